// Cluster overhead and data-parallel scaling: the same tiny-preset job trained by the standalone Trainer in this process
// and by GpuWorkers under the Coordinator (real processes: Azurite, DataShardService, CheckpointStore, Coordinator),
// configurations interleaved round by round because the machine is shared and its load moves under every number.
using System.Collections.Concurrent;
using System.Diagnostics;
using System.Globalization;
using System.Text.RegularExpressions;
using DeepSeekCluster.Chaos;
using DeepSeekCluster.Contracts;
using DeepSeekCluster.Training.Data;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Perf;
using TorchSharp;
using static DeepSeekCluster.Bench.ClusterBenchSupport;
using static TorchSharp.torch;

namespace DeepSeekCluster.Bench;

public static partial class ClusterBench
{
    /// <summary>
    /// The step whose log line opens the window (--warm, a multiple of <see cref="LogEvery"/>): 10 by default; a later one
    /// leaves the worker's JIT warm-up (its larger code base tiers up for tens of seconds) out of a steady-state window.
    /// </summary>
    static int Warm = 10;
    const int LogEvery = 10;
    const int VocabSize = 512; // the corpus the cluster prepares (as the chaos jobs do)

    sealed record Config(string Key, string Label, bool Standalone, int Workers, int Threads, int CheckpointEvery);

    /// <summary>One run: wall tokens/s over the steady window, median per-step tokens/s the trainer measured, phases per step.</summary>
    internal sealed record Sample(double WallTps, double StepTps, double Load1, IReadOnlyDictionary<string, double> Phases,
                         IReadOnlyDictionary<string, double> CpuPerStep, IReadOnlyDictionary<string, double> ThreadCpuPerStep,
                         IReadOnlyDictionary<string, double> RuntimePerStep);

    /// <summary>The trainer process's .NET runtime counters (as the System.Runtime meter names them), for per-step differences.</summary>
    static readonly string[] RuntimeCounters = ["gc pause ms", "gcs", "allocated MB", "jit ms", "jitted methods"];

    /// <summary>This process's runtime counters, in <see cref="RuntimeCounters"/>' units.</summary>
    static Dictionary<string, double> OwnRuntime() => new()
    {
        ["gc pause ms"] = GC.GetTotalPauseDuration().TotalMilliseconds, ["gcs"] = GC.CollectionCount(0), // gen0 counts every collection
        ["allocated MB"] = GC.GetTotalAllocatedBytes() / 1e6,
        ["jit ms"] = System.Runtime.JitInfo.GetCompilationTime().TotalMilliseconds, ["jitted methods"] = System.Runtime.JitInfo.GetCompiledMethodCount(),
    };

    static Dictionary<string, double> PerStep(IReadOnlyDictionary<string, double> at0, IReadOnlyDictionary<string, double> at1, int steps) =>
        at1.Keys.Where(at0.ContainsKey).ToDictionary(k => k, k => (at1[k] - at0[k]) / steps);

    /// <summary>The processes whose CPU time a window accounts for: the trainer's (workers, or this process), then the services.</summary>
    static readonly string[] CpuColumns = ["trainer", ServiceNames.Coordinator, ServiceNames.DataShards, ServiceNames.Checkpoints, ServiceNames.Blobs, "bench"];

    public static async Task<int> RunAsync(string[] args)
    {
        var o = new BenchArgs("cluster", args);
        Warm = o.Int("--warm", 10, LogEvery);
        if (Warm % LogEvery != 0) throw new ArgumentException($"option --warm: {Warm} must be a multiple of {LogEvery} (rank 0 logs every {LogEvery} steps)");
        int rounds = o.Int("--rounds", 3, 1), steps = o.Int("--steps", 30, Warm + LogEvery), threadRounds = o.Int("--thread-rounds", 1, 0);
        int seqLen = o.Int("--seq-len", 64, 8), globalBatch = o.Int("--global-batch", 16, 2), micro = o.Int("--micro-batch", 4, 1);
        int checkpointEvery = o.Int("--checkpoint-every", 10, 0);
        bool scaling = !o.Flag("--no-scaling"); // --no-scaling: the overhead pair only (standalone, 1 worker), rounds twice as fast
        o.Done();
        if (steps % LogEvery != 0) throw new ArgumentException($"option --steps: {steps} must be a multiple of {LogEvery} (rank 0 logs every {LogEvery} steps; the window ends on the last)");
        if (globalBatch % (2 * micro) != 0)
            throw new ArgumentException($"option --global-batch: {globalBatch} must be a multiple of 2 x --micro-batch ({micro}) so 1 and 2 workers train the same batch");
        int cores = Environment.ProcessorCount;
        var configs = new List<Config>
        {
            new("standalone", "standalone Trainer (fresh process)", true, 1, 1, 0),
            new("c1", "1 worker under the Coordinator", false, 1, 1, 0),
        };
        if (scaling) configs.Add(new("c2", "2 workers (data-parallel)", false, 2, 1, 0));
        if (threadRounds > 0) configs.Add(new("c1t2", $"1 worker, {cores} torch threads", false, 1, cores, 0));
        if (checkpointEvery > 0) configs.Add(new("c1ck", $"1 worker, checkpoint every {checkpointEvery}", false, 1, 1, checkpointEvery));

        var runDir = NewRunDir("cluster");
        var stdout = DivertChildOutput(runDir);
        void Say(string line) { lock (stdout) stdout.WriteLine(line); }
        Say($"# Cluster overhead and data-parallel scaling — {DateTime.UtcNow:yyyy-MM-dd HH:mm} UTC");
        Say($"machine: {cores} cores, load average {LoadAverage()} at start; cluster log: {runDir}/cluster.log");

        // Before any child runs: the 1-thread throughput for reference, and the machine's peak (the cached calibration the
        // workers use too, with every core), the denominator of the MFU column.
        var cpu = CPU;
        set_num_threads(1);
        var peak1 = MatmulPeak.Measure(cpu, ScalarType.Float32, 1024, TimeSpan.FromSeconds(3));
        set_num_threads(cores);
        var peakAll = HardwarePeak.For(cpu, ScalarType.Float32, PeakSettings.Default, Say);
        Say($"matmul throughput fp32, 1 thread: {peak1}");

        var config = DeepSeekConfig.Preset("tiny") with { VocabSize = VocabSize };
        double flopsPerToken = config.TrainingFlopsPerToken(seqLen, includeMtp: new TrainingOptions().MtpWeight > 0);
        var results = configs.ToDictionary(c => c.Key, _ => new List<Sample>());
        try
        {
            await using var cluster = await ChaosCluster.StartAsync(new ChaosClusterOptions
            {
                // Generous: a heartbeat that is late on a loaded machine must not re-form a job in the middle of a window.
                RunDir = Path.Combine(runDir, "cluster"), HeartbeatTimeout = TimeSpan.FromSeconds(20), Log = _ => { },
            }, CancellationToken.None);
            var watch = new WorkerWatch();
            cluster.App.LineReceived += watch.OnLine;
            var dataset = await cluster.PrepareCorpusAsync(seqLen, VocabSize, CancellationToken.None);
            Say("");
            Say($"tiny preset (vocab {VocabSize}), fp32, seq_len {seqLen}, global batch {globalBatch}, micro-batch {micro}, {steps} steps; " +
                $"steady window = steps {Warm + 1}..{steps}; {rounds} rounds of {string.Join(" → ", configs.Select(c => c.Key))}; " +
                "workers: heartbeat every 1 s (the default), checkpoint only at the end (after the window) unless the row says otherwise");
            Say("");
            Say("| round | config | wall tokens/s | trainer tokens/s (median step) | data / fwd / bwd / comm / opt ms per step (rank 0) | " +
                $"CPU ms per step: {string.Join(" / ", CpuColumns)} | load 1 min |");
            Say("|---|---|---|---|---|---|---|");
            var services = new[] { ServiceNames.Coordinator, ServiceNames.DataShards, ServiceNames.Checkpoints, ServiceNames.Blobs }.ToDictionary(n => n, cluster.Pid);
            services["bench"] = Environment.ProcessId;
            for (int round = 1; round <= rounds; round++)
                foreach (var c in configs.Where(c => c.Key != "c1t2" || round <= threadRounds))
                {
                    var s = c.Standalone
                        ? await StandaloneProcessAsync(seqLen, globalBatch, micro, steps, c.Threads, services)
                        : await ClusterRunAsync(cluster, watch, services, dataset, c, $"{c.Key}-{round}", seqLen, globalBatch, micro, steps);
                    results[c.Key].Add(s);
                    Say($"| {round} | {c.Key} | {s.WallTps:F0} | {s.StepTps:F0} | {Phases(s.Phases)} | {Cpu(s.CpuPerStep)} | {s.Load1:F2} |");
                }
        }
        catch (Exception e) when (e is InvalidOperationException or TimeoutException or HttpRequestException)
        {
            Say("");
            Say($"the cluster run failed: {e.Message.Split('\n')[0]} (the children's output is in {runDir}/cluster.log)");
            File.WriteAllText(Path.Combine(runDir, "failure.txt"), e.ToString());
            return 1;
        }

        // ---- Summary: medians and spread, MFU, ratio and efficiency ----
        double Median(string key, Func<Sample, double> f) => MedianOf(results[key].Select(f));
        string Spread(string key, Func<Sample, double> f) =>
            $"{results[key].Min(f):F0}–{results[key].Max(f):F0}";
        Say("");
        Say($"Medians over {rounds} rounds (range in brackets). MFU: model FLOPs ({flopsPerToken / 1e6:F2} MFLOP/token, MTP included) per second " +
            $"over the fp32 peak of the whole machine ({peakAll}; " +
            $"1 thread measured now: {peak1.FlopsPerSecond / 1e9:F1} GFLOP/s)");
        Say("");
        Say($"| config | workers × torch threads | runs | wall tokens/s | trainer tokens/s | MFU (wall) | CPU ms per step: {string.Join(" / ", CpuColumns)} | load 1 min |");
        Say("|---|---|---|---|---|---|---|---|");
        foreach (var c in configs)
            Say($"| {c.Label} | {c.Workers} × {c.Threads} | {results[c.Key].Count} | {Median(c.Key, s => s.WallTps):F0} ({Spread(c.Key, s => s.WallTps)}) | " +
                $"{Median(c.Key, s => s.StepTps):F0} ({Spread(c.Key, s => s.StepTps)}) | " +
                $"{peakAll.Mfu(Median(c.Key, s => s.WallTps) * flopsPerToken).Ratio * 100:F1}% | {Cpu(MedianOf(results[c.Key], s => s.CpuPerStep))} | " +
                $"{Median(c.Key, s => s.Load1):F2} ({results[c.Key].Min(s => s.Load1):F2}–{results[c.Key].Max(s => s.Load1):F2}) |");
        Say("");
        // Ratios within a round (the configurations of a round ran minutes apart, under similar load), then their median.
        var overhead = PairedRatios(results["c1"], results["standalone"], (a, b) => a.WallTps / b.WallTps);
        var overheadStep = PairedRatios(results["c1"], results["standalone"], (a, b) => a.StepTps / b.StepTps);
        Say($"cluster overhead: 1 worker under the Coordinator reaches {Ratio(overhead)} of the standalone trainer's wall tokens/s " +
            $"(trainer-measured step tokens/s: {Ratio(overheadStep)}); goal ≥ 95%");
        if (scaling)
            Say($"data-parallel scaling, 2 workers × 1 thread vs 1 worker × 1 thread, same global batch: efficiency " +
                $"{Ratio(PairedRatios(results["c2"], results["c1"], (a, b) => a.WallTps / (2 * b.WallTps)))} (tokens/s(2) / (2 × tokens/s(1)))");
        if (threadRounds > 0)
            Say($"1 worker with {cores} torch threads vs 1 thread: " +
                $"{Ratio(PairedRatios(results["c1t2"], results["c1"], (a, b) => a.WallTps / b.WallTps), "F2", percent: false)}×");
        if (checkpointEvery > 0)
            Say($"checkpoint every {checkpointEvery} steps (async save to CheckpointStore) vs only at the end: " +
                $"{Ratio(PairedRatios(results["c1ck"], results["c1"], (a, b) => a.WallTps / b.WallTps))} of the tokens/s");
        var sa = results["standalone"];
        var c1 = results["c1"];
        Say("");
        Say("Where the trainer process's CPU goes, by thread (medians over the rounds):");
        Say("");
        foreach (var line in ThreadTable(sa, c1)) Say(line);
        Say("");
        var rsa = MedianOf(sa, s => s.RuntimePerStep);
        var rc1 = MedianOf(c1, s => s.RuntimePerStep);
        Say($"runtime per step, medians (standalone → 1 worker): " + string.Join(", ", RuntimeCounters.Select(k =>
            FormattableString.Invariant($"{k} {rsa.GetValueOrDefault(k, double.NaN):F2} → {rc1.GetValueOrDefault(k, double.NaN):F2}"))));
        Say("");
        Say($"per-step phases, medians (ms): standalone {Phases(MedianOf(sa, s => s.Phases))}, cluster {Phases(MedianOf(c1, s => s.Phases))}; wall ms per step: " +
            $"standalone {MedianOf(sa.Select(s => globalBatch * seqLen / s.WallTps * 1000)):F1}, cluster {MedianOf(c1.Select(s => globalBatch * seqLen / s.WallTps * 1000)):F1}");
        return 0;
    }

    // ---- The standalone side: the Trainer the worker wraps, on in-memory tokens, in a fresh process like a worker's ----

    /// <summary>
    /// Runs <see cref="StandaloneChild"/> as a new process: a worker is a fresh process every run, so the standalone side
    /// pays the same JIT tiering and allocator warm-up in its window instead of reusing this process's warm code.
    /// </summary>
    static async Task<Sample> StandaloneProcessAsync(int seqLen, int globalBatch, int micro, int steps, int threads,
                                                     IReadOnlyDictionary<string, int> services)
    {
        var start = new ProcessStartInfo(Environment.ProcessPath ?? "dotnet") { RedirectStandardOutput = true, RedirectStandardError = true };
        if (Path.GetFileNameWithoutExtension(start.FileName) == "dotnet") start.ArgumentList.Add(typeof(ClusterBench).Assembly.Location);
        foreach (var a in new[]
                 {
                     "cluster-standalone", "--seq-len", $"{seqLen}", "--global-batch", $"{globalBatch}", "--micro-batch", $"{micro}",
                     "--steps", $"{steps}", "--threads", $"{threads}", "--warm", $"{Warm}",
                     "--pids", string.Join(",", services.Select(p => $"{p.Key}={p.Value}")),
                 })
            start.ArgumentList.Add(a);
        start.Environment["OMP_NUM_THREADS"] = $"{threads}";
        start.Environment["MKL_NUM_THREADS"] = $"{threads}";
        using var child = Process.Start(start) ?? throw new InvalidOperationException($"could not start {start.FileName}");
        var stderr = child.StandardError.ReadToEndAsync();
        var stdoutText = child.StandardOutput.ReadToEndAsync();
        using var timeout = new CancellationTokenSource(TimeSpan.FromMinutes(15));
        try { await child.WaitForExitAsync(timeout.Token); }
        catch (OperationCanceledException)
        {
            child.Kill(entireProcessTree: true);
            throw new TimeoutException("the standalone run did not finish within 15 min");
        }
        var line = (await stdoutText).Split('\n').FirstOrDefault(l => l.StartsWith("RESULT ", StringComparison.Ordinal));
        if (child.ExitCode != 0 || line is null)
            throw new InvalidOperationException($"the standalone run exited {child.ExitCode} without a result: {await stderr}");
        return System.Text.Json.JsonSerializer.Deserialize<Sample>(line["RESULT ".Length..])
               ?? throw new InvalidOperationException($"the standalone run printed an empty result: {line}");
    }

    /// <summary>The child side (verb cluster-standalone): one standalone run, its <see cref="Sample"/> as a JSON line.</summary>
    public static int StandaloneChild(string[] args)
    {
        var o = new BenchArgs("cluster-standalone", args);
        Warm = o.Int("--warm", 10, LogEvery);
        var pids = o.String("--pids", "").Split(',', StringSplitOptions.RemoveEmptyEntries)
            .Select(p => p.Split('=')).ToDictionary(p => p[0], p => int.Parse(p[1], CultureInfo.InvariantCulture));
        int seqLen = o.Int("--seq-len", 64, 8), globalBatch = o.Int("--global-batch", 16, 1), micro = o.Int("--micro-batch", 4, 1);
        int steps = o.Int("--steps", 30, Warm + LogEvery), threads = o.Int("--threads", 1, 1);
        o.Done();
        var config = DeepSeekConfig.Preset("tiny") with { VocabSize = VocabSize };
        var s = Standalone(config, seqLen, globalBatch, micro, steps, threads, pids);
        Console.WriteLine("RESULT " + System.Text.Json.JsonSerializer.Serialize(s));
        return 0;
    }

    static Sample Standalone(DeepSeekConfig config, int seqLen, int globalBatch, int micro, int steps, int threads,
                             IReadOnlyDictionary<string, int> services)
    {
        set_num_threads(threads);
        var options = JobOptions(seqLen, globalBatch, micro, steps);
        // Random tokens of the same vocabulary: the step's arithmetic does not depend on the text.
        var rng = new Random(1);
        var tokens = new int[(seqLen + 1) * globalBatch * 8];
        for (int i = 0; i < tokens.Length; i++) tokens[i] = rng.Next(config.VocabSize);
        manual_seed(options.Seed);
        using var model = new DeepSeekForCausalLM(config).InitializeWeights();
        model.to(CPU);
        using var trainer = new Trainer(model, new TokenDataset(tokens, seqLen), null, options, CPU, 0);
        var measured = new List<StepMetrics>();
        var window = new Stopwatch();
        var pids = services.Append(new("trainer", Environment.ProcessId)).ToDictionary();
        Dictionary<string, double> cpu0 = [], threads0 = [], runtime0 = [];
        for (int i = 1; i <= steps; i++)
        {
            var m = trainer.TrainStep();
            if (i == Warm) { window.Start(); cpu0 = CpuSeconds(pids); threads0 = ThreadCpuSeconds(Environment.ProcessId); runtime0 = OwnRuntime(); }
            else if (i > Warm) measured.Add(m);
        }
        var cpu1 = CpuSeconds(pids);
        var threads1 = ThreadCpuSeconds(Environment.ProcessId);
        var runtime1 = OwnRuntime();
        double wall = (double)(steps - Warm) * globalBatch * seqLen / window.Elapsed.TotalSeconds;
        double load = double.Parse(LoadAverage(), CultureInfo.InvariantCulture);
        var phases = new Dictionary<string, double>
        {
            ["data"] = measured.Average(m => m.Times.DataSeconds), ["forward"] = measured.Average(m => m.Times.ForwardSeconds),
            ["backward"] = measured.Average(m => m.Times.BackwardSeconds), ["communication"] = measured.Average(m => m.Times.CommunicationSeconds),
            ["optimizer"] = measured.Average(m => m.Times.OptimizerSeconds),
        };
        var cpu = cpu1.Keys.ToDictionary(k => k, k => (cpu1[k] - cpu0[k]) / (steps - Warm));
        return new Sample(wall, MedianOf(measured.Select(m => m.TokensPerSecond)), load, phases, cpu,
                          ThreadsPerStep(threads0, threads1, cpu["trainer"] * (steps - Warm), steps - Warm), PerStep(runtime0, runtime1, steps - Warm));
    }

    /// <summary>The options the worker (GpuWorker/Cluster/JobPlan.Map) builds from the job spec ChaosJob.ToSpec writes (cosine, peak 3e-3, min 3e-4, warm-up steps/10).</summary>
    static TrainingOptions JobOptions(int seqLen, int globalBatch, int micro, int steps)
    {
        var job = new ChaosJob();
        return new TrainingOptions
        {
            SeqLen = seqLen, GlobalBatch = globalBatch, MicroBatch = micro, Steps = steps, Lr = job.Lr, Schedule = "cosine",
            WarmupSteps = Math.Max(1, steps / 10), MinLrRatio = 0.1, Seed = job.Seed, EvalEvery = 0, Device = "cpu",
        }.Validated();
    }

    // ---- The cluster side: fresh workers per run, so thread counts and world sizes never mix ----

    static async Task<Sample> ClusterRunAsync(ChaosCluster cluster, WorkerWatch watch, IReadOnlyDictionary<string, int> services, string dataset,
                                              Config c, string name,
                                              int seqLen, int globalBatch, int micro, int steps)
    {
        var ids = Enumerable.Range(0, c.Workers).Select(_ => cluster.AddWorker(torchThreads: c.Threads)).ToList();
        try
        {
            await cluster.WaitForIdleWorkersAsync(ids, TimeSpan.FromMinutes(5), CancellationToken.None);
            var job = new ChaosJob
            {
                Name = name, Steps = steps, SeqLen = seqLen, GlobalBatch = globalBatch, MicroBatch = micro,
                CheckpointInterval = c.CheckpointEvery, MinWorkers = c.Workers, MaxWorkers = c.Workers,
            };
            watch.Expect(ids, steps, services.Concat(ids.Select(id => new KeyValuePair<string, int>(id, cluster.Pid(id)))).ToDictionary());
            await cluster.SubmitAsync(job, dataset, CancellationToken.None);
            // Polled slowly: every GET /jobs costs the coordinator CPU that the worker would otherwise get.
            var end = await cluster.WaitForAsync(job.Name, j => j.Terminal, TimeSpan.FromMinutes(15), $"the end of {name}", CancellationToken.None,
                                                 TimeSpan.FromSeconds(3));
            if (end.State != "completed") throw new InvalidOperationException($"{name} ended {end.State}: {end.Describe()}");
            if (end.Generation != 1)
                throw new InvalidOperationException($"{name} re-formed (generation {end.Generation}): its window mixes a recovery into the throughput; {end.Describe()}");
            double load = double.Parse(LoadAverage(), CultureInfo.InvariantCulture);
            var (from, to, rank0, cpu0, cpu1, threads0, threads1) = watch.Window(Warm, steps) ?? throw new InvalidOperationException(
                $"{name}: rank 0's log lines of steps {Warm} and {steps} were not both seen\n{cluster.RecentLines(30)}");
            double wall = (double)(steps - Warm) * globalBatch * seqLen / Stopwatch.GetElapsedTime(from, to).TotalSeconds;
            var stepTps = end.Loss.Where(l => l.Step > Warm).Select(l => l.TokensPerSecond).ToList();
            if (stepTps.Count == 0) throw new InvalidOperationException($"{name}: the job's loss history holds no step after {Warm}");
            // The worker's deepseek_train_step_seconds histogram and runtime counters, scraped at rank 0's log lines of step 10 and
            // of the last step (before the final save and the end-of-run work): the steady steps' phases, GC and JIT.
            var first = await watch.WarmScrape!;
            var last = await watch.LastScrape!;
            var phases = new Dictionary<string, double>();
            foreach (var phase in last.Phases.Keys)
            {
                var (sum1, count1) = last.Phases[phase];
                var (sum0, count0) = first.Phases.GetValueOrDefault(phase);
                if (count1 > count0) phases[phase] = (sum1 - sum0) / (count1 - count0);
            }
            var cpu = cpu1.Keys.Where(k => !ids.Contains(k)).ToDictionary(k => k, k => (cpu1[k] - cpu0[k]) / (steps - Warm));
            cpu["trainer"] = ids.Sum(id => cpu1[id] - cpu0[id]) / (steps - Warm);
            return new Sample(wall, MedianOf(stepTps), load, phases, cpu,
                              ThreadsPerStep(threads0, threads1, cpu1[rank0] - cpu0[rank0], steps - Warm), PerStep(first.Runtime, last.Runtime, steps - Warm));
        }
        finally { await cluster.StopWorkersAsync(); }
    }

    /// <summary>Reads the workers' stdout: their metrics address, and when rank 0 logged each step.</summary>
    sealed partial class WorkerWatch
    {
        static readonly HttpClient Http = new() { Timeout = TimeSpan.FromSeconds(30) };
        readonly ConcurrentDictionary<string, string> urls = new();
        readonly ConcurrentDictionary<long, long> stepAt = new();
        readonly Dictionary<long, Dictionary<string, double>> cpuAt = new();
        readonly Dictionary<long, Dictionary<string, double>> threadsAt = new();
        HashSet<string> current = [];
        Dictionary<string, int> pids = [];
        string? rank0;
        int lastStep;
        public Task<Scrape>? WarmScrape { get; private set; }
        public Task<Scrape>? LastScrape { get; private set; }

        public void Expect(IEnumerable<string> instances, int steps, Dictionary<string, int> processes)
        {
            lock (this) { current = instances.ToHashSet(); stepAt.Clear(); cpuAt.Clear(); threadsAt.Clear(); pids = processes; rank0 = null; lastStep = steps; WarmScrape = LastScrape = null; }
        }

        public string MetricsUrl(string instance) =>
            urls.TryGetValue(instance, out var u) ? u : throw new InvalidOperationException($"{instance} never printed its metrics address");

        public void OnLine(string instance, string line)
        {
            long now = Stopwatch.GetTimestamp();
            if (MetricsLine().Match(line) is { Success: true } m) { urls[instance] = m.Groups[1].Value; return; }
            if (StepLine().Match(line) is not { Success: true } s) return;
            lock (this)
            {
                if (!current.Contains(instance) || int.Parse(s.Groups[2].Value, CultureInfo.InvariantCulture) != lastStep) return;
                long step = long.Parse(s.Groups[1].Value, CultureInfo.InvariantCulture);
                if (!stepAt.TryAdd(step, now)) return;
                if (step == Warm || step == lastStep)
                {
                    cpuAt[step] = CpuSeconds(pids);
                    threadsAt[step] = ThreadCpuSeconds(pids[instance]);
                }
                rank0 = instance;
                if (step == Warm && WarmScrape is null) WarmScrape = ScrapeAsync(MetricsUrl(instance));
                if (step == lastStep && LastScrape is null) LastScrape = ScrapeAsync(MetricsUrl(instance));
            }
        }

        public (long From, long To, string Rank0, Dictionary<string, double> Cpu0, Dictionary<string, double> Cpu1,
                Dictionary<string, double> Threads0, Dictionary<string, double> Threads1)? Window(int from, int to)
        {
            lock (this)
                return stepAt.TryGetValue(from, out var a) && stepAt.TryGetValue(to, out var b) && rank0 is not null && WarmScrape is not null && LastScrape is not null
                       && cpuAt.TryGetValue(from, out var c0) && cpuAt.TryGetValue(to, out var c1)
                       && threadsAt.TryGetValue(from, out var t0) && threadsAt.TryGetValue(to, out var t1)
                    ? (a, b, rank0, c0, c1, t0, t1) : null;
        }

        /// <summary>phase → (sum of seconds, steps) of the worker's step histogram; its runtime counters as <see cref="OwnRuntime"/>'s.</summary>
        public sealed record Scrape(Dictionary<string, (double Sum, long Count)> Phases, Dictionary<string, double> Runtime);

        public static async Task<Scrape> ScrapeAsync(string baseUrl)
        {
            var text = await Http.GetStringAsync(baseUrl.TrimEnd('/') + "/metrics");
            var sums = new Dictionary<string, double>();
            var counts = new Dictionary<string, long>();
            foreach (Match m in HistogramLine().Matches(text))
            {
                double v = double.Parse(m.Groups[3].Value, CultureInfo.InvariantCulture);
                if (m.Groups[1].Value == "sum") sums[m.Groups[2].Value] = v;
                else counts[m.Groups[2].Value] = (long)v;
            }
            double Sum(string metric, double scale) => Regex.Matches(text, $@"^{metric}(?:{{[^}}]*}})? (\S+)", RegexOptions.Multiline)
                .Sum(m => double.Parse(m.Groups[1].Value, CultureInfo.InvariantCulture)) * scale;
            var runtime = new Dictionary<string, double>
            {
                ["gc pause ms"] = Sum("dotnet_gc_pause_time_seconds_total", 1000),
                ["gcs"] = Sum("dotnet_gc_collections_total", 1), // every generation's: one collection counts once, in its generation
                ["allocated MB"] = Sum("dotnet_gc_heap_total_allocated_bytes_total", 1e-6),
                ["jit ms"] = Sum("dotnet_jit_compilation_time_seconds_total", 1000),
                ["jitted methods"] = Sum("dotnet_jit_compiled_methods_total", 1),
            };
            return new Scrape(sums.Keys.Where(counts.ContainsKey).ToDictionary(k => k, k => (sums[k], counts[k])), runtime);
        }

        [GeneratedRegex(@"^health and metrics on (http://[^, ]+)")]
        private static partial Regex MetricsLine();
        [GeneratedRegex(@"\[rank 0\] step (\d+)/(\d+) \|")]
        private static partial Regex StepLine();
        [GeneratedRegex(@"^deepseek_train_step_seconds_(sum|count)\{[^}]*phase=""(\w+)""[^}]*\} (\S+)", RegexOptions.Multiline)]
        private static partial Regex HistogramLine();
    }

    // ---- Small helpers ----

    static string LoadAverage() => File.ReadAllText("/proc/loadavg").Split(' ')[0];

    static double MedianOf(IEnumerable<double> values)
    {
        var v = values.Order().ToList();
        return v.Count == 0 ? double.NaN : v.Count % 2 == 1 ? v[v.Count / 2] : (v[v.Count / 2 - 1] + v[v.Count / 2]) / 2;
    }

    static List<double> PairedRatios(List<Sample> a, List<Sample> b, Func<Sample, Sample, double> f) =>
        a.Zip(b).Select(p => f(p.First, p.Second)).ToList();

    static string Ratio(List<double> ratios, string format = "P1", bool percent = true)
    {
        string F(double x) => percent ? x.ToString("P1", CultureInfo.InvariantCulture) : x.ToString(format, CultureInfo.InvariantCulture);
        return $"{F(MedianOf(ratios))} (per round: {string.Join(", ", ratios.Select(F))})";
    }

    static Dictionary<string, double> MedianOf(List<Sample> samples, Func<Sample, IReadOnlyDictionary<string, double>> part) =>
        samples.SelectMany(s => part(s).Keys).Distinct()
            .ToDictionary(k => k, k => MedianOf(samples.Where(s => part(s).ContainsKey(k)).Select(s => part(s)[k])));

    /// <summary>utime + stime of each process, in seconds (/proc/pid/stat, clock ticks of 1/100 s); 0 for one that is gone.</summary>
    static Dictionary<string, double> CpuSeconds(IReadOnlyDictionary<string, int> pids) => pids.ToDictionary(p => p.Key, p =>
    {
        try { return StatCpuSeconds(File.ReadAllText($"/proc/{p.Value}/stat")); }
        catch (IOException) { return 0; }
    });

    /// <summary>utime + stime of a /proc stat line (a process's or a thread's), in seconds.</summary>
    static double StatCpuSeconds(string stat)
    {
        var fields = stat[(stat.LastIndexOf(')') + 2)..].Split(' ');
        return (long.Parse(fields[11], CultureInfo.InvariantCulture) + long.Parse(fields[12], CultureInfo.InvariantCulture)) / 100.0;
    }

    /// <summary>
    /// utime + stime of every thread of <paramref name="pid"/>, summed by thread name (/proc/pid/task/tid/stat; the .NET
    /// runtime names its threads, e.g. ".NET TP Worker"; the process's first thread is "main"), in seconds.
    /// </summary>
    static Dictionary<string, double> ThreadCpuSeconds(int pid)
    {
        var byName = new Dictionary<string, double>();
        string[] tasks;
        try { tasks = Directory.GetDirectories($"/proc/{pid}/task"); }
        catch (DirectoryNotFoundException) { return byName; }
        foreach (var dir in tasks)
        {
            try
            {
                var stat = File.ReadAllText(Path.Combine(dir, "stat"));
                var name = Path.GetFileName(dir) == pid.ToString(CultureInfo.InvariantCulture) ? "main" : stat[(stat.IndexOf('(') + 1)..stat.LastIndexOf(')')];
                byName[name] = byName.GetValueOrDefault(name) + StatCpuSeconds(stat);
            }
            catch (IOException) { } // a thread that ended between the listing and the read
        }
        return byName;
    }

    /// <summary>
    /// CPU per step of each thread name over a window; what threads that ended inside the window used (the process's
    /// total minus the named threads') is "(ended threads)".
    /// </summary>
    static Dictionary<string, double> ThreadsPerStep(Dictionary<string, double> t0, Dictionary<string, double> t1, double processSeconds, int steps)
    {
        var perStep = t1.ToDictionary(kv => kv.Key, kv => Math.Max(0, kv.Value - t0.GetValueOrDefault(kv.Key)) / steps);
        perStep["(ended threads)"] = Math.Max(0, processSeconds / steps - perStep.Values.Sum());
        return perStep;
    }

    /// <summary>CPU ms per step by thread name, the worker beside the standalone trainer (medians over the rounds), the biggest differences first.</summary>
    static IEnumerable<string> ThreadTable(List<Sample> standalone, List<Sample> worker)
    {
        var sa = MedianOf(standalone, s => s.ThreadCpuPerStep);
        var w = MedianOf(worker, s => s.ThreadCpuPerStep);
        yield return "| thread | standalone CPU ms per step | 1 worker, rank 0 | difference |";
        yield return "|---|---|---|---|";
        foreach (var name in sa.Keys.Union(w.Keys).OrderByDescending(n => Math.Abs(w.GetValueOrDefault(n) - sa.GetValueOrDefault(n))))
        {
            double a = sa.GetValueOrDefault(name) * 1000, b = w.GetValueOrDefault(name) * 1000;
            if (Math.Max(a, b) < 0.05) continue;
            yield return FormattableString.Invariant($"| {name} | {a:F1} | {b:F1} | {b - a:+0.0;-0.0;0.0} |");
        }
    }

    static string Cpu(IReadOnlyDictionary<string, double> perStep) =>
        string.Join(" / ", CpuColumns.Select(k => perStep.TryGetValue(k, out var v) ? (v * 1000).ToString("F0", CultureInfo.InvariantCulture) : "–"));

    static string Phases(IReadOnlyDictionary<string, double> p) =>
        string.Join(" / ", new[] { "data", "forward", "backward", "communication", "optimizer" }
            .Select(k => p.TryGetValue(k, out var v) ? (v * 1000).ToString("F1", CultureInfo.InvariantCulture) : "–"));
}
