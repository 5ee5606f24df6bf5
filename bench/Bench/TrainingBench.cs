// Training-step benchmark: tokens/s, MFU (against HardwarePeak) and peak memory per preset, beside this machine's measured matmul throughput.
using System.Diagnostics;
using DeepSeekCluster.Training.Data;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Perf;
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.Bench;

public static class TrainingBench
{
    public static void Run(string[] args)
    {
        var o = new BenchArgs("train", args);
        var presets = o.List("--presets", "tiny,small");
        var precisions = o.List("--precisions", "fp32,bf16");
        int warmup = o.Int("--warmup", 3), measured = o.Int("--steps", 8);
        int seqLen = o.Int("--seq-len", 0), batch = o.Int("--batch", 0); // 0: the preset's
        var deviceName = o.String("--device", "auto");
        int? torchThreads = o.OptionalInt("--torch-threads", 1);
        // flat: AdamW over flat buffers (the trainer's); plain: the per-slot step it replaced; both: side by side, steps interleaved.
        var optimizers = o.Choice("--optimizer", "flat", "flat", "plain", "both") is "both" ? new[] { "plain", "flat" } : [o.String("--optimizer", "flat")];
        // auto, grouped, per-expert (GroupedExperts), or both: per-expert and grouped side by side, steps interleaved.
        var expertKernels = o.String("--experts", "auto") is "both" ? new[] { "per-expert", "grouped" } : [o.String("--experts", "auto")];
        // fast: the exact sum's one-pass CPU kernels and lone-term shortcut (the default); torch: its op chain; both: side by side.
        var sums = o.Choice("--exact-sum", "fast", "fast", "torch", "both") is "both" ? new[] { "torch", "fast" } : [o.String("--exact-sum", "fast")];
        // auto (the default: written out for bf16 on a CPU up to 256 keys), fused, written-out, or both: fused and auto side by side.
        var attentions = o.Choice("--attention", "auto", "auto", "fused", "written-out", "both") is "both" ? new[] { "fused", "auto" } : [o.String("--attention", "auto")];
        // exact: each expert on its exact token count (no rounding up for oneDNN's primitive cache), as before it.
        bool exactExpertRows = o.Choice("--expert-rows", "auto", "auto", "exact") == "exact";
        o.Done();
        var device = StandaloneRun.ResolveDevice(deviceName);
        if (torchThreads is { } threads) set_num_threads(threads);
        var attentionKernels = attentions.Select(a => a switch
        {
            "auto" => AttentionKernel.Auto, "fused" => AttentionKernel.Fused, "written-out" => AttentionKernel.WrittenOut,
            _ => throw new ArgumentException($"--attention must be auto, fused, written-out or both, got '{a}'"),
        }).ToArray();
        var variants = optimizers.SelectMany(o => expertKernels.SelectMany(e => sums.SelectMany(s => attentions.Select(a => (Optimizer: o, Experts: e, Sum: s, Attention: a))))).ToList();

        Console.WriteLine($"# DeepSeekCluster training benchmark — {DateTime.UtcNow:yyyy-MM-dd HH:mm} UTC");
        Console.WriteLine($"machine: {Environment.ProcessorCount} cores, torch threads {get_num_threads()}, device {device.type}");
        var fp32 = MatmulPeak.Measure(device, ScalarType.Float32, MatmulPeak.SizeFor(device), TimeSpan.FromSeconds(3));
        var bf16 = MatmulPeak.Measure(device, ScalarType.BFloat16, MatmulPeak.SizeFor(device), TimeSpan.FromSeconds(3));
        Console.WriteLine($"matmul throughput fp32: {fp32}");
        Console.WriteLine($"matmul throughput bf16: {bf16}");
        // MFU is against the hardware's peak (declared on a GPU, the cached calibration on a CPU), not this run's matmuls.
        var peaks = precisions.Distinct().ToDictionary(p => p, p => HardwarePeak.For(device, p == "bf16" ? ScalarType.BFloat16 : ScalarType.Float32, PeakSettings.Default, Console.WriteLine));
        Console.WriteLine();
        Console.WriteLine($"load average at start: {File.ReadAllText("/proc/loadavg").Trim()}");
        Console.WriteLine("| preset | precision | optimizer | experts | exact sum | attention | params (active) | seq x batch | tokens/s | MFU vs same-dtype peak | step s | fwd / bwd / opt s | peak RSS MiB | expert load (max/mean over layers and steps; first MoE layer's, last step) |");
        Console.WriteLine("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");

        foreach (var name in presets)
        foreach (var precision in precisions)
        {
            var peak = peaks[precision];
            var config = DeepSeekConfig.Preset(name);
            var options = name == "tiny"
                ? new TrainingOptions { SeqLen = 128, GlobalBatch = 16, MicroBatch = 16, Steps = warmup + measured, WarmupSteps = 1, Precision = precision, Device = device.type.ToString().ToLowerInvariant() }
                : new TrainingOptions { SeqLen = 256, GlobalBatch = 8, MicroBatch = 8, Steps = warmup + measured, WarmupSteps = 1, Precision = precision, Device = device.type.ToString().ToLowerInvariant() };
            // The defaults fit a CPU; a GPU needs far more tokens per step before its matmuls fill the chip.
            if (seqLen > 0) options = options with { SeqLen = seqLen };
            if (batch > 0) options = options with { GlobalBatch = batch, MicroBatch = batch };
            // Random tokens: the step's arithmetic does not depend on the text, and routing starts near uniform either way.
            var rng = new Random(1);
            var tokens = new int[(options.SeqLen + 1) * 64 * 8];
            for (int i = 0; i < tokens.Length; i++) tokens[i] = rng.Next(config.VocabSize);
            var data = new TokenDataset(tokens, options.SeqLen);
            var models = new List<DeepSeekForCausalLM>();
            var trainers = new List<Trainer>();
            try
            {
                foreach (var (optimizer, experts, sum, attention) in variants)
                {
                    manual_seed(1);
                    var model = new DeepSeekForCausalLM(config).InitializeWeights();
                    models.Add(model);
                    if (precision == "bf16") model.to(ScalarType.BFloat16);
                    CausalAttention.Apply(model, attentionKernels[Array.IndexOf(attentions, attention)]);
                    if (exactExpertRows) foreach (var moe in model.MoeLayers()) moe.RowBucket = 1;
                    model.to(device);
                    var trainer = new Trainer(model, data, null, options with { Experts = experts }, device, peak);
                    trainer.Optimizer.Flat = optimizer == "flat";
                    trainer.ExactSumFastPaths = sum == "fast";
                    trainers.Add(trainer);
                    for (int i = 0; i < warmup; i++) trainer.TrainStep();
                }
                // Interleaved, so a change of load on this shared machine falls on every optimizer alike.
                var steps = trainers.Select(_ => new List<StepMetrics>()).ToList();
                var elapsed = new double[trainers.Count];
                for (int i = 0; i < measured; i++)
                    for (int k = 0; k < trainers.Count; k++)
                    {
                        var sw = Stopwatch.StartNew();
                        steps[k].Add(trainers[k].TrainStep());
                        elapsed[k] += sw.Elapsed.TotalSeconds;
                    }
                for (int k = 0; k < trainers.Count; k++)
                {
                    double seconds = elapsed[k] / measured;
                    double tps = options.GlobalBatch * options.SeqLen / seconds;
                    var mfu = peak.Mfu(tps * config.TrainingFlopsPerToken(options.SeqLen));
                    Console.WriteLine($"| {name} | {precision} | {variants[k].Optimizer} | {variants[k].Experts} | {variants[k].Sum} | {variants[k].Attention} | {config.ParameterCount() / 1e6:F1} M ({config.ParameterCount(true) / 1e6:F1} M) | {options.SeqLen} x {options.GlobalBatch} | {tps:F0} | {mfu.Ratio * 100:F1}%{(mfu.Capped ? " (capped: peak too low)" : "")} | {seconds:F3} | " +
                                      $"{steps[k].Average(s => s.Times.ForwardSeconds):F3} / {steps[k].Average(s => s.Times.BackwardSeconds):F3} / {steps[k].Average(s => s.Times.OptimizerSeconds):F3} | {PeakRssMiB()} | max/mean {steps[k].Average(s => s.LoadImbalance):F2}; {string.Join(",", steps[k][^1].ExpertLoad[0])} |");
                }
                Console.WriteLine($"|  |  | load average now: {File.ReadAllText("/proc/loadavg").Trim()} | | | | | | | | | | |");
                if (trainers.Count == 2 && attentions.Length == 2)
                    Console.WriteLine($"|  |  | | | | auto / fused | | | tokens/s {elapsed[0] / elapsed[1]:F2}× | | | fwd time {steps[1].Sum(s => s.Times.ForwardSeconds) / steps[0].Sum(s => s.Times.ForwardSeconds):F2}×, bwd time {steps[1].Sum(s => s.Times.BackwardSeconds) / steps[0].Sum(s => s.Times.BackwardSeconds):F2}× | | |");
                if (trainers.Count == 2 && sums.Length == 2)
                    Console.WriteLine($"|  |  | | | fast / torch | | | tokens/s {elapsed[0] / elapsed[1]:F2}× | | | bwd time {steps[1].Sum(s => s.Times.BackwardSeconds) / steps[0].Sum(s => s.Times.BackwardSeconds):F2}×, opt time {steps[1].Sum(s => s.Times.OptimizerSeconds) / steps[0].Sum(s => s.Times.OptimizerSeconds):F2}× | | |");
                if (trainers.Count == 2 && optimizers.Length == 2)
                    Console.WriteLine($"|  |  | flat / plain | | | | | tokens/s {elapsed[0] / elapsed[1]:F2}× | | | opt time {steps[1].Sum(s => s.Times.OptimizerSeconds) / steps[0].Sum(s => s.Times.OptimizerSeconds):F2}× | | |");
                if (trainers.Count == 2 && expertKernels.Length == 2)
                    Console.WriteLine($"|  |  | | grouped / per-expert | | | | tokens/s {elapsed[0] / elapsed[1]:F2}× | | | fwd+bwd time {steps[1].Sum(s => s.Times.ForwardSeconds + s.Times.BackwardSeconds) / steps[0].Sum(s => s.Times.ForwardSeconds + s.Times.BackwardSeconds):F2}× | | |");
            }
            finally
            {
                foreach (var t in trainers) t.Dispose();
                foreach (var m in models) m.Dispose();
            }
        }
        Console.WriteLine($"load average at end: {File.ReadAllText("/proc/loadavg").Trim()}");
    }

    static long PeakRssMiB()
    {
        foreach (var line in File.ReadLines("/proc/self/status"))
            if (line.StartsWith("VmHWM:")) return long.Parse(line.Split(' ', StringSplitOptions.RemoveEmptyEntries)[1]) / 1024;
        return -1;
    }
}
