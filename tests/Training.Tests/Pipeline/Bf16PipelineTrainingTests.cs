// bf16 training inside pipeline stages (pp 2, and pp 2 x dp 2 x ep 2 x zero 1, rank threads over real tcp): the losses
// follow the same layout's fp32 pipeline within the stated 2%, the replicas of a stage hold the same bf16 bits, and every
// optimizer slot keeps fp32 master weights and moments. Not a float64 equality test: ExpertPipelineTrainingTests and
// ZeroPipelineTrainingTests are.
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Data;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Optim;
using DeepSeekCluster.Training.Parallel;
using DeepSeekCluster.Training.Pipeline;
using DeepSeekCluster.Training.Tests.Parallel;
using TorchSharp;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Tests.Pipeline;

public sealed class Bf16PipelineTrainingTests(ITestOutputHelper output)
{
    const int Pp = 2, Layers = 4, Experts = 8;

    // The stated tolerance of every bf16-against-fp32 test here (ZeroTrainingTests, ExpertZeroTrainingTests): bf16 keeps
    // 8 bits of mantissa, so a step's loss moves by a few tenths of a percent at most over 3 steps of the micro model.
    const double RelativeTolerance = 0.02;

    // The pipeline tests' micro model and batch: 4 decoder layers (1 dense, 3 MoE) and a MoE MTP module split 2 + 2;
    // global batch 8 = dp x micro-batches x 2; the clip of 0.5 is active in every step.
    static readonly TrainingOptions Options = new()
    {
        SeqLen = MicroModel.SeqLen, GlobalBatch = 8, MicroBatch = 2, Steps = 3, Lr = 5e-3, WarmupSteps = 1, BiasUpdateSpeed = 0.01,
        MtpWeight = 0.3, ClipNorm = 0.5,
    };

    static readonly Lazy<(int Vocab, TokenDataset Train)> Data = MicroModel.Data;

    static DeepSeekForCausalLM NewModel(ScalarType dtype)
    {
        manual_seed(Options.Seed);
        var model = new DeepSeekForCausalLM(MicroModel.Config(Data.Value.Vocab, layers: Layers)).InitializeWeights();
        if (dtype != ScalarType.Float32) model.to(dtype); // AdamW makes the fp32 master from the bf16 weights
        return model;
    }

    sealed record Held(int Stage, int Replica, List<double> Losses, List<double> Norms, Dictionary<string, float[]> Weights);

    /// <summary>Trains dp x pp 2 (x ep, zero) in <paramref name="dtype"/>; every rank's losses, clipped norms and bf16-or-fp32 weights (as float32).</summary>
    Held[] RunPipeline(ScalarType dtype, int dp, int ep, int zero)
    {
        var options = Options with { Precision = dtype == ScalarType.BFloat16 ? "bf16" : "fp32", Ep = ep, Zero = zero };
        var layout = ParallelLayout.Even(dp, Pp, Layers).WithShards(ep, zero, Experts);
        var models = new DeepSeekForCausalLM[dp * Pp];
        for (int r = 0; r < models.Length; r++)
        {
            models[r] = NewModel(dtype);
            if (ep > 1) ExpertParallel.ShardModel(models[r], layout, r);
        }
        try
        {
            return PipelineGroup.Run(dp, Pp, rank =>
            {
                var stage = new PipelineStage(models[layout.Rank(rank.Stage, rank.Replica)], layout, rank.Stage);
                var reducer = rank.StageGroup is { } g ? new BucketedGradientReducer(g, bucketBytes: 16 << 10) : null;
                using var trainer = new PipelineTrainer(stage, new PermutedSamples(Data.Value.Train, (ulong)Options.Seed), options, CPU, 1e11,
                                                        rank.Links, rank.Replica, dp, reducer);
                var steps = Enumerable.Range(0, (int)Options.Steps).Select(_ => trainer.TrainStep()).ToList();
                AssertMixedPrecision(trainer.Optimizer, stage, dtype, $"stage {rank.Stage} replica {rank.Replica}");
                var weights = stage.Parameters.ToDictionary(p => p.Name, p => p.Param.detach().to_type(ScalarType.Float32).data<float>().ToArray());
                return new Held(rank.Stage, rank.Replica, [.. steps.Select(m => m.Loss)], [.. steps.Select(m => m.GradNorm)], weights);
            }, limit: TimeSpan.FromSeconds(150));
        }
        finally { foreach (var m in models) m.Dispose(); }
    }

    /// <summary>bf16: every parameter of the stage is bf16, its slot's master and both moments fp32 (rows of a ZeRO shard); fp32: no master.</summary>
    static void AssertMixedPrecision(AdamW optimizer, PipelineStage stage, ScalarType dtype, string who)
    {
        Assert.Equal(stage.Parameters.Count, optimizer.Slots.Count);
        foreach (var s in optimizer.Slots)
        {
            Assert.True(s.Param.dtype == dtype, $"{who}: '{s.Name}' is {s.Param.dtype}, expected {dtype}");
            Assert.True(s.ExpAvg.dtype == ScalarType.Float32 && s.ExpAvgSq.dtype == ScalarType.Float32, $"{who}: the moments of '{s.Name}' are {s.ExpAvg.dtype}, {s.ExpAvgSq.dtype}");
            if (dtype == ScalarType.BFloat16)
                Assert.True(s.Master is { dtype: ScalarType.Float32 } m && m.numel() == s.ExpAvg.numel(), $"{who}: '{s.Name}' has no fp32 master of its {s.ExpAvg.numel()} rows' elements");
            else Assert.Null(s.Master);
        }
    }

    /// <summary>
    /// pp 2 alone, and the end-to-end goal's ep 2 x zero 1 training under pp 2 (dp 2): the bf16 pipeline's losses at each of
    /// the 3 steps are within 2% of the fp32 pipeline's of the same layout, every rank reports the same loss, the replicas of
    /// a stage hold the same bf16 weights (the all-gather moved each shard's rows unchanged), and the masters and moments
    /// are fp32. The bf16 run must differ from the fp32 run (else the test would not be running bf16 at all).
    /// </summary>
    [Theory]
    [InlineData(1, 1, 0)]
    [InlineData(2, 2, 1)]
    public void ABf16PipelineFollowsTheFp32PipelineWithinTwoPercentAndKeepsFp32MastersAndMoments(int dp, int ep, int zero)
    {
        var fp32 = RunPipeline(ScalarType.Float32, dp, ep, zero);
        var bf16 = RunPipeline(ScalarType.BFloat16, dp, ep, zero);
        for (int s = 0; s < Options.Steps; s++)
        {
            double want = fp32[0].Losses[s], got = bf16[0].Losses[s];
            output.WriteLine($"dp {dp} x pp {Pp} ep {ep} zero {zero} step {s + 1}: bf16 loss {got:R}, fp32 {want:R} ({Math.Abs(got - want) / want:P3}); " +
                             $"norm bf16 {bf16[0].Norms[s]:R}, fp32 {fp32[0].Norms[s]:R}");
            Assert.All(bf16, r => Assert.Equal(got, r.Losses[s]));
            Assert.All(fp32, r => Assert.Equal(want, r.Losses[s]));
            Assert.True(Math.Abs(got - want) <= RelativeTolerance * want, $"step {s + 1}: the bf16 pipeline's loss {got:R}, the fp32 pipeline's {want:R}");
            Assert.True(fp32[0].Norms[s] > Options.ClipNorm, $"step {s + 1}: the clip should be active (norm {fp32[0].Norms[s]})");
        }
        Assert.NotEqual(fp32[0].Losses, bf16[0].Losses);

        // The replicas of each stage hold the same bf16 bits of every weight they both hold (under ep the replicated ones).
        foreach (var group in bf16.GroupBy(r => r.Stage))
        {
            var first = group.First();
            Assert.NotEmpty(first.Weights);
            foreach (var other in group.Skip(1))
                foreach (var (name, values) in first.Weights.Where(kv => other.Weights.ContainsKey(kv.Key)))
                    Assert.True(values.AsSpan().SequenceEqual(other.Weights[name]), $"stage {group.Key}: '{name}' differs between replicas {first.Replica} and {other.Replica}");
        }
    }
}
