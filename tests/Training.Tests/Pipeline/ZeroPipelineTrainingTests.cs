// ZeRO-1/2/3 inside pipeline stages (dp 2 x pp 2, rank threads over real tcp) equals the single-process trainer in float64
// (losses, clipped norm, expert loads, every weight, both moments of every row, routing biases), each replica holds the
// planned share of its stage's optimizer state (ZeRO-3: and of its parameters), and a dp 2 x pp 2 x zero 1 or zero 3
// checkpoint loads bitwise into one process, into a dp 2 x pp 1 x zero 0 replica and back into dp 2 x pp 2 sharded stages.
using DeepSeekCluster.Training.Checkpoints;
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

public sealed class ZeroPipelineTrainingTests(ITestOutputHelper output) : IDisposable
{
    const int Dp = 2, Pp = 2, Layers = 4, Experts = 8;
    const string Job = "zero-pp-job";
    readonly string root = Directory.CreateTempSubdirectory("zero-pp-ckpt-").FullName;

    // 4 decoder layers (1 dense, 3 MoE) and a MoE MTP module, split 2 + 2. Global batch 8 = 2 replicas x 2 micro-batches
    // x 2. The clip of 0.5 is active in every step, so the norm over both stages and both shards decides every update.
    static DeepSeekConfig Micro(int vocab) => MicroModel.Config(vocab, layers: Layers);

    static readonly TrainingOptions Options = new()
    {
        SeqLen = MicroModel.SeqLen, GlobalBatch = 8, MicroBatch = 2, Steps = 3, Lr = 5e-3, WarmupSteps = 1, BiasUpdateSpeed = 0.01,
        MtpWeight = 0.3, ClipNorm = 0.5,
    };

    static readonly Lazy<(int Vocab, TokenDataset Train)> Data = MicroModel.Data;

    static DeepSeekForCausalLM NewModel()
    {
        manual_seed(Options.Seed);
        var model = new DeepSeekForCausalLM(Micro(Data.Value.Vocab)).InitializeWeights();
        model.to(ScalarType.Float64);
        return model;
    }

    /// <summary>A checkpoint tensor as a rank holds it: rows from <see cref="Start"/> (0 and whole unless a ZeRO shard of optimizer state).</summary>
    sealed record Part(long Start, long RowSize, double[] Values);

    sealed record Held(List<StepMetrics> Steps, Dictionary<string, Part> Tensors)
    {
        public int Stage, Replica;
        public long OptimizerElements;
        /// <summary>ZeRO-3: parameter bytes held between steps, the peak of parameter and gradient storage, whether every parameter was empty between steps.</summary>
        public long ParameterBytes, PeakBytes;
        public bool EmptyBetweenSteps;
        public ManifestFile? File;
        public ShardingPlan? Plan;
    }

    /// <summary>Weights, routing biases and both moments under checkpoint names, with the rows a ZeRO replica holds.</summary>
    static Dictionary<string, Part> Capture(IEnumerable<KeyValuePair<string, Tensor>> tensors, AdamW optimizer, IReadOnlyList<TensorEntry> catalog)
    {
        var shards = optimizer.ShardRows();
        var whole = catalog.ToDictionary(e => e.Name, e => e.Shape, StringComparer.Ordinal);
        return tensors.ToDictionary(kv => kv.Key, kv =>
        {
            long[] shape = whole.GetValueOrDefault(kv.Key, kv.Value.shape);
            long rowSize = shape.Length == 0 || shape[0] == 0 ? 1 : shape.Aggregate(1L, (a, b) => a * b) / shape[0];
            return new Part(shards.TryGetValue(kv.Key, out var rows) ? rows.Start : 0, rowSize,
                            kv.Value.detach().cpu().to_type(ScalarType.Float64).data<double>().ToArray());
        });
    }

    static readonly Dictionary<(double, double), Held> Singles = [];

    static Held RunSingle(TrainingOptions options)
    {
        lock (Singles)
        {
            if (Singles.TryGetValue((options.ClipNorm, options.MtpWeight), out var held)) return held;
            using var model = NewModel();
            using var trainer = new Trainer(model, Data.Value.Train, null, options, CPU, peakFlops: 1e11);
            var steps = Enumerable.Range(0, (int)Options.Steps).Select(_ => trainer.TrainStep()).ToList();
            return Singles[(options.ClipNorm, options.MtpWeight)] =
                new Held(steps, Capture(CheckpointTensors.Collect(model, trainer.Optimizer), trainer.Optimizer, CheckpointTensors.Catalog(model, trainer.Optimizer)));
        }
    }

    static ParallelLayout LayoutOf(TrainingOptions options, int dp = Dp) => ParallelLayout.Even(dp, Pp, Layers).WithShards(options.Ep, options.Zero, Experts);

    /// <summary>
    /// Trains dp x pp 2 (x ep) with ZeRO <paramref name="options"/>.Zero up to step <paramref name="until"/> (from the
    /// start, or from <paramref name="store"/>'s committed step <paramref name="resumeFrom"/>, each stage reading its
    /// rows); each rank then writes its checkpoint file of step <paramref name="until"/>.
    /// </summary>
    static Held[] RunZeroPipeline(FolderCheckpointStore store, TrainingOptions options, int dp, long until = 3, long resumeFrom = 0)
    {
        var layout = LayoutOf(options, dp);
        var models = Enumerable.Range(0, dp * Pp).Select(_ => NewModel()).ToArray();
        if (options.Ep > 1)
            for (int r = 0; r < models.Length; r++) ExpertParallel.ShardModel(models[r], layout, r);
        try
        {
            return PipelineGroup.Run(dp, Pp, rank =>
            {
                int worldRank = layout.Rank(rank.Stage, rank.Replica);
                var stage = new PipelineStage(models[worldRank], layout, rank.Stage);
                // Small buckets: many reduce-scatters (per micro-batch under ZeRO-2) and all-gathers per step.
                var reducer = new BucketedGradientReducer(rank.StageGroup!, bucketBytes: 4 << 10);
                using var optimizer = PipelineTrainer.CreateOptimizer(stage, options, rank.Replica, dp);
                if (resumeFrom > 0) stage.LoadCheckpointAsync(store, resumeFrom, optimizer).GetAwaiter().GetResult();
                using var trainer = new PipelineTrainer(stage, new PermutedSamples(Data.Value.Train, (ulong)Options.Seed), options, CPU, 1e11,
                                                        rank.Links, rank.Replica, dp, reducer, optimizer);
                trainer.ResumeAt(resumeFrom, optimizer.StepCount);
                Assert.True(trainer.Optimizer.Sharded, $"stage {rank.Stage} replica {rank.Replica}: the optimizer is not sharded");
                var sharded = trainer.ShardedParameters;
                Assert.Equal(options.Zero >= 3, sharded is not null);
                if (sharded is not null) sharded.TrackPeak = true;
                // Each step announces its changes in order: under ZeRO-3 the parameters' release at its start, then the update.
                var changes = new List<StateChange>();
                trainer.BeforeStateChange = changes.Add;
                var steps = Enumerable.Range(0, (int)(until - resumeFrom)).Select(_ => trainer.TrainStep()).ToList();
                StateChange[] perStep = options.Zero >= 3 ? [StateChange.ReleaseParameters, StateChange.Update] : [StateChange.Update];
                Assert.Equal(Enumerable.Repeat(perStep, (int)(until - resumeFrom)).SelectMany(c => c), changes);
                // ZeRO-3 between steps: every parameter of the stage empty, the replica's rows alone held.
                bool empty = stage.Parameters.All(p => p.Param.numel() == 0);
                long parameterBytes = sharded?.ResidentBytes ?? 0, peak = sharded?.PeakBytes ?? 0;
                var plan = new ShardingPlan(layout, stage.CheckpointCatalog);
                var file = ShardedCheckpointWriter.WriteRank(store, plan, worldRank, until, trainer.CheckpointTensors());
                if (sharded is not null) { sharded.TrackPeak = false; sharded.GatherAll(); } // every weight whole, for the comparison
                return new Held(steps, Capture(trainer.CheckpointTensors(), trainer.Optimizer, stage.CheckpointCatalog))
                {
                    Stage = rank.Stage, Replica = rank.Replica, File = file, Plan = plan,
                    OptimizerElements = trainer.Optimizer.Slots.Sum(s => s.ExpAvg.numel()),
                    ParameterBytes = parameterBytes, PeakBytes = peak, EmptyBetweenSteps = empty,
                };
            }, limit: TimeSpan.FromSeconds(150));
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

    /// <summary>The whole tensor from the ranks' parts: each row from the one rank holding it (a test failure if a row is held twice or never).</summary>
    static double[] Assemble(Held[] ranks, string name, int length)
    {
        var result = new double[length];
        var covered = new int[length];
        foreach (var r in ranks)
            if (r.Tensors.TryGetValue(name, out var p))
            {
                p.Values.CopyTo(result, (int)(p.Start * p.RowSize));
                for (int i = 0; i < p.Values.Length; i++) covered[(int)(p.Start * p.RowSize) + i]++;
            }
        Assert.True(covered.All(c => c == 1), $"'{name}': the ranks' shards do not hold each element exactly once");
        return result;
    }

    /// <summary>
    /// Clipped (0.5, active in every step) with MTP: to 1e-9, since each stage's share of the norm is added along the
    /// pipeline (not row by row over the whole model as one process does) and the embedding's gradient from the MTP
    /// module arrives along the pipeline, added in another order. Unclipped without MTP every weight, moment and bias is
    /// the single process's bit for bit (the gradient sums are exact and each shard's AdamW is the same arithmetic); the
    /// reported norm and aux loss are sums over the stages in another order, so to 1e-9. With ep 2 each stage's replicas
    /// also form its ep groups: dp 2 leaves each expert one holder (only the replicated rows are split), dp 4 two. ZeRO-3
    /// (each layer gathered around its forward and again around its backward's recompute, per micro-batch) under 1F1B,
    /// whose backwards run after later micro-batches' forwards, and under GPipe; and ZeRO-3 in CUDA's shape (no exchange
    /// thread: each layer's reduce-scatter inline on the backward's thread, no prefetch; TrainingOptions.ExchangeThread).
    /// </summary>
    [Theory]
    [InlineData(1, 1, 2, 0.5, 0.3)]
    [InlineData(2, 1, 2, 0.5, 0.3)]
    [InlineData(2, 1, 2, 0.0, 0.0)]
    [InlineData(1, 2, 2, 0.5, 0.3)]
    [InlineData(2, 2, 2, 0.5, 0.3)]
    [InlineData(2, 2, 4, 0.0, 0.0)]
    [InlineData(3, 1, 2, 0.5, 0.3)]
    [InlineData(3, 1, 2, 0.5, 0.3, "gpipe")]
    [InlineData(3, 1, 2, 0.5, 0.3, "1f1b", false)]
    [InlineData(3, 1, 2, 0.0, 0.0)]
    [InlineData(3, 2, 2, 0.5, 0.3)]
    [InlineData(3, 2, 4, 0.0, 0.0)]
    public async Task ZeroShardedStagesEqualTheSingleProcessAndTheirCheckpointLoadsIntoOtherLayoutsBitwise(int zero, int ep, int dp, double clipNorm, double mtpWeight, string schedule = "1f1b", bool exchangeThread = true)
    {
        const double Tolerance = 1e-9;
        var options = Options with { Zero = zero, Ep = ep, ClipNorm = clipNorm, MtpWeight = mtpWeight, PipelineSchedule = schedule,
                                     ExchangeThread = exchangeThread ? null : false };
        double tolerance = clipNorm > 0 ? Tolerance : 0;
        using var store = new FolderCheckpointStore(root, Job);
        var ranks = RunZeroPipeline(store, options, dp);
        var single = RunSingle(options with { Zero = 0, Ep = 1, PipelineSchedule = "1f1b" });

        for (int s = 0; s < Options.Steps; s++)
        {
            var one = single.Steps[s];
            Assert.True(clipNorm == 0 || one.GradNorm > clipNorm, $"step {s + 1}: the clip should be active (norm {one.GradNorm})");
            foreach (var r in ranks)
            {
                var m = r.Steps[s];
                output.WriteLine($"zero {zero} ep {ep} dp {dp} {schedule} stage {r.Stage} replica {r.Replica} step {s + 1}: loss {m.Loss:R} (single {one.Loss:R}), norm {m.GradNorm:R} (single {one.GradNorm:R})");
                foreach (var (what, got, want) in new[] { ("loss", m.Loss, one.Loss), ("MTP loss", m.MtpLoss ?? 0, one.MtpLoss ?? 0), ("aux loss", m.AuxLoss!.Value, one.AuxLoss!.Value), ("clipped norm", m.GradNorm, one.GradNorm) })
                    Assert.True(Math.Abs(got - want) <= (what is "clipped norm" or "aux loss" ? Tolerance : tolerance) * want, $"step {s + 1}, stage {r.Stage} replica {r.Replica}: {what} {got:R}, the single process {want:R}");
                Assert.Equal(mtpWeight > 0, m.MtpLoss is not null);
                Assert.Equal(one.ExpertLoad.Select(l => string.Join(",", l)), m.ExpertLoad.Select(l => string.Join(",", l)));
            }
        }

        // Every weight and routing bias on every replica of its stage holding it (a routed expert's: dp / ep of them);
        // every row of both moments on exactly one of them.
        double worst = 0;
        foreach (var (name, expected) in single.Tensors)
        {
            var holders = ranks.Where(r => r.Tensors.ContainsKey(name)).ToList();
            int expectedHolders = ExpertParallel.IsExpertParameter(name) ? dp / ep : dp;
            Assert.True(holders.Count == expectedHolders && holders.Select(h => h.Stage).Distinct().Count() == 1, $"'{name}' is held by {holders.Count} ranks; expected {expectedHolders}");
            bool sharded = ShardingPlan.IsOptimizerState(name) && holders.Any(h => h.Tensors[name].Values.Length != expected.Values.Length);
            var got = sharded ? [Assemble([.. holders], name, expected.Values.Length)] : holders.Select(h => h.Tensors[name].Values).ToArray();
            foreach (var values in got)
            {
                double diff = MaxDifference(expected.Values, values);
                worst = Math.Max(worst, diff);
                Assert.True(diff <= tolerance, $"'{name}' differs from the single process by {diff:E2}");
            }
        }
        output.WriteLine($"zero {zero}, ep {ep}, dp {dp}, clip {clipNorm}, MTP weight {mtpWeight}: {single.Tensors.Count} tensors, largest difference from the single process {worst:E2}");
        Assert.Contains(single.Tensors.Keys, n => n.EndsWith("e_score_correction_bias", StringComparison.Ordinal));

        // Each replica holds ~1/dp of its stage's optimizer state, as the memory plan predicts (within 10%).
        var layout = LayoutOf(options, dp);
        foreach (var r in ranks)
        {
            int rank = layout.Rank(r.Stage, r.Replica);
            long predicted = MemoryPlanner.ShardParameters(Micro(Data.Value.Vocab), layout, rank), whole = MemoryPlanner.LocalParameters(Micro(Data.Value.Vocab), layout, rank);
            output.WriteLine($"stage {r.Stage} replica {r.Replica}: moments of {r.OptimizerElements} elements per kind, planned {predicted}, the stage's whole {whole}");
            Assert.True(Math.Abs(r.OptimizerElements - predicted) <= 0.1 * predicted, $"stage {r.Stage} replica {r.Replica} holds moments of {r.OptimizerElements} elements; the plan says {predicted}");
            if (zero >= 3) AssertShardedParametersAsPlanned(r, layout, rank, options);
        }
        if (zero is 1 or 3 && ep == 1 && clipNorm > 0 && schedule == "1f1b") await CheckpointLoadsIntoOtherLayoutsBitwise(store, ranks, options);
    }

    /// <summary>
    /// A dp 2 x pp 2 x zero 2 (and zero 3) job stopped after step 2 and resumed from its committed checkpoint (each stage reading
    /// its weights and its rows of the moments) trains step 3 bit for bit as the job that never stopped: loss, norm,
    /// every weight, both moments of every row, routing biases.
    /// </summary>
    [Theory]
    [InlineData(2)]
    [InlineData(3)]
    public async Task AZeroPipelineResumedFromItsCheckpointContinuesBitForBit(int zero)
    {
        var options = Options with { Zero = zero };
        using var store = new FolderCheckpointStore(root, Job);
        using var straightStore = new FolderCheckpointStore(root, "straight-job");
        var first = RunZeroPipeline(store, options, Dp, until: 2);
        await store.CommitAsync(ShardedCheckpointWriter.Manifest(Job, first[0].Plan!, new CheckpointPosition(2, 1, 2 * Options.GlobalBatch, 2),
                                                                 first.Select(r => r.File!), Micro(Data.Value.Vocab).ToJson(), null));
        var resumed = RunZeroPipeline(store, options, Dp, until: 3, resumeFrom: 2);
        var straight = RunZeroPipeline(straightStore, options, Dp);
        foreach (var (r, s) in resumed.OrderBy(r => (r.Stage, r.Replica)).Zip(straight.OrderBy(r => (r.Stage, r.Replica))))
        {
            Assert.Equal((s.Stage, s.Replica), (r.Stage, r.Replica));
            var (m, want) = (Assert.Single(r.Steps), s.Steps[^1]);
            Assert.Equal(3, m.Step);
            Assert.True((m.Loss, m.GradNorm) == (want.Loss, want.GradNorm), $"stage {r.Stage} replica {r.Replica} step 3: loss {m.Loss:R}, norm {m.GradNorm:R}; without the stop {want.Loss:R}, {want.GradNorm:R}");
            Assert.Equal(s.Tensors.Keys.Order(), r.Tensors.Keys.Order());
            foreach (var (name, part) in s.Tensors)
                Assert.True(part.Start == r.Tensors[name].Start && part.Values.AsSpan().SequenceEqual(r.Tensors[name].Values),
                            $"'{name}' on stage {r.Stage} replica {r.Replica} differs after the resume");
        }
        output.WriteLine($"resumed at step 2: step 3's loss {resumed[0].Steps[0].Loss:R} and all {straight[0].Tensors.Count + straight[^1].Tensors.Count} stage tensors bitwise the uninterrupted run's");
    }

    /// <summary>
    /// ZeRO-3: between steps the stage's parameters are empty and the replica holds its rows alone, the planner's
    /// prediction within 10%; during a step the peak of parameter and gradient storage (the rows, what is gathered, the
    /// .grads) within 10% of the planner's, well below the stage's whole parameters that keeping its layers gathered
    /// through the step would hold besides the gradients.
    /// </summary>
    void AssertShardedParametersAsPlanned(Held r, ParallelLayout layout, int rank, TrainingOptions options)
    {
        var config = Micro(Data.Value.Vocab);
        // Without an exchange thread (CUDA's shape) nothing is prefetched, which the planner predicts for a CUDA device.
        var inputs = new MemoryInputs("fp64", "none", options.MicroBatch, options.SeqLen, options.Accumulation(layout.Dp), options.PipelineSchedule,
                                      Device: options.ExchangeThread == false ? DeviceType.CUDA : DeviceType.CPU);
        var predicted = MemoryPlanner.Predict(config, layout, rank, inputs);
        long local = MemoryPlanner.LocalParameters(config, layout, rank);
        long scratch = Math.Min(local, 1L << 22) * sizeof(double);
        long held = predicted.Parameters + predicted.Gathered + predicted.Gradients - predicted.GradientWords - scratch;
        output.WriteLine($"zero 3 {options.PipelineSchedule} stage {r.Stage} replica {r.Replica}: {r.ParameterBytes} parameter bytes between steps (planned {predicted.Parameters}, " +
                         $"the stage's whole {local * sizeof(double)}); peak parameter and gradient bytes {r.PeakBytes} (planned {held}; the stage's parameters and .grads whole {2 * local * sizeof(double)})");
        Assert.True(r.EmptyBetweenSteps, $"stage {r.Stage} replica {r.Replica}: a parameter was whole between steps");
        Assert.True(Math.Abs(r.ParameterBytes - predicted.Parameters) <= 0.10 * predicted.Parameters,
            $"stage {r.Stage} replica {r.Replica} holds {r.ParameterBytes} parameter bytes between steps; the planner predicts {predicted.Parameters}");
        // (Under ep the gradients are not scattered per layer and the trainer does not count its holdings at the backward's end.)
        if (layout.Ep == 1) Assert.True(Math.Abs(r.PeakBytes - held) <= 0.10 * held, $"stage {r.Stage} replica {r.Replica}: {r.PeakBytes} bytes at the peak; the planner predicts {held}");
    }

    /// <summary>The dp 2 x pp 2 x zero 1 checkpoint into one process, a dp 2 x pp 1 x zero 0 replica, dp 3 x pp 1 x zero 1 shards and dp 2 x pp 2 x zero 2 stages.</summary>
    async Task CheckpointLoadsIntoOtherLayoutsBitwise(FolderCheckpointStore store, Held[] ranks, TrainingOptions options)
    {
        var written = ranks.SelectMany(r => r.Plan!.WritesOf(LayoutOf(options).Rank(r.Stage, r.Replica))).GroupBy(w => w.Name).ToDictionary(g => g.Key, g => g.Sum(w => w.RowCount));
        Assert.All(ranks[0].Plan!.Tensors, t => Assert.Equal(t.Rows, written[t.Name]));
        await store.CommitAsync(ShardedCheckpointWriter.Manifest(Job, ranks[0].Plan!,
            new CheckpointPosition(Options.Steps, 1, Options.Steps * Options.GlobalBatch, Options.Steps), ranks.Select(r => r.File!), Micro(Data.Value.Vocab).ToJson(), null));
        var saved = ranks.SelectMany(r => r.Tensors.Keys).Distinct().ToDictionary(n => n, n =>
        {
            var holders = ranks.Where(r => r.Tensors.ContainsKey(n)).ToArray();
            int length = (int)(ranks[0].Plan!.Entry(n).Shape.Aggregate(1L, (a, b) => a * b));
            return holders[0].Tensors[n].Values.Length == length ? holders[0].Tensors[n].Values : Assemble(holders, n, length);
        });

        // One process; replica 1 of dp 2 x pp 1 x zero 0 (the whole model and optimizer state); each shard of dp 3 x pp 1 x zero 1.
        var targets = new[] { ("one process", 0, 1, 0), ("replica 1 of dp 2 x pp 1 x zero 0", 1, 2, 0) }
            .Concat(Enumerable.Range(0, 3).Select(r => ($"shard {r} of dp 3 x pp 1 x zero 1", r, 3, 1)));
        foreach (var (what, rank, world, zero) in targets)
        {
            using var model = NewModel();
            using var optimizer = Trainer.CreateOptimizer(model, Options with { Zero = zero }, rank, world);
            await ShardedCheckpointLoader.LoadReplicaAsync(store, Options.Steps, model, optimizer);
            Assert.Equal(Options.Steps, optimizer.StepCount);
            var loaded = Capture(CheckpointTensors.Collect(model, optimizer), optimizer, CheckpointTensors.Catalog(model, optimizer));
            Assert.Equal(saved.Keys.Order(), loaded.Keys.Order());
            foreach (var (name, p) in loaded)
                Assert.True(saved[name].AsSpan((int)(p.Start * p.RowSize), p.Values.Length).SequenceEqual(p.Values), $"'{name}' rows from {p.Start} loaded into {what} differ from the saved ones");
            output.WriteLine($"{what}: {loaded.Count} tensors bitwise the saved ones");
        }

        // Back into dp 2 x pp 2 stages, sharded as ZeRO-2: each replica reads its stage's weights and its rows of the moments.
        var layout = LayoutOf(options with { Zero = 2 });
        for (int rank = 0; rank < layout.WorldSize; rank++)
        {
            using var model = NewModel();
            var stage = new PipelineStage(model, layout, layout.StageOfRank(rank));
            using var optimizer = PipelineTrainer.CreateOptimizer(stage, options with { Zero = 2 }, layout.ReplicaOfRank(rank), Dp);
            await stage.LoadCheckpointAsync(store, Options.Steps, optimizer);
            Assert.Equal(Options.Steps, optimizer.StepCount);
            foreach (var (name, p) in Capture(stage.StageTensors(optimizer), optimizer, stage.CheckpointCatalog))
                Assert.True(saved[name].AsSpan((int)(p.Start * p.RowSize), p.Values.Length).SequenceEqual(p.Values), $"'{name}' rows from {p.Start} loaded into rank {rank} differ from the saved ones");
        }
    }

    public void Dispose() => Directory.Delete(root, recursive: true);
}
