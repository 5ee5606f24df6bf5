// The real Prometheus server (Debian's /usr/bin/prometheus) on a free port with a temporary storage folder, scraping the
// targets of a file_sd file that the test rewrites as instances come and go; queried through its HTTP API.
using System.Diagnostics;
using System.Globalization;
using System.Net.Http.Json;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace DeepSeekCluster.Observability.Tests;

/// <summary>A scrape target: its address (host:port) and the labels the dashboards group by (service, pod).</summary>
public sealed record ScrapeTarget(string Address, string Service, string Pod);

/// <summary>The outcome of one query: an error (did not parse or evaluate) or its series.</summary>
public sealed record QueryResult(string? Error, JsonArray Series);

public sealed class PrometheusServer : IAsyncDisposable
{
    public const string Binary = "/usr/bin/prometheus";
    /// <summary>Short, so a test run of a few minutes gives every rate window several samples.</summary>
    public static readonly TimeSpan ScrapeInterval = TimeSpan.FromSeconds(1);

    readonly Process process;
    readonly string folder;
    readonly StringBuilder log = new();
    readonly HttpClient http;

    public string Url { get; }
    public string TargetsFile { get; }
    public DateTimeOffset StartedAt { get; } = DateTimeOffset.UtcNow;
    public string Log { get { lock (log) return log.ToString(); } }

    PrometheusServer(Process process, string folder, string url, string targetsFile)
    {
        this.process = process;
        this.folder = folder;
        Url = url;
        TargetsFile = targetsFile;
        http = new HttpClient { BaseAddress = new Uri(url), Timeout = TimeSpan.FromSeconds(30) };
    }

    public static async Task<PrometheusServer> StartAsync(IReadOnlyList<ScrapeTarget> targets)
    {
        if (!File.Exists(Binary)) throw new InvalidOperationException($"{Binary} is missing: install Debian's 'prometheus' package (CI's .ci/run does)");
        var folder = Directory.CreateTempSubdirectory("prometheus-").FullName;
        var targetsFile = Path.Combine(folder, "targets.json");
        WriteTargets(targetsFile, targets);
        var config = Path.Combine(folder, "prometheus.yml");
        // file_sd: Prometheus watches the file, so a worker that joins later is scraped without a restart.
        File.WriteAllText(config, $"""
            global:
              scrape_interval: {ScrapeInterval.TotalSeconds}s
              scrape_timeout: {ScrapeInterval.TotalSeconds}s
              evaluation_interval: {ScrapeInterval.TotalSeconds}s
            scrape_configs:
              - job_name: deepseek
                metrics_path: /metrics
                file_sd_configs:
                  - files: ['{targetsFile}']
                    refresh_interval: 1s
            """);
        int port = FreePort();
        var psi = new ProcessStartInfo(Binary) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (var a in new[] { $"--config.file={config}", $"--storage.tsdb.path={Path.Combine(folder, "data")}",
                                  $"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1d" })
            psi.ArgumentList.Add(a);
        var p = Process.Start(psi) ?? throw new InvalidOperationException($"cannot start {Binary}");
        var server = new PrometheusServer(p, folder, $"http://127.0.0.1:{port}", targetsFile);
        p.OutputDataReceived += (_, e) => { if (e.Data is not null) lock (server.log) server.log.AppendLine(e.Data); };
        p.ErrorDataReceived += (_, e) => { if (e.Data is not null) lock (server.log) server.log.AppendLine(e.Data); };
        p.BeginOutputReadLine();
        p.BeginErrorReadLine();
        await Poll.UntilAsync(async () =>
        {
            if (p.HasExited) throw new InvalidOperationException($"prometheus exited with code {p.ExitCode}:\n{server.Log}");
            try { return (await server.http.GetAsync("/-/ready")).IsSuccessStatusCode; }
            catch (HttpRequestException) { return false; }
        }, TimeSpan.FromSeconds(60), () => "prometheus did not become ready:\n" + server.Log);
        return server;
    }

    public void SetTargets(IReadOnlyList<ScrapeTarget> targets) => WriteTargets(TargetsFile, targets);

    static void WriteTargets(string file, IReadOnlyList<ScrapeTarget> targets)
    {
        var groups = new JsonArray(targets.Select(t => (JsonNode)new JsonObject
        {
            ["targets"] = new JsonArray(t.Address),
            ["labels"] = new JsonObject { ["service"] = t.Service, ["pod"] = t.Pod },
        }).ToArray());
        File.WriteAllText(file + ".tmp", groups.ToJsonString());
        File.Move(file + ".tmp", file, overwrite: true);
    }

    /// <summary>The active targets: (scrapeUrl, health, lastError).</summary>
    public async Task<List<(string Url, string Health, string Error, string Pod)>> TargetsAsync()
    {
        var doc = await http.GetFromJsonAsync<JsonObject>("/api/v1/targets?state=active");
        return doc!["data"]!["activeTargets"]!.AsArray().Select(t => (
            t!["scrapeUrl"]!.GetValue<string>(), t["health"]!.GetValue<string>(), t["lastError"]?.GetValue<string>() ?? "",
            t["labels"]?["pod"]?.GetValue<string>() ?? "")).ToList();
    }

    /// <summary>An instant query at <paramref name="at"/>.</summary>
    public Task<QueryResult> QueryAsync(string expr, DateTimeOffset at) =>
        SendAsync("/api/v1/query", new() { ["query"] = expr, ["time"] = Unix(at) });

    /// <summary>A range query, as a Grafana time-series or stat panel issues it.</summary>
    public Task<QueryResult> QueryRangeAsync(string expr, DateTimeOffset start, DateTimeOffset end, TimeSpan step) =>
        SendAsync("/api/v1/query_range", new() { ["query"] = expr, ["start"] = Unix(start), ["end"] = Unix(end), ["step"] = step.TotalSeconds.ToString(CultureInfo.InvariantCulture) });

    /// <summary>Values of one label on the series a selector matches (Grafana's label_values(selector, label)).</summary>
    public async Task<List<string>> LabelValuesAsync(string label, string selector, DateTimeOffset start, DateTimeOffset end)
    {
        var url = $"/api/v1/label/{Uri.EscapeDataString(label)}/values?match[]={Uri.EscapeDataString(selector)}&start={Unix(start)}&end={Unix(end)}";
        var doc = await http.GetFromJsonAsync<JsonObject>(url);
        return doc!["data"]!.AsArray().Select(v => v!.GetValue<string>()).ToList();
    }

    async Task<QueryResult> SendAsync(string path, Dictionary<string, string> form)
    {
        using var response = await http.PostAsync(path, new FormUrlEncodedContent(form));
        var body = JsonNode.Parse(await response.Content.ReadAsStringAsync())!.AsObject();
        if (body["status"]?.GetValue<string>() != "success")
            return new QueryResult($"{body["errorType"]}: {body["error"]}", []);
        var result = body["data"]!["result"];
        return new QueryResult(null, result is JsonArray a ? a : new JsonArray(result!.DeepClone()));
    }

    static string Unix(DateTimeOffset t) => (t.ToUnixTimeMilliseconds() / 1000.0).ToString("F3", CultureInfo.InvariantCulture);

    static int FreePort()
    {
        using var l = new System.Net.Sockets.TcpListener(System.Net.IPAddress.Loopback, 0);
        l.Start();
        return ((System.Net.IPEndPoint)l.LocalEndpoint).Port;
    }

    public async ValueTask DisposeAsync()
    {
        http.Dispose();
        if (!process.HasExited)
        {
            process.Kill(entireProcessTree: true);
            await process.WaitForExitAsync();
        }
        process.Dispose();
        try { Directory.Delete(folder, recursive: true); } catch (IOException) { }
    }
}
