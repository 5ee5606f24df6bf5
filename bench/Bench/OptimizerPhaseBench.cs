// The training step's optimizer phase call by call (exact sum's add and mean, global-norm clip, AdamW step), the
// per-parameter reference path against the flat-buffer path, interleaved round by round on one model.
using System.Diagnostics;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Optim;
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.Bench;

public static class OptimizerPhaseBench
{
    public static void Run(string[] args)
    {
        var o = new BenchArgs("optimizer-phase", args);
        var presets = o.List("--presets", "small,tiny");
        var precisions = o.List("--precisions", "bf16,fp32");
        int rounds = o.Int("--rounds", 5, 1);
        long? chunk = o.OptionalInt("--sum-chunk", 1);
        o.Done();
        Console.WriteLine($"# Optimizer phase, per call — {DateTime.UtcNow:yyyy-MM-dd HH:mm} UTC, {Environment.ProcessorCount} cores, torch threads {get_num_threads()}");
        Console.WriteLine($"load average at start: {File.ReadAllText("/proc/loadavg").Trim()}");
        Console.WriteLine();
        Console.WriteLine("| preset | precision | path | exact add per micro-batch s | exact mean s | clip s | AdamW step s | mean + clip + step s | rounds (min–max of the sum) |");
        Console.WriteLine("|---|---|---|---|---|---|---|---|---|");
        foreach (var name in presets)
        foreach (var precision in precisions)
        {
            manual_seed(1);
            var config = DeepSeekConfig.Preset(name);
            using var model = new DeepSeekForCausalLM(config).InitializeWeights();
            if (precision == "bf16") model.to(ScalarType.BFloat16);
            using var optimizer = new AdamW(model.named_parameters().Select(p => (p.name, (Tensor)p.parameter)));
            var buffers = optimizer.AdoptGradients() ?? throw new InvalidOperationException("the bench needs whole, contiguous parameters");
            var parameters = optimizer.Slots.Select(s => s.Param).ToList();
            using var reference = new ExactGradientSum(parameters);
            using var flat = ExactGradientSum.OverFlatBuffers(() => optimizer.AdoptGradients()!, chunk);
            List<Tensor> saved;
            using (no_grad()) { foreach (var b in buffers) b.normal_(0, 1e-2); saved = [.. buffers.Select(b => b.clone())]; }
            void Restore() { using (no_grad()) for (int i = 0; i < buffers.Count; i++) buffers[i].copy_(saved[i]); }

            var times = new Dictionary<string, List<double[]>> { ["per-parameter"] = [], ["flat"] = [] };
            for (int r = 0; r <= rounds; r++) // round 0 warms up
                foreach (var (path, sum) in new[] { ("per-parameter", reference), ("flat", flat) })
                {
                    optimizer.Flat = path == "flat";
                    sum.Clear();
                    Restore();
                    double add = Time(sum.AddAndClearGradients);
                    double mean = Time(() => sum.WriteMean(1));
                    double clip = Time(() => optimizer.ClipGradNorm(1e-3)); // small: the scaling runs, as in a clipped step
                    double step = Time(() => optimizer.Step(1e-4));
                    if (r > 0) times[path].Add([add, mean, clip, step]);
                }
            foreach (var (path, list) in times)
            {
                double Avg(int i) => list.Average(t => t[i]);
                var phase = list.Select(t => t[1] + t[2] + t[3]).ToList();
                Console.WriteLine($"| {name} | {precision} | {path} | {Avg(0):F4} | {Avg(1):F4} | {Avg(2):F4} | {Avg(3):F4} | {phase.Average():F4} | {rounds} ({phase.Min():F4}–{phase.Max():F4}) |");
            }
            double ratio = times["flat"].Sum(t => t[1] + t[2] + t[3]) / times["per-parameter"].Sum(t => t[1] + t[2] + t[3]);
            double addRatio = times["flat"].Sum(t => t[0]) / times["per-parameter"].Sum(t => t[0]);
            Console.WriteLine($"|  |  | flat / per-parameter | {addRatio:F2}× | | | | {ratio:F2}× | |");
            foreach (var s in saved) s.Dispose();
        }
        Console.WriteLine($"load average at end: {File.ReadAllText("/proc/loadavg").Trim()}");
    }

    static double Time(Action action)
    {
        var sw = Stopwatch.StartNew();
        action();
        return sw.Elapsed.TotalSeconds;
    }
}
