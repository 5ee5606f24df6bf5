// The flat-buffer AdamW against the per-parameter update it replaced: an independent per-parameter AdamW on separate
// tensors, the same training run with Flat on and off (whole and ZeRO-sharded), and checkpoints both ways.
using DeepSeekCluster.Training.Checkpoints;
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Data;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Optim;
using DeepSeekCluster.Training.Parallel;
using DeepSeekCluster.Training.Tests.Checkpoints;
using DeepSeekCluster.Training.Tests.Collectives;
using DeepSeekCluster.Training.Tests.Parallel;
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Tests.Optim;

public sealed class FlatAdamWTests : IDisposable
{
    readonly string root = Directory.CreateTempSubdirectory("flat-adamw-").FullName;

    /// <summary>The per-parameter AdamW as it was before the flat buffers, on tensors of its own (no views of anything).</summary>
    sealed class PlainAdamW(double beta1, double beta2, double eps, double weightDecay)
    {
        public readonly Dictionary<string, (Tensor M, Tensor V, Tensor? Master)> State = new();
        long t;

        public void Step(IEnumerable<(string Name, Tensor Param, Tensor Grad)> parameters, double lr)
        {
            t++;
            double c1 = 1 - Math.Pow(beta1, t), c2 = 1 - Math.Pow(beta2, t);
            using var noGrad = no_grad();
            foreach (var (name, p, grad) in parameters)
            {
                var stateType = p.dtype == ScalarType.Float64 ? ScalarType.Float64 : ScalarType.Float32;
                if (!State.TryGetValue(name, out var s))
                    State[name] = s = (zeros_like(p, dtype: stateType), zeros_like(p, dtype: stateType), p.dtype == ScalarType.BFloat16 ? p.to_type(ScalarType.Float32) : null);
                var target = s.Master ?? p;
                var g = grad.to_type(stateType);
                if (p.dim() >= 2) target.mul_(1 - lr * weightDecay);
                s.M.mul_(beta1).add_(g, alpha: 1 - beta1);
                s.V.mul_(beta2).addcmul_(g, g, value: 1 - beta2);
                target.addcdiv_(s.M, (s.V / c2).sqrt_().add_(eps), value: -lr / c1);
                if (s.Master is not null) p.copy_(s.Master);
            }
        }
    }

    // Shapes of every kind the model has: decayed matrices and a 3-d expert stack, undecayed vectors and a scalar.
    static readonly long[][] Shapes = [[7, 5], [3], [4, 6, 2], [], [9], [2, 8]];

    static List<(string Name, Tensor Param)> NewParameters(ScalarType dtype, long seed)
    {
        manual_seed(seed);
        return Shapes.Select((s, i) => ($"p{i}", randn(s, dtype: ScalarType.Float64).to_type(dtype).requires_grad_())).ToList();
    }

    [Theory]
    [InlineData(ScalarType.Float64, false, null)]
    [InlineData(ScalarType.Float64, true, 7L)]
    [InlineData(ScalarType.BFloat16, false, 7L)]
    [InlineData(ScalarType.BFloat16, true, null)]
    public void TheFlatStepEqualsAnIndependentPerParameterAdamWBitForBitOverThreeSteps(ScalarType dtype, bool sharded, long? chunk)
    {
        // chunk 7: chunks cross parameters and the end of the decayed prefix; null: the whole group in one chunk.
        var flatParams = NewParameters(dtype, 11);
        var plainParams = NewParameters(dtype, 11);
        // Sharded: rows [1, +rows/2) of every parameter with rows (a ZeRO shard's), the scalar whole.
        Func<string, long[], (long, long)>? rows = sharded ? (_, shape) => shape.Length == 0 ? (0, 1) : (1, shape[0] / 2) : null;
        using var flat = new AdamW(flatParams, rows) { WeightDecay = 0.1, FlatChunkElements = chunk };
        Assert.True(flat.Flat);
        var plain = new PlainAdamW(flat.Beta1, flat.Beta2, flat.Eps, flat.WeightDecay);
        for (int step = 1; step <= 3; step++)
        {
            manual_seed(100 + step);
            var grads = flatParams.Select(p => randn(p.Param.shape, dtype: ScalarType.Float64).to_type(dtype)).ToList();
            using (no_grad())
                for (int i = 0; i < grads.Count; i++)
                    if (i != 4 || step != 2) flatParams[i].Param.grad = grads[i].clone(); // p4 has no gradient in step 2: it counts as zero
                    else flatParams[i].Param.grad = null;
            flat.Step(1e-2 * step);
            plain.Step(flat.Slots.Select((s, i) =>
            {
                var p = plainParams[i].Param;
                var g = i == 4 && step == 2 ? zeros_like(p) : grads[i];
                return sharded && s.Param.dim() > 0 ? (s.Name, p.narrow(0, s.RowStart, s.RowCount!.Value), g.narrow(0, s.RowStart, s.RowCount.Value)) : (s.Name, p, g);
            }), 1e-2 * step);
            foreach (var (s, i) in flat.Slots.Select((s, i) => (s, i)))
            {
                var (m, v, master) = plain.State[s.Name];
                Assert.True(TrainedState.BitwiseEqual(m, s.ExpAvg), $"{dtype} step {step}: {s.Name}.exp_avg differs");
                Assert.True(TrainedState.BitwiseEqual(v, s.ExpAvgSq), $"{dtype} step {step}: {s.Name}.exp_avg_sq differs");
                if (master is not null) Assert.True(TrainedState.BitwiseEqual(master, s.Master!), $"step {step}: {s.Name}.master differs");
                Assert.True(TrainedState.BitwiseEqual(plainParams[i].Param.detach(), s.Param.detach()), $"{dtype} step {step}: {s.Name} differs");
            }
        }
        // Whole parameters are views of the flat buffers (the step copies nothing in or out); shards are not.
        Assert.Equal(!sharded, flat.Slots.All(s => s.Param.detach().storage_offset() > 0 || s.Name == flat.Slots[0].Name));
    }

    static readonly TrainingOptions Options = new()
    {
        SeqLen = MicroModel.SeqLen, GlobalBatch = 8, MicroBatch = 2, Steps = 3, Lr = 5e-3, WarmupSteps = 1, BiasUpdateSpeed = 0.01,
        MtpWeight = 0.3, ClipNorm = 0.5,
    };

    sealed record Run(List<StepMetrics> Steps, Dictionary<string, Tensor> State, Dictionary<string, Tensor> Grads, bool OverFlatBuffers);

    static DeepSeekForCausalLM NewModel(ScalarType dtype)
    {
        manual_seed(Options.Seed);
        var model = new DeepSeekForCausalLM(MicroModel.Config(MicroModel.Data.Value.Vocab)).InitializeWeights();
        model.to(dtype);
        return model;
    }

    static Run Train(bool flat, ScalarType dtype, int dp, int zero, int rank)
    {
        // The models are made here, one after another: torch's generator is process-wide, and rank threads drawing from
        // it at once would give each run other initial weights.
        var models = Enumerable.Range(0, dp).Select(_ => NewModel(dtype)).ToArray();
        try
        {
            return dp == 1
                ? TrainRank(models[0], flat, Options, null, 0, 1)
                : RankGroup.Run(dp, c => TrainRank(models[c.Rank], flat, Options with { Zero = zero }, new BucketedGradientReducer(c, bucketBytes: 4 << 10), c.Rank, dp),
                                limit: TimeSpan.FromSeconds(120))[rank];
        }
        finally { foreach (var m in models) m.Dispose(); }
    }

    static Run TrainRank(DeepSeekForCausalLM model, bool flat, TrainingOptions options, IGradientReducer? reducer, int rank, int dp)
    {
        options = options with { Precision = model.parameters().First().dtype == ScalarType.BFloat16 ? "bf16" : "fp32" };
        using var optimizer = Trainer.CreateOptimizer(model, options, rank, dp);
        optimizer.Flat = flat;
        optimizer.FlatChunkElements = 1000; // several chunks per group, crossing parameters
        using var trainer = new Trainer(model, new PermutedSamples(MicroModel.Data.Value.Train, (ulong)options.Seed), null, options, CPU, 1e11, rank, dp, reducer, optimizer);
        var steps = Enumerable.Range(0, (int)options.Steps).Select(_ => trainer.TrainStep()).ToList();
        var grads = optimizer.Slots.ToDictionary(s => s.Name, s => s.Own(s.Param.grad!).clone());
        return new Run(steps, CheckpointTensors.Collect(model, optimizer).ToDictionary(kv => kv.Key, kv => kv.Value.clone()), grads, trainer.GradientsOverFlatBuffers);
    }

    [Theory]
    [InlineData(ScalarType.Float64, 1, 0)]
    [InlineData(ScalarType.Float64, 2, 1)]
    [InlineData(ScalarType.Float64, 2, 2)]
    [InlineData(ScalarType.Float64, 2, 0)]
    [InlineData(ScalarType.BFloat16, 1, 0)]
    [InlineData(ScalarType.BFloat16, 2, 0)]
    public void TrainingWithTheFlatStepSumAndClipEqualsThePerSlotPathInLossNormGradientsWeightsAndMoments(ScalarType dtype, int dp, int zero)
    {
        // Rank 1 under ZeRO: its rows start inside the parameters, so the gather and scatter of shard rows are exercised.
        var flat = Train(flat: true, dtype, dp, zero, rank: dp - 1);
        var plain = Train(flat: false, dtype, dp, zero, rank: dp - 1);
        // Without ZeRO the flat run's exact sum and clip work on the flat gradient buffers (ZeRO shards keep their own path).
        Assert.Equal(zero == 0, flat.OverFlatBuffers);
        Assert.False(plain.OverFlatBuffers);
        for (int s = 0; s < Options.Steps; s++)
        {
            Assert.Equal(plain.Steps[s].Loss, flat.Steps[s].Loss);
            Assert.Equal(plain.Steps[s].GradNorm, flat.Steps[s].GradNorm);
            Assert.True(plain.Steps[s].GradNorm > Options.ClipNorm, $"step {s + 1}: the clip should be active");
        }
        Assert.Equal(plain.State.Keys.Order(), flat.State.Keys.Order());
        Assert.Contains(flat.State.Keys, k => k.EndsWith(".exp_avg_sq", StringComparison.Ordinal));
        Assert.Equal(dtype == ScalarType.BFloat16, flat.State.Keys.Any(k => k.EndsWith(".master", StringComparison.Ordinal)));
        Assert.All(plain.State, kv => Assert.True(TrainedState.BitwiseEqual(kv.Value, flat.State[kv.Key]), $"{kv.Key} differs"));
        Assert.All(plain.Grads, kv => Assert.True(TrainedState.BitwiseEqual(kv.Value, flat.Grads[kv.Key]), $"the clipped gradient of {kv.Key} differs"));
    }

    [Fact]
    public async Task APerParameterStateLoadsIntoTheFlatOptimizerAndAFlatCheckpointHoldsTheSameTensors()
    {
        const string job = "flat";
        var layout = ParallelLayout.Even(1, 1, TrainedState.Config.NumHiddenLayers);
        var position = new CheckpointPosition(5, Generation: 1, ConsumedSamples: 40, OptimizerSteps: 5);
        using var store = new FolderCheckpointStore(root, job);

        // The per-parameter layout's checkpoint: weights plus separate moment tensors under the names the format has.
        manual_seed(3);
        using var model = new DeepSeekForCausalLM(TrainedState.Config).InitializeWeights();
        var old = CheckpointTensors.Collect(model, null).ToList();
        foreach (var (name, p) in model.named_parameters().Select(p => (model.ToHfName(p.name), (Tensor)p.parameter)))
        {
            old.Add(new($"optimizer.{name}.exp_avg", randn_like(p)));
            old.Add(new($"optimizer.{name}.exp_avg_sq", rand_like(p)));
        }
        await ShardedCheckpointWriter.SaveAllRanksAsync(store, job, layout, old, position, TrainedState.Config.ToJson(), tokenizerSha256: null);
        using var target = new TrainedState(9, fill: false);
        Assert.True(target.Optimizer.Flat);
        await ShardedCheckpointLoader.LoadReplicaAsync(store, 5, target.Model, target.Optimizer);
        var loaded = target.Tensors.ToDictionary();
        Assert.Equal(old.Select(kv => kv.Key).Order(), loaded.Keys.Order());
        Assert.All(old, kv => Assert.True(TrainedState.BitwiseEqual(kv.Value, loaded[kv.Key]), $"{kv.Key} did not load into the flat optimizer"));

        // And back: the flat optimizer's checkpoint holds the same names, shapes, dtypes and bits.
        using var store2 = new FolderCheckpointStore(Path.Combine(root, "2"), job);
        await ShardedCheckpointWriter.SaveAllRanksAsync(store2, job, layout, target.Tensors, position, TrainedState.Config.ToJson(), tokenizerSha256: null);
        foreach (var (key, expected) in old)
        {
            var manifest = await store2.ReadManifestAsync(5);
            var entry = Assert.Single(manifest.Tensors[key].Slices);
            using var read = await store2.ReadAsync(5, entry.File, key, null);
            Assert.True(TrainedState.BitwiseEqual(expected, read), $"{key} as the flat optimizer saved it");
        }
    }

    public void Dispose()
    {
        try { Directory.Delete(root, recursive: true); } catch (IOException) { }
    }
}
