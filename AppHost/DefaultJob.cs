// The default run: prepare the shipped corpus, submit the tiny job, follow its progress, accept add/remove commands.
using System.Net.Http.Headers;
using System.Net.Http.Json;
using System.Text.Json;
using DeepSeekCluster.AppHost.Hosting;
using DeepSeekCluster.Contracts;
using DeepSeekCluster.Contracts.DataShards;
using Grpc.Net.Client;

namespace DeepSeekCluster.AppHost;

public sealed class DefaultJob(AppHostOptions options, Resource coordinator, Resource dataShards, string token)
{
    readonly HttpClient http = new() { BaseAddress = new Uri(coordinator.GetEndpoint("http").Url), Timeout = TimeSpan.FromSeconds(30) };

    /// <summary>Prepares (or reuses: the dataset id is a content address) the corpus in DataShardService.</summary>
    public async Task<string> PrepareCorpusAsync(string corpus, CancellationToken ct)
    {
        Log.AppHost($"preparing {Path.GetFileName(corpus)} in data-shards (seq_len {options.SeqLen}, vocabulary {options.VocabSize}); the first run trains the tokenizer");
        using var channel = GrpcChannel.ForAddress(dataShards.GetEndpoint("grpc").Url);
        var client = new DataShards.DataShardsClient(channel);
        var reply = await client.PrepareAsync(new PrepareRequest
        {
            Sources = { new Source { Name = "kjv", Path = corpus, Weight = 1 } },
            SeqLen = options.SeqLen, VocabSize = options.VocabSize,
        }, deadline: DateTime.UtcNow.AddMinutes(10), cancellationToken: ct);
        Log.AppHost($"dataset {reply.DatasetId}{(reply.Reused ? " (reused)" : "")}: {reply.TrainSamples} train / {reply.ValidationSamples} validation samples");
        return reply.DatasetId;
    }

    public async Task<string> SubmitAsync(string datasetId, CancellationToken ct)
    {
        var spec = new
        {
            name = $"{options.Preset}-{DateTime.UtcNow:yyyyMMdd-HHmmss}",
            modelPreset = options.Preset,
            dataset = datasetId,
            parallel = new { dp = 0, pp = options.Pp },
            globalBatch = options.GlobalBatch, microBatch = options.MicroBatch, seqLen = options.SeqLen, steps = options.Steps,
            schedule = new { kind = "cosine", peakLr = options.Lr, minLr = options.Lr / 10, warmupSteps = Math.Min(30, options.Steps / 10) },
            checkpointInterval = options.CheckpointInterval,
            minWorkers = options.Pp, maxWorkers = options.JobMaxWorkers, seed = 1234,
        };
        using var request = new HttpRequestMessage(HttpMethod.Post, "/jobs") { Content = JsonContent.Create(spec) };
        request.Headers.Authorization = new AuthenticationHeaderValue("Bearer", token);
        using var response = await http.SendAsync(request, ct);
        var body = await response.Content.ReadAsStringAsync(ct);
        if (!response.IsSuccessStatusCode) throw new InvalidOperationException($"the coordinator refused the job ({(int)response.StatusCode}): {body}");
        using var doc = JsonDocument.Parse(body);
        var id = doc.RootElement.GetProperty("jobId").GetString()!;
        Log.AppHost($"submitted job {id}: {options.Preset}, {options.Steps} steps, global batch {options.GlobalBatch} x {options.SeqLen} tokens, up to {options.JobMaxWorkers} workers{(options.Pp > 1 ? $", {options.Pp} pipeline stages per replica" : "")}");
        return id;
    }

    /// <summary>
    /// Shows progress as the job advances (a live status line on a terminal, a log line every 10 steps otherwise);
    /// returns its final state.
    /// </summary>
    public async Task<string> FollowAsync(string jobId, CancellationToken ct)
    {
        bool live = ProgressView.IsLive();
        JobProgress? last = null;
        // The ETA is measured from the first step seen, so corpus preparation and model set-up do not inflate it.
        (long step, DateTime at)? pace = null;
        try
        {
            while (true)
            {
                using var doc = JsonDocument.Parse(await http.GetStringAsync($"/jobs/{jobId}", ct));
                var s = doc.RootElement;
                // The REST API writes states camelCase ("running"); the AppHost reports them as the JobState names.
                var raw = s.GetProperty("state").GetString() ?? "?";
                var state = raw.Length > 0 ? char.ToUpperInvariant(raw[0]) + raw[1..] : raw;
                long step = s.GetProperty("step").GetInt64();
                if (step > 0 && pace is null) pace = (step, DateTime.UtcNow);
                var loss = s.TryGetProperty("loss", out var l) && l.GetArrayLength() > 0 ? l[l.GetArrayLength() - 1] : default;
                var now = new JobProgress(state, s.GetProperty("generation").GetInt64(), step, options.Steps,
                    loss.ValueKind == JsonValueKind.Object ? loss.GetProperty("loss").GetDouble() : null,
                    loss.ValueKind == JsonValueKind.Object ? loss.GetProperty("tokensPerSecond").GetDouble() : null,
                    ProgressView.UtilizationOf(s),
                    s.TryGetProperty("workers", out var w) ? w.GetArrayLength() : 0,
                    s.TryGetProperty("committed", out var c) && c.GetArrayLength() > 0 ? c[c.GetArrayLength() - 1].GetProperty("step").GetInt64() : null,
                    pace is { } p ? ProgressView.Eta(p.step, DateTime.UtcNow - p.at, step, options.Steps) : null);
                bool terminal = state is "Completed" or "Failed" or "Stopped";
                if (now.Mfu is { } u && (last?.Mfu is not { } before || !before.Peaks.SequenceEqual(u.Peaks) || before.PeakTooLow != u.PeakTooLow))
                    Log.AppHost(ProgressView.PeakLine(u));
                if (live)
                {
                    // State and generation changes stay in the log; the status line below it follows every poll.
                    if (last is null || now.State != last.State || now.Generation != last.Generation) Log.AppHost(ProgressView.Format(now));
                    Log.Status(terminal ? null : ProgressView.Format(now));
                }
                else if (ProgressView.PlainLineDue(now, last, every: 10)) Log.AppHost(ProgressView.Format(now));
                last = now;
                if (terminal)
                {
                    if (s.TryGetProperty("error", out var err) && err.ValueKind == JsonValueKind.String) Log.AppHost($"error: {err.GetString()}");
                    if (state == "Completed") await WaitForFinalCommitAsync(jobId, ct);
                    return state;
                }
                await Task.Delay(1000, ct);
            }
        }
        finally { if (live) Log.Status(null); }
    }

    /// <summary>The final checkpoint commits after the last step report: wait for it (bounded) so the run ends complete.</summary>
    async Task WaitForFinalCommitAsync(string jobId, CancellationToken ct)
    {
        var deadline = DateTime.UtcNow + TimeSpan.FromMinutes(2);
        while (DateTime.UtcNow < deadline)
        {
            using var doc = JsonDocument.Parse(await http.GetStringAsync($"/jobs/{jobId}", ct));
            if (doc.RootElement.TryGetProperty("committed", out var committed) && committed.GetArrayLength() > 0)
            {
                var last = committed[committed.GetArrayLength() - 1];
                long step = last.GetProperty("step").GetInt64();
                if (step >= options.Steps)
                {
                    Log.AppHost($"checkpoint of step {step} committed ({last.GetProperty("files").GetInt32()} files, {last.GetProperty("bytes").GetInt64() / 1e6:F1} MB)");
                    return;
                }
            }
            await Task.Delay(500, ct);
        }
        Log.AppHost("the final checkpoint was not committed within 2 minutes (see the job's events: GET /jobs/{id})");
    }

    /// <summary>'add' / 'remove' / 'quit' on standard input scale the workers while the cluster runs.</summary>
    public Task AcceptConsoleCommandsAsync(DistributedApplication app, Resource worker, CancellationTokenSource stop) => Task.Run(async () =>
    {
        int next = worker.Replicas;
        while (!stop.IsCancellationRequested)
        {
            var line = await Console.In.ReadLineAsync(stop.Token);
            if (line is null) return; // no console (CI, redirected input)
            switch (line.Trim())
            {
                case "add" or "+":
                    try { app.Start(worker, next++); }
                    catch (InvalidOperationException e) { Log.AppHost($"not added: {e.Message}"); }
                    break;
                case "remove" or "-":
                    var victim = app.Instances(worker).LastOrDefault();
                    if (victim is null) Log.AppHost("no worker to remove");
                    else { Log.AppHost($"asking {victim} to leave"); await app.StopInstanceAsync(victim, TimeSpan.FromSeconds(30)); }
                    break;
                case "quit" or "q":
                    stop.Cancel();
                    break;
                case "":
                    break;
                default:
                    Log.AppHost($"unknown command '{line.Trim()}': add, remove, quit");
                    break;
            }
        }
    });
}
