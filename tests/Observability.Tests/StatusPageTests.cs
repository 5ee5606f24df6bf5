// The Coordinator's status page in headless Chromium against the running cluster: it loads from the Coordinator alone,
// its charts, tables and event log show what the REST API reports for the real job, and a screenshot is kept.
using System.Buffers.Binary;
using System.Text.Json.Nodes;
using Xunit.Abstractions;

namespace DeepSeekCluster.Observability.Tests;

[Collection(ClusterCollection.Name)]
public class StatusPageTests(RunningCluster cluster, ITestOutputHelper log)
{
    const int Width = 1280, Height = 2600; // tall enough for the whole page (evaluations and studies included): a scrollbar would narrow the screenshot

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
            studyShown: !document.getElementById('studies').hidden, studyTitle: document.getElementById('study-title').textContent,
            studySummary: document.getElementById('study-summary').textContent,
            trials: [...document.querySelectorAll('#trials tbody tr')].map(r => ({ job: r.children[0].textContent, state: r.children[1].textContent })),
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
        // The training job by name: the cluster also holds a stopped study trial, which is newer.
        await browser.NavigateAsync(cluster.CoordinatorUrl + "/status?job=" + Uri.EscapeDataString(cluster.JobId));
        JsonObject page = new();
        await Poll.UntilAsync(async () =>
        {
            // Right after navigation the document may not be parsed yet (the page's elements are missing): not ready.
            if ((await browser.EvaluateAsync("document.readyState === 'complete' && document.getElementById('updated') !== null"))?.GetValue<bool>() != true)
                return false;
            page = JsonNode.Parse((await browser.EvaluateAsync(ReadPage))?.GetValue<string>() ?? "{}")!.AsObject();
            return page["loss"]?.GetValue<int>() == lossPoints && page["workers"]!.AsArray().Count == workers.Count && page["events"]!.AsArray().Count > 0
                && page["trials"]!.AsArray().Count > 0;
        }, TimeSpan.FromSeconds(90), () => "the page did not show the job's data: " + page.ToJsonString() + "\n" + browser.Log, TimeSpan.FromMilliseconds(500));
        log.WriteLine(page.ToJsonString());

        Assert.Null(page["error"]);
        Assert.Empty(page["foreign"]!.AsArray()); // every asset comes from the Coordinator itself
        // The cluster's study (created and stopped by the fixture): its trials by state, as GET /studies/{id} reports them.
        var study = JsonNode.Parse(await cluster.Coordinator.GetStringAsync("/studies/observability-study"))!;
        Assert.True(page["studyShown"]!.GetValue<bool>(), "the study view is hidden");
        Assert.Equal($"Study observability-study ({study["state"]!.GetValue<string>()})", page["studyTitle"]!.GetValue<string>());
        var trials = study["trials"]!.AsArray();
        Assert.Equal(trials.Select(t => (t!["jobId"]!.GetValue<string>(), t["state"]!.GetValue<string>())),
                     page["trials"]!.AsArray().Select(t => (t!["job"]!.GetValue<string>(), t["state"]!.GetValue<string>())));
        foreach (var byState in trials.GroupBy(t => t!["state"]!.GetValue<string>()))
            Assert.Contains($"{byState.Count()} {byState.Key}", page["studySummary"]!.GetValue<string>());
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
        // Checkpoints: every committed step, including the last, as committed, and those retention (keepLast 3 by default)
        // deleted from the store as deleted.
        HashSet<long> Api(bool deleted) => job["committed"]!.AsArray().Where(c => (c!["deletedAt"] is not null) == deleted).Select(c => c!["step"]!.GetValue<long>()).ToHashSet();
        HashSet<long> Shown(string state) => page["checkpoints"]!.AsArray().Where(c => c!["state"]!.GetValue<string>() == state).Select(c => c!["step"]!.GetValue<long>()).ToHashSet();
        Assert.Contains((long)RunningCluster.Steps, Api(deleted: false));
        Assert.Equal(Api(deleted: false), Shown("committed"));
        Assert.Equal(Api(deleted: true), Shown("deleted (keepLast)"));
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

    /// <summary>
    /// The fields other parts of the cluster are adding to the job status (event details, data consumption, validation
    /// history, expert load): rendered by the page's own renderJob from a status object of that shape, in one evaluation,
    /// so the 2-second poll cannot interleave.
    /// </summary>
    [Fact]
    public async Task TheStatusFieldsBeingAddedRenderWhenPresent()
    {
        await using var browser = await Chromium.StartAsync(Width, Height);
        // The training job by name: the cluster also holds a stopped study trial, which is newer.
        await browser.NavigateAsync(cluster.CoordinatorUrl + "/status?job=" + Uri.EscapeDataString(cluster.JobId));
        await Poll.UntilAsync(async () => (await browser.EvaluateAsync("typeof renderJob === 'function' && document.readyState === 'complete'"))?.GetValue<bool>() == true,
            TimeSpan.FromSeconds(60), () => "the page's script did not load:\n" + browser.Log);
        var shown = JsonNode.Parse((await browser.EvaluateAsync("""
            JSON.stringify((() => {
              renderJob({
                jobId: 'contract', state: 'running', generation: 3, step: 12, spec: { steps: 20 },
                loss: [{ step: 1, loss: 5, tokensPerSecond: 100 }, { step: 2, loss: 4, tokensPerSecond: 120 }],
                validationLoss: [{ step: 4, loss: 5.5 }, { step: 8, loss: 4.5 }, { step: 12, loss: 4.4 }],
                expertLoad: { step: 12, layers: [1, 2], experts: 4, fractions: [[0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]] },
                consumption: { samples: 160, ranges: [[0, 160]], complete: false },
                events: [
                  { at: '2026-01-01T00:00:00Z', generation: 2, message: 'worker w1 failed', kind: 'failed', workerId: 'w1', reason: 'heartbeat timeout' },
                  { at: '2026-01-01T00:00:05Z', generation: 3, message: 'recovered', kind: 'recovered', resumeSource: 'checkpoint', stepsRedone: 2, recoverySeconds: 4.5 }],
                committed: [{ step: 4, generation: 1, files: 2, bytes: 2000000, deletedAt: '2026-01-01T00:00:06Z' }, { step: 8, generation: 2, files: 2, bytes: 2000000 }],
                checkpoints: [{ step: 12, generation: 3, world: 2, files: [{}], complete: false }],
              });
              const heat = document.getElementById('heatmap');
              return {
                validation: +document.getElementById('validation-chart').getAttribute('data-points'),
                cells: +heat.getAttribute('data-cells'), shades: [...heat.querySelectorAll('rect.cell')].map(r => r.getAttribute('fill')),
                caption: heat.querySelector('.caption')?.textContent || '',
                // Every label and the caption drawn inside the heatmap's box: none cut off at its edge.
                clipped: [...heat.querySelectorAll('svg text, .caption')].filter(t => {
                  const r = t.getBoundingClientRect(), box = heat.getBoundingClientRect(), svg = heat.querySelector('svg').getBoundingClientRect();
                  const inner = t.closest('svg') ? svg : box;
                  return r.left < inner.left - 0.5 || r.right > inner.right + 0.5 || r.top < inner.top - 0.5 || r.bottom > inner.bottom + 0.5;
                }).map(t => t.textContent),
                events: [...document.querySelectorAll('#events li')].map(li => ({ kind: li.dataset.kind, text: li.textContent })),
                consumption: document.getElementById('consumption').textContent,
                checkpoints: [...document.querySelectorAll('#checkpoints tbody tr')].map(r => r.textContent),
              };
            })())
            """))!.GetValue<string>())!.AsObject();
        log.WriteLine(shown.ToJsonString());
        Assert.Equal(3, shown["validation"]!.GetValue<int>());
        Assert.Equal(8, shown["cells"]!.GetValue<int>());
        Assert.Equal("step 12: layers (rows) by experts 0…3 (columns); darker: more tokens; balanced = 25.0% each", shown["caption"]!.GetValue<string>());
        Assert.Empty(shown["clipped"]!.AsArray());
        // Balanced experts (1/4) are drawn lighter than the one taking 70% of its layer.
        var shades = shown["shades"]!.AsArray().Select(f => double.Parse(f!.GetValue<string>().Split(',')[3].TrimEnd(')'), System.Globalization.CultureInfo.InvariantCulture)).ToList();
        Assert.True(shades[4] > shades[0] && shades[0] > shades[5], string.Join(", ", shades));
        var events = shown["events"]!.AsArray();
        Assert.Equal(["recovered", "failed"], events.Select(e => e!["kind"]!.GetValue<string>())); // newest first
        var recovered = events[0]!["text"]!.GetValue<string>();
        Assert.Contains("resumed from checkpoint", recovered);
        Assert.Contains("2 steps redone", recovered);
        Assert.Contains("recovered in 4.5 s", recovered);
        Assert.Contains("worker w1", events[1]!["text"]!.GetValue<string>());
        Assert.Contains("heartbeat timeout", events[1]!["text"]!.GetValue<string>());
        Assert.Equal("data consumed: 160 samples in 1 ranges", shown["consumption"]!.GetValue<string>());
        Assert.Equal(3, shown["checkpoints"]!.AsArray().Count);
        // Committed steps newest first (8, then 4, which retention deleted), then the step still being reported.
        Assert.Contains("committed", shown["checkpoints"]![0]!.GetValue<string>());
        Assert.Contains("deleted (keepLast)", shown["checkpoints"]![1]!.GetValue<string>());
        Assert.Contains("1/2 ranks", shown["checkpoints"]![2]!.GetValue<string>());
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
