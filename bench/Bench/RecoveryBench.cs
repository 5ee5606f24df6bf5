// Recovery: a 3-worker tiny job loses a worker (SIGKILL) several times and one hangs (SIGSTOP); the job's structured
// events time each recovery — detection, re-formation, state restore, first step after it — and count the steps
// redone. Then the same 2-worker job runs with heartbeats every 100 ms and every 5 s to price the heartbeat and
// fencing machinery in tokens/s.
using DeepSeekCluster.Chaos;
using DeepSeekCluster.Contracts;
using static DeepSeekCluster.Bench.ClusterBenchSupport;

namespace DeepSeekCluster.Bench;

public static class RecoveryBench
{
    public static async Task<int> RunAsync(string[] args)
    {
        var o = new BenchArgs("recovery", args);
        int kills = o.Int("--kills", 3, 0), hangs = o.Int("--hangs", 1, 0), steps = o.Int("--steps", 80, 10);
        int costSteps = o.Int("--cost-steps", 40, 0);
        o.Done();
        var runDir = NewRunDir("recovery");
        var stdout = DivertChildOutput(runDir);
        void Say(string line) { lock (stdout) stdout.WriteLine(line); }
        Say($"# Recovery benchmark — {DateTime.UtcNow:yyyy-MM-dd HH:mm} UTC");
        Say($"machine: {Environment.ProcessorCount} cores, load average {File.ReadAllText("/proc/loadavg").Split(' ')[0]} at start; cluster log: {runDir}/cluster.log");
        int failed = 0;
        // Each part reports its own failure and the other still runs: a recovery that never completes is a finding too.
        foreach (var (part, run) in new (string, Func<Task>)[]
                 {
                     ("recoveries", () => kills + hangs > 0 ? RecoveriesAsync(runDir, kills, hangs, steps, Say) : Task.CompletedTask),
                     ("heartbeat cost", () => costSteps > 0 ? HeartbeatCostAsync(runDir, costSteps, Say) : Task.CompletedTask),
                 })
        {
            try { await run(); }
            catch (Exception e) when (e is InvalidOperationException or TimeoutException)
            {
                failed++;
                Say("");
                Say($"{part} failed: {e.Message.Split('\n')[0]} (the job's events and the children's output are in {runDir})");
                File.WriteAllText(Path.Combine(runDir, $"{part.Replace(' ', '-')}-failure.txt"), e.ToString());
            }
        }
        return failed == 0 ? 0 : 1;
    }

    static async Task RecoveriesAsync(string runDir, int kills, int hangs, int steps, Action<string> say)
    {
        var random = new Random(7);
        var heartbeatTimeout = TimeSpan.FromSeconds(5);
        await using var cluster = await ChaosCluster.StartAsync(new ChaosClusterOptions
        {
            RunDir = Path.Combine(runDir, "recovery"), HeartbeatTimeout = heartbeatTimeout, Log = _ => { },
        }, CancellationToken.None);
        var dataset = await cluster.PrepareCorpusAsync(32, 512, CancellationToken.None);
        var job = new ChaosJob { Name = "recovery", Steps = steps, CheckpointInterval = 10, MinWorkers = 1, MaxWorkers = 3 };
        // Three train, one idle spare per fault: the job re-forms with a spare instead of growing back afterwards.
        var first = Enumerable.Range(0, 3 + kills + hangs).Select(_ => cluster.AddWorker()).ToList();
        await cluster.WaitForIdleWorkersAsync(first, TimeSpan.FromMinutes(5), CancellationToken.None);
        await cluster.SubmitAsync(job, dataset, CancellationToken.None);
        say("");
        say($"tiny preset, seq_len {job.SeqLen}, global batch {job.GlobalBatch}, {steps} steps, checkpoint every {job.CheckpointInterval}; " +
            $"3 workers training + {kills + hangs} idle spares; coordinator heartbeat timeout {heartbeatTimeout.TotalSeconds:F0} s, worker heartbeat every 1 s; times from the job's events (one clock)");
        say("");
        say("| fault | detected after s | re-formation s | state restore s | first step s | fault → first step s | resumed from | steps redone | state MB |");
        say("|---|---|---|---|---|---|---|---|---|");
        var timeout = TimeSpan.FromMinutes(10);
        var faults = Enumerable.Repeat("SIGKILL", kills).Concat(Enumerable.Repeat("SIGSTOP", hangs)).ToList();
        foreach (var fault in faults)
        {
            // Three workers training, two steps past the moment the third (re)joined.
            var three = await cluster.WaitForAsync(job.Name, j => j.State == "running" && j.Workers.Count == 3, timeout, "three workers",
                                                   CancellationToken.None, TimeSpan.FromMilliseconds(50));
            var before = await cluster.WaitForAsync(job.Name, j => j.State == "running" && j.Workers.Count == 3 && j.Step >= three.Step + 2,
                                                    timeout, "three workers training", CancellationToken.None, TimeSpan.FromMilliseconds(50));
            var victim = before.Workers[1 + random.Next(before.Workers.Count - 1)].WorkerId; // not rank 0: it writes the model
            var at = DateTimeOffset.UtcNow;
            cluster.Signal(victim, fault == "SIGKILL" ? Signals.Kill : Signals.Stop);
            string detectKind = fault == "SIGKILL" ? "worker_lost" : "worker_hung";
            var after = await cluster.WaitForAsync(job.Name, j => j.OfKind("recovered").Any(e => e.At > at && e.Generation > before.Generation),
                timeout, $"recovery from {fault} of {victim}", CancellationToken.None, TimeSpan.FromMilliseconds(100));
            var detected = after.Events.FirstOrDefault(e => e.At >= at && e.WorkerId == victim && e.Kind is "worker_lost" or "worker_hung" or "worker_left");
            var recovered = after.OfKind("recovered").First(e => e.At > at && e.Generation > before.Generation);
            var resumed = after.OfKind("resumed").LastOrDefault(e => e.Generation == recovered.Generation);
            double? detection = detected is null ? null : (detected.At - at).TotalSeconds;
            say($"| {fault}{(detected is not null && detected.Kind != detectKind ? $" (seen as {detected.Kind})" : "")} | {F(detection)} | {F(recovered.FormationSeconds)} | " +
                $"{F(recovered.RestoreSeconds)} | {F(recovered.FirstStepSeconds)} | {F((recovered.At - at).TotalSeconds)} | " +
                $"{resumed?.ResumeSource ?? "–"} | {resumed?.StepsRedone?.ToString() ?? "–"} | {F(resumed?.StateBytes / 1e6, "F1")} |");
            if (fault == "SIGSTOP") cluster.Signal(victim, Signals.Kill); // the measurement is done; a zombie rejoining is the tests' business
        }
        // Not the first terminal view: the other ranks' reports of the last step land after the one that completed the
        // job, and the ledger is whole once the final checkpoint commits (reading it earlier showed a false gap).
        var (end, _) = await cluster.WaitForCompletionAsync(job.Name, timeout, CancellationToken.None);
        var c = end.Consumption;
        say("");
        say($"job {end.State} at step {end.Step} after {end.Generation} generations; ledger {(c is null ? "absent" : $"{c.Ranges.Count} range(s) [{string.Join(", ", c.Ranges.Select(r => $"[{r.Start},{r.End})"))}] of {job.Samples} samples, complete {c.Complete}, overlaps {c.Overlaps}")}; " +
            $"steps redone in total: {end.OfKind("resumed").Sum(e => e.StepsRedone ?? 0)}");
        await cluster.StopWorkersAsync();
    }

    /// <summary>The same job with heartbeats every 100 ms and every 5 s: the difference in steady tokens/s is what they cost.</summary>
    static async Task HeartbeatCostAsync(string runDir, int steps, Action<string> say)
    {
        await using var cluster = await ChaosCluster.StartAsync(new ChaosClusterOptions
        {
            // Long enough that a 5 s heartbeat is never late.
            RunDir = Path.Combine(runDir, "cost"), HeartbeatTimeout = TimeSpan.FromSeconds(20), Log = _ => { },
        }, CancellationToken.None);
        var dataset = await cluster.PrepareCorpusAsync(32, 512, CancellationToken.None);
        say("");
        say($"Heartbeat and fencing cost: the same 2-worker job ({steps} steps), alternating runs, steady tokens/s = median over steps after the 5th");
        say("");
        say("| heartbeat interval | run | tokens/s (median) | heartbeats sent per s (cluster) | idle CPU ms/s (coordinator + 2 workers) |");
        say("|---|---|---|---|---|");
        var results = new Dictionary<double, List<double>> { [0.1] = new(), [5] = new() };
        var idleCpu = new Dictionary<double, List<double>> { [0.1] = new(), [5] = new() };
        int run = 0;
        foreach (var interval in new[] { 0.1, 5, 0.1, 5 })
        {
            run++;
            var job = new ChaosJob { Name = $"cost-{run}", Steps = steps, CheckpointInterval = steps, MinWorkers = 2, MaxWorkers = 2 };
            var pair = new[] { cluster.AddWorker(heartbeatInterval: TimeSpan.FromSeconds(interval)), cluster.AddWorker(heartbeatInterval: TimeSpan.FromSeconds(interval)) };
            await cluster.WaitForIdleWorkersAsync(pair, TimeSpan.FromMinutes(5), CancellationToken.None);
            await cluster.SubmitAsync(job, dataset, CancellationToken.None);
            var end = await cluster.WaitForAsync(job.Name, j => j.Terminal, TimeSpan.FromMinutes(10), $"cost run {run}", CancellationToken.None, TimeSpan.FromSeconds(1));
            // The same processes idle afterwards: what they burn then is heartbeats (sent, received, fenced-checked) plus
            // the runtime's own background, which the 5 s runs measure alone.
            var pids = pair.Select(cluster.Pid).Append(cluster.Pid(ServiceNames.Coordinator)).ToList();
            double cpu0 = pids.Sum(CpuSeconds);
            var window = System.Diagnostics.Stopwatch.StartNew();
            await Task.Delay(TimeSpan.FromSeconds(15)); // a measurement window, not a readiness wait
            idleCpu[interval].Add((pids.Sum(CpuSeconds) - cpu0) / window.Elapsed.TotalSeconds);
            await cluster.StopWorkersAsync();
            var tps = end.Loss.Where(l => l.Step > 5).Select(l => l.TokensPerSecond).Order().ToList();
            double median = tps.Count == 0 ? double.NaN : tps[tps.Count / 2];
            results[interval].Add(median);
            say($"| {interval * 1000:F0} ms | {run} | {median:F0} | {2 / interval:F1} | {idleCpu[interval][^1] * 1000:F1} |");
        }
        double fast = results[0.1].Average(), slow = results[5].Average();
        say("");
        say($"mean of medians: {fast:F0} tokens/s at 100 ms, {slow:F0} tokens/s at 5 s: heartbeats every 100 ms cost {(slow - fast) / slow:P1} " +
            "(negative: faster, i.e. within the run-to-run noise)");
        // Independent of the noisy throughput: CPU per heartbeat from the idle difference, priced at the default rate.
        double perBeat = (idleCpu[0.1].Average() - idleCpu[5].Average()) / (2 / 0.1 - 2 / 5.0);
        say($"CPU per heartbeat (worker send + coordinator receive, fencing check and grain update): {perBeat * 1e3:F3} ms; " +
            $"at the default 1 s interval that is {perBeat * 1e3:F3} ms of CPU per worker-second, {perBeat:P3} of the one core a worker trains on");
    }

    /// <summary>utime + stime of a process, in seconds (/proc/pid/stat, clock ticks of 1/100 s).</summary>
    static double CpuSeconds(int pid)
    {
        try
        {
            var stat = File.ReadAllText($"/proc/{pid}/stat");
            var fields = stat[(stat.LastIndexOf(')') + 2)..].Split(' ');
            return (long.Parse(fields[11]) + long.Parse(fields[12])) / 100.0; // fields 14 and 15 of stat, counted from state (3)
        }
        catch (IOException) { return 0; }
    }
}
