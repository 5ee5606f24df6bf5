// What exact gradient sums cost: ExactGradientSum's add per micro-batch and its mean per step, beside a float32 add and a training step.
using System.Diagnostics;
using DeepSeekCluster.Training.Data;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Model;
using static TorchSharp.torch;

namespace DeepSeekCluster.Bench;

public static class ExactSumBench
{
    public static void Run(string[] args)
    {
        var o = new BenchArgs("exact-sum", args);
        var presets = o.List("--presets", "tiny,small");
        int repeats = o.Int("--repeats", 10, 1);
        var micros = o.Ints("--micro-batches", "8,2", 1).ToList();
        o.Done();
        Console.WriteLine($"# Exact gradient sums — {DateTime.UtcNow:yyyy-MM-dd HH:mm} UTC, {Environment.ProcessorCount} cores, torch threads {get_num_threads()}, load {File.ReadAllText("/proc/loadavg").Split(' ')[0]}");
        Console.WriteLine();
        Console.WriteLine("| preset | params | micro-batch x count | train step s | exact add per micro-batch s | exact mean per step s | float32 add per micro-batch s | exact sum share of the step |");
        Console.WriteLine("|---|---|---|---|---|---|---|---|");
        foreach (var name in presets)
        foreach (int microBatch in micros)
        {
            var config = DeepSeekConfig.Preset(name);
            // The training bench's CPU shapes, cut into micro-batches (the cost is per micro-batch: 8 is the default job's).
            var options = name == "tiny"
                ? new TrainingOptions { SeqLen = 128, GlobalBatch = 16, MicroBatch = microBatch, Steps = 100, WarmupSteps = 1 }
                : new TrainingOptions { SeqLen = 256, GlobalBatch = 8, MicroBatch = microBatch, Steps = 100, WarmupSteps = 1 };
            int micro = options.GlobalBatch / options.MicroBatch;
            var rng = new Random(1);
            var tokens = new int[(options.SeqLen + 1) * 64];
            for (int i = 0; i < tokens.Length; i++) tokens[i] = rng.Next(config.VocabSize);
            manual_seed(1);
            using var model = new DeepSeekForCausalLM(config).InitializeWeights();
            using var trainer = new Trainer(model, new TokenDataset(tokens, options.SeqLen), null, options, CPU, 0);
            trainer.TrainStep();
            var step = Stopwatch.StartNew();
            for (int i = 0; i < 3; i++) trainer.TrainStep();
            double stepS = step.Elapsed.TotalSeconds / 3;

            var parameters = trainer.Optimizer.Slots.Select(s => s.Param).ToList();
            using var sum = new ExactGradientSum(parameters);
            using (no_grad()) foreach (var p in parameters) p.grad = randn_like(p).mul_(1e-3);
            var grads = parameters.Select(p => p.grad!.clone()).ToList();
            double add = Time(repeats, () =>
            {
                sum.AddAndClearGradients();
                using (no_grad()) for (int i = 0; i < parameters.Count; i++) parameters[i].grad!.copy_(grads[i]);
            });
            double restore = Time(repeats, () => { using (no_grad()) for (int i = 0; i < parameters.Count; i++) parameters[i].grad!.copy_(grads[i]); });
            double mean = Time(repeats, () => sum.WriteMean(micro));
            var accumulators = parameters.Select(p => zeros_like(p)).ToList();
            double floatAdd = Time(repeats, () => { using (no_grad()) for (int i = 0; i < parameters.Count; i++) accumulators[i].add_(grads[i]); });
            double exactPerStep = (add - restore) * micro + mean;
            Console.WriteLine($"| {name} | {config.ParameterCount() / 1e6:F1} M | {microBatch} x {micro} | {stepS:F3} | {add - restore:F4} | {mean:F4} | {floatAdd:F4} | {exactPerStep / stepS:P1} |");
            foreach (var a in accumulators) a.Dispose();
            foreach (var g in grads) g.Dispose();
        }
    }

    static double Time(int repeats, Action action)
    {
        action();
        var sw = Stopwatch.StartNew();
        for (int i = 0; i < repeats; i++) action();
        return sw.Elapsed.TotalSeconds / repeats;
    }
}
