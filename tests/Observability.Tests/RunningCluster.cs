// One real cluster for every test of this project: the AppHost (coordinator, data-shards, checkpoints, workers as real
// processes) runs a small job and stays up after it; Prometheus scrapes every instance from the start. The run is made
// to produce the events the dashboards and the status page show: checkpoint commits, a worker leaving a running job
// (a rescale to a new generation that resumes from the survivor's live state), the survivor leaving too and a new worker
// joining (a generation that resumes by loading the last committed checkpoint), refused requests without or with a wrong
// token, and the end-of-run evaluation.
using System.Diagnostics;
using System.Net;
using System.Net.Http.Headers;
using System.Reflection;
using System.Text;
using System.Text.Json.Nodes;

namespace DeepSeekCluster.Observability.Tests;

[CollectionDefinition(Name)]
public sealed class ClusterCollection : ICollectionFixture<RunningCluster>
{
    public const string Name = "running cluster";
}

public sealed class RunningCluster : IAsyncLifetime
{
    /// <summary>Enough steps that the job is still running after two re-formations (a step takes well under a second here).</summary>
    public const int Steps = 40;
    public const int CheckpointInterval = 4;

    static readonly string AppHostDll = typeof(RunningCluster).Assembly.GetCustomAttributes<AssemblyMetadataAttribute>().Single(a => a.Key == "AppHostDll").Value!;

    readonly StringBuilder output = new();
    Process? appHost;

    public string RunDir { get; } = Directory.CreateTempSubdirectory("observability-").FullName;
    public HttpClient Coordinator { get; private set; } = null!;
    public string CoordinatorUrl { get; private set; } = "";
    public string JobId { get; private set; } = "";
    public PrometheusServer Prometheus { get; private set; } = null!;
    public string Output { get { lock (output) return output.ToString(); } }

    ClusterTestLock? clusterLock;

    public async Task InitializeAsync()
    {
        clusterLock = await ClusterTestLock.AcquireAsync("observability cluster");
        var psi = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true, RedirectStandardInput = true };
        // --eval-limit: the dashboards' evaluation panels need scores at the checkpoints, and the default (auto) scores no
        // task in a run this short; five examples of each give them in seconds.
        foreach (var a in new[] { AppHostDll, "--device", "cpu", "--workers", "2", "--steps", $"{Steps}", "--seq-len", "64", "--vocab-size", "512",
                                  "--global-batch", "8", "--micro-batch", "4", "--checkpoint-interval", $"{CheckpointInterval}", "--eval-limit", "5",
                                  "--run-dir", RunDir })
            psi.ArgumentList.Add(a);
        psi.Environment["NO_COLOR"] = "1";
        appHost = Process.Start(psi)!;
        appHost.OutputDataReceived += (_, e) => { if (e.Data is not null) lock (output) output.AppendLine(e.Data); };
        appHost.ErrorDataReceived += (_, e) => { if (e.Data is not null) lock (output) output.AppendLine(e.Data); };
        appHost.BeginOutputReadLine();
        appHost.BeginErrorReadLine();
        try { await StartAsync(); }
        catch (Exception e)
        {
            throw new InvalidOperationException($"the cluster did not get where the tests need it: {e.Message}\n---- AppHost output ----\n{Tail(Output)}", e);
        }
    }

    async Task StartAsync()
    {
        // Every instance announced: the three services and both workers with the ports they bound.
        await Poll.UntilAsync(() => Targets().Count(t => t.Service == "gpu-worker") == 2 && Targets().Count == 5, TimeSpan.FromMinutes(5), AppHostState);
        CoordinatorUrl = Endpoints().Single(i => i!["instance"]!.GetValue<string>() == "coordinator")!["endpoints"]!["http"]!.GetValue<string>();
        Coordinator = new HttpClient { BaseAddress = new Uri(CoordinatorUrl), Timeout = TimeSpan.FromSeconds(30) };
        Prometheus = await PrometheusServer.StartAsync(Targets());

        // The job trains on two workers past its first commit; then one leaves (SIGTERM) and the job re-forms on the other.
        await Poll.UntilAsync(async () => await JobAsync() is { } j && j["step"]!.GetValue<long>() > CheckpointInterval
                                          && j["committed"]!.AsArray().Count > 0, TimeSpan.FromMinutes(8), AppHostState, TimeSpan.FromSeconds(1));
        await appHost!.StandardInput.WriteLineAsync("remove");
        await appHost.StandardInput.FlushAsync();
        await Poll.UntilAsync(() => Targets().Count(t => t.Service == "gpu-worker") == 1, TimeSpan.FromMinutes(2), AppHostState);
        Prometheus.SetTargets(Targets());

        // Refused writes: one without a token, one with a wrong one (deepseek_coordinator_auth_refusals_total).
        foreach (var token in new string?[] { null, "not-the-token" })
        {
            using var request = new HttpRequestMessage(HttpMethod.Post, "/jobs") { Content = new StringContent("{}", Encoding.UTF8, "application/json") };
            if (token is not null) request.Headers.Authorization = new AuthenticationHeaderValue("Bearer", token);
            using var response = await Coordinator.SendAsync(request);
            if (response.StatusCode != HttpStatusCode.Unauthorized) throw new InvalidOperationException($"POST /jobs with token '{token}' answered {(int)response.StatusCode}, expected 401");
        }

        // The survivor resumed from its live state and trained a step (the recovery is over). Then it leaves too: the job
        // waits with no worker, and the worker that joins next has no state, so its generation loads the committed checkpoint.
        await Poll.UntilAsync(async () => await JobAsync() is { } j && j["events"]!.AsArray().Any(e => e!["kind"]?.GetValue<string>() == "recovered"),
            TimeSpan.FromMinutes(3), AppHostState, TimeSpan.FromSeconds(1));
        if (await JobAsync() is { } running && running["state"]!.GetValue<string>() != "running")
            throw new InvalidOperationException($"the job should still be running before its last worker leaves; it is {running["state"]} at step {running["step"]} of {Steps}");
        await appHost.StandardInput.WriteLineAsync("remove");
        await appHost.StandardInput.FlushAsync();
        await Poll.UntilAsync(async () => Targets().All(t => t.Service != "gpu-worker") && await JobAsync() is { } j && j["workers"]!.AsArray().Count == 0,
            TimeSpan.FromMinutes(2), AppHostState);
        await appHost.StandardInput.WriteLineAsync("add");
        await appHost.StandardInput.FlushAsync();
        await Poll.UntilAsync(() => Targets().Count(t => t.Service == "gpu-worker") == 1, TimeSpan.FromMinutes(3), AppHostState);
        Prometheus.SetTargets(Targets());
        await Poll.UntilAsync(async () => await JobAsync() is { } j && j["events"]!.AsArray().Any(e => e!["resumeSource"]?.GetValue<string>() == "checkpoint"),
            TimeSpan.FromMinutes(3), AppHostState, TimeSpan.FromSeconds(1));

        // The job runs to completion on the new worker and its last checkpoint commits.
        await Poll.UntilAsync(async () => await JobAsync() is { } j && j["state"]!.GetValue<string>() == "completed"
                                          && j["committed"]!.AsArray().Any(c => c!["step"]!.GetValue<long>() == Steps), TimeSpan.FromMinutes(10), AppHostState, TimeSpan.FromSeconds(1));
        // After the job, the AppHost serves its model (docs/serving.md): the model server joins the scraped instances.
        await Poll.UntilAsync(() => Targets().Any(t => t.Service == "model-server"), TimeSpan.FromMinutes(4), AppHostState);
        Prometheus.SetTargets(Targets());
        // Every instance scraped successfully at least once.
        await Poll.UntilAsync(async () => (await Prometheus.TargetsAsync()) is var t && t.Count == Targets().Count && t.All(x => x.Health == "up"),
            TimeSpan.FromMinutes(1), () => "not every target is up:\n" + string.Join("\n", Prometheus.TargetsAsync().Result.Select(t => $"{t.Url} {t.Health} {t.Error}")));
        // Rank 0 evaluates after the last checkpoint is saved: the run is over when Prometheus has scraped that value.
        await Poll.UntilAsync(async () => (await Prometheus.QueryAsync("deepseek_train_validation_loss", DateTimeOffset.UtcNow)).Series.Count > 0,
            TimeSpan.FromMinutes(3), AppHostState, TimeSpan.FromSeconds(1));
        await ServeTrafficAsync();
    }

    /// <summary>
    /// Requests to the model server (plain, streamed, and one without a key) in two rounds: the first creates the serving
    /// series, the second, once Prometheus holds them, makes their rates non-zero, as live traffic would.
    /// </summary>
    async Task ServeTrafficAsync()
    {
        var url = Endpoints().Single(i => i!["resource"]!.GetValue<string>() == "model-server")!["endpoints"]!["http"]!.GetValue<string>();
        using var server = new HttpClient { BaseAddress = new Uri(url), Timeout = TimeSpan.FromMinutes(2) };
        var token = File.ReadAllText(Path.Combine(RunDir, "cluster.token")).Trim();
        async Task RoundAsync()
        {
            foreach (bool stream in new[] { false, true })
            {
                using var request = new HttpRequestMessage(HttpMethod.Post, "/v1/completions")
                {
                    Content = new StringContent($$"""{"model": "default", "prompt": "In the beginning", "max_tokens": 8, "temperature": 0, "stream": {{(stream ? "true" : "false")}}}""", Encoding.UTF8, "application/json"),
                };
                request.Headers.Authorization = new AuthenticationHeaderValue("Bearer", token);
                using var response = await server.SendAsync(request);
                var body = await response.Content.ReadAsStringAsync();
                if (!response.IsSuccessStatusCode) throw new InvalidOperationException($"POST /v1/completions (stream {stream}) answered {(int)response.StatusCode}: {body}");
            }
            using var anonymous = await server.PostAsync("/v1/completions", new StringContent("""{"model": "default", "prompt": "x"}""", Encoding.UTF8, "application/json"));
            if (anonymous.StatusCode != HttpStatusCode.Unauthorized) throw new InvalidOperationException($"a completion without a key answered {(int)anonymous.StatusCode}, expected 401");
        }
        await RoundAsync();
        await Poll.UntilAsync(async () => (await Prometheus.QueryAsync("deepseek_serving_output_tokens_total", DateTimeOffset.UtcNow)).Series.Count > 0,
            TimeSpan.FromMinutes(1), AppHostState, TimeSpan.FromSeconds(1));
        // Rounds until the latency panels' own form (a quantile of a short-window rate) has a value: a histogram's rate
        // needs two scrapes around a change in the same few seconds, which a busy engine can delay.
        var latency = new[] { "deepseek_serving_time_to_first_token_seconds_bucket", "deepseek_serving_time_per_output_token_seconds_bucket" }
            .Select(h => $"histogram_quantile(0.5, sum by (le) (rate({h}[{4 * PrometheusServer.ScrapeInterval.TotalSeconds:F0}s])))").ToList();
        await Poll.UntilAsync(async () =>
        {
            await RoundAsync();
            foreach (var q in latency)
                if (!DashboardQueryTests.HasFiniteSample((await Prometheus.QueryAsync(q, DateTimeOffset.UtcNow)).Series)) return false;
            return true;
        }, TimeSpan.FromMinutes(2), () => $"the serving latency quantiles stayed empty: {string.Join("; ", latency)}", TimeSpan.FromMilliseconds(200));
        await StudyAsync(token);
    }

    /// <summary>
    /// A study (docs/studies.md) created and stopped at once: its trials are reported by state on /metrics
    /// (deepseek_cluster_study_trials), as the cluster dashboard shows them. Its trial asks for more workers than the
    /// cluster has, so it never forms and takes no worker from the tests that look at the training job.
    /// </summary>
    async Task StudyAsync(string token)
    {
        var dataset = (await JobAsync())!["spec"]!["dataset"]!.GetValue<string>();
        string body = $$$"""
            {"name": "observability-study", "job": {"modelPreset": "tiny", "dataset": "{{{dataset}}}", "globalBatch": 32, "microBatch": 4, "seqLen": 64, "steps": 20,
              "schedule": {"kind": "cosine", "peakLr": 0.003, "minLr": 0, "warmupSteps": 2}, "checkpointInterval": 0, "minWorkers": 8, "maxWorkers": 8},
             "space": [{"path": "schedule.peakLr", "kind": "logUniform", "low": 0.0001, "high": 0.01}],
             "metric": "validationLoss", "mode": "min", "budget": {"trials": 2}, "concurrency": 1,
             "sampler": {"kind": "random", "seed": 1}, "scheduler": {"kind": "asha", "gracePeriod": 5, "reductionFactor": 3}}
            """;
        foreach (var (path, content) in new[] { ("/studies", body), ("/studies/observability-study/stop", "") })
        {
            using var request = new HttpRequestMessage(HttpMethod.Post, path) { Content = new StringContent(content, Encoding.UTF8, "application/json") };
            request.Headers.Authorization = new AuthenticationHeaderValue("Bearer", token);
            using var response = await Coordinator.SendAsync(request);
            if (!response.IsSuccessStatusCode) throw new InvalidOperationException($"POST {path} answered {(int)response.StatusCode}: {await response.Content.ReadAsStringAsync()}");
        }
        await Poll.UntilAsync(async () => (await Prometheus.QueryAsync("deepseek_cluster_study_trials", DateTimeOffset.UtcNow)).Series.Count > 0,
            TimeSpan.FromMinutes(1), AppHostState, TimeSpan.FromSeconds(1));
    }

    /// <summary>The job the AppHost submitted, as GET /jobs/{id} shows it (null before it exists).</summary>
    public async Task<JsonObject?> JobAsync()
    {
        if (JobId.Length == 0)
        {
            var jobs = JsonNode.Parse(await Coordinator.GetStringAsync("/jobs"))!.AsArray();
            if (jobs.Count == 0) return null;
            JobId = jobs[0]!["jobId"]!.GetValue<string>();
        }
        return JsonNode.Parse(await Coordinator.GetStringAsync($"/jobs/{JobId}"))!.AsObject();
    }

    JsonArray Endpoints()
    {
        var file = Path.Combine(RunDir, "endpoints.json");
        if (!File.Exists(file)) return [];
        return JsonNode.Parse(File.ReadAllText(file))!["instances"]!.AsArray();
    }

    /// <summary>Every instance's http endpoint (where /metrics is) from the AppHost's endpoints.json.</summary>
    public List<ScrapeTarget> Targets() =>
        Endpoints().Where(i => i!["endpoints"]!["http"] is not null)
            .Select(i => new ScrapeTarget(new Uri(i!["endpoints"]!["http"]!.GetValue<string>()).Authority, i["resource"]!.GetValue<string>(), i["instance"]!.GetValue<string>()))
            .ToList();

    string AppHostState() => appHost!.HasExited ? $"the AppHost exited with code {appHost.ExitCode}" : "the AppHost is still running";

    static string Tail(string text, int lines = 150) => string.Join("\n", text.Split('\n').TakeLast(lines));

    public async Task DisposeAsync()
    {
        try { await StopAsync(); }
        finally { clusterLock?.Dispose(); }
    }

    async Task StopAsync()
    {
        if (Prometheus is not null) await Prometheus.DisposeAsync();
        Coordinator?.Dispose();
        if (appHost is not null)
        {
            // 'quit' stops every child cleanly (dependants first); the kill is the fallback.
            if (!appHost.HasExited)
            {
                try { await appHost.StandardInput.WriteLineAsync("quit"); await appHost.StandardInput.FlushAsync(); } catch (IOException) { }
                using var grace = new CancellationTokenSource(TimeSpan.FromSeconds(60));
                try { await appHost.WaitForExitAsync(grace.Token); }
                catch (OperationCanceledException) { appHost.Kill(entireProcessTree: true); await appHost.WaitForExitAsync(); }
            }
            appHost.Dispose();
        }
        try { Directory.Delete(RunDir, recursive: true); } catch (IOException) { } catch (UnauthorizedAccessException) { }
    }
}
