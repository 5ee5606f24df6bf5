// ZeRO-3 with its exchanges overlapped (per-layer gradient reduce-scatter during the backward, next layer's gather
// prefetched) against the reduce-scatter after the backward with waiting gathers: step time and peak storage, one run.
using System.Diagnostics;
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Data;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Parallel;
using static TorchSharp.torch;

namespace DeepSeekCluster.Bench;

/// <summary>
/// dp 2 ZeRO-3, ranks as threads over tcp on 127.0.0.1 (as the equality tests run them). The two modes alternate
/// (off, on, off, on, ...) so that a change in the machine's load falls on both; each row is the median step of its
/// rounds, the slowest rank's. Peak: the largest parameter and gradient storage a rank held at once during the steps
/// (ZeroParameters.PeakBytes), beside the planner's prediction of the same.
/// </summary>
public static class Zero3Bench
{
    public static void Run(string[] args)
    {
        var o = new BenchArgs("zero3", args);
        var presets = o.List("--presets", "tiny");
        int steps = o.Int("--steps", 3, 1), rounds = o.Int("--rounds", 2, 1);
        o.Done();
        Console.WriteLine($"# DeepSeekCluster ZeRO-3 overlap benchmark — {DateTime.UtcNow:yyyy-MM-dd HH:mm} UTC");
        Console.WriteLine($"machine: {Environment.ProcessorCount} cores, load average {Load()} at start; fp32, dp 2 zero 3, ranks as threads over tcp on 127.0.0.1, {rounds} alternating rounds of {steps} steps (+1 warm-up) per mode");
        Console.WriteLine();
        Console.WriteLine("| preset | exchanges | step s (median) | fwd / bwd / comm s | peak parameter + gradient MiB per rank (predicted) | prefetches used per step | load during |");
        Console.WriteLine("|---|---|---|---|---|---|---|");
        foreach (var preset in presets)
        {
            var results = new Dictionary<bool, List<Result>> { [false] = [], [true] = [] };
            for (int r = 0; r < rounds; r++)
                foreach (bool overlap in new[] { false, true })
                    results[overlap].Add(TimeSteps(preset, overlap, steps));
            foreach (bool overlap in new[] { false, true })
            {
                var rs = results[overlap].OrderBy(x => x.Step).ToList();
                var m = rs[rs.Count / 2];
                Console.WriteLine($"| {preset} | {(overlap ? "per-layer reduce-scatter + prefetch" : "after the backward, gathers wait")} | {m.Step:F3} | {m.Fwd:F3} / {m.Bwd:F3} / {m.Comm:F3} | {m.Peak / 1048576.0:F2} ({m.Predicted / 1048576.0:F2}) | {m.Prefetches:F0} | {string.Join(", ", results[overlap].Select(x => x.Load))} |");
            }
        }
        Console.WriteLine($"load average at end: {Load()}");
    }

    sealed record Result(double Step, double Fwd, double Bwd, double Comm, long Peak, long Predicted, double Prefetches, string Load);

    static Result TimeSteps(string preset, bool overlap, int measured)
    {
        var config = DeepSeekConfig.Preset(preset);
        var options = new TrainingOptions { SeqLen = 128, GlobalBatch = 16, MicroBatch = 4, Steps = measured + 1, WarmupSteps = 1, Zero = 3, Zero3Overlap = overlap };
        var rng = new Random(1);
        var tokens = new int[(options.SeqLen + 1) * 64];
        for (int i = 0; i < tokens.Length; i++) tokens[i] = rng.Next(config.VocabSize);
        var data = new TokenDataset(tokens, options.SeqLen);
        var layout = ParallelLayout.Even(2, 1, config.NumHiddenLayers).WithShards(1, 3, config.NRoutedExperts);
        var models = Enumerable.Range(0, 2).Select(_ =>
        {
            manual_seed(1);
            return new DeepSeekForCausalLM(config).InitializeWeights();
        }).ToArray();
        var results = ExpertBench.OnRanks(2, c =>
        {
            using var trainer = new Trainer(models[c.Rank], data, null, options, CPU, 1e11, c.Rank, 2, new BucketedGradientReducer(c));
            var sharded = trainer.ShardedParameters!;
            trainer.TrainStep(); // warm-up
            sharded.TrackPeak = true;
            long prefetched = sharded.PrefetchesUsed;
            var sw = Stopwatch.StartNew();
            var m = Enumerable.Range(0, measured).Select(_ => trainer.TrainStep()).ToList();
            double s = sw.Elapsed.TotalSeconds / measured;
            var predicted = MemoryPlanner.Predict(config, layout, c.Rank, new MemoryInputs("fp32", "full", options.MicroBatch, options.SeqLen, Zero3Overlap: overlap));
            long scratch = Math.Min(MemoryPlanner.LocalParameters(config, layout, c.Rank), 1L << 22) * sizeof(double); // the sum's float64 scratch
            long held = predicted.Parameters + predicted.Gathered + predicted.Gradients - predicted.GradientWords - scratch;
            return new Result(s, m.Average(x => x.Times.ForwardSeconds), m.Average(x => x.Times.BackwardSeconds), m.Average(x => x.Times.CommunicationSeconds),
                sharded.PeakBytes, held, (sharded.PrefetchesUsed - prefetched) / (double)measured, Load());
        });
        foreach (var m in models) m.Dispose();
        return results.MaxBy(r => r.Step)!;
    }

    static string Load() => File.ReadAllText("/proc/loadavg").Split(' ')[0];
}
