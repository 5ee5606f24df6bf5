// Activation recompute (full and selective) changes what backward keeps, not what it computes: in float64 the gradients
// and a 3-step training run (MTP, balance loss, routing-bias updates, clipping) equal those without recompute.
using DeepSeekCluster.Training.Data;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Optim;
using DeepSeekCluster.Training.Tests.Parallel;
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Tests.Collectives;
using TorchSharp;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Tests.Model;

public sealed class ActivationRecomputeTests(ITestOutputHelper output)
{
    // 3 decoder layers (1 dense, 2 MoE with a shared expert), q and kv LoRA (both up-projections), an MTP module and the
    // sequence balance loss: every module recompute touches.
    static DeepSeekConfig Micro(int vocab) => MicroModel.Config(vocab);

    static readonly TrainingOptions Options = new()
    {
        SeqLen = MicroModel.SeqLen, GlobalBatch = 4, MicroBatch = 2, Steps = 3, Lr = 5e-3, WarmupSteps = 1, BiasUpdateSpeed = 0.01,
        MtpWeight = 0.3, ClipNorm = 0.5,
    };

    // Full recompute runs each layer's very graph again: bit for bit. Selective recompute returns a norm's input gradient
    // as one sum, which the plain graph adds to the residual's in another order: last bits may move.
    static double ToleranceOf(RecomputeMode mode) => mode == RecomputeMode.Full ? 0 : 1e-12;

    static readonly Lazy<(int Vocab, TokenDataset Train)> Data = MicroModel.Data;

    static DeepSeekForCausalLM NewModel(ScalarType dtype = ScalarType.Float64)
    {
        manual_seed(Options.Seed);
        var model = new DeepSeekForCausalLM(Micro(Data.Value.Vocab)).InitializeWeights();
        model.to(dtype);
        return model;
    }

    /// <summary>Every parameter's gradient after one forward and backward of LM + MTP + balance loss.</summary>
    static Dictionary<string, double[]> Gradients(RecomputeMode mode, ScalarType dtype = ScalarType.Float64)
    {
        using var model = NewModel(dtype);
        ActivationRecompute.Apply(model, mode);
        model.train();
        using var scope = NewDisposeScope();
        var batch = Data.Value.Train.Batch([0L, 1L]);
        var input = batch.narrow(1, 0, Options.SeqLen);
        var result = model.Forward(input, withMtp: true);
        var loss = Evaluation.CrossEntropy(result.Logits_BTV, batch.narrow(1, 1, Options.SeqLen))
                   + Evaluation.CrossEntropy(result.MtpLogits[0], batch.narrow(1, 2, Options.SeqLen - 1)) * 0.3
                   + result.AuxLoss!;
        loss.backward();
        return model.named_parameters().ToDictionary(p => p.name, p => p.parameter.grad!.to_type(ScalarType.Float64).data<double>().ToArray());
    }

    static double RelativeDifference(double[] a, double[] b)
    {
        Assert.Equal(a.Length, b.Length);
        double diff = 0, scale = 0;
        for (int i = 0; i < a.Length; i++) { diff = Math.Max(diff, Math.Abs(a[i] - b[i])); scale = Math.Max(scale, Math.Abs(a[i])); }
        return scale == 0 ? diff : diff / scale;
    }

    static readonly Lazy<Dictionary<string, double[]>> Plain = new(() => Gradients(RecomputeMode.None));

    [Theory]
    [InlineData(RecomputeMode.Full)]
    [InlineData(RecomputeMode.Selective)]
    public void RecomputeGivesTheSameGradients(RecomputeMode mode)
    {
        var plain = Plain.Value;
        long before = ActivationRecompute.Recomputed;
        var recomputed = Gradients(mode);
        long segments = ActivationRecompute.Recomputed - before;
        // Full: 3 decoder layers and the MTP block. Selective: at least each layer's 2 norms and 2 up-projections.
        if (mode == RecomputeMode.Full) Assert.Equal(4, segments);
        else Assert.True(segments >= 4 * 4, $"selective recompute ran {segments} segments again");
        double worst = 0;
        foreach (var (name, expected) in plain)
        {
            Assert.Contains(expected, v => v != 0);
            double diff = RelativeDifference(expected, recomputed[name]);
            worst = Math.Max(worst, diff);
            Assert.True(diff <= ToleranceOf(mode), $"{mode}: the gradient of '{name}' differs by {diff:E2} (relative)");
        }
        output.WriteLine($"{mode}: {segments} segments recomputed, {plain.Count} gradients, worst relative difference {worst:E2}");
    }

    /// <summary>
    /// The gradients a rerun segment computes for its layer's parameters are added into their <c>.grad</c> and freed inside
    /// its backward: what the backward leaves in the caller's dispose scope (the micro-batch's, held until it ends) are
    /// only the segments' (B, T, D) input and output gradients, never a tensor shaped as a parameter, and every parameter
    /// still has its gradient.
    /// </summary>
    [Theory]
    [InlineData(RecomputeMode.Full)]
    [InlineData(RecomputeMode.Selective)]
    public void ARecomputedBackwardLeavesNoParameterGradientInTheCallersScope(RecomputeMode mode)
    {
        using var model = NewModel();
        ActivationRecompute.Apply(model, mode);
        model.train();
        using var scope = NewDisposeScope();
        var batch = Data.Value.Train.Batch([0L, 1L]);
        var result = model.Forward(batch.narrow(1, 0, Options.SeqLen), withMtp: true);
        var loss = Evaluation.CrossEntropy(result.Logits_BTV, batch.narrow(1, 1, Options.SeqLen))
                   + Evaluation.CrossEntropy(result.MtpLogits[0], batch.narrow(1, 2, Options.SeqLen - 1)) * 0.3
                   + result.AuxLoss!;
        int before = scope.DisposablesCount;
        long segments = ActivationRecompute.Recomputed;
        loss.backward();
        Assert.True(ActivationRecompute.Recomputed > segments, $"{mode}: nothing was recomputed");
        var left = scope.DisposablesView.Skip(before).OfType<Tensor>().Where(t => !t.IsInvalid).ToList();
        var parameterShapes = model.named_parameters().Select(p => (p.name, shape: string.Join("x", p.parameter.shape))).ToList();
        foreach (var t in left)
        {
            string shape = string.Join("x", t.shape);
            Assert.True(!parameterShapes.Any(p => p.shape == shape),
                $"{mode}: the backward left a {shape} tensor in the caller's scope, shaped as '{parameterShapes.FirstOrDefault(p => p.shape == shape).name}'");
        }
        foreach (var (name, parameter) in model.named_parameters())
            Assert.True(parameter.grad is not null, $"{mode}: '{name}' has no gradient");
        output.WriteLine($"{mode}: the backward left {left.Count} tensors in the caller's scope: {string.Join(", ", left.Select(t => string.Join("x", t.shape)).Distinct())}");
    }

    [Fact]
    public void FullRecomputeIsBitForBitInBf16Too()
    {
        var plain = Gradients(RecomputeMode.None, ScalarType.BFloat16);
        var full = Gradients(RecomputeMode.Full, ScalarType.BFloat16);
        foreach (var (name, expected) in plain)
            Assert.True(RelativeDifference(expected, full[name]) == 0, $"bf16: the gradient of '{name}' differs with full recompute");
    }

    sealed record Trained(List<StepMetrics> Steps, Dictionary<string, double[]> Weights, Dictionary<string, (long Offset, double[] Values)> Moments);

    static Trained Train(RecomputeMode mode)
    {
        using var model = NewModel();
        return Train(model, mode, options => new Trainer(model, Data.Value.Train, null, options, CPU, peakFlops: 1e11));
    }

    static Trained Train(DeepSeekForCausalLM model, RecomputeMode mode, Func<TrainingOptions, Trainer> newTrainer, int zero = 0)
    {
        using var trainer = newTrainer(Options with { Recompute = mode.ToString().ToLowerInvariant(), Zero = zero });
        var steps = Enumerable.Range(0, (int)Options.Steps).Select(_ => trainer.TrainStep()).ToList();
        var weights = model.HfStateDict().ToDictionary(kv => kv.Key, kv => kv.Value.detach().to_type(ScalarType.Float64).data<double>().ToArray());
        // Under ZeRO a rank holds the moments of its rows only: keep where they start in the whole tensor.
        long Offset(AdamW.Slot s) => s.RowStart * (s.Param.dim() == 0 ? 1 : s.Param.numel() / Math.Max(1, s.Param.shape[0]));
        var moments = trainer.Optimizer.Slots.SelectMany(s => new[] { ($"{s.Name}.exp_avg", Offset(s), s.ExpAvg), ($"{s.Name}.exp_avg_sq", Offset(s), s.ExpAvgSq) })
            .ToDictionary(m => m.Item1, m => (m.Item2, m.Item3.data<double>().ToArray()));
        return new Trained(steps, weights, moments);
    }

    static readonly Lazy<Trained> PlainRun = new(() => Train(RecomputeMode.None));

    [Theory]
    [InlineData(RecomputeMode.Full)]
    [InlineData(RecomputeMode.Selective)]
    public void ThreeStepsWithRecomputeEqualThreeStepsWithout(RecomputeMode mode) => AssertEqualsPlain(Train(mode), mode);

    /// <summary>Recompute inside a data-parallel ZeRO-2 job (dp 2 over tcp between threads) still equals one plain process.</summary>
    [Fact]
    public void FullRecomputeInADp2ZeroJobEqualsOnePlainProcess()
    {
        // The models are made one after the other: initialization draws from the process-wide generator.
        var models = new[] { NewModel(), NewModel() };
        Trained[] ranks;
        try
        {
            ranks = RankGroup.Run(2, c => Train(models[c.Rank], RecomputeMode.Full,
                options => new Trainer(models[c.Rank], Data.Value.Train, null, options, CPU, 1e11, c.Rank, 2, new BucketedGradientReducer(c, bucketBytes: 4 << 10)), zero: 2),
                limit: TimeSpan.FromSeconds(120));
        }
        finally { foreach (var m in models) m.Dispose(); }
        foreach (var rank in ranks) AssertEqualsPlain(rank, RecomputeMode.Full);
        Assert.True(ranks[0].Moments.Values.Sum(m => m.Values.Length) < PlainRun.Value.Moments.Values.Sum(m => m.Values.Length), "each ZeRO rank should hold a shard of the moments");
    }

    void AssertEqualsPlain(Trained run, RecomputeMode mode)
    {
        var plain = PlainRun.Value;
        double tolerance = ToleranceOf(mode);
        for (int s = 0; s < Options.Steps; s++)
        {
            StepMetrics one = plain.Steps[s], m = run.Steps[s];
            output.WriteLine($"{mode} step {s + 1}: loss {m.Loss:R} (plain {one.Loss:R}), MTP {m.MtpLoss:R}, norm {m.GradNorm:R} (plain {one.GradNorm:R})");
            Assert.True(one.GradNorm > Options.ClipNorm, $"step {s + 1}: the clip should be active (norm {one.GradNorm})");
            Assert.True(Math.Abs(m.Loss - one.Loss) <= tolerance * one.Loss, $"step {s + 1}: loss {m.Loss:R}, without recompute {one.Loss:R}");
            Assert.True(Math.Abs(m.MtpLoss!.Value - one.MtpLoss!.Value) <= tolerance * one.MtpLoss.Value, $"step {s + 1}: MTP loss {m.MtpLoss:R}, without {one.MtpLoss:R}");
            Assert.True(Math.Abs(m.GradNorm - one.GradNorm) <= tolerance * one.GradNorm, $"step {s + 1}: clipped norm {m.GradNorm:R}, without {one.GradNorm:R}");
            // The loads the bias update uses are counted once per micro-batch, not again by the recomputed forward.
            Assert.Equal(one.ExpertLoad.Select(l => string.Join(",", l)), m.ExpertLoad.Select(l => string.Join(",", l)));
            Assert.Equal(Options.GlobalBatch * Options.SeqLen * Micro(300).NumExpertsPerTok, m.ExpertLoad[0].Sum());
        }
        Assert.Contains(plain.Weights.Keys, n => n.EndsWith("e_score_correction_bias", StringComparison.Ordinal));
        foreach (var (name, expected) in plain.Weights)
        {
            double diff = RelativeDifference(expected, run.Weights[name]);
            Assert.True(diff <= tolerance, $"{mode}: '{name}' after 3 steps differs by {diff:E2} (relative)");
        }
        foreach (var (name, (_, whole)) in plain.Moments)
        {
            var (offset, values) = run.Moments[name];
            double diff = RelativeDifference(whole.AsSpan((int)offset, values.Length).ToArray(), values);
            Assert.True(diff <= tolerance, $"{mode}: '{name}' after 3 steps differs by {diff:E2} (relative)");
        }
    }

    [Fact]
    public void AModelInEvalModeKeepsItsActivations()
    {
        using var model = NewModel();
        ActivationRecompute.Apply(model, RecomputeMode.Full);
        model.eval();
        long before = ActivationRecompute.Recomputed;
        using (var scope = NewDisposeScope())
        {
            var batch = Data.Value.Train.Batch([0L]);
            var logits = model.Forward(batch.narrow(1, 0, Options.SeqLen)).Logits_BTV;
            Evaluation.CrossEntropy(logits, batch.narrow(1, 1, Options.SeqLen)).backward();
        }
        Assert.Equal(before, ActivationRecompute.Recomputed);
        Assert.Throws<ArgumentException>(() => ActivationRecompute.Parse("some"));
        Assert.Contains("recompute must be one of none, full, selective, got 'some'", string.Join(";", (Options with { Recompute = "some" }).Problems()));
    }
}
