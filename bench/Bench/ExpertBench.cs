// Expert parallelism on this machine: step time of dp 2 x ep 2 (with and without ZeRO-1/3) and dp 2 ZeRO-3 against plain dp 2,
// dp 2 x pp 2 x ep 2 against dp 2 x pp 2, in fp32 or bf16, and the tcp all-to-all's bandwidth beside a memory copy.
using System.Diagnostics;
using System.Net;
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Collectives.Tcp;
using DeepSeekCluster.Training.Data;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Parallel;
using DeepSeekCluster.Training.Pipeline;
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.Bench;

/// <summary>
/// Ranks are threads of this process over real sockets on 127.0.0.1 (as the equality tests run them), so both layouts
/// share the same cores: the step times compare what each layout computes and moves, not more hardware. The all-to-all
/// moves each rank's buffer split evenly over the ranks; its bandwidth is the bytes a rank sends to others per second.
/// </summary>
public static class ExpertBench
{
    public static void Run(string[] args)
    {
        var o = new BenchArgs("ep", args);
        var presets = o.List("--presets", "tiny");
        int steps = o.Int("--steps", 4, 1), warmup = o.Int("--warmup", 1, 0);
        // As `bench -- recompute` names it; the trainer's own check (TrainingOptions.Validate) would refuse others later, inside a rank.
        var precision = o.Choice("--precision", "fp32", "fp32", "bf16");
        o.Done();
        Console.WriteLine($"# DeepSeekCluster expert-parallel benchmark — {DateTime.UtcNow:yyyy-MM-dd HH:mm} UTC");
        Console.WriteLine($"machine: {Environment.ProcessorCount} cores, load average {File.ReadAllText("/proc/loadavg").Split(' ')[0]} at start; {precision}, ranks as threads over tcp on 127.0.0.1");
        double copy = CollectiveBench.MemoryCopyBandwidth(256 << 20);
        Console.WriteLine($"memory copy (256 MiB, single thread): {copy / 1e9:F2} GB/s");
        Console.WriteLine();
        Console.WriteLine("| world | MiB per rank | time ms | sent GB/s per rank | / memcpy |");
        Console.WriteLine("|---|---|---|---|---|");
        foreach (int world in new[] { 2, 4 })
            foreach (int mb in new[] { 4, 32 })
            {
                double t = TimeAllToAll(world, (long)mb << 20);
                double sent = ((long)mb << 20) * (world - 1.0) / world / t;
                Console.WriteLine($"| {world} | {mb} | {t * 1e3:F1} | {sent / 1e9:F2} | {sent / copy:P0} |");
            }
        Console.WriteLine();
        Console.WriteLine("| preset | layout | step s | fwd / bwd / comm s | fan-out ranks/token | bytes sent per step per rank | parameter MiB per rank between steps (predicted) | optimizer MiB per rank (predicted) |");
        Console.WriteLine("|---|---|---|---|---|---|---|---|");
        foreach (var preset in presets)
            // dp 1: one process running every expert itself, the same global batch in two micro-batches (the ep path's reference).
            foreach (var (dp, ep, zero) in new[] { (1, 1, 0), (2, 1, 0), (2, 2, 0), (2, 2, 1), (2, 1, 3), (2, 2, 3) })
            {
                var r = TimeSteps(preset, precision, dp, ep, zero, warmup, steps);
                Console.WriteLine($"| {preset} | dp {dp}{(ep > 1 ? $" x ep {ep}" : "")}{(zero > 0 ? $", zero {zero}" : "")} | {r.Step:F3} | {r.Fwd:F3} / {r.Bwd:F3} / {r.Comm:F3} | {(ep > 1 ? r.FanOut.ToString("F2") : "-")} | {(ep > 1 ? $"{r.Bytes / 1e6:F2} MB" : "-")} | {r.ParamBytes / 1048576.0:F1} ({r.PredictedParams / 1048576.0:F1}) | {r.OptimizerBytes / 1048576.0:F1} ({r.PredictedOptimizer / 1048576.0:F1}) |");
            }
        Console.WriteLine();
        Console.WriteLine("| preset | layout (4 ranks) | step s | fwd / bwd / comm s (slowest rank) | fan-out ranks/token (mean of ranks) | bytes sent per step (most of any rank) |");
        Console.WriteLine("|---|---|---|---|---|---|");
        foreach (var preset in presets)
            foreach (int ep in new[] { 1, 2 })
            {
                var r = TimePipelineSteps(preset, precision, ep, warmup, steps);
                Console.WriteLine($"| {preset} | dp 2 x pp 2{(ep > 1 ? $" x ep {ep}" : "")} | {r.Step:F3} | {r.Fwd:F3} / {r.Bwd:F3} / {r.Comm:F3} | {(ep > 1 ? r.FanOut.ToString("F2") : "-")} | {(ep > 1 ? $"{r.Bytes / 1e6:F2} MB" : "-")} |");
            }
        Console.WriteLine($"load average at end: {File.ReadAllText("/proc/loadavg").Split(' ')[0]}");
    }

    internal static T[] OnRanks<T>(int world, Func<TcpCollective, T> body)
    {
        var options = new TcpCollectiveOptions { Timeout = TimeSpan.FromSeconds(120) };
        var key = System.Security.Cryptography.RandomNumberGenerator.GetBytes(32);
        var rendezvous = Enumerable.Range(0, world).Select(r => new TcpRendezvous("bench", 1, key, r, world, new IPEndPoint(IPAddress.Loopback, 0))).ToArray();
        var endpoints = rendezvous.Select(r => $"127.0.0.1:{r.LocalEndpoint.Port}").ToArray();
        var tasks = rendezvous.Select(rv => Task.Factory.StartNew(() =>
        {
            using var c = rv.Connect(endpoints, options);
            return body(c);
        }, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default)).ToArray();
        Task.WaitAll(tasks);
        return [.. tasks.Select(t => t.Result)];
    }

    /// <summary>Median seconds of one all-to-all of <paramref name="bytes"/> per rank, split evenly over the ranks.</summary>
    static double TimeAllToAll(int world, long bytes) => OnRanks(world, c =>
    {
        long rows = bytes / 4 / 1024 / world * world;
        using var input = ones(rows, 1024, dtype: ScalarType.Float32);
        using var output = empty(rows, 1024, dtype: ScalarType.Float32);
        var counts = Enumerable.Repeat(rows / world, world).ToArray();
        c.AllToAll(input, counts, output, counts); // warm-up
        var times = new List<double>();
        for (int i = 0; i < 9; i++)
        {
            c.Barrier();
            var sw = Stopwatch.StartNew();
            c.AllToAll(input, counts, output, counts);
            times.Add(sw.Elapsed.TotalSeconds);
        }
        times.Sort();
        return times[times.Count / 2];
    }).Max();

    sealed record StepResult(double Step, double Fwd, double Bwd, double Comm, double FanOut, double Bytes, long ParamBytes, long OptimizerBytes, long PredictedOptimizer, long PredictedParams);

    static StepResult TimeSteps(string preset, string precision, int dp, int ep, int zero, int warmup, int measured)
    {
        var config = DeepSeekConfig.Preset(preset);
        var options = new TrainingOptions { SeqLen = 128, GlobalBatch = 16, MicroBatch = 8, Steps = warmup + measured, WarmupSteps = 1, Ep = ep, Zero = zero, Precision = precision };
        var rng = new Random(1);
        var tokens = new int[(options.SeqLen + 1) * 64];
        for (int i = 0; i < tokens.Length; i++) tokens[i] = rng.Next(config.VocabSize);
        var data = new TokenDataset(tokens, options.SeqLen);
        var layout = ParallelLayout.Even(dp, 1, config.NumHiddenLayers).WithShards(ep, zero, config.NRoutedExperts);
        var models = Enumerable.Range(0, dp).Select(r =>
        {
            manual_seed(1);
            var m = new DeepSeekForCausalLM(config).InitializeWeights();
            if (ep > 1) ExpertParallel.ShardModel(m, layout, r);
            if (precision == "bf16") m.to(ScalarType.BFloat16); // as the worker does: AdamW keeps fp32 master weights and moments
            return m;
        }).ToArray();
        var results = OnRanks(dp, c =>
        {
            using var trainer = new Trainer(models[c.Rank], data, null, options, CPU, 1e11, c.Rank, dp, new BucketedGradientReducer(c));
            for (int i = 0; i < warmup; i++) trainer.TrainStep();
            var parallel = trainer.Model.MoeLayers().First().Parallel;
            parallel?.TakeTraffic();
            var sw = Stopwatch.StartNew();
            var m = Enumerable.Range(0, measured).Select(_ => trainer.TrainStep()).ToList();
            double s = sw.Elapsed.TotalSeconds / measured;
            var traffic = parallel?.TakeTraffic() ?? default;
            long bytes = trainer.ShardedParameters?.ResidentBytes ?? trainer.Model.parameters().Sum(p => p.numel() * p.element_size()); // ZeRO-3: its rows
            long optimizer = trainer.Optimizer.StateTensors().Sum(kv => kv.Value.numel() * kv.Value.element_size());
            var predicted = MemoryPlanner.Predict(config, layout, c.Rank, new MemoryInputs(precision, "none", options.MicroBatch, options.SeqLen));
            return new StepResult(s, m.Average(x => x.Times.ForwardSeconds), m.Average(x => x.Times.BackwardSeconds), m.Average(x => x.Times.CommunicationSeconds),
                traffic.FanOut, (double)traffic.SentBytes / measured, bytes, optimizer, predicted.Optimizer, predicted.Parameters);
        });
        foreach (var m in models) m.Dispose();
        return results.MaxBy(r => r.Step)!;
    }

    /// <summary>
    /// dp 2 x pp 2 (each stage's two replicas its ep group when <paramref name="ep"/> is 2) as four threads: stage links and
    /// per-stage rings over 127.0.0.1, the 1F1B schedule with two micro-batches per replica, as the cluster runs it.
    /// </summary>
    static StepResult TimePipelineSteps(string preset, string precision, int ep, int warmup, int measured)
    {
        const int dp = 2, pp = 2;
        var config = DeepSeekConfig.Preset(preset);
        var options = new TrainingOptions { SeqLen = 128, GlobalBatch = 16, MicroBatch = 4, Steps = warmup + measured, WarmupSteps = 1, Ep = ep, Precision = precision };
        var rng = new Random(1);
        var tokens = new int[(options.SeqLen + 1) * 64];
        for (int i = 0; i < tokens.Length; i++) tokens[i] = rng.Next(config.VocabSize);
        var data = new TokenDataset(tokens, options.SeqLen);
        var layout = ParallelLayout.Even(dp, pp, config.NumHiddenLayers).WithShards(ep, 0, config.NRoutedExperts);
        // Built here, one after another: torch's generator is process-wide, so every run routes the same tokens alike.
        var models = Enumerable.Range(0, dp * pp).Select(r =>
        {
            manual_seed(1);
            var m = new DeepSeekForCausalLM(config).InitializeWeights();
            if (ep > 1) ExpertParallel.ShardModel(m, layout, r);
            if (precision == "bf16") m.to(ScalarType.BFloat16); // as the worker does: AdamW keeps fp32 master weights and moments
            return m;
        }).ToArray();
        var results = OnStages(dp, pp, (stage, replica, ring, links) =>
        {
            using var model = models[layout.Rank(stage, replica)];
            var pipelineStage = new PipelineStage(model, layout, stage);
            using var trainer = new PipelineTrainer(pipelineStage, new PermutedSamples(data, 1), options, CPU, 1e11, links, replica, dp, new BucketedGradientReducer(ring));
            for (int i = 0; i < warmup; i++) trainer.TrainStep();
            var parallel = pipelineStage.MoeLayers().FirstOrDefault()?.Parallel;
            parallel?.TakeTraffic();
            var sw = Stopwatch.StartNew();
            var m = Enumerable.Range(0, measured).Select(_ => trainer.TrainStep()).ToList();
            double seconds = sw.Elapsed.TotalSeconds / measured;
            var traffic = parallel?.TakeTraffic() ?? default;
            return new StepResult(seconds, m.Average(x => x.Times.ForwardSeconds), m.Average(x => x.Times.BackwardSeconds), m.Average(x => x.Times.CommunicationSeconds),
                traffic.FanOut, (double)traffic.SentBytes / measured, 0, 0, 0, 0);
        });
        // The stages hold different MoE layers, so their traffic differs: the ranks' mean fan-out and the most any rank sent.
        return results.MaxBy(r => r.Step)! with { FanOut = results.Average(r => r.FanOut), Bytes = results.Max(r => r.Bytes) };
    }

    /// <summary>dp x pp ranks as threads: each stage's replicas a tcp ring, each replica's stages joined by stage links; results stage-major.</summary>
    internal static T[] OnStages<T>(int dp, int pp, Func<int, int, ICollective, PipelineLinks, T> body)
    {
        var timeout = TimeSpan.FromSeconds(120);
        var key = System.Security.Cryptography.RandomNumberGenerator.GetBytes(32);
        var listeners = new StageListener[pp, dp];
        var rings = new TcpRendezvous[pp, dp];
        for (int s = 0; s < pp; s++)
            for (int r = 0; r < dp; r++)
            {
                listeners[s, r] = new StageListener("bench", 1, key, s, r, new IPEndPoint(IPAddress.Loopback, 0));
                rings[s, r] = new TcpRendezvous($"bench/stage-{s}", 1, key, r, dp, new IPEndPoint(IPAddress.Loopback, 0));
            }
        var tasks = new List<Task<T>>();
        for (int s = 0; s < pp; s++)
            for (int r = 0; r < dp; r++)
            {
                int stage = s, replica = r;
                tasks.Add(Task.Factory.StartNew(() =>
                {
                    using var listener = listeners[stage, replica];
                    using var ring = rings[stage, replica].Connect([.. Enumerable.Range(0, dp).Select(x => $"127.0.0.1:{rings[stage, x].LocalEndpoint.Port}")],
                                                                   new TcpCollectiveOptions { Timeout = timeout });
                    string Address(int st) => $"127.0.0.1:{listeners[st, replica].LocalEndpoint.Port}";
                    using var links = PipelineLinks.Connect("bench", 1, key, stage, pp, replica, stage == 0 ? null : listener,
                                                            stage == 0 ? null : Address(stage - 1), stage == pp - 1 ? null : Address(stage + 1), timeout);
                    return body(stage, replica, ring, links);
                }, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default));
            }
        Task.WaitAll([.. tasks]);
        return [.. tasks.Select(t => t.Result)];
    }
}
