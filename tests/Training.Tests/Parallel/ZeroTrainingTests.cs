// ZeRO-1/2 over real tcp between rank threads equals the single-process trainer (float64: losses, clipped norm, weights,
// both moments, routing biases), holds ~1/dp of the optimizer state, and saves checkpoints any layout loads bitwise.
using System.Diagnostics;
using DeepSeekCluster.Training.Checkpoints;
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Data;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Optim;
using DeepSeekCluster.Training.Parallel;
using DeepSeekCluster.Training.Tests.Collectives;
using TorchSharp;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Tests.Parallel;

public sealed class ZeroTrainingTests(ITestOutputHelper output) : IDisposable
{
    // 3 decoder layers (1 dense, 2 MoE), an MTP module and the sequence balance loss: every kind of parameter and loss.
    static DeepSeekConfig Micro(int vocab) => MicroModel.Config(vocab);

    // Global batch 12 = 1 x 6 x 2 = 2 x 3 x 2 = 3 x 2 x 2. A clip of 0.5 is active in every step, so the norm over all
    // shards decides every update.
    static readonly TrainingOptions Options = new()
    {
        SeqLen = MicroModel.SeqLen, GlobalBatch = 12, MicroBatch = 2, Steps = 3, Lr = 5e-3, WarmupSteps = 1, BiasUpdateSpeed = 0.01,
        MtpWeight = 0.3, ClipNorm = 0.5,
    };

    const double Tolerance = 0; // the issue asks for 1e-9; the sums are exact and the norm is summed in one order, so it is bit for bit
    readonly string root = Directory.CreateTempSubdirectory("zero-ckpt-").FullName;

    static readonly Lazy<(int Vocab, TokenDataset Train)> Data = MicroModel.Data;

    static DeepSeekForCausalLM NewModel()
    {
        manual_seed(Options.Seed);
        var model = new DeepSeekForCausalLM(Micro(Data.Value.Vocab)).InitializeWeights();
        model.to(ScalarType.Float64);
        return model;
    }

    /// <summary>What a rank holds after training: weights and biases whole, the optimizer state of its rows.</summary>
    sealed record Held(List<StepMetrics> Steps, Dictionary<string, double[]> Weights, Dictionary<string, (long Start, long RowSize, double[] Values)> Moments, long OptimizerBytes, long WordBytes);

    static Held Capture(Trainer trainer, List<StepMetrics> steps) =>
        Capture(trainer.Model, trainer.Optimizer) with { Steps = steps, WordBytes = trainer.GradientWordBytes };

    static Held Capture(DeepSeekForCausalLM model, AdamW optimizer)
    {
        var weights = new Dictionary<string, double[]>();
        foreach (var (name, t) in model.HfStateDict()) weights[name] = t.detach().to_type(ScalarType.Float64).data<double>().ToArray();
        var moments = new Dictionary<string, (long, long, double[])>();
        foreach (var s in optimizer.Slots)
        {
            long rowSize = s.Param.dim() == 0 ? 1 : s.Param.numel() / Math.Max(1, s.Param.shape[0]);
            moments[$"{s.Name}.exp_avg"] = (s.RowStart, rowSize, s.ExpAvg.data<double>().ToArray());
            moments[$"{s.Name}.exp_avg_sq"] = (s.RowStart, rowSize, s.ExpAvgSq.data<double>().ToArray());
        }
        long bytes = optimizer.StateTensors().Sum(kv => kv.Value.numel() * kv.Value.ElementSize);
        return new Held([], weights, moments, bytes, 0);
    }

    static Held RunSingle()
    {
        using var model = NewModel();
        using var trainer = new Trainer(model, Data.Value.Train, null, Options, CPU, peakFlops: 1e11);
        var steps = Enumerable.Range(0, (int)Options.Steps).Select(_ => trainer.TrainStep()).ToList();
        return Capture(trainer, steps);
    }

    static readonly Lazy<Held> Single = new(RunSingle);

    static Held[] RunZero(int dp, int zero, Action<Trainer>? after = null)
    {
        var options = Options with { Zero = zero };
        var models = Enumerable.Range(0, dp).Select(_ => NewModel()).ToArray();
        try
        {
            return RankGroup.Run(dp, c =>
            {
                var reducer = new BucketedGradientReducer(c, bucketBytes: 4 << 10); // small buckets: many reduce-scatters and all-gathers per step
                using var trainer = new Trainer(models[c.Rank], Data.Value.Train, null, options, CPU, 1e11, c.Rank, dp, reducer);
                var steps = Enumerable.Range(0, (int)Options.Steps).Select(_ => trainer.TrainStep()).ToList();
                after?.Invoke(trainer);
                return Capture(trainer, steps);
            }, limit: TimeSpan.FromSeconds(120));
        }
        finally { foreach (var m in models) m.Dispose(); }
    }

    static double MaxDifference(ReadOnlySpan<double> a, ReadOnlySpan<double> b)
    {
        Assert.Equal(a.Length, b.Length);
        double max = 0;
        for (int i = 0; i < a.Length; i++) max = Math.Max(max, Math.Abs(a[i] - b[i]));
        return max;
    }

    void AssertEqualsSingle(Held[] ranks, int dp)
    {
        var single = Single.Value;
        for (int s = 0; s < Options.Steps; s++)
        {
            var one = single.Steps[s];
            Assert.True(one.GradNorm > Options.ClipNorm, $"step {s + 1}: the clip should be active (norm {one.GradNorm})");
            foreach (var (r, rank) in ranks.Select((x, i) => (i, x)))
            {
                var m = rank.Steps[s];
                output.WriteLine($"dp {dp} rank {r} step {s + 1}: loss {m.Loss:R} (single {one.Loss:R}), norm {m.GradNorm:R} (single {one.GradNorm:R})");
                Assert.True(Math.Abs(m.Loss - one.Loss) <= Tolerance * one.Loss, $"rank {r} step {s + 1}: loss {m.Loss:R}, single process {one.Loss:R}");
                Assert.True(Math.Abs(m.MtpLoss!.Value - one.MtpLoss!.Value) <= Tolerance * one.MtpLoss.Value, $"rank {r} step {s + 1}: MTP loss {m.MtpLoss:R}, single {one.MtpLoss:R}");
                Assert.True(Math.Abs(m.GradNorm - one.GradNorm) <= Tolerance * one.GradNorm, $"rank {r} step {s + 1}: clipped norm {m.GradNorm:R}, single {one.GradNorm:R}");
                Assert.Equal(one.ExpertLoad.Select(l => string.Join(",", l)), m.ExpertLoad.Select(l => string.Join(",", l)));
            }
        }
        // Every weight and routing bias on every rank; every row of both moments on the rank whose shard holds it.
        foreach (var (name, expected) in single.Weights)
            foreach (var (rank, r) in ranks.Select((x, i) => (x, i)))
            {
                double diff = MaxDifference(expected, rank.Weights[name]);
                Assert.True(diff <= Tolerance, $"'{name}' on rank {r} differs from the single process by {diff:E2}");
            }
        Assert.Contains(single.Weights.Keys, n => n.EndsWith("e_score_correction_bias", StringComparison.Ordinal));
        foreach (var (name, (_, _, expected)) in single.Moments)
        {
            long covered = 0;
            foreach (var (rank, r) in ranks.Select((x, i) => (x, i)))
            {
                var (start, rowSize, values) = rank.Moments[name];
                var reference = expected.AsSpan((int)(start * rowSize), values.Length);
                double diff = MaxDifference(reference, values);
                Assert.True(diff <= Tolerance, $"'{name}' rows from {start} on rank {r} differ from the single process by {diff:E2}");
                covered += values.Length;
            }
            Assert.True(covered == expected.Length, $"'{name}': the shards hold {covered} of its {expected.Length} elements; expected each exactly once");
        }
    }

    [Theory]
    [InlineData(2, 1)]
    [InlineData(3, 1)]
    [InlineData(2, 2)]
    [InlineData(3, 2)]
    public void ShardedOptimizerOverTcpEqualsTheSingleProcessBitForBitAndHoldsThePlannedShare(int dp, int zero)
    {
        var clock = Stopwatch.StartNew();
        var ranks = RunZero(dp, zero);
        output.WriteLine($"dp {dp} zero {zero}: {clock.Elapsed.TotalSeconds:F1} s");
        AssertEqualsSingle(ranks, dp);

        // Measured resident optimizer state (and, under ZeRO-2, gradient words) against the planner's prediction.
        var config = Micro(Data.Value.Vocab);
        var layout = ParallelLayout.Even(dp, 1, config.NumHiddenLayers).WithShards(1, zero, config.NRoutedExperts);
        var inputs = new MemoryInputs("fp64", "none", Options.MicroBatch, Options.SeqLen);
        var whole = MemoryPlanner.Predict(config, ParallelLayout.Even(1, 1, config.NumHiddenLayers), 0, inputs);
        Assert.True(Math.Abs(Single.Value.OptimizerBytes - whole.Optimizer) <= 0.01 * whole.Optimizer,
            $"one process holds {Single.Value.OptimizerBytes} optimizer bytes; the planner predicts {whole.Optimizer}");
        for (int r = 0; r < dp; r++)
        {
            var predicted = MemoryPlanner.Predict(config, layout, r, inputs);
            output.WriteLine($"rank {r}: optimizer {ranks[r].OptimizerBytes} B (predicted {predicted.Optimizer}, one process {Single.Value.OptimizerBytes}); gradient words {ranks[r].WordBytes} B (predicted {predicted.GradientWords})");
            Assert.True(Math.Abs(ranks[r].OptimizerBytes - predicted.Optimizer) <= 0.10 * predicted.Optimizer,
                $"rank {r} of dp {dp} holds {ranks[r].OptimizerBytes} optimizer bytes; the planner predicts {predicted.Optimizer} (1/{dp} of {whole.Optimizer})");
            Assert.True(Math.Abs(ranks[r].WordBytes - predicted.GradientWords) <= 0.10 * predicted.GradientWords,
                $"rank {r} of dp {dp} zero {zero} holds {ranks[r].WordBytes} bytes of gradient words; the planner predicts {predicted.GradientWords}");
        }
    }

    /// <summary>
    /// A dp 2 zero 2 job saves its checkpoint the way a cluster does (each rank writes its own file: its rows of the
    /// weights and the optimizer rows it holds, nothing gathered); it loads into one process and into dp 3 zero 1 shards
    /// with every weight, routing bias, both moments of every row and the step count bitwise those of the single process.
    /// </summary>
    [Fact]
    public async Task AZeroCheckpointLoadsIntoOneProcessAndIntoOtherShardsBitwise()
    {
        const string job = "zero-job";
        var config = Micro(Data.Value.Vocab);
        var layout = ParallelLayout.Even(2, 1, config.NumHiddenLayers).WithShards(1, 2, config.NRoutedExperts);
        using var store = new FolderCheckpointStore(root, job);
        var position = new CheckpointPosition(Options.Steps, 1, Options.Steps * Options.GlobalBatch, Options.Steps);
        var files = new ManifestFile[2];
        ShardingPlan? plan = null;
        RunZero(2, 2, trainer =>
        {
            var catalog = CheckpointTensors.Catalog(trainer.Model, trainer.Optimizer);
            var mine = new ShardingPlan(layout, catalog);
            if (trainer.Rank == 0) plan = mine;
            files[trainer.Rank] = ShardedCheckpointWriter.WriteRank(store, mine, trainer.Rank, Options.Steps, trainer.CheckpointTensors());
        });
        await store.CommitAsync(ShardedCheckpointWriter.Manifest(job, plan!, position, files, config.ToJson(), null));

        var single = Single.Value;
        using (var model = NewModel())
        using (var optimizer = Trainer.CreateOptimizer(model, Options))
        {
            await ShardedCheckpointLoader.LoadReplicaAsync(store, Options.Steps, model, optimizer);
            Assert.Equal(Options.Steps, optimizer.StepCount);
            var loaded = Capture(model, optimizer);
            foreach (var (name, expected) in single.Weights) Assert.True(expected.SequenceEqual(loaded.Weights[name]), $"'{name}' differs after loading into one process");
            foreach (var (name, (_, _, expected)) in single.Moments) Assert.True(expected.SequenceEqual(loaded.Moments[name].Values), $"'{name}' differs after loading into one process");
        }
        var zero1 = Options with { Zero = 1 };
        for (int r = 0; r < 3; r++)
        {
            using var model = NewModel();
            using var optimizer = Trainer.CreateOptimizer(model, zero1, r, 3);
            await ShardedCheckpointLoader.LoadReplicaAsync(store, Options.Steps, model, optimizer);
            var loaded = Capture(model, optimizer);
            foreach (var (name, expected) in single.Weights) Assert.True(expected.SequenceEqual(loaded.Weights[name]), $"'{name}' differs after loading into shard {r} of 3");
            foreach (var (name, (_, _, expected)) in single.Moments)
            {
                var (start, rowSize, values) = loaded.Moments[name];
                Assert.True(expected.AsSpan((int)(start * rowSize), values.Length).SequenceEqual(values), $"'{name}' rows from {start} differ after loading into shard {r} of 3");
            }
        }
    }

    /// <summary>
    /// A bf16 job (bf16 weights, gradients and activations; fp32 master weights and moments; parameters all-gathered in
    /// bf16) trains on dp 2 ZeRO-1 bit for bit as one bf16 process, and its losses stay within 2% of the fp32 run's over
    /// the 3 steps (the stated tolerance of bf16 against fp32 here; measured: 0.02% at most).
    /// </summary>
    [Fact]
    public void ABf16JobOnZeroShardsEqualsOneBf16ProcessAndFollowsFp32WithinTwoPercent()
    {
        DeepSeekForCausalLM Fresh(ScalarType dtype)
        {
            manual_seed(Options.Seed);
            var model = new DeepSeekForCausalLM(Micro(Data.Value.Vocab)).InitializeWeights();
            if (dtype != ScalarType.Float32) model.to(dtype);
            return model;
        }
        List<double> RunOne(ScalarType dtype, TrainingOptions options)
        {
            using var model = Fresh(dtype);
            using var trainer = new Trainer(model, Data.Value.Train, null, options, CPU, peakFlops: 1e11);
            return Enumerable.Range(0, (int)Options.Steps).Select(_ => trainer.TrainStep().Loss).ToList();
        }
        var bf16 = Options with { Precision = "bf16" };
        var fp32Losses = RunOne(ScalarType.Float32, Options);
        var bf16Losses = RunOne(ScalarType.BFloat16, bf16);
        var models = new[] { Fresh(ScalarType.BFloat16), Fresh(ScalarType.BFloat16) };
        var ranks = RankGroup.Run(2, c =>
        {
            using var trainer = new Trainer(models[c.Rank], Data.Value.Train, null, bf16 with { Zero = 1 }, CPU, 1e11, c.Rank, 2, new BucketedGradientReducer(c, 4 << 10));
            Assert.True(trainer.Optimizer.Slots.All(s => s.Master is not null && s.Master.dtype == ScalarType.Float32));
            return Enumerable.Range(0, (int)Options.Steps).Select(_ => trainer.TrainStep().Loss).ToList();
        });
        for (int s = 0; s < Options.Steps; s++)
        {
            output.WriteLine($"step {s + 1}: fp32 {fp32Losses[s]:R}, bf16 {bf16Losses[s]:R} ({Math.Abs(bf16Losses[s] - fp32Losses[s]) / fp32Losses[s]:P3}), bf16 dp 2 zero 1 {ranks[0][s]:R}");
            Assert.All(ranks, r => Assert.Equal(bf16Losses[s], r[s]));
            Assert.True(Math.Abs(bf16Losses[s] - fp32Losses[s]) <= 0.02 * fp32Losses[s], $"step {s + 1}: bf16 loss {bf16Losses[s]:R}, fp32 {fp32Losses[s]:R}");
        }
        // The replicas' bf16 weights are the same bits (the all-gather moved each shard's rows unchanged).
        var w0 = models[0].parameters().Select(p => p.to_type(ScalarType.Float32).data<float>().ToArray()).ToList();
        var w1 = models[1].parameters().Select(p => p.to_type(ScalarType.Float32).data<float>().ToArray()).ToList();
        Assert.True(w0.Zip(w1).All(x => x.First.SequenceEqual(x.Second)), "the two bf16 replicas hold different weights");
        foreach (var m in models) m.Dispose();
    }

    public void Dispose() => Directory.Delete(root, recursive: true);
}
