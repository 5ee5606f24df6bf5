// The trainer with the exact sum's fast paths (one-pass CPU kernels, no sum for a lone micro-batch) against the same
// training with them off (torch's op chain over the words): loss, norm, gradients, weights and moments bit for bit.
using DeepSeekCluster.Training.Checkpoints;
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Data;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Tests.Checkpoints;
using DeepSeekCluster.Training.Tests.Collectives;
using DeepSeekCluster.Training.Tests.Parallel;
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Tests.Engine;

public class ExactSumFastPathTests
{
    static readonly TrainingOptions Options = new()
    {
        SeqLen = MicroModel.SeqLen, GlobalBatch = 8, MicroBatch = 2, Steps = 2, Lr = 5e-3, WarmupSteps = 1, BiasUpdateSpeed = 0.01,
        MtpWeight = 0.3, ClipNorm = 0.5,
    };

    sealed record Run(List<StepMetrics> Steps, Dictionary<string, Tensor> State, Dictionary<string, Tensor> Grads);

    static DeepSeekForCausalLM NewModel(ScalarType dtype)
    {
        manual_seed(Options.Seed);
        var model = new DeepSeekForCausalLM(MicroModel.Config(MicroModel.Data.Value.Vocab)).InitializeWeights();
        model.to(dtype);
        return model;
    }

    static Run Train(bool fast, ScalarType dtype, TrainingOptions options, int dp)
    {
        options = options with { Precision = dtype == ScalarType.BFloat16 ? "bf16" : "fp32" }; // (a float64 model trains as "fp32")
        var models = Enumerable.Range(0, dp).Select(_ => NewModel(dtype)).ToArray(); // in turn: the seed is process-wide
        try
        {
            Run Rank(int rank, IGradientReducer? reducer)
            {
                using var trainer = new Trainer(models[rank], new PermutedSamples(MicroModel.Data.Value.Train, (ulong)options.Seed), null, options, CPU, 1e11, rank, dp, reducer);
                trainer.ExactSumFastPaths = fast;
                var steps = Enumerable.Range(0, (int)options.Steps).Select(_ => trainer.TrainStep()).ToList();
                var grads = trainer.Optimizer.Slots.ToDictionary(s => s.Name, s => s.Own(s.Param.grad!).clone());
                return new Run(steps, CheckpointTensors.Collect(models[rank], trainer.Optimizer).ToDictionary(kv => kv.Key, kv => kv.Value.clone()), grads);
            }
            return dp == 1
                ? Rank(0, null)
                : RankGroup.Run(dp, c => Rank(c.Rank, new BucketedGradientReducer(c, bucketBytes: 4 << 10)), limit: TimeSpan.FromSeconds(120))[dp - 1];
        }
        finally { foreach (var m in models) m.Dispose(); }
    }

    /// <summary>
    /// Standalone with one micro-batch per step (global 2): the lone-term path, no words at all; with four: the one-pass
    /// add and mean; dp 2 under ZeRO-2: the native mean of one shard's summed rows (rank 1's start inside parameters).
    /// </summary>
    [Theory]
    [InlineData(ScalarType.Float32, 2, 1, 0)]
    [InlineData(ScalarType.BFloat16, 2, 1, 0)]
    [InlineData(ScalarType.Float32, 8, 1, 0)]
    [InlineData(ScalarType.BFloat16, 8, 1, 0)]
    [InlineData(ScalarType.Float32, 8, 2, 2)]
    public void TrainingWithTheFastPathsEqualsTheTorchOpsInLossNormGradientsWeightsAndMoments(ScalarType dtype, int globalBatch, int dp, int zero)
    {
        var options = Options with { GlobalBatch = globalBatch, Zero = zero };
        var fast = Train(fast: true, dtype, options, dp);
        var reference = Train(fast: false, dtype, options, dp);
        for (int s = 0; s < options.Steps; s++)
        {
            Assert.Equal(reference.Steps[s].Loss, fast.Steps[s].Loss);
            Assert.Equal(reference.Steps[s].GradNorm, fast.Steps[s].GradNorm);
            Assert.True(double.IsFinite(fast.Steps[s].GradNorm) && fast.Steps[s].GradNorm > 0, $"step {s + 1}: norm {fast.Steps[s].GradNorm}");
        }
        Assert.Equal(reference.State.Keys.Order(), fast.State.Keys.Order());
        Assert.All(reference.State, kv => Assert.True(TrainedState.BitwiseEqual(kv.Value, fast.State[kv.Key]), $"{kv.Key} differs"));
        Assert.All(reference.Grads, kv => Assert.True(TrainedState.BitwiseEqual(kv.Value, fast.Grads[kv.Key]), $"the clipped gradient of {kv.Key} differs"));
    }
}
