// Soak: short jobs one after another under random faults — SIGKILL, SIGSTOP then SIGCONT, a worker added, a worker asked
// to leave (SIGTERM or REST) — for a bounded time; every job gets the chaos checks: it completes, its ledger has no repeat
// or gap, its model matches an undisturbed run of the same seed and global batch, and no process is left behind.
//
// Why short jobs and not one long one: the model check compares against a run at another world size, and the two differ
// by the order of the gradient sums (ulps per step). Through the MoE router's top-k choices that difference grows
// chaotically: over a 150-step job the loss of an elastic run agreed with the reference to 4 digits up to step 40 and
// then drifted (a weight 38% of its scale apart at step 150) with no fault in the job's second half. At the chaos
// tests' 20 steps the drift stays far below the tolerance, so a 20-step job still detects a lost or doubled step.
using DeepSeekCluster.Chaos;
using static DeepSeekCluster.Bench.ClusterBenchSupport;

namespace DeepSeekCluster.Bench;

public static class SoakBench
{
    sealed record Fault(DateTimeOffset At, string Kind, string? Victim, string? Job, bool Member);

    sealed record JobResult(string Name, JobView View, ModelDiff? Diff, List<string> Problems);

    public static async Task<int> RunAsync(string[] args)
    {
        var o = new BenchArgs("soak", args);
        double minutes = o.Double("--minutes", 5, above: 0);
        int seed = o.Int("--seed", 1, 0), steps = o.Int("--steps", 20, 10), maxWorkers = o.Int("--max-workers", 3, 2);
        o.Done();
        var runDir = NewRunDir("soak");
        var stdout = DivertChildOutput(runDir);
        void Say(string line) { lock (stdout) stdout.WriteLine(line); }
        Say($"# Soak — {DateTime.UtcNow:yyyy-MM-dd HH:mm} UTC: faults for {minutes} min, seed {seed}, jobs of {steps} steps, up to {maxWorkers} workers");
        Say($"machine: {Environment.ProcessorCount} cores, load average {File.ReadAllText("/proc/loadavg").Split(' ')[0]} at start; cluster log: {runDir}/cluster.log");
        var problems = new List<string>();
        var instances = new List<string>();
        var faults = new List<Fault>();
        var results = new List<JobResult>();
        var events = new Dictionary<string, List<JobEventView>>(); // every event seen per job (a job keeps its last 200)
        try
        {
            await using var cluster = await ChaosCluster.StartAsync(new ChaosClusterOptions { RunDir = runDir, Log = Say }, CancellationToken.None);
            var dataset = await cluster.PrepareCorpusAsync(32, 512, CancellationToken.None);
            var template = new ChaosJob { Steps = steps, CheckpointInterval = 5, MinWorkers = 1, MaxWorkers = maxWorkers };

            // The undisturbed reference first (same seed, global batch and steps, two workers throughout): every soak job
            // is compared with it as soon as it completes.
            Say("training the undisturbed reference");
            var reference = template with { Name = "soak-reference", MinWorkers = 2, MaxWorkers = 2 };
            var pair = new[] { cluster.AddWorker(), cluster.AddWorker() };
            await cluster.WaitForIdleWorkersAsync(pair, TimeSpan.FromMinutes(5), CancellationToken.None);
            await cluster.SubmitAsync(reference, dataset, CancellationToken.None);
            var (_, referenceFile) = await cluster.WaitForCompletionAsync(reference.Name, TimeSpan.FromMinutes(30), CancellationToken.None);
            var referenceWeights = ModelWeights.Read(referenceFile);
            await cluster.StopWorkersAsync();

            var random = new Random(seed);
            var stopped = new Dictionary<string, DateTime>();
            for (int i = 0; i < 2; i++) instances.Add(cluster.AddWorker());
            await cluster.WaitForIdleWorkersAsync(instances, TimeSpan.FromMinutes(5), CancellationToken.None);
            var faultsEnd = DateTime.UtcNow + TimeSpan.FromMinutes(minutes);
            ChaosJob? job = null;
            int jobs = 0;

            void Remember(JobView v)
            {
                var list = events.TryGetValue(v.JobId, out var l) ? l : events[v.JobId] = [];
                foreach (var e in v.Events) if (!list.Contains(e)) list.Add(e);
            }

            // Waits for the job's model and final checkpoint (no fault meanwhile) and compares it with the reference.
            async Task FinishAsync(ChaosJob j)
            {
                var jobProblems = new List<string>();
                JobView? final = null;
                ModelDiff? diff = null;
                try
                {
                    var (view, modelFile) = await cluster.WaitForCompletionAsync(j.Name, TimeSpan.FromMinutes(20), CancellationToken.None);
                    final = view;
                    diff = ModelWeights.Compare(referenceWeights, ModelWeights.Read(modelFile));
                    var c = view.Consumption;
                    if (c is null) jobProblems.Add("no consumption ledger");
                    else if (!(c.Complete && c.Overlaps == 0 && c.Ranges.Count == 1 && c.Ranges[0] == (0, j.Samples)))
                        jobProblems.Add($"ledger: ranges [{string.Join(", ", c.Ranges.Select(r => $"[{r.Start},{r.End})"))}], overlaps {c.Overlaps}, complete {c.Complete}");
                    if (!diff.Bitwise) jobProblems.Add($"model differs from the reference (training is bitwise identical at any world size): {diff}");
                }
                catch (Exception e) when (e is InvalidOperationException or TimeoutException)
                {
                    jobProblems.Add(e.Message);
                    final = await cluster.TryGetJobAsync(j.Name, CancellationToken.None);
                    try { await cluster.StopJobAsync(j.Name, CancellationToken.None); } catch (HttpRequestException) { }
                }
                if (final is not null) Remember(final);
                results.Add(new JobResult(j.Name, final ?? new JobView(j.Name, "?", 0, 0, [], [], null, [], null, []), diff, jobProblems));
                problems.AddRange(jobProblems.Select(p => $"{j.Name}: {p}"));
                Say($"{DateTime.UtcNow:HH:mm:ss} {j.Name} {(jobProblems.Count == 0 ? "passed" : "FAILED")}: {final?.State}, generation {final?.Generation}, " +
                    $"model {diff?.ToString() ?? "not compared"}{(jobProblems.Count == 0 ? "" : "; " + string.Join("; ", jobProblems))}");
            }

            while (DateTime.UtcNow < faultsEnd)
            {
                if (job is null)
                {
                    job = template with { Name = $"soak-{++jobs}" };
                    await cluster.SubmitAsync(job, dataset, CancellationToken.None);
                }
                await Task.Delay(TimeSpan.FromSeconds(2 + random.NextDouble() * 6)); // the pace of the faults, not a readiness wait
                var view = await cluster.TryGetJobAsync(job.Name, CancellationToken.None);
                if (view is not null) Remember(view);
                // Continue the workers whose freeze is over.
                foreach (var (w, until) in stopped.Where(s => s.Value <= DateTime.UtcNow).ToList())
                {
                    cluster.Signal(w, Signals.Cont);
                    stopped.Remove(w);
                }
                if (view is { Terminal: true })
                {
                    // Continue every frozen worker first: a frozen rank 0 cannot save the model.
                    foreach (var w in stopped.Keys) cluster.Signal(w, Signals.Cont);
                    stopped.Clear();
                    if (instances.Count(w => !cluster.App.HasExited(w)) == 0) instances.Add(cluster.AddWorker());
                    await FinishAsync(job);
                    job = null;
                    continue;
                }
                var live = instances.Where(w => !cluster.App.HasExited(w) && !stopped.ContainsKey(w) && !faults.Any(f => f.Victim == w && f.Kind is "term" or "rest-leave" or "kill")).ToList();
                string fault = random.Next(6) switch
                {
                    0 => "kill", 1 => "stop", 2 or 3 => "add", 4 => "term", _ => "rest-leave",
                };
                if (fault != "add" && live.Count <= 1) fault = "add"; // always leave one worker to train
                if (fault == "add" && live.Count >= maxWorkers + 1) fault = "kill";
                var victim = fault == "add" ? null : live[random.Next(live.Count)];
                bool member = victim is not null && view is not null && view.Workers.Any(w => w.WorkerId == victim);
                var at = DateTimeOffset.UtcNow;
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
                        catch (InvalidOperationException e) { Say($"leave over REST refused: {e.Message}"); fault = "rest-leave (refused: not registered yet)"; }
                        break;
                }
                faults.Add(new Fault(at, fault, victim, job.Name, member));
                Say($"{at:HH:mm:ss} {fault}{(victim is null ? "" : $" {victim}{(member ? " (member)" : " (not a member)")}")} ({job.Name} at step {view?.Step}, generation {view?.Generation})");
            }
            foreach (var w in stopped.Keys) cluster.Signal(w, Signals.Cont);
            if (job is not null)
            {
                if (instances.Count(w => !cluster.App.HasExited(w)) == 0) instances.Add(cluster.AddWorker());
                Say($"faults done; waiting for {job.Name} to complete");
                await FinishAsync(job);
            }
            await cluster.StopWorkersAsync();
            var left = await ProcessScan.WaitUntilNoneAsync(() => cluster.Alive(cluster.StartedWorkers), TimeSpan.FromSeconds(30));
            if (left.Count > 0) problems.Add($"workers left behind: {ProcessScan.Describe(left)}");

            Report(Say, faults, results, events, left.Count);
        }
        catch (Exception e) when (e is InvalidOperationException or TimeoutException)
        {
            problems.Add(e.Message);
        }
        Say("");
        Say(problems.Count == 0 ? "soak passed" : "soak FAILED:\n  " + string.Join("\n  ", problems));
        return problems.Count == 0 ? 0 : 1;
    }

    static void Report(Action<string> say, List<Fault> faults, List<JobResult> results, Dictionary<string, List<JobEventView>> events, int orphans)
    {
        var all = events.Values.SelectMany(e => e).ToList();
        // Per destructive fault on a member: when the job saw it (its worker_lost/hung/left event) and the first completed
        // step of a generation re-formed after that (its next recovered event).
        var detections = new List<(Fault Fault, double Detected, double? NextStep)>();
        int undetected = 0;
        foreach (var f in faults.Where(f => f.Member && f.Kind is "kill" or "stop" or "term" or "rest-leave"))
        {
            var list = events.GetValueOrDefault(f.Job!) ?? [];
            var seen = list.Where(e => e.WorkerId == f.Victim && e.At >= f.At && e.Kind is "worker_lost" or "worker_hung" or "worker_left").OrderBy(e => e.At).FirstOrDefault();
            if (seen is null) { undetected++; continue; }
            var next = list.Where(e => e.Kind == "recovered" && e.At > seen.At).OrderBy(e => e.At).FirstOrDefault();
            detections.Add((f, (seen.At - f.At).TotalSeconds, next is null ? null : (next.At - f.At).TotalSeconds));
        }
        string Range(IEnumerable<double> values)
        {
            var v = values.Order().ToList();
            return v.Count == 0 ? "–" : $"{v[0]:F2} / {v[v.Count / 2]:F2} / {v[^1]:F2} (n={v.Count})";
        }
        var recovered = all.Where(e => e.Kind == "recovered").ToList();
        var resumed = all.Where(e => e.Kind == "resumed").ToList();
        say("");
        say("| measure | value |");
        say("|---|---|");
        say($"| jobs | {results.Count} ({results.Count(r => r.Problems.Count == 0)} passed), {results.Sum(r => r.View.Generation)} generations in all |");
        say($"| faults injected | {faults.Count}: {string.Join(", ", faults.GroupBy(f => f.Kind).Select(g => $"{g.Key} {g.Count()}"))} |");
        say($"| destructive faults on members | {faults.Count(f => f.Member)}: {string.Join(", ", faults.Where(f => f.Member).GroupBy(f => f.Kind).Select(g => $"{g.Key} {g.Count()}"))}; " +
            $"{undetected} not seen by the job (a freeze shorter than the heartbeat timeout, or a worker already leaving) |");
        foreach (var kind in detections.GroupBy(d => d.Fault.Kind))
            say($"| {kind.Key}: detected after s (min / median / max) | {Range(kind.Select(d => d.Detected))} |");
        foreach (var kind in detections.GroupBy(d => d.Fault.Kind))
            say($"| {kind.Key}: fault → next completed step s (min / median / max) | {Range(kind.Where(d => d.NextStep is not null).Select(d => d.NextStep!.Value))} |");
        say($"| recoveries (recovered events) | {recovered.Count}; detection → first step s (min / median / max) {Range(recovered.Select(r => r.RecoverySeconds ?? 0))} |");
        say($"| events by kind | {string.Join(", ", all.GroupBy(e => e.Kind ?? "?").Select(g => $"{g.Key} {g.Count()}"))} |");
        say($"| resumed from | {string.Join(", ", resumed.GroupBy(e => e.ResumeSource ?? "?").Select(g => $"{g.Key} {g.Count()}"))} |");
        say($"| steps redone | {resumed.Sum(e => e.StepsRedone ?? 0)} (max {resumed.Select(e => e.StepsRedone ?? 0).DefaultIfEmpty(0).Max()} in one resume) |");
        say($"| ledgers exact | {results.Count(r => r.View.Consumption is { Complete: true, Overlaps: 0, Ranges.Count: 1 })} of {results.Count} |");
        say($"| models bitwise equal to the reference | {results.Count(r => r.Diff is { Bitwise: true })} of {results.Count}; " +
            $"worst {results.Where(r => r.Diff is { Tensors.Count: > 0 }).Select(r => r.Diff!.Worst.Relative).DefaultIfEmpty(double.NaN).Max():E2} of a tensor's scale |");
        say($"| orphan processes | {orphans} |");
    }
}
