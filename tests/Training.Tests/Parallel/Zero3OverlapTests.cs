// ZeRO-3 with its exchanges overlapped (each layer's gradients reduce-scattered as its backward ends, the next layer's
// gather prefetched on the exchange thread) trains bit for bit as with the whole backward's reduce-scatter after it,
// over real tcp between rank threads, and holds at its peak what the planner predicts, less than without the overlap.
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Parallel;
using DeepSeekCluster.Training.Tests.Collectives;
using TorchSharp;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Tests.Parallel;

public sealed class Zero3OverlapTests(ITestOutputHelper output)
{
    // Global batch 12 = 2 ranks x 3 micro-batches x 2 = 3 x 2 x 2: several micro-batches per step on every rank.
    static readonly TrainingOptions Options = new()
    {
        SeqLen = MicroModel.SeqLen, GlobalBatch = 12, MicroBatch = 2, Steps = 3, Lr = 5e-3, WarmupSteps = 1, BiasUpdateSpeed = 0.01,
        MtpWeight = 0.3, ClipNorm = 0.5, Zero = 3,
    };

    static DeepSeekConfig Config => MicroModel.Config(MicroModel.Data.Value.Vocab);

    sealed record Ran(List<StepMetrics> Steps, Dictionary<string, double[]> Weights, Dictionary<string, double[]> Moments,
                      long Peak, long PrefetchesUsed, long GroupsScattered);

    static Ran[] Train(int dp, string recompute, bool overlap, bool? exchangeThread = null)
    {
        var models = Enumerable.Range(0, dp).Select(_ =>
        {
            var m = DeepSeekForCausalLM.FromSeed(Config, Options.Seed);
            m.to(ScalarType.Float64);
            return m;
        }).ToArray();
        try
        {
            return RankGroup.Run(dp, c =>
            {
                var options = Options with { Recompute = recompute, Zero3Overlap = overlap, ExchangeThread = exchangeThread };
                using var trainer = new Trainer(models[c.Rank], MicroModel.Data.Value.Train, null, options, CPU, 1e11, c.Rank, dp, new BucketedGradientReducer(c, bucketBytes: 4 << 10));
                var sharded = trainer.ShardedParameters!;
                sharded.TrackPeak = true;
                var steps = Enumerable.Range(0, (int)Options.Steps).Select(_ => trainer.TrainStep()).ToList();
                var (peak, prefetches, scattered) = (sharded.PeakBytes, sharded.PrefetchesUsed, sharded.GroupsScattered);
                sharded.TrackPeak = false;
                sharded.GatherAll();
                var weights = trainer.Model.HfStateDict().ToDictionary(kv => kv.Key, kv => kv.Value.detach().data<double>().ToArray());
                var moments = new Dictionary<string, double[]>();
                foreach (var s in trainer.Optimizer.Slots)
                {
                    moments[$"{s.Name}.exp_avg"] = s.ExpAvg.data<double>().ToArray();
                    moments[$"{s.Name}.exp_avg_sq"] = s.ExpAvgSq.data<double>().ToArray();
                }
                return new Ran(steps, weights, moments, peak, prefetches, scattered);
            }, limit: TimeSpan.FromSeconds(150));
        }
        finally { foreach (var m in models) m.Dispose(); }
    }

    /// <summary>
    /// The exchange thread runs its calls in the order posted; a call that fails fails every call queued after it without
    /// running it (another rank would wait on its collective), and the failure reaches the waiter as the same exception.
    /// </summary>
    [Fact]
    public void TheExchangeRunsCallsInOrderAndStopsAtTheFirstFailure()
    {
        using var exchange = new OrderedExchange(async: true);
        using var hold = new ManualResetEventSlim();
        var ran = new List<int>();
        var stalled = new CollectiveException(CollectiveFailure.PeerStalled, "rank 1 stalled", peerRank: 1);
        var first = exchange.Post(() => { hold.Wait(); ran.Add(1); });
        var second = exchange.Post(() => ran.Add(2));
        var failing = exchange.Post(() => throw stalled);
        var after = exchange.Post(() => ran.Add(4));
        Assert.False(first.IsCompleted); // held: the later calls are queued behind it
        hold.Set();
        Assert.Same(stalled, Assert.Throws<CollectiveException>(() => OrderedExchange.Wait(after)));
        Assert.Equal([1, 2], ran);
        Assert.True(second.IsCompletedSuccessfully);
        Assert.Same(stalled, Assert.Throws<CollectiveException>(() => exchange.Drain()));
        Assert.True(failing.IsFaulted);
    }

    /// <summary>
    /// dp 2 and dp 3 (rows that do not split evenly), each without and with selective recompute (nested in the layer's own rerun): the overlapped exchanges give the
    /// same loss, MTP loss, clipped norm and expert loads at every step, and every weight and both moments of every rank's
    /// rows, bit for bit, as the reduce-scatter after the backward; the prefetches were used and every layer scattered
    /// during the backward; and the peak of parameter and gradient storage falls to within 10% of the planner's prediction.
    /// </summary>
    [Theory]
    [InlineData(2, "none")]
    [InlineData(2, "selective")]
    [InlineData(3, "none")]
    [InlineData(3, "selective")]
    public void OverlappedExchangesTrainBitForBitAsTheAfterBackwardReductionAndHoldLess(int dp, string recompute)
    {
        var after = Train(dp, recompute, overlap: false);
        var overlapped = Train(dp, recompute, overlap: true);
        for (int s = 0; s < Options.Steps; s++)
            for (int r = 0; r < dp; r++)
            {
                var (a, o) = (after[r].Steps[s], overlapped[r].Steps[s]);
                output.WriteLine($"dp {dp} rank {r} step {s + 1}: loss {o.Loss:R} (after backward {a.Loss:R}), norm {o.GradNorm:R} ({a.GradNorm:R})");
                Assert.True(a.GradNorm > Options.ClipNorm, $"step {s + 1}: the clip should be active (norm {a.GradNorm})");
                Assert.Equal(a.Loss, o.Loss);
                Assert.Equal(a.MtpLoss, o.MtpLoss);
                Assert.Equal(a.GradNorm, o.GradNorm);
                Assert.Equal(a.ExpertLoad.Select(l => string.Join(",", l)), o.ExpertLoad.Select(l => string.Join(",", l)));
            }
        for (int r = 0; r < dp; r++)
        {
            foreach (var (name, values) in after[r].Weights)
                Assert.True(values.SequenceEqual(overlapped[r].Weights[name]), $"weight '{name}' on rank {r} differs with the overlap");
            foreach (var (name, values) in after[r].Moments)
                Assert.True(values.SequenceEqual(overlapped[r].Moments[name]), $"moment '{name}' of rank {r}'s rows differs with the overlap");
        }

        int layers = Config.NumHiddenLayers + Config.NumNextnPredictLayers;
        int microBatches = Options.GlobalBatch / Options.MicroBatch / dp;
        var layout = ParallelLayout.Even(dp, 1, Config.NumHiddenLayers).WithShards(1, 3, Config.NRoutedExperts);
        for (int r = 0; r < dp; r++)
        {
            Assert.Equal(0, after[r].PrefetchesUsed + after[r].GroupsScattered);
            // Forward and backward, every micro-batch: each main layer but the first in each direction comes prefetched,
            // and each layer's gradients and then the rest's are scattered during the backward.
            Assert.Equal(Options.Steps * microBatches * 2 * (Config.NumHiddenLayers - 1 + Config.NumNextnPredictLayers - 1), overlapped[r].PrefetchesUsed);
            Assert.Equal(Options.Steps * microBatches * (layers + 1), overlapped[r].GroupsScattered);

            var inputs = new MemoryInputs("fp64", recompute, Options.MicroBatch, Options.SeqLen);
            long scratch = Math.Min(MemoryPlanner.LocalParameters(Config, layout, r), 1L << 22) * sizeof(double);
            long Held(RankMemory m) => m.Parameters + m.Gathered + m.Gradients - m.GradientWords - scratch; // parameter and .grad storage
            long withOverlap = Held(MemoryPlanner.Predict(Config, layout, r, inputs));
            long without = Held(MemoryPlanner.Predict(Config, layout, r, inputs with { Zero3Overlap = false }));
            output.WriteLine($"dp {dp} rank {r}: peak parameter and gradient bytes {overlapped[r].Peak} overlapped (predicted {withOverlap}), {after[r].Peak} after the backward (predicted {without})");
            Assert.True(overlapped[r].Peak < after[r].Peak, $"rank {r}: the overlap should hold less at its peak ({overlapped[r].Peak} against {after[r].Peak})");
            Assert.True(Math.Abs(overlapped[r].Peak - withOverlap) <= 0.10 * overlapped[r].Peak,
                $"rank {r} of dp {dp}: {overlapped[r].Peak} bytes at the overlapped peak; the planner predicts {withOverlap}");
            Assert.True(Math.Abs(after[r].Peak - without) <= 0.10 * after[r].Peak,
                $"rank {r} of dp {dp}: {after[r].Peak} bytes at the peak without the overlap; the planner predicts {without}");
        }
    }

    /// <summary>
    /// The CUDA shape of the overlap on CPU tensors (the seam TrainingOptions.ExchangeThread = false): no exchange thread,
    /// each layer's reduce-scatter run inline by the backward's own thread as its signal fires, no prefetch. The code a
    /// GPU runs between NCCL calls trains bit for bit as the reduce-scatter after the backward, scatters every layer
    /// during the backward, and holds at its peak (one layer gathered at a time: no prefetch) what the planner predicts
    /// for the same run on CUDA, within 10%.
    /// </summary>
    [Fact]
    public void WithoutAnExchangeThreadAsOnCudaTheOverlapTrainsBitForBitAsTheAfterBackwardReduction()
    {
        const int dp = 2;
        var after = Train(dp, "none", overlap: false);
        var inline = Train(dp, "none", overlap: true, exchangeThread: false);
        for (int r = 0; r < dp; r++)
        {
            ExpertParallelTrainingTests.AssertStepsEqualSingle([inline[r].Steps], after[r].Steps, Options.ClipNorm, output, $"inline overlap of dp rank {r}:", "after the backward");
            foreach (var (name, values) in after[r].Weights)
                Assert.True(values.SequenceEqual(inline[r].Weights[name]), $"weight '{name}' on rank {r} differs with the inline overlap");
            foreach (var (name, values) in after[r].Moments)
                Assert.True(values.SequenceEqual(inline[r].Moments[name]), $"moment '{name}' of rank {r}'s rows differs with the inline overlap");

            int microBatches = Options.GlobalBatch / Options.MicroBatch / dp;
            Assert.Equal(0, inline[r].PrefetchesUsed);
            Assert.Equal(Options.Steps * microBatches * (Config.NumHiddenLayers + Config.NumNextnPredictLayers + 1), inline[r].GroupsScattered);

            var layout = ParallelLayout.Even(dp, 1, Config.NumHiddenLayers).WithShards(1, 3, Config.NRoutedExperts);
            var inputs = new MemoryInputs("fp64", "none", Options.MicroBatch, Options.SeqLen, Device: DeviceType.CUDA);
            long scratch = Math.Min(MemoryPlanner.LocalParameters(Config, layout, r), 1L << 22) * sizeof(double);
            var cuda = MemoryPlanner.Predict(Config, layout, r, inputs);
            long predicted = cuda.Parameters + cuda.Gathered + cuda.Gradients - cuda.GradientWords - scratch;
            output.WriteLine($"rank {r}: peak parameter and gradient bytes {inline[r].Peak} inline (the planner predicts {predicted} on CUDA), {after[r].Peak} after the backward");
            Assert.True(Math.Abs(inline[r].Peak - predicted) <= 0.10 * inline[r].Peak,
                $"rank {r}: {inline[r].Peak} bytes at the inline overlap's peak; the planner predicts {predicted} on CUDA");
        }
    }
}
