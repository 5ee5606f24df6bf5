// The Coordinator's status page in headless Chromium against the running cluster: it loads from the Coordinator alone,
// its charts, tables and event log show what the REST API reports for the real job, and a screenshot is kept.
using System.Buffers.Binary;
using System.Text.Json.Nodes;
using Xunit.Abstractions;

namespace DeepSeekCluster.Observability.Tests;

[Collection(ClusterCollection.Name)]
public class StatusPageTests(RunningCluster cluster, ITestOutputHelper log)
{
    const int Width = 1280, Height = 1700;

    /// <summary>What the page shows, read from its DOM in one evaluation.</summary>
    const string ReadPage = """
        JSON.stringify((() => {
          const points = id => +(document.getElementById(id).getAttribute('data-points') || 0);
          const heat = document.getElementById('heatmap');
          return {
            error: document.getElementById('updated').getAttribute('data-error'),
            jobs: [...document.querySelectorAll('#jobs tbody tr[data-job]')].map(r => ({ id: r.dataset.job, state: r.children[1].textContent, generation: r.children[2].textContent })),
            state: document.getElementById('job-summary').getAttribute('data-state'),
            loss: points('loss-chart'), tps: points('tps-chart'), validation: points('validation-chart'),
            lossPath: document.querySelector('#loss-chart path.series')?.getAttribute('d') || '',
            tpsPath: document.querySelector('#tps-chart path.series')?.getAttribute('d') || '',
            validationText: document.getElementById('validation-chart').textContent,
            heatmapCells: +(heat.getAttribute('data-cells') || 0), heatmapText: heat.textContent,
            workers: [...document.querySelectorAll('#workers tbody tr[data-worker]')].map(r => ({ id: r.dataset.worker, health: r.children[1].textContent })),
            checkpoints: [...document.querySelectorAll('#checkpoints tbody tr[data-step]')].map(r => ({ step: +r.dataset.step, state: r.children[2].textContent })),
            events: [...document.querySelectorAll('#events li')].map(li => li.textContent),
            foreign: [...document.querySelectorAll('script[src], link[href], img[src]')].map(e => new URL(e.src || e.href, location.href)).filter(u => u.origin !== location.origin).map(u => u.href),
          };
        })())
        """;

    [Fact]
    public async Task TheStatusPageShowsTheRunningJobWithChartsWorkersCheckpointsAndEvents()
    {
        // The REST API's view, read independently of the page. The job has completed, so it no longer changes.
        var job = (await cluster.JobAsync())!;
        var workers = JsonNode.Parse(await cluster.Coordinator.GetStringAsync("/workers"))!.AsArray();
        int lossPoints = job["loss"]!.AsArray().Count;
        Assert.True(lossPoints >= 5, $"the job reported only {lossPoints} loss points");

        await using var browser = await Chromium.StartAsync(Width, Height);
        await browser.NavigateAsync(cluster.CoordinatorUrl + "/status");
        JsonObject page = new();
        await Poll.UntilAsync(async () =>
        {
            page = JsonNode.Parse((await browser.EvaluateAsync(ReadPage))?.GetValue<string>() ?? "{}")!.AsObject();
            return page["loss"]?.GetValue<int>() == lossPoints && page["workers"]!.AsArray().Count == workers.Count && page["events"]!.AsArray().Count > 0;
        }, TimeSpan.FromSeconds(90), () => "the page did not show the job's data: " + page.ToJsonString() + "\n" + browser.Log, TimeSpan.FromMilliseconds(500));
        log.WriteLine(page.ToJsonString());

        Assert.Null(page["error"]);
        Assert.Empty(page["foreign"]!.AsArray()); // every asset comes from the Coordinator itself
        // Jobs table and summary: the job, its state and generation as the API reports them.
        var row = Assert.Single(page["jobs"]!.AsArray(), r => r!["id"]!.GetValue<string>() == cluster.JobId)!;
        Assert.Equal(job["state"]!.GetValue<string>(), row["state"]!.GetValue<string>());
        Assert.Equal(job["generation"]!.GetValue<long>().ToString(), row["generation"]!.GetValue<string>());
        Assert.Equal("completed", page["state"]!.GetValue<string>());
        Assert.True(job["generation"]!.GetValue<long>() >= 2, "the worker that left should have re-formed the job");
        // Loss and tokens-per-second charts: one path vertex per reported step.
        Assert.Equal(lossPoints, page["lossPath"]!.GetValue<string>().Count(c => c is 'M' or 'L'));
        Assert.Equal(lossPoints, page["tps"]!.GetValue<int>());
        Assert.Equal(lossPoints, page["tpsPath"]!.GetValue<string>().Count(c => c is 'M' or 'L'));
        // Validation loss and expert load when the status carries them; otherwise the page says there is none yet.
        var validation = (job["validationLoss"] ?? job["validation"])?.AsArray();
        if (validation is { Count: > 0 }) Assert.Equal(validation.Count, page["validation"]!.GetValue<int>());
        else Assert.Contains("no validation run yet", page["validationText"]!.GetValue<string>());
        if (job["expertLoad"]?["fractions"] is JsonArray fractions && fractions.Count > 0)
            Assert.Equal(fractions.Sum(r => r!.AsArray().Count), page["heatmapCells"]!.GetValue<int>());
        else Assert.Contains("no routing data yet", page["heatmapText"]!.GetValue<string>());
        // Workers and their health: every worker the coordinator knows, the one that left no longer online.
        foreach (var w in workers)
        {
            var shown = Assert.Single(page["workers"]!.AsArray(), r => r!["id"]!.GetValue<string>() == w!["workerId"]!.GetValue<string>())!;
            Assert.Equal(w!["online"]!.GetValue<bool>(), shown["health"]!.GetValue<string>() != "offline");
        }
        Assert.Contains(page["workers"]!.AsArray(), r => r!["health"]!.GetValue<string>() == "online");
        // Checkpoints: every committed step, including the last.
        var committed = job["committed"]!.AsArray().Select(c => c!["step"]!.GetValue<long>()).ToHashSet();
        Assert.Contains((long)RunningCluster.Steps, committed);
        Assert.Superset(committed, page["checkpoints"]!.AsArray().Where(c => c!["state"]!.GetValue<string>() == "committed").Select(c => c!["step"]!.GetValue<long>()).ToHashSet());
        // Event log: every event of the job, the worker leaving among them.
        var events = page["events"]!.AsArray().Select(e => e!.GetValue<string>()).ToList();
        Assert.Equal(job["events"]!.AsArray().Count, events.Count);
        foreach (var e in job["events"]!.AsArray()) Assert.Contains(events, shown => shown.Contains(e!["message"]!.GetValue<string>()));
        Assert.Contains(events, e => e.Contains("left"));

        var png = await browser.ScreenshotAsync();
        var artifact = Path.Combine(AppContext.BaseDirectory, "TestResults", "status-page.png");
        Directory.CreateDirectory(Path.GetDirectoryName(artifact)!);
        await File.WriteAllBytesAsync(artifact, png);
        log.WriteLine($"screenshot: {artifact} ({png.Length} bytes)");
        Console.WriteLine($"status page screenshot: {artifact}");
        // A PNG of the page's size, with enough content not to be a blank page.
        Assert.Equal(new byte[] { 0x89, (byte)'P', (byte)'N', (byte)'G', 0x0D, 0x0A, 0x1A, 0x0A }, png[..8]);
        Assert.Equal("IHDR", System.Text.Encoding.ASCII.GetString(png, 12, 4));
        Assert.Equal(Width, BinaryPrimitives.ReadInt32BigEndian(png.AsSpan(16)));
        Assert.True(BinaryPrimitives.ReadInt32BigEndian(png.AsSpan(20)) >= Height / 2);
        Assert.True(png.Length > 30_000, $"the screenshot is only {png.Length} bytes: a blank page?");
    }

    [Fact]
    public async Task TheStatusPageAndItsAssetsAreServedWithoutAToken()
    {
        foreach (var (path, type) in new[] { ("/", "text/html"), ("/status", "text/html"), ("/status.js", "text/javascript"), ("/status.css", "text/css") })
        {
            using var response = await cluster.Coordinator.GetAsync(path);
            Assert.True(response.IsSuccessStatusCode, $"GET {path}: {(int)response.StatusCode}");
            Assert.Equal(type, response.Content.Headers.ContentType?.MediaType);
        }
        using var missing = await cluster.Coordinator.GetAsync("/status.txt");
        Assert.Equal(System.Net.HttpStatusCode.NotFound, missing.StatusCode);
    }
}
