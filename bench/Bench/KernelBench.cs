// Fused paths against the plain ones they replaced, timed side by side in one process (interleaved rounds, so the shared
// machine's load falls on both alike): the ratio is the figure, the absolute times only its context.
using System.Diagnostics;
using DeepSeekCluster.Training.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.Bench;

public static class KernelBench
{
    public static void Run(string[] args)
    {
        var o = new BenchArgs("kernels", args);
        bool onCuda = o.Choice("--device", "cpu", "cpu", "cuda") == "cuda";
        int rounds = o.Int("--rounds", 7, 1);
        var presetName = o.String("--preset", "small");
        int seqLen = o.Int("--seq-len", 256, 1), batch = o.Int("--batch", 8, 1);
        // attention, adamw, moe: any of them.
        var parts = o.List("--parts", "attention,adamw");
        // The flat AdamW's chunk sizes in elements, compared in turns (none: its default).
        var chunks = o.Optional("--chunks") ?? "";
        o.Done();
        var device = onCuda ? CUDA : CPU;
        var preset = DeepSeekConfig.Preset(presetName);
        Console.WriteLine($"# Fused against plain — {DateTime.UtcNow:yyyy-MM-dd HH:mm} UTC, {Environment.ProcessorCount} cores, torch threads {get_num_threads()}, " +
                          $"device {device.type}, load {File.ReadAllText("/proc/loadavg").Split(' ')[0]}");
        Console.WriteLine();
        Console.WriteLine("| kernel | shape | dtype | plain s (median) | fused s (median) | fused / plain, median (range over rounds) |");
        Console.WriteLine("|---|---|---|---|---|---|");
        foreach (var dtype in new[] { ScalarType.Float32, ScalarType.BFloat16 })
        {
            if (parts.Contains("adamw")) AdamWStep(preset, dtype, device, rounds, chunks);
            if (parts.Contains("moe")) MoeLayer(preset, dtype, device, rounds, batch, seqLen);
            if (!parts.Contains("attention")) continue;
            // One MLA layer's attention in training: queries and keys qk_nope + qk_rope wide, values v_head_dim wide.
            long h = preset.NumAttentionHeads, q = preset.QkHeadDim, v = preset.VHeadDim;
            double scale = RotaryEmbedding.SoftmaxScale(preset);
            manual_seed(1);
            var query = randn(batch, h, seqLen, q, dtype, device).requires_grad_(true);
            var key = randn(batch, h, seqLen, q, dtype, device).requires_grad_(true);
            var value = randn(batch, h, seqLen, v, dtype, device).requires_grad_(true);
            var projection = randn(batch, h, seqLen, v, dtype, device);
            void Pass(Func<Tensor, Tensor, Tensor, long, double, Tensor> attention)
            {
                using var scope = NewDisposeScope();
                var grads = autograd.grad([(attention(query, key, value, 0, scale) * projection).sum()], [query, key, value]);
                if (device.type == TorchSharp.DeviceType.CUDA) cuda.synchronize();
            }
            var (plain, fused, ratios) = SideBySide(rounds, () => Pass((q, k, v, past, s) => CausalAttention.Explicit(q, k, v, past, s)), () => Pass((q, k, v, past, s) => CausalAttention.Fused(q, k, v, past, s)));
            Console.WriteLine($"| attention forward + backward | {batch} x {h} heads x {seqLen} tokens, q/k {q}, v {v} | {dtype} | {plain:F4} | {fused:F4} | " +
                              $"{Median(ratios):F2} ({ratios.Min():F2}–{ratios.Max():F2}) |");
        }
    }

    /// <summary>
    /// One AdamW step over every parameter of <paramref name="preset"/> (random gradients): the per-slot step against the
    /// flat one, each on a model of its own (the flat optimizer makes its parameters views of its buffers).
    /// </summary>
    static void AdamWStep(DeepSeekConfig preset, ScalarType dtype, Device device, int rounds, string chunks)
    {
        var sizes = chunks.Length == 0 ? new long?[] { null } : chunks.Split(',').Select(c => (long?)long.Parse(c)).ToArray();
        foreach (var chunk in sizes)
        {
            (DeepSeekForCausalLM, Training.Optim.AdamW) Make(bool flat)
            {
                manual_seed(1);
                var model = new DeepSeekForCausalLM(preset).InitializeWeights();
                model.to(dtype).to(device);
                using (no_grad()) foreach (var p in model.parameters()) p.grad = randn_like(p);
                var optimizer = new Training.Optim.AdamW(model.named_parameters().Select(p => (p.name, (Tensor)p.parameter))) { Flat = flat, FlatChunkElements = chunk };
                return (model, optimizer);
            }
            var (plainModel, plainOptimizer) = Make(false);
            var (flatModel, flatOptimizer) = Make(true);
            void Step(Training.Optim.AdamW optimizer)
            {
                optimizer.Step(1e-4);
                if (device.type == TorchSharp.DeviceType.CUDA) cuda.synchronize();
            }
            var (plain, fused, ratios) = SideBySide(rounds, () => Step(plainOptimizer), () => Step(flatOptimizer));
            long chunkElements = chunk ?? Training.Optim.AdamW.DefaultChunkElements(device);
            Console.WriteLine($"| AdamW step, per slot vs flat | {preset.ParameterCount() / 1e6:F1} M parameters, {plainOptimizer.Slots.Count} slots, flat chunks of {chunkElements:N0} | {dtype} | {plain:F4} | {fused:F4} | " +
                              $"{Median(ratios):F2} ({ratios.Min():F2}–{ratios.Max():F2}) |");
            plainOptimizer.Dispose(); flatOptimizer.Dispose(); plainModel.Dispose(); flatModel.Dispose();
        }
    }

    /// <summary>
    /// One MoE layer of <paramref name="preset"/> (router, shared and routed experts), forward + backward: the routed experts
    /// one GEMM chain each against one bmm per projection (GroupedExperts); then what stacking the expert weights costs alone.
    /// </summary>
    static void MoeLayer(DeepSeekConfig preset, ScalarType dtype, Device device, int rounds, int batch, int seqLen)
    {
        manual_seed(1);
        using var moe = new DeepSeekMoe(preset);
        using (no_grad()) foreach (var p in moe.parameters()) p.normal_(0, 0.02);
        moe.to(dtype).to(device);
        moe.train();
        var x = randn(batch, seqLen, preset.HiddenSize, dtype, device).requires_grad_(true);
        var projection = randn_like(x);
        void Pass(ExpertKernel kernel)
        {
            using var scope = NewDisposeScope();
            moe.Kernel = kernel;
            moe.zero_grad();
            (moe.forward(x) * projection).sum().backward();
            if (device.type == TorchSharp.DeviceType.CUDA) cuda.synchronize();
        }
        var (plain, fused, ratios) = SideBySide(rounds, () => Pass(ExpertKernel.PerExpert), () => Pass(ExpertKernel.Grouped));
        var load = moe.LastLoad;
        double padding = (double)load.Max() * load.Length / load.Sum();
        Console.WriteLine($"| MoE layer forward + backward, per-expert vs grouped | {batch} x {seqLen} tokens, {preset.NRoutedExperts} experts of {preset.HiddenSize} x {preset.MoeIntermediateSize}, top-{preset.NumExpertsPerTok}; " +
                          $"load {string.Join(",", load)} (padded rows / rows {padding:F2}) | {dtype} | {plain:F4} | {fused:F4} | {Median(ratios):F2} ({ratios.Min():F2}–{ratios.Max():F2}) |");

        // The grouped path's chunk rows: its own rule alone (RowBucket 1) against that rounded up to the layer's row bucket
        // (auto: 64 in bf16 on a CPU, the per-expert windows' rule; 1 in fp32, where both are one rule), on fresh tokens each
        // round, so that the loads and with them the matmul shapes change as they do from step to step (oneDNN makes a
        // primitive per new shape). Both see the same tokens in a round.
        var fresh = Enumerable.Range(0, rounds + 1).Select(_ => randn(batch, seqLen, preset.HiddenSize, dtype, device).requires_grad_(true)).ToArray();
        int round = -1;
        var chunks = new List<(long own, long rounded)>();
        void Grouped(long? rowBucket, bool first)
        {
            if (first) round++;
            using var scope = NewDisposeScope();
            moe.Kernel = ExpertKernel.Grouped;
            moe.RowBucket = rowBucket;
            moe.zero_grad();
            (moe.forward(fresh[round]) * projection).sum().backward();
            if (device.type == TorchSharp.DeviceType.CUDA) cuda.synchronize();
            if (!first && round > 0) chunks.Add((GroupedExperts.BucketRows(moe.LastLoad), GroupedExperts.ChunkRows(moe.LastLoad, DeepSeekMoe.AutoRowBucket(fresh[round]))));
        }
        var (own, rounded, chunkRatios) = SideBySide(rounds, () => Grouped(1, first: true), () => Grouped(null, first: false));
        moe.RowBucket = null;
        Console.WriteLine($"| MoE layer forward + backward, grouped: chunk rows by its own rule vs rounded to the row bucket (fresh tokens each round) | {batch} x {seqLen} tokens; " +
                          $"chunk rows own {string.Join(",", chunks.Select(c => c.own))}, rounded {string.Join(",", chunks.Select(c => c.rounded))} | {dtype} | {own:F4} | {rounded:F4} | {Median(chunkRatios):F2} ({chunkRatios.Min():F2}–{chunkRatios.Max():F2}) |");
        foreach (var t in fresh) t.Dispose();

        // The stack the grouped path makes of the per-expert weights each forward, and its backward (slicing the gradient).
        var gateUp = moe.experts.SelectMany(e => new[] { (Tensor)e.gate_proj.weight!, e.up_proj.weight! }).ToArray();
        var down = moe.experts.Select(e => (Tensor)e.down_proj.weight!).ToArray();
        void Stack()
        {
            using var scope = NewDisposeScope();
            moe.zero_grad();
            (stack(gateUp).sum() + stack(down).sum()).backward();
            if (device.type == TorchSharp.DeviceType.CUDA) cuda.synchronize();
        }
        var (_, stackSeconds, _) = SideBySide(rounds, () => { }, Stack);
        Console.WriteLine($"| stacking the routed expert weights (forward + backward), alone | {3 * preset.NRoutedExperts} tensors of {preset.HiddenSize} x {preset.MoeIntermediateSize} | {dtype} | | {stackSeconds:F4} | {stackSeconds / fused:P0} of the grouped layer (an upper bound: includes a sum's backward) |");
    }

    /// <summary>Both actions once to warm up, then <paramref name="rounds"/> rounds of plain then fused; medians and per-round ratios.</summary>
    static (double plain, double fused, List<double> ratios) SideBySide(int rounds, Action plain, Action fused)
    {
        plain(); fused();
        var (p, f, r) = (new List<double>(), new List<double>(), new List<double>());
        for (int i = 0; i < rounds; i++)
        {
            double a = Time(plain), b = Time(fused);
            p.Add(a); f.Add(b); r.Add(b / a);
        }
        return (Median(p), Median(f), r);
    }

    static double Time(Action action)
    {
        var sw = Stopwatch.StartNew();
        action();
        return sw.Elapsed.TotalSeconds;
    }

    static double Median(List<double> xs)
    {
        var s = xs.Order().ToList();
        return s.Count % 2 == 1 ? s[s.Count / 2] : (s[s.Count / 2 - 1] + s[s.Count / 2]) / 2;
    }
}
