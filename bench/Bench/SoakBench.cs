// Soak: one longer job under random faults — SIGKILL, SIGSTOP then SIGCONT, a worker added, a worker asked to leave
// (SIGTERM or REST) — for a bounded time, then the chaos checks: the job completes, the ledger has no repeat or gap,
// the model matches an undisturbed run of the same seed and global batch, and no process is left behind.
using DeepSeekCluster.Chaos;
using static DeepSeekCluster.Bench.ClusterBenchSupport;

namespace DeepSeekCluster.Bench;

public static class SoakBench
{
    /// <summary>Same reasoning as the chaos tests' tolerance: other world sizes reorder the gradient sums (ulps per step).</summary>
    const double Tolerance = 1e-3;

    public static async Task<int> RunAsync(string[] args)
    {
        double minutes = Double(args, "--minutes", 5);
        int seed = Int(args, "--seed", 1), steps = Int(args, "--steps", 150, 10), maxWorkers = Int(args, "--max-workers", 3, 2);
        var runDir = NewRunDir("soak");
        var stdout = DivertChildOutput(runDir);
        void Say(string line) { lock (stdout) stdout.WriteLine(line); }
        Say($"# Soak — {DateTime.UtcNow:yyyy-MM-dd HH:mm} UTC: faults for up to {minutes} min, seed {seed}, {steps} steps, up to {maxWorkers} workers");
        Say($"cluster log: {runDir}/cluster.log");
        var problems = new List<string>();
        var instances = new List<string>();
        try
        {
            await using var cluster = await ChaosCluster.StartAsync(new ChaosClusterOptions { RunDir = runDir, Log = Say }, CancellationToken.None);
            var dataset = await cluster.PrepareCorpusAsync(32, 512, CancellationToken.None);
            var job = new ChaosJob { Name = "soak", Steps = steps, CheckpointInterval = 10, MinWorkers = 1, MaxWorkers = maxWorkers };
            var random = new Random(seed);
            var faults = new Dictionary<string, int>();
            var stopped = new Dictionary<string, DateTime>();
            for (int i = 0; i < 2; i++) instances.Add(cluster.AddWorker());
            await cluster.WaitForIdleWorkersAsync(instances, TimeSpan.FromMinutes(5), CancellationToken.None);
            await cluster.SubmitAsync(job, dataset, CancellationToken.None);
            var faultsEnd = DateTime.UtcNow + TimeSpan.FromMinutes(minutes);
            var jobDeadline = faultsEnd + TimeSpan.FromMinutes(Math.Max(10, minutes));
            JobView? view = null;
            while (DateTime.UtcNow < faultsEnd)
            {
                await Task.Delay(TimeSpan.FromSeconds(2 + random.NextDouble() * 6)); // the pace of the faults, not a readiness wait
                view = await cluster.TryGetJobAsync(job.Name, CancellationToken.None);
                if (view is { Terminal: true }) break;
                // Continue the workers whose freeze is over.
                foreach (var (w, until) in stopped.Where(s => s.Value <= DateTime.UtcNow).ToList())
                {
                    cluster.Signal(w, Signals.Cont);
                    stopped.Remove(w);
                }
                var live = instances.Where(w => !cluster.App.HasExited(w) && !stopped.ContainsKey(w)).ToList();
                string fault = random.Next(6) switch
                {
                    0 => "kill", 1 => "stop", 2 or 3 => "add", 4 => "term", _ => "rest-leave",
                };
                if (fault != "add" && live.Count <= 1) fault = "add"; // always leave one worker training
                if (fault == "add" && live.Count >= maxWorkers + 1) fault = "kill";
                var victim = live.Count > 0 ? live[random.Next(live.Count)] : null;
                switch (fault)
                {
                    case "add": instances.Add(cluster.AddWorker()); break;
                    case "kill": cluster.Signal(victim!, Signals.Kill); break;
                    case "term": cluster.Signal(victim!, Signals.Term); break;
                    case "stop":
                        cluster.Signal(victim!, Signals.Stop);
                        stopped[victim!] = DateTime.UtcNow + TimeSpan.FromSeconds(1 + random.NextDouble() * 9); // shorter or longer than the 5 s timeout
                        break;
                    case "rest-leave":
                        try { await cluster.LeaveOverRestAsync(victim!, CancellationToken.None); }
                        catch (InvalidOperationException e) { Say($"leave over REST refused: {e.Message}"); fault = "rest-leave (refused)"; }
                        break;
                }
                faults[fault] = faults.GetValueOrDefault(fault) + 1;
                Say($"{DateTime.UtcNow:HH:mm:ss} {fault}{(fault == "add" ? "" : $" {victim}")} (job at step {view?.Step}, generation {view?.Generation})");
            }
            foreach (var w in stopped.Keys) cluster.Signal(w, Signals.Cont);
            if (instances.Count(w => !cluster.App.HasExited(w)) == 0) instances.Add(cluster.AddWorker());
            Say($"faults done ({string.Join(", ", faults.Select(f => $"{f.Key} {f.Value}"))}); waiting for the job to complete");
            var (final, modelFile) = await cluster.WaitForCompletionAsync(job.Name, jobDeadline - DateTime.UtcNow, CancellationToken.None);
            await cluster.StopWorkersAsync();

            // The undisturbed reference: same seed, global batch and steps, two workers throughout.
            Say("training the undisturbed reference");
            var reference = job with { Name = "soak-reference", MinWorkers = 2, MaxWorkers = 2 };
            var pair = new[] { cluster.AddWorker(), cluster.AddWorker() };
            await cluster.WaitForIdleWorkersAsync(pair, TimeSpan.FromMinutes(5), CancellationToken.None);
            await cluster.SubmitAsync(reference, dataset, CancellationToken.None);
            var (_, referenceFile) = await cluster.WaitForCompletionAsync(reference.Name, TimeSpan.FromMinutes(30), CancellationToken.None);
            await cluster.StopWorkersAsync();
            var diff = ModelWeights.Compare(ModelWeights.Read(referenceFile), ModelWeights.Read(modelFile));

            var c = final.Consumption;
            if (c is null) problems.Add("no consumption ledger");
            else if (!(c.Complete && c.Overlaps == 0 && c.Ranges.Count == 1 && c.Ranges[0] == (0, job.Samples)))
                problems.Add($"ledger: ranges [{string.Join(", ", c.Ranges.Select(r => $"[{r.Start},{r.End})"))}], overlaps {c.Overlaps}, complete {c.Complete}");
            if (diff.Mismatched.Count > 0 || diff.Beyond(Tolerance).Count > 0) problems.Add($"model differs from the reference beyond {Tolerance:E0}: {diff}");
            var left = await ProcessScan.WaitUntilNoneAsync(() => ChaosCluster.Alive(cluster.StartedWorkers), TimeSpan.FromSeconds(30));
            if (left.Count > 0) problems.Add($"workers left behind: {ProcessScan.Describe(left)}");

            var recovered = final.OfKind("recovered").ToList();
            Say("");
            Say("| measure | value |");
            Say("|---|---|");
            Say($"| faults injected | {faults.Values.Sum()} ({string.Join(", ", faults.Select(f => $"{f.Key} {f.Value}"))}) |");
            Say($"| generations | {final.Generation} |");
            Say($"| events by kind | {string.Join(", ", final.Events.GroupBy(e => e.Kind ?? "?").Select(g => $"{g.Key} {g.Count()}"))} |");
            Say($"| resumed from | {string.Join(", ", final.OfKind("resumed").GroupBy(e => e.ResumeSource ?? "?").Select(g => $"{g.Key} {g.Count()}"))} |");
            Say($"| steps redone | {final.OfKind("resumed").Sum(e => e.StepsRedone ?? 0)} |");
            Say($"| recovery s (median / max) | {(recovered.Count == 0 ? "–" : $"{Median(recovered.Select(r => r.RecoverySeconds ?? 0)):F2} / {recovered.Max(r => r.RecoverySeconds ?? 0):F2}")} |");
            Say($"| ledger | {(c is null ? "absent" : $"{c.Ranges.Count} range(s), {c.Samples} samples, overlaps {c.Overlaps}, complete {c.Complete}")} |");
            Say($"| model vs reference | {diff} |");
            Say($"| orphan processes | {left.Count} |");
        }
        catch (Exception e) when (e is InvalidOperationException or TimeoutException)
        {
            problems.Add(e.Message);
        }
        Say("");
        Say(problems.Count == 0 ? "soak passed" : "soak FAILED:\n  " + string.Join("\n  ", problems));
        return problems.Count == 0 ? 0 : 1;
    }

    static double Median(IEnumerable<double> values)
    {
        var v = values.Order().ToList();
        return v.Count == 0 ? double.NaN : v[v.Count / 2];
    }
}
