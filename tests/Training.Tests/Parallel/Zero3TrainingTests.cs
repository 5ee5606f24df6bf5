// ZeRO-3 over real tcp between rank threads equals the single-process trainer (float64: losses, clipped norm, weights,
// both moments, routing biases), holds ~1/dp of the parameters between steps, frees a released parameter's storage,
// and saves checkpoints any layout loads bitwise.
using System.Globalization;
using DeepSeekCluster.Training.Checkpoints;
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Data;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Harness;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Optim;
using DeepSeekCluster.Training.Parallel;
using DeepSeekCluster.Training.Tests.Collectives;
using TorchSharp;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Tests.Parallel;

public sealed class Zero3TrainingTests(ITestOutputHelper output) : IDisposable
{
    // Global batch 8 = 1 x 4 x 2 = 2 x 2 x 2 = 4 x 1 x 2; a clip of 0.5 is active in every step.
    static readonly TrainingOptions Options = new()
    {
        SeqLen = MicroModel.SeqLen, GlobalBatch = 8, MicroBatch = 2, Steps = 3, Lr = 5e-3, WarmupSteps = 1, BiasUpdateSpeed = 0.01,
        MtpWeight = 0.3, ClipNorm = 0.5,
    };

    readonly string root = Directory.CreateTempSubdirectory("zero3-ckpt-").FullName;

    static DeepSeekConfig Config => MicroModel.Config(MicroModel.Data.Value.Vocab);

    static DeepSeekForCausalLM NewModel()
    {
        var model = DeepSeekForCausalLM.FromSeed(Config, Options.Seed);
        model.to(ScalarType.Float64);
        return model;
    }

    sealed record Held(List<StepMetrics> Steps, Dictionary<string, double[]> Weights, Dictionary<string, (long Start, double[] Values)> Moments, long ParameterBytes);

    static Held Capture(DeepSeekForCausalLM model, AdamW optimizer, List<StepMetrics> steps, long parameterBytes)
    {
        var weights = model.HfStateDict().ToDictionary(kv => kv.Key, kv => kv.Value.detach().data<double>().ToArray());
        var moments = new Dictionary<string, (long, double[])>();
        foreach (var s in optimizer.Slots)
        {
            long rowSize = s.Param.dim() == 0 ? 1 : s.Param.numel() / Math.Max(1, s.Param.shape[0]);
            moments[$"{s.Name}.exp_avg"] = (s.RowStart * rowSize, s.ExpAvg.data<double>().ToArray());
            moments[$"{s.Name}.exp_avg_sq"] = (s.RowStart * rowSize, s.ExpAvgSq.data<double>().ToArray());
        }
        return new Held(steps, weights, moments, parameterBytes);
    }

    static readonly Lazy<Held> Single = new(() =>
    {
        using var model = NewModel();
        using var trainer = new Trainer(model, MicroModel.Data.Value.Train, null, Options, CPU, peakFlops: 1e11);
        var steps = Enumerable.Range(0, (int)Options.Steps).Select(_ => trainer.TrainStep()).ToList();
        return Capture(model, trainer.Optimizer, steps, model.parameters().Sum(p => p.numel() * p.ElementSize));
    });

    /// <summary>Trains dp ranks with ZeRO-3; <paramref name="after"/> runs on each rank with the parameters still sharded.</summary>
    static Held[] RunZero3(int dp, Action<Trainer>? after = null)
    {
        var models = Enumerable.Range(0, dp).Select(_ => NewModel()).ToArray();
        try
        {
            return RankGroup.Run(dp, c =>
            {
                var reducer = new BucketedGradientReducer(c, bucketBytes: 4 << 10); // small buckets: many gathers per layer
                using var trainer = new Trainer(models[c.Rank], MicroModel.Data.Value.Train, null, Options with { Zero = 3 }, CPU, 1e11, c.Rank, dp, reducer);
                // ZeRO-3 announces the parameters' release at the start of each step, then its update.
                var changes = new List<StateChange>();
                trainer.BeforeStateChange = changes.Add;
                var steps = Enumerable.Range(0, (int)Options.Steps).Select(_ => trainer.TrainStep()).ToList();
                Assert.Equal(Enumerable.Repeat(new[] { StateChange.ReleaseParameters, StateChange.Update }, (int)Options.Steps).SelectMany(c => c), changes);
                var sharded = trainer.ShardedParameters!;
                Assert.All(trainer.Model.parameters(), p => Assert.Equal(0, p.numel())); // nothing whole between steps
                long resident = sharded.ResidentBytes;
                after?.Invoke(trainer);
                sharded.GatherAll();
                return Capture(trainer.Model, trainer.Optimizer, steps, resident);
            }, limit: TimeSpan.FromSeconds(150));
        }
        finally { foreach (var m in models) m.Dispose(); }
    }

    static double MaxDifference(double[] a, ReadOnlySpan<double> b)
    {
        Assert.Equal(a.Length, b.Length);
        double max = 0;
        for (int i = 0; i < a.Length; i++) max = Math.Max(max, Math.Abs(a[i] - b[i]));
        return max;
    }

    [Theory]
    [InlineData(2)]
    [InlineData(4)]
    public void ShardedParametersOverTcpEqualTheSingleProcessBitForBitAndHoldThePlannedShare(int dp)
    {
        var ranks = RunZero3(dp);
        var single = Single.Value;
        ExpertParallelTrainingTests.AssertStepsEqualSingle(ranks.Select(r => r.Steps), single.Steps, Options.ClipNorm, output, $"dp {dp}");
        Assert.Contains(single.Weights.Keys, n => n.EndsWith("e_score_correction_bias", StringComparison.Ordinal));
        foreach (var (name, expected) in single.Weights)
            foreach (var (rank, r) in ranks.Select((x, i) => (x, i)))
            {
                double diff = MaxDifference(expected, rank.Weights[name]);
                Assert.True(diff == 0, $"'{name}' on rank {r} differs from the single process by {diff:E2}");
            }
        foreach (var (name, (_, expected)) in single.Moments)
        {
            long covered = 0;
            foreach (var (rank, r) in ranks.Select((x, i) => (x, i)))
            {
                var (start, values) = rank.Moments[name];
                double diff = MaxDifference(values, expected.AsSpan((int)start, values.Length));
                Assert.True(diff == 0, $"'{name}' from element {start} on rank {r} differs from the single process by {diff:E2}");
                covered += values.Length;
            }
            Assert.Equal(expected.Length, covered);
        }

        // Parameter bytes resident between steps against the planner's ZeRO-3 prediction (1/dp of one process's).
        var layout = ParallelLayout.Even(dp, 1, Config.NumHiddenLayers).WithShards(1, 3, Config.NRoutedExperts);
        var inputs = new MemoryInputs("fp64", "full", Options.MicroBatch, Options.SeqLen);
        var whole = MemoryPlanner.Predict(Config, ParallelLayout.Even(1, 1, Config.NumHiddenLayers), 0, inputs);
        Assert.True(Math.Abs(single.ParameterBytes - whole.Parameters) <= 0.01 * whole.Parameters, $"one process holds {single.ParameterBytes} parameter bytes; the planner predicts {whole.Parameters}");
        // What a step holds whole besides the rows: everything outside the layers, and the largest layer; with the
        // overlap (the default), the largest two consecutive layers of the main ones or of the MTP blocks (one runs, the next is prefetched).
        using (var model = NewModel())
        {
            var main = model.model.layers.Select(l => l.parameters().Sum(p => p.numel())).ToList();
            var mtp = model.mtp.Select(m => m.block.parameters().Sum(p => p.numel())).ToList();
            var layers = main.Concat(mtp).ToList();
            long outside = model.parameters().Sum(p => p.numel()) - layers.Sum();
            long pair = new[] { main, mtp }.Max(list => list.Select((x, i) => x + (i > 0 ? list[i - 1] : 0)).DefaultIfEmpty(0).Max());
            Assert.Equal((outside + layers.Max()) * sizeof(double), MemoryPlanner.Predict(Config, layout, 0, inputs with { Zero3Overlap = false }).Gathered);
            Assert.Equal((outside + pair) * sizeof(double), MemoryPlanner.Predict(Config, layout, 0, inputs).Gathered);
        }
        for (int r = 0; r < dp; r++)
        {
            long predicted = MemoryPlanner.Predict(Config, layout, r, inputs).Parameters;
            output.WriteLine($"dp {dp} rank {r}: {ranks[r].ParameterBytes} parameter bytes between steps (predicted {predicted}, one process {single.ParameterBytes})");
            Assert.True(Math.Abs(ranks[r].ParameterBytes - predicted) <= 0.10 * predicted,
                $"rank {r} of dp {dp} holds {ranks[r].ParameterBytes} parameter bytes between steps; the planner predicts {predicted}");
        }
    }

    /// <summary>
    /// A cluster job's evaluation tasks score the model between steps, where ZeRO-3 leaves every parameter empty:
    /// <see cref="Trainer.Evaluating"/> gathers what the forward needs, so dp 2 zero 3 scores equal the single process's
    /// after the same 3 steps (its weights are the same bits), and the parameters are empty again afterwards.
    /// </summary>
    [Fact]
    public void EvaluationTasksScoreTheWholeModelBetweenZero3Steps()
    {
        LoglikelihoodRequest[] requests = [new([1, 2, 3, 4, 5], [6, 7]), new([8, 9], [10, 11, 12])];
        IReadOnlyList<Loglikelihood> expected;
        using (var model = NewModel())
        using (var trainer = new Trainer(model, MicroModel.Data.Value.Train, null, Options, CPU, peakFlops: 1e11))
        {
            for (int s = 0; s < Options.Steps; s++) trainer.TrainStep();
            expected = new ModelScorer(model, CPU).Score(requests);
        }
        var scored = new IReadOnlyList<Loglikelihood>[2];
        RunZero3(2, trainer =>
        {
            scored[trainer.Rank] = trainer.Evaluating(model => new ModelScorer(model, CPU).Score(requests));
            Assert.All(trainer.Model.parameters(), p => Assert.Equal(0, p.numel())); // emptied again for the next step
        });
        foreach (var rank in scored)
            for (int i = 0; i < requests.Length; i++)
            {
                output.WriteLine($"request {i}: {rank[i].LogProb:R} (single process {expected[i].LogProb:R})");
                Assert.True(Math.Abs(rank[i].LogProb - expected[i].LogProb) <= 1e-9, $"request {i}: zero 3 scored {rank[i].LogProb:R}, one process {expected[i].LogProb:R}");
                Assert.Equal(expected[i].IsGreedy, rank[i].IsGreedy);
            }
    }

    /// <summary>
    /// dp 4 x ep 2 with ZeRO-3 (the replicated parameters sharded over all 4 replicas, each routed expert over the 2 that
    /// hold it, gathered per layer from those): bit for bit the single process in loss, MTP loss, clipped norm, expert
    /// loads, every weight on every holder, both moments of every row; between steps every parameter tensor is empty and
    /// each rank holds exactly the planner's share of the parameters.
    /// </summary>
    [Fact]
    public void ExpertParallelWithShardedParametersEqualsTheSingleProcessBitForBit()
    {
        const int dp = 4, ep = 2;
        var resident = new long[dp];
        var ranks = ExpertZeroTrainingTests.Run(dp, ep, 3, trainer =>
        {
            Assert.All(trainer.Model.parameters(), p => Assert.Equal(0, p.numel()));
            resident[trainer.Rank] = trainer.ShardedParameters!.ResidentBytes;
            trainer.ShardedParameters.GatherAll(); // for the capture of every weight
        });
        var single = ExpertParallelTrainingTests.Single.Value;
        ExpertParallelTrainingTests.AssertStepsEqualSingle(ranks.Select(r => r.Steps), single.Steps, ExpertParallelTrainingTests.Options.ClipNorm, output, "dp 4 x ep 2 zero 3");
        ExpertParallelTrainingTests.AssertWeightsEqualSingle(ranks.Select(r => (IReadOnlyDictionary<string, double[]>)r.Weights).ToList(), single.Weights, dp, ep);
        ExpertZeroTrainingTests.AssertMomentsEqualSingle(ranks, "dp 4 x ep 2 zero 3");

        var config = ExpertParallelTrainingTests.Micro(ExpertParallelTrainingTests.Data.Value.Vocab);
        var layout = ParallelLayout.Even(dp, 1, config.NumHiddenLayers).WithShards(ep, 3, config.NRoutedExperts);
        var inputs = new MemoryInputs("fp64", "full", ExpertParallelTrainingTests.Options.MicroBatch, ExpertParallelTrainingTests.Options.SeqLen);
        long epAlone = MemoryPlanner.Predict(config, layout with { Zero = 0 }, 0, inputs).Parameters;
        for (int r = 0; r < dp; r++)
        {
            long predicted = MemoryPlanner.Predict(config, layout, r, inputs).Parameters;
            output.WriteLine($"rank {r}: {resident[r]} parameter bytes between steps (predicted {predicted}; ep 2 alone {epAlone})");
            Assert.True(Math.Abs(resident[r] - predicted) <= 0.10 * predicted, $"rank {r} holds {resident[r]} parameter bytes between steps; the planner predicts {predicted}");
        }
    }

    /// <summary>
    /// A dp 2 zero 3 job saves its checkpoint the way a cluster does (each rank writes its own file: its rows of the
    /// weights and optimizer state); it loads into one process and into dp 2 zero 1 with every weight, routing bias and
    /// both moments of every row bitwise the single process's.
    /// </summary>
    [Fact]
    public async Task AZero3CheckpointLoadsIntoOneProcessAndIntoZero1ShardsBitwise()
    {
        const string job = "zero3-job";
        var layout = ParallelLayout.Even(2, 1, Config.NumHiddenLayers).WithShards(1, 3, Config.NRoutedExperts);
        using var store = new FolderCheckpointStore(root, job);
        var position = new CheckpointPosition(Options.Steps, 1, Options.Steps * Options.GlobalBatch, Options.Steps);
        var files = new ManifestFile[2];
        ShardingPlan? plan = null;
        RunZero3(2, trainer =>
        {
            var tensors = trainer.CheckpointTensors(); // gives the parameters their shapes (this rank's rows filled)
            var mine = new ShardingPlan(layout, CheckpointTensors.Catalog(trainer.Model, trainer.Optimizer));
            if (trainer.Rank == 0) plan = mine;
            files[trainer.Rank] = ShardedCheckpointWriter.WriteRank(store, mine, trainer.Rank, Options.Steps, tensors);
        });
        await store.CommitAsync(ShardedCheckpointWriter.Manifest(job, plan!, position, files, Config.ToJson(), null));

        var single = Single.Value;
        void AssertLoaded(DeepSeekForCausalLM model, AdamW optimizer, string into)
        {
            var loaded = Capture(model, optimizer, [], 0);
            foreach (var (name, expected) in single.Weights) Assert.True(expected.SequenceEqual(loaded.Weights[name]), $"'{name}' differs after loading into {into}");
            foreach (var (name, (_, expected)) in single.Moments)
            {
                var (start, values) = loaded.Moments[name];
                Assert.True(expected.AsSpan((int)start, values.Length).SequenceEqual(values), $"'{name}' from element {start} differs after loading into {into}");
            }
        }
        using (var model = NewModel())
        using (var optimizer = Trainer.CreateOptimizer(model, Options))
        {
            await ShardedCheckpointLoader.LoadReplicaAsync(store, Options.Steps, model, optimizer);
            Assert.Equal(Options.Steps, optimizer.StepCount);
            AssertLoaded(model, optimizer, "one process");
        }
        for (int r = 0; r < 2; r++)
        {
            using var model = NewModel();
            using var optimizer = Trainer.CreateOptimizer(model, Options with { Zero = 1 }, r, 2);
            await ShardedCheckpointLoader.LoadReplicaAsync(store, Options.Steps, model, optimizer);
            AssertLoaded(model, optimizer, $"shard {r} of dp 2 zero 1");
        }
    }

    /// <summary>
    /// What a cluster worker does with a ZeRO-3 trainer's live state: step 3 is taken, rolled back by writing a snapshot
    /// into the tensors <see cref="Trainer.CheckpointTensors"/> exposes (a step guard's rollback), the trainer ends (a
    /// re-formation), and a new trainer over the same model and optimizer (the same shard) takes step 3 again. Both takes
    /// of step 3, and the weights and moments after, are the single process's bit for bit.
    /// </summary>
    [Fact]
    public void AZero3RanksLiveStateSurvivesARollbackAndANewTrainer()
    {
        const int dp = 2;
        var options = Options with { Zero = 3 };
        var models = Enumerable.Range(0, dp).Select(_ => NewModel()).ToArray();
        try
        {
            var ranks = RankGroup.Run(dp, c =>
            {
                using var optimizer = Trainer.CreateOptimizer(models[c.Rank], options, c.Rank, dp);
                var steps = new List<StepMetrics>();
                Dictionary<string, Tensor> snapshot;
                void RollBack(Trainer trainer)
                {
                    using (no_grad())
                        foreach (var (name, t) in trainer.CheckpointTensors()) t.copy_(snapshot[name]);
                    trainer.ResumeAt(2, 2);
                }
                using (var first = new Trainer(models[c.Rank], new PermutedSamples(MicroModel.Data.Value.Train, (ulong)options.Seed), null, options, CPU, 1e11, c.Rank, dp, new BucketedGradientReducer(c, 4 << 10), optimizer))
                {
                    steps.Add(first.TrainStep());
                    steps.Add(first.TrainStep());
                    snapshot = first.CheckpointTensors().ToDictionary(kv => kv.Key, kv => kv.Value.detach().clone());
                    steps.Add(first.TrainStep());
                    RollBack(first);
                    steps.Add(first.TrainStep()); // step 3 again, in the same trainer
                    RollBack(first);
                }
                using var second = new Trainer(models[c.Rank], new PermutedSamples(MicroModel.Data.Value.Train, (ulong)options.Seed), null, options, CPU, 1e11, c.Rank, dp, new BucketedGradientReducer(c, 4 << 10), optimizer);
                second.ResumeAt(2, 2);
                steps.Add(second.TrainStep()); // and in a new trainer over the live state
                foreach (var t in snapshot.Values) t.Dispose();
                second.ShardedParameters!.GatherAll();
                return Capture(second.Model, optimizer, steps, 0);
            }, limit: TimeSpan.FromSeconds(120));
            var single = Single.Value;
            foreach (var (held, r) in ranks.Select((x, i) => (x, i)))
            {
                var taken = held.Steps.Select(m => (m.Loss, m.GradNorm)).ToList();
                var expected = single.Steps.Select(m => (m.Loss, m.GradNorm)).ToList();
                Assert.Equal([expected[0], expected[1], expected[2], expected[2], expected[2]], taken);
                foreach (var (name, values) in single.Weights)
                    Assert.True(values.SequenceEqual(held.Weights[name]), $"'{name}' on rank {r} differs from the single process after the rollback and the new trainer");
                foreach (var (name, (_, expectedMoment)) in single.Moments)
                {
                    var (start, values) = held.Moments[name];
                    Assert.True(expectedMoment.AsSpan((int)start, values.Length).SequenceEqual(values), $"'{name}' on rank {r} differs from the single process");
                }
            }
        }
        finally { foreach (var m in models) m.Dispose(); }
    }

    /// <summary>
    /// bf16 under ZeRO-3 (bf16 weights gathered in bf16, fp32 master and moments of each rank's rows): dp 2 trains bit
    /// for bit as one bf16 process, and the bf16 weights each rank gathers at the end are the same bits on both.
    /// </summary>
    [Fact]
    public void ABf16Zero3JobEqualsOneBf16Process()
    {
        static DeepSeekForCausalLM Bf16Model()
        {
            var model = DeepSeekForCausalLM.FromSeed(Config, Options.Seed);
            model.to(ScalarType.BFloat16);
            return model;
        }
        var bf16 = Options with { Precision = "bf16" };
        List<double> expected;
        using (var model = Bf16Model())
        using (var trainer = new Trainer(model, MicroModel.Data.Value.Train, null, bf16, CPU, peakFlops: 1e11))
            expected = Enumerable.Range(0, (int)Options.Steps).Select(_ => trainer.TrainStep().Loss).ToList();
        var models = new[] { Bf16Model(), Bf16Model() };
        try
        {
            var ranks = RankGroup.Run(2, c =>
            {
                using var trainer = new Trainer(models[c.Rank], MicroModel.Data.Value.Train, null, bf16 with { Zero = 3 }, CPU, 1e11, c.Rank, 2, new BucketedGradientReducer(c, 4 << 10));
                Assert.True(trainer.Optimizer.Slots.All(s => s.Master is { dtype: ScalarType.Float32 }));
                var losses = Enumerable.Range(0, (int)Options.Steps).Select(_ => trainer.TrainStep().Loss).ToList();
                trainer.ShardedParameters!.GatherAll();
                return (losses, weights: trainer.Model.parameters().Select(p => p.to_type(ScalarType.Float32).data<float>().ToArray()).ToList());
            }, limit: TimeSpan.FromSeconds(120));
            for (int s = 0; s < Options.Steps; s++)
            {
                output.WriteLine($"step {s + 1}: one bf16 process {expected[s]:R}, bf16 dp 2 zero 3 {ranks[0].losses[s]:R}");
                Assert.All(ranks, r => Assert.Equal(expected[s], r.losses[s]));
            }
            Assert.True(ranks[0].weights.Zip(ranks[1].weights).All(x => x.First.SequenceEqual(x.Second)), "the two ranks gathered different bf16 weights");
        }
        finally { foreach (var m in models) m.Dispose(); }
    }

    /// <summary>
    /// Emptying a parameter the way ZeroParameters does (<c>set_</c> to a zero-element tensor) gives its storage back to
    /// the system: the 256 MiB mapping that held it is gone from the process's address space, while the module keeps
    /// the same parameter object (and a later <c>set_</c> restores it).
    /// </summary>
    [Fact]
    public void AnEmptiedParameterGivesItsStorageBack()
    {
        using var layer = nn.Linear(4096, 8192, hasBias: false, dtype: ScalarType.Float64); // 256 MiB: a mapping of its own
        var weight = layer.weight!;
        long address;
        using (var storage = weight.storage<double>()) address = (long)storage.data_ptr();
        Assert.True(Mapped(address), "the weight's storage should be mapped before it is emptied");
        using (no_grad())
        using (var nothing = empty(0, dtype: ScalarType.Float64)) weight.set_(nothing);
        Assert.Equal(0, weight.numel());
        Assert.True(weight.requires_grad);
        Assert.False(Mapped(address), $"the 256 MiB storage at 0x{address:x} is still mapped after set_ emptied its parameter");
        using (no_grad())
        using (var back = ones(8192, 4096, dtype: ScalarType.Float64)) weight.set_(back);
        Assert.Same(weight, layer.weight);
        Assert.Equal([8192L, 4096L], weight.shape);

        static bool Mapped(long address) => File.ReadLines("/proc/self/maps").Any(line =>
        {
            var range = line[..line.IndexOf(' ')].Split('-');
            long lo = long.Parse(range[0], NumberStyles.HexNumber), hi = long.Parse(range[1], NumberStyles.HexNumber);
            return address >= lo && address < hi && hi - lo >= 256L << 20;
        });
    }

    public void Dispose() => Directory.Delete(root, recursive: true);
}
