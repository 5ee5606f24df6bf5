// Plain data parallelism's gradient all-reduce overlapped with the last micro-batch's backward against the all-reduce
// after the backward: step time and its phases, one run, the two modes interleaved.
using System.Diagnostics;
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Collectives.Nccl;
using TorchSharp;
using DeepSeekCluster.Training.Data;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Model;
using static TorchSharp.torch;

namespace DeepSeekCluster.Bench;

/// <summary>
/// dp 2 (zero 0), ranks as threads over tcp on 127.0.0.1 (as the equality tests run them), 25 MB buckets (the reducer's
/// default; --bucket-mb). The two modes alternate (after, overlapped, after, ...) so that a change in the machine's load falls on both;
/// each row is the median step of its rounds, the slowest rank's. "comm" is what the step waited for the all-reduce after
/// the backward: the whole reduction without the overlap, the buckets still in flight (and the rest) with it.
/// </summary>
public static class DpOverlapBench
{
    public static void Run(string[] args)
    {
        var o = new BenchArgs("dp-overlap", args);
        var presets = o.List("--presets", "tiny");
        int steps = o.Int("--steps", 3, 1), rounds = o.Int("--rounds", 3, 1);
        int seqLen = o.Int("--seq-len", 128, 1), batch = o.Int("--batch", 16, 1), micro = o.Int("--micro", 4, 1);
        long bucketBytes = (long)(o.Double("--bucket-mb", 25, above: 0) * (1 << 20));
        bool onGpus = o.Choice("--device", "cpu", "cpu", "cuda") == "cuda";
        o.Done();
        Console.WriteLine($"# DeepSeekCluster data-parallel overlap benchmark — {DateTime.UtcNow:yyyy-MM-dd HH:mm} UTC");
        Console.WriteLine($"machine: {Environment.ProcessorCount} cores, load average {Load()} at start; fp32, dp 2 zero 0, ranks as threads {(onGpus ? "over NCCL on cuda:0 and cuda:1" : "over tcp on 127.0.0.1")}, " +
                          $"seq {seqLen}, global batch {batch}, micro-batch {micro} ({batch / 2 / micro} per rank per step), buckets of {bucketBytes / 1048576.0:0.##} MiB, {rounds} alternating rounds of {steps} steps (+1 warm-up) per mode");
        Console.WriteLine();
        Console.WriteLine("| preset | all-reduce | step s (median) | fwd / bwd / comm / opt s | buckets per step (during the backward) | load during |");
        Console.WriteLine("|---|---|---|---|---|---|");
        foreach (var preset in presets)
        {
            var results = new Dictionary<bool, List<Result>> { [false] = [], [true] = [] };
            for (int r = 0; r < rounds; r++)
                foreach (bool overlap in new[] { false, true })
                    results[overlap].Add(TimeSteps(preset, overlap, steps, seqLen, batch, micro, bucketBytes, onGpus));
            foreach (bool overlap in new[] { false, true })
            {
                var rs = results[overlap].OrderBy(x => x.Step).ToList();
                var m = rs[rs.Count / 2];
                Console.WriteLine($"| {preset} | {(overlap ? "overlapped with the last backward" : "after the backward")} | {m.Step:F3} | {m.Fwd:F3} / {m.Bwd:F3} / {m.Comm:F3} / {m.Opt:F3} | {m.Buckets:F0} ({m.During:F0}) | {string.Join(", ", results[overlap].Select(x => x.Load))} |");
            }
            Console.WriteLine($"| {preset} | overlapped / after, per round | {string.Join(", ", results[true].Zip(results[false], (o, a) => (o.Step / a.Step).ToString("F2")))} | | | |");
        }
        Console.WriteLine($"load average at end: {Load()}");
    }

    sealed record Result(double Step, double Fwd, double Bwd, double Comm, double Opt, double Buckets, double During, string Load);

    static Result TimeSteps(string preset, bool overlap, int measured, int seqLen, int batch, int micro, long bucketBytes, bool onGpus)
    {
        var config = DeepSeekConfig.Preset(preset);
        var options = new TrainingOptions { SeqLen = seqLen, GlobalBatch = batch, MicroBatch = micro, Steps = measured + 1, WarmupSteps = 1, OverlapGradientReduction = overlap };
        var rng = new Random(1);
        var tokens = new int[(options.SeqLen + 1) * Math.Max(64, batch * (measured + 1))];
        for (int i = 0; i < tokens.Length; i++) tokens[i] = rng.Next(config.VocabSize);
        var data = new TokenDataset(tokens, options.SeqLen);
        var models = Enumerable.Range(0, 2).Select(_ =>
        {
            manual_seed(1);
            return new DeepSeekForCausalLM(config).InitializeWeights();
        }).ToArray();
        var results = (onGpus ? OnGpus : (Func<Func<ICollective, Result>, Result[]>)(body => ExpertBench.OnRanks(2, c => body(c))))(c =>
        {
            var device = onGpus ? new Device(DeviceType.CUDA, c.Rank) : CPU;
            models[c.Rank].to(device);
            using var trainer = new Trainer(models[c.Rank], data, null, options, device, 1e11, c.Rank, 2, new BucketedGradientReducer(c, bucketBytes));
            if (trainer.OverlapsReduction != overlap) throw new InvalidOperationException($"the trainer {(overlap ? "does not overlap" : "overlaps")} its all-reduce");
            trainer.TrainStep(); // warm-up
            var (b0, d0) = trainer.OverlappedBuckets;
            var sw = Stopwatch.StartNew();
            var m = Enumerable.Range(0, measured).Select(_ => trainer.TrainStep()).ToList();
            double s = sw.Elapsed.TotalSeconds / measured;
            var (b1, d1) = trainer.OverlappedBuckets;
            return new Result(s, m.Average(x => x.Times.ForwardSeconds), m.Average(x => x.Times.BackwardSeconds), m.Average(x => x.Times.CommunicationSeconds),
                m.Average(x => x.Times.OptimizerSeconds), (b1 - b0) / (double)measured, (d1 - d0) / (double)measured, Load());
        });
        foreach (var m in models) m.Dispose();
        return results.MaxBy(r => r.Step)!;
    }

    /// <summary>Two ranks as threads, rank r on cuda:r, over one NCCL communicator (needs two GPUs: NCCL refuses two ranks on one).</summary>
    static Result[] OnGpus(Func<ICollective, Result> body)
    {
        var id = NcclCollective.CreateUniqueId();
        var tasks = Enumerable.Range(0, 2).Select(r => Task.Factory.StartNew(() =>
        {
            using var c = NcclCollective.Create(id, r, 2, 1, new Device(DeviceType.CUDA, r), TimeSpan.FromSeconds(120));
            return body(c);
        }, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default)).ToArray();
        Task.WaitAll(tasks);
        return [.. tasks.Select(t => t.Result)];
    }

    static string Load() => File.ReadAllText("/proc/loadavg").Split(' ')[0];
}
