// Where a training step's time goes in bf16 against fp32: each part of the model (embedding, each layer's attention
// and MLP/MoE, the head with its loss, MTP) timed forward and backward alone, the two precisions interleaved round by
// round on the same weights and inputs. Not the step's speed (bench `train` is): the parts' shares and their ratio.
using System.Diagnostics;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.Bench;

public static class PrecisionPartsBench
{
    public static void Run(string[] args)
    {
        var o = new BenchArgs("precision-parts", args);
        int rounds = o.Int("--rounds", 7, 1);
        var name = o.String("--preset", "tiny");
        int seqLen = o.Int("--seq-len", name == "tiny" ? 128 : 256, 1);
        int batch = o.Int("--batch", name == "tiny" ? 16 : 8, 1);
        // cpu: this thread's CPU seconds, which a loaded machine inflates far less than wall time; with one torch thread
        // (and CPU tensors, whose backward runs on the calling thread) they are the whole work of the part.
        bool cpuClock = o.Choice("--clock", "wall", "wall", "cpu") == "cpu";
        int? torchThreads = o.OptionalInt("--torch-threads", 1);
        // min: the fastest round of each, nearest what an idle machine gives when other processes take the cores at times.
        bool useMin = o.Choice("--stat", "median", "median", "min") == "min";
        var only = o.String("--only", ""); // parts whose name contains this
        bool withTrainer = o.Bool("--trainer", true), flatOptimizer = o.Bool("--flat", true);
        o.Done();
        var config = DeepSeekConfig.Preset(name);
        if (torchThreads is { } threads) set_num_threads(threads);
        Func<IEnumerable<double>, double> stat = useMin ? v => v.Min() : Median;
        Func<double> now = cpuClock ? CheckpointCostBench.ThreadCpu : () => Stopwatch.GetTimestamp() / (double)Stopwatch.Frequency;
        Console.WriteLine($"# fp32 against bf16, part by part — {DateTime.UtcNow:yyyy-MM-dd HH:mm} UTC, {name} {seqLen} x {batch}, torch threads {get_num_threads()}, {(cpuClock ? "thread CPU" : "wall")} seconds, {(useMin ? "fastest round" : "median")}, load {File.ReadAllText("/proc/loadavg").Trim()}");
        Console.WriteLine();

        manual_seed(1);
        var models = new Dictionary<ScalarType, DeepSeekForCausalLM>();
        foreach (var dtype in new[] { ScalarType.Float32, ScalarType.BFloat16 })
        {
            manual_seed(1);
            var model = new DeepSeekForCausalLM(config).InitializeWeights();
            if (dtype == ScalarType.BFloat16) model.to(dtype);
            model.train();
            models[dtype] = model;
        }
        var ids = randint(config.VocabSize, [batch, seqLen + 2], dtype: ScalarType.Int64);
        var input = ids.narrow(1, 0, seqLen);
        var target = ids.narrow(1, 1, seqLen);

        var parts = new List<(string Name, Func<ScalarType, Tensor> Forward)>();
        // Inputs to each part: the hidden states a forward of the whole model gives there, fixed once (no graph).
        Tensor Hidden(ScalarType dtype) => randn(batch, seqLen, config.HiddenSize, dtype) * 0.5;
        parts.Add(("embedding", dtype => models[dtype].model.embed_tokens.forward(input)));
        for (int l = 0; l < config.NumHiddenLayers; l++)
        {
            int layer = l;
            var x = new Dictionary<ScalarType, Tensor> { [ScalarType.Float32] = Hidden(ScalarType.Float32) };
            x[ScalarType.BFloat16] = x[ScalarType.Float32].to_type(ScalarType.BFloat16);
            parts.Add(($"layer {layer} attention (+ norm)", dtype =>
            {
                var d = models[dtype].model.layers[layer];
                return d.self_attn.forward(d.input_layernorm.forward(x[dtype].requires_grad_(true)));
            }));
            parts.Add(($"layer {layer} {(models[ScalarType.Float32].model.layers[layer].Moe is null ? "dense MLP" : "MoE")} (+ norm)", dtype =>
            {
                var d = models[dtype].model.layers[layer];
                return d.mlp.forward(d.post_attention_layernorm.forward(x[dtype].requires_grad_(true)));
            }));
        }
        // The attention kernel alone at the layers' shapes: fused (scaled_dot_product_attention) and written out.
        long heads = config.NumAttentionHeads, qk = config.QkHeadDim, vd = config.VHeadDim;
        double scale = RotaryEmbedding.SoftmaxScale(config);
        var qkv = new[] { randn(batch, heads, seqLen, qk), randn(batch, heads, seqLen, qk), randn(batch, heads, seqLen, vd) };
        Tensor[] Qkv(ScalarType dtype) => [.. qkv.Select(t => t.to_type(dtype).requires_grad_(true))];
        parts.Add(("attention kernel, fused", dtype => { var t = Qkv(dtype); return CausalAttention.Fused(t[0], t[1], t[2], 0, scale); }));
        parts.Add(("attention kernel, written out", dtype => { var t = Qkv(dtype); return CausalAttention.Explicit(t[0], t[1], t[2], 0, scale); }));
        Tensor Mixed(Tensor q, Tensor k, Tensor v, bool fp32Values)
        {
            var t = q.shape[2];
            var scores = matmul(q.to_type(ScalarType.Float32), k.to_type(ScalarType.Float32).transpose(-1, -2)) * scale;
            scores = scores.masked_fill(ones(t, t, ScalarType.Bool).triu(1), double.NegativeInfinity);
            var probs = scores.softmax(-1);
            return fp32Values ? matmul(probs, v.to_type(ScalarType.Float32)).to_type(q.dtype) : matmul(probs.to_type(q.dtype), v);
        }
        parts.Add(("attention kernel, fp32 scores", dtype => { var t = Qkv(dtype); return Mixed(t[0], t[1], t[2], false); }));
        parts.Add(("attention kernel, all fp32", dtype => { var t = Qkv(dtype); return Mixed(t[0], t[1], t[2], true); }));
        var last = new Dictionary<ScalarType, Tensor> { [ScalarType.Float32] = Hidden(ScalarType.Float32) };
        last[ScalarType.BFloat16] = last[ScalarType.Float32].to_type(ScalarType.BFloat16);
        parts.Add(("norm + lm_head + cross-entropy", dtype =>
        {
            var m = models[dtype];
            return Evaluation.CrossEntropy(m.lm_head.forward(m.model.norm.forward(last[dtype].requires_grad_(true))), target);
        }));
        if (config.NumNextnPredictLayers > 0)
            parts.Add(("MTP module (block, no head)", dtype =>
            {
                var m = models[dtype];
                return m.mtp[0].Forward(last[dtype].requires_grad_(true), last[dtype].detach()).hidden;
            }));
        parts.Add(("whole model + MTP, losses", dtype =>
        {
            var m = models[dtype];
            var output = m.Forward(input, withMtp: true);
            var loss = Evaluation.CrossEntropy(output.Logits_BTV, target);
            foreach (var mtp in output.MtpLogits) loss = loss + Evaluation.CrossEntropy(mtp, ids.narrow(1, 2, mtp.shape[1]));
            return output.AuxLoss is { } aux ? loss + aux : loss;
        }));

        Console.WriteLine("| part | fp32 fwd s | fp32 bwd s | bf16 fwd s | bf16 bwd s | bf16 / fp32 fwd | bf16 / fp32 bwd (range of the rounds' ratios) |");
        Console.WriteLine("|---|---|---|---|---|---|---|");
        foreach (var (partName, forward) in parts.Where(p => p.Name.Contains(only, StringComparison.Ordinal)))
        {
            var times = new Dictionary<ScalarType, List<(double Fwd, double Bwd)>> { [ScalarType.Float32] = [], [ScalarType.BFloat16] = [] };
            for (int r = 0; r < rounds + 1; r++)
                foreach (var dtype in new[] { ScalarType.Float32, ScalarType.BFloat16 })
                {
                    using var scope = NewDisposeScope();
                    models[dtype].zero_grad();
                    double t0 = now();
                    var output = forward(dtype);
                    double t1 = now();
                    if (output.numel() == 1) output.backward();
                    else output.backward([ones_like(output)]);
                    double bwd = now() - t1, fwd = t1 - t0;
                    if (r > 0) times[dtype].Add((fwd, bwd)); // round 0 warms up
                }
            var f = times[ScalarType.Float32];
            var b = times[ScalarType.BFloat16];
            var bwdRatios = f.Zip(b, (x, y) => y.Bwd / x.Bwd).ToList();
            Console.WriteLine($"| {partName} | {stat(f.Select(t => t.Fwd)):F4} | {stat(f.Select(t => t.Bwd)):F4} | {stat(b.Select(t => t.Fwd)):F4} | {stat(b.Select(t => t.Bwd)):F4} | " +
                              $"{stat(b.Select(t => t.Fwd)) / stat(f.Select(t => t.Fwd)):F2} | {stat(b.Select(t => t.Bwd)) / stat(f.Select(t => t.Bwd)):F2} (rounds {bwdRatios.Min():F2}–{bwdRatios.Max():F2}) |");
        }
        if (withTrainer) TrainerSteps(config, seqLen, batch, rounds, flatOptimizer, now, stat);
        Console.WriteLine($"load average at end: {File.ReadAllText("/proc/loadavg").Trim()}");
        foreach (var m in models.Values) m.Dispose();
    }

    /// <summary>Whole trainer steps (standalone, one micro-batch, the bench's settings), fp32 and bf16 interleaved.</summary>
    static void TrainerSteps(DeepSeekConfig config, int seqLen, int batch, int rounds, bool flatOptimizer, Func<double> now, Func<IEnumerable<double>, double> stat)
    {
        var rng = new Random(1);
        var tokens = new int[(seqLen + 1) * 64 * 8];
        for (int i = 0; i < tokens.Length; i++) tokens[i] = rng.Next(config.VocabSize);
        var data = new Training.Data.TokenDataset(tokens, seqLen);
        var trainers = new Dictionary<string, (Trainer Trainer, DeepSeekForCausalLM Model)>();
        foreach (var precision in new[] { "fp32", "bf16" })
        {
            manual_seed(1);
            var model = new DeepSeekForCausalLM(config).InitializeWeights();
            if (precision == "bf16") model.to(ScalarType.BFloat16);
            var options = new TrainingOptions { SeqLen = seqLen, GlobalBatch = batch, MicroBatch = batch, Steps = 1000, WarmupSteps = 1, Precision = precision };
            var trainer = new Trainer(model, data, null, options, CPU, 1e11);
            trainer.Optimizer.Flat = flatOptimizer;
            trainers[precision] = (trainer, model);
        }
        var times = trainers.Keys.ToDictionary(k => k, _ => new List<(double Total, StepTimes Phases)>());
        for (int r = 0; r < rounds + 2; r++)
            foreach (var (precision, (trainer, _)) in trainers)
            {
                double t0 = now();
                var metrics = trainer.TrainStep();
                if (r >= 2) times[precision].Add((now() - t0, metrics.Times)); // two warm-up steps
            }
        foreach (var (precision, list) in times)
            Console.WriteLine($"| trainer step {precision}, bwd by step: {string.Join(" ", list.Select(t => t.Phases.BackwardSeconds.ToString("F3")))} | | | | | | |");
        foreach (var (precision, list) in times)
            Console.WriteLine($"| trainer step {precision}: total {stat(list.Select(t => t.Total)):F4} s (wall phases fwd / bwd / opt {stat(list.Select(t => t.Phases.ForwardSeconds)):F4} / {stat(list.Select(t => t.Phases.BackwardSeconds)):F4} / {stat(list.Select(t => t.Phases.OptimizerSeconds)):F4}) | | | | | | |");
        // The trained models' forward and backward alone (the same input as the trainer's last batch shape), to compare with
        // the fresh models' "whole model" row: what training changed in the weights (routing, magnitudes) shows here.
        var ids = randint(config.VocabSize, [batch, seqLen + 2], dtype: ScalarType.Int64);
        foreach (var (precision, (_, model)) in trainers)
        {
            var f = new List<double>(); var b = new List<double>();
            for (int r = 0; r < rounds; r++)
            {
                using var scope = NewDisposeScope();
                double t0 = now();
                var output = model.Forward(ids.narrow(1, 0, seqLen), withMtp: true);
                var loss = Evaluation.CrossEntropy(output.Logits_BTV, ids.narrow(1, 1, seqLen));
                foreach (var mtp in output.MtpLogits) loss = loss + Evaluation.CrossEntropy(mtp, ids.narrow(1, 2, mtp.shape[1]));
                if (output.AuxLoss is { } aux) loss = loss + aux;
                double t1 = now();
                loss.backward();
                f.Add(t1 - t0); b.Add(now() - t1);
            }
            Console.WriteLine($"| trained model {precision}: fwd {stat(f):F4} bwd {stat(b):F4} | | | | | | |");
        }
        foreach (var (trainer, model) in trainers.Values) { trainer.Dispose(); model.Dispose(); }
    }

    static double Median(IEnumerable<double> values)
    {
        var sorted = values.Order().ToList();
        return sorted.Count % 2 == 1 ? sorted[sorted.Count / 2] : (sorted[sorted.Count / 2 - 1] + sorted[sorted.Count / 2]) / 2;
    }
}
