// Scheduling: on a real cluster (Coordinator, data, store and workers as processes), the time from a preemption to the
// high-priority job's first step (split into the victim's checkpoint, the formation and the first step), and ASHA
// against random search with every trial trained to the end (fifo) at the same worker-hour budget on the tiny preset:
// best validation loss, trials run and stopped, and the Coordinator's overhead per trial (submitted → formed).
using System.Net.Http.Headers;
using System.Net.Http.Json;
using System.Text.Json;
using DeepSeekCluster.Chaos;
using static DeepSeekCluster.Bench.ClusterBenchSupport;

namespace DeepSeekCluster.Bench;

public static class SchedulingBench
{
    public static async Task<int> RunAsync(string[] args)
    {
        var o = new BenchArgs("scheduling", args);
        int steps = o.Int("--steps", 12, 4), seeds = o.Int("--seeds", 1, 1), trials = o.Int("--trials", 6, 2);
        double workerHours = o.Double("--worker-hours", 0.01, above: 0);
        bool preemption = !o.Flag("--no-preemption"), studies = !o.Flag("--no-studies");
        o.Done();
        var runDir = NewRunDir("scheduling");
        var stdout = DivertChildOutput(runDir);
        void Say(string line) { lock (stdout) stdout.WriteLine(line); }
        Say($"# Scheduling benchmark — {DateTime.UtcNow:yyyy-MM-dd HH:mm} UTC");
        Say($"machine: {Environment.ProcessorCount} cores, load average {Load()} at start; cluster log: {runDir}/cluster.log");
        await using var cluster = await ChaosCluster.StartAsync(new ChaosClusterOptions { RunDir = Path.Combine(runDir, "cluster"), Log = _ => { } }, CancellationToken.None);
        var dataset = await cluster.PrepareCorpusAsync(32, 512, CancellationToken.None);
        var workers = new[] { cluster.AddWorker(), cluster.AddWorker() };
        await cluster.WaitForIdleWorkersAsync(workers, TimeSpan.FromMinutes(5), CancellationToken.None);
        using var http = new HttpClient { BaseAddress = new Uri(cluster.RestUrl), Timeout = TimeSpan.FromSeconds(100) };
        http.DefaultRequestHeaders.Authorization = new AuthenticationHeaderValue("Bearer", cluster.Token);
        int failed = 0;
        foreach (var (part, run) in new (string, Func<Task>)[]
                 {
                     ("preemption", () => preemption ? PreemptionAsync(cluster, dataset, Say) : Task.CompletedTask),
                     ("studies", () => studies ? StudiesAsync(http, dataset, steps, trials, workerHours, seeds, Say) : Task.CompletedTask),
                 })
        {
            try { await run(); }
            catch (Exception e) when (e is InvalidOperationException or TimeoutException or HttpRequestException)
            {
                failed++;
                Say($"\n{part} failed: {e.Message.Split('\n')[0]} (details in {runDir})");
                File.WriteAllText(Path.Combine(runDir, $"{part}-failure.txt"), e.ToString());
            }
        }
        Say($"\nload average {Load()} at the end");
        await cluster.StopWorkersAsync();
        return failed == 0 ? 0 : 1;
    }

    static string Load() => File.ReadAllText("/proc/loadavg").Split(' ')[0];

    /// <summary>A 2-worker job of priority 0 trains; one of priority 5 that needs both workers arrives.</summary>
    static async Task PreemptionAsync(ChaosCluster cluster, string dataset, Action<string> say)
    {
        var timeout = TimeSpan.FromMinutes(10);
        var low = new ChaosJob { Name = "low", Steps = 40, CheckpointInterval = 20, MinWorkers = 2, MaxWorkers = 2 };
        var high = new ChaosJob { Name = "high", Steps = 4, CheckpointInterval = 4, MinWorkers = 2, MaxWorkers = 2, Priority = 5 };
        await cluster.SubmitAsync(low, dataset, CancellationToken.None);
        await cluster.WaitForAsync(low.Name, j => j.State == "running" && j.Step >= 5, timeout, "low training", CancellationToken.None);
        var asked = DateTimeOffset.UtcNow;
        await cluster.SubmitAsync(high, dataset, CancellationToken.None);
        var first = await cluster.WaitForAsync(high.Name, j => j.Step >= 1, timeout, "high's first step", CancellationToken.None, TimeSpan.FromMilliseconds(50));
        var seen = DateTimeOffset.UtcNow;
        var lowView = await cluster.WaitForAsync(low.Name, j => j.OfKind("released").Any(), timeout, "low released", CancellationToken.None);
        var preempted = lowView.OfKind("preempted").First();
        var released = lowView.OfKind("released").First();
        var formed = first.OfKind("formed").First();
        var resumed = first.OfKind("resumed").FirstOrDefault();
        say("");
        say($"Preemption: tiny preset, global batch {low.GlobalBatch}, 2 workers; low (priority 0, checkpoint every {low.CheckpointInterval}) at step ≥ 5 when high (priority 5, 2 workers) is submitted");
        say("");
        say("| request → low preempted s | low's checkpoint at preemption (preempted → released) s | released → high formed s | formed → high resumed s | request → high's first step seen s (50 ms polling) | checkpointed step | release reason |");
        say("|---|---|---|---|---|---|---|");
        say($"| {F((preempted.At - asked).TotalSeconds)} | {F((released.At - preempted.At).TotalSeconds)} | {F((formed.At - released.At).TotalSeconds)} | " +
            $"{F(resumed is null ? null : (resumed.At - formed.At).TotalSeconds)} | {F((seen - asked).TotalSeconds)} | {released.ResumeStep} | {released.Reason} |");
        var lowEnd = await cluster.WaitForAsync(low.Name, j => j.State == "completed", timeout, "low's completion", CancellationToken.None);
        var c = lowEnd.Consumption;
        say("");
        say($"low completed after {lowEnd.Generation} generations; steps redone at its resumes: {string.Join(", ", lowEnd.OfKind("resumed").Select(e => e.StepsRedone ?? 0))}; " +
            $"ledger {(c is null ? "absent" : $"complete {c.Complete}, overlaps {c.Overlaps}, {c.Ranges.Count} range(s) of {low.Samples} samples")}");
    }

    /// <summary>The same search space and worker-hour budget, once with ASHA and once with every trial trained to the end.</summary>
    static async Task StudiesAsync(HttpClient http, string dataset, int steps, int trials, double workerHours, int seeds, Action<string> say)
    {
        say("");
        say($"Studies: tiny preset, seq_len 32, global batch 8, {steps} steps per trial, peak LR log-uniform in [1e-4, 3e-2], random sampler, concurrency 2 on 2 workers, " +
            $"budget {workerHours} worker-hours ({workerHours * 3600:F0} worker-seconds) or {trials} trials; ASHA grace {steps / 4}, η 2");
        say("");
        say("| seed | scheduler | best validation loss | best peak LR | trials run | stopped early | worker-hours used | wall s | submitted → formed per trial s (mean) " +
            "| per promotion decision: steps trained past the rung (mean, max) | decision → trial's job stopped s (mean) | decision → next trial formed s (mean) |");
        say("|---|---|---|---|---|---|---|---|---|---|---|---|");
        for (int seed = 1; seed <= seeds; seed++)
            foreach (var scheduler in new[] { "asha", "fifo" })
            {
                string name = $"{scheduler}-s{seed}";
                var spec = new
                {
                    name,
                    job = new
                    {
                        modelPreset = "tiny", dataset, globalBatch = 8, microBatch = 4, seqLen = 32, steps, evalInterval = Math.Max(1, steps / 4),
                        schedule = new { kind = "cosine", peakLr = 3e-3, minLr = 0, warmupSteps = 1 }, checkpointInterval = 0, minWorkers = 1, maxWorkers = 1,
                    },
                    space = new[] { new { path = "schedule.peakLr", kind = "logUniform", low = 1e-4, high = 3e-2 } },
                    metric = "validationLoss", mode = "min",
                    budget = new { trials, workerHours },
                    concurrency = 2,
                    sampler = new { kind = "random", seed },
                    scheduler = scheduler == "asha" ? (object)new { kind = "asha", gracePeriod = Math.Max(1, steps / 4), reductionFactor = 2 } : new { kind = "fifo" },
                };
                var start = DateTimeOffset.UtcNow;
                using (var created = await http.PostAsJsonAsync("/studies", spec))
                    if (!created.IsSuccessStatusCode) throw new InvalidOperationException($"study {name} refused: {await created.Content.ReadAsStringAsync()}");
                JsonElement study;
                while (true)
                {
                    study = JsonDocument.Parse(await http.GetStringAsync($"/studies/{name}")).RootElement.Clone();
                    if (study.GetProperty("state").GetString() != "running") break;
                    if (DateTimeOffset.UtcNow - start > TimeSpan.FromMinutes(30)) throw new TimeoutException($"study {name} still running after 30 minutes");
                    await Task.Delay(TimeSpan.FromSeconds(1));
                }
                double wall = (DateTimeOffset.UtcNow - start).TotalSeconds;
                var trialList = study.GetProperty("trials").EnumerateArray().ToList();
                var overheads = new List<double>();
                var jobTimes = new Dictionary<string, (DateTimeOffset? Submitted, DateTimeOffset? Formed, DateTimeOffset? Stopped)>();
                foreach (var t in trialList)
                {
                    var events = JsonDocument.Parse(await http.GetStringAsync($"/jobs/{t.GetProperty("jobId").GetString()}")).RootElement.GetProperty("events").EnumerateArray().ToList();
                    DateTimeOffset? At(string kind) => events.FirstOrDefault(e => e.GetProperty("kind").GetString() == kind) is { ValueKind: JsonValueKind.Object } e
                        ? e.GetProperty("at").GetDateTimeOffset() : null;
                    if (At("submitted") is { } s && At("formed") is { } f) overheads.Add((f - s).TotalSeconds);
                    jobTimes[t.GetProperty("jobId").GetString()!] = (At("submitted"), At("formed"), At("stopped"));
                }
                var promotions = Promotions(study, trialList, jobTimes);
                var best = study.TryGetProperty("best", out var b) && b.ValueKind == JsonValueKind.Object ? b : (JsonElement?)null;
                string bestLr = best?.GetProperty("parameters").TryGetProperty("schedule.peakLr", out var lr) == true ? lr.GetString() ?? "–" : "–";
                double? bestLoss = best?.GetProperty("metric") is { ValueKind: JsonValueKind.Number } m ? m.GetDouble() : null;
                int stopped = trialList.Count(t => t.GetProperty("state").GetString() == "pruned");
                double used = trialList.Sum(t => t.GetProperty("workerHours").GetDouble());
                say($"| {seed} | {scheduler} | {F(bestLoss, "F4")} | {bestLr} | {trialList.Count} | {stopped} | {used:F4} | {wall:F0} | {F(overheads.Count == 0 ? null : overheads.Average())} " +
                    (promotions.Count == 0 ? "| – | – | – |"
                        : $"| {promotions.Average(p => p.PastRung):F1}, {promotions.Max(p => p.PastRung)} | {F(Mean(promotions.Select(p => p.ToStopped)))} | {F(Mean(promotions.Select(p => p.ToNextFormed)))} |"));
            }
    }

    static double? Mean(IEnumerable<double?> values) => values.Where(v => v.HasValue).Select(v => v!.Value).DefaultIfEmpty(double.NaN).Average() is var m && double.IsNaN(m) ? null : m;

    /// <summary>
    /// Each ASHA decision to stop a trial, from the study's own record (its event "trial I stopped at rung K (step R)"
    /// with the study's clock) and the jobs' events: how many steps the trial trained past its rung before the study saw
    /// the rung's result (the study looks at its trials once a second), how long its job took to stop, and how long until
    /// the next trial submitted after the decision formed on the freed worker.
    /// </summary>
    static List<(long PastRung, double? ToStopped, double? ToNextFormed)> Promotions(JsonElement study, List<JsonElement> trials,
        Dictionary<string, (DateTimeOffset? Submitted, DateTimeOffset? Formed, DateTimeOffset? Stopped)> jobs)
    {
        var result = new List<(long, double?, double?)>();
        foreach (var line in study.GetProperty("events").EnumerateArray().Select(e => e.GetString()!))
        {
            var m = System.Text.RegularExpressions.Regex.Match(line, @"^(\S+) trial (\d+) stopped at rung \d+ \(step (\d+)\)");
            if (!m.Success) continue;
            var decided = DateTimeOffset.Parse(m.Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture);
            var trial = trials.Single(t => t.GetProperty("index").GetInt32() == int.Parse(m.Groups[2].Value));
            var job = jobs[trial.GetProperty("jobId").GetString()!];
            var next = jobs.Values.Where(j => j.Submitted >= decided && j.Formed is not null).Select(j => j.Formed!.Value).DefaultIfEmpty().Min();
            result.Add((trial.GetProperty("step").GetInt64() - long.Parse(m.Groups[3].Value),
                        job.Stopped is { } s ? (s - decided).TotalSeconds : null,
                        next == default ? null : (next - decided).TotalSeconds));
        }
        return result;
    }
}
