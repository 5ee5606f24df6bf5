// Expert parallelism over real tcp between rank threads equals the single-process trainer bit for bit (float64: losses,
// clipped norm, expert loads, every weight, both moments, routing biases), an expert no token reaches gets a zero
// gradient, and node-limited routing bounds the measured fan-out.
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

public sealed class ExpertParallelTrainingTests(ITestOutputHelper output) : IDisposable
{
    readonly string root = Directory.CreateTempSubdirectory("ep-ckpt-").FullName;

    // 3 decoder layers (1 dense, 2 MoE) and an MTP module (a third MoE layer): 8 routed experts in 4 groups, top-2 of
    // 2 groups per token, so ep 4 puts one group on each rank and a token reaches at most 2 ranks.
    internal static DeepSeekConfig Micro(int vocab) => MicroModel.Config(vocab);

    // Global batch 16 = 1 x 8 x 2 = 2 x 4 x 2 = 4 x 2 x 2; the clip of 0.5 is active in every step.
    internal static readonly TrainingOptions Options = new()
    {
        SeqLen = MicroModel.SeqLen, GlobalBatch = 16, MicroBatch = 2, Steps = 3, Lr = 5e-3, WarmupSteps = 1, BiasUpdateSpeed = 0.01,
        MtpWeight = 0.3, ClipNorm = 0.5,
    };

    // No token ever chooses this expert (its routing bias is far below the others'): its gradient must be exactly zero.
    internal const int Starved = 5;

    internal static readonly Lazy<(int Vocab, TokenDataset Train)> Data = MicroModel.Data;

    internal static DeepSeekForCausalLM NewModel(ScalarType dtype = ScalarType.Float64)
    {
        manual_seed(Options.Seed);
        var model = new DeepSeekForCausalLM(Micro(Data.Value.Vocab)).InitializeWeights();
        model.to(dtype);
        using var noGrad = no_grad();
        foreach (var moe in model.MoeLayers()) moe.gate.e_score_correction_bias[Starved] = tensor(-1e3f);
        return model;
    }

    internal sealed record Held(List<StepMetrics> Steps, Dictionary<string, double[]> Weights, Dictionary<string, double[]> Moments, ExpertTraffic Traffic)
    {
        public long ParameterBytes, OptimizerBytes, WordBytes;
    }

    static Held Capture(Trainer trainer, List<StepMetrics> steps, ExpertTraffic traffic) =>
        Capture(trainer.Model, trainer.Optimizer) with { Steps = steps, Traffic = traffic, WordBytes = trainer.GradientWordBytes };

    internal static Held Capture(DeepSeekForCausalLM model, AdamW optimizer)
    {
        var weights = new Dictionary<string, double[]>();
        foreach (var (name, t) in model.HfStateDict()) weights[name] = t.detach().to_type(ScalarType.Float64).data<double>().ToArray();
        var moments = new Dictionary<string, double[]>();
        foreach (var s in optimizer.Slots)
        {
            Assert.True(s.RowStart == 0 && s.RowCount is null, $"'{s.Name}': without ZeRO every held row's moments are on the rank");
            moments[$"{s.Name}.exp_avg"] = s.ExpAvg.to_type(ScalarType.Float64).data<double>().ToArray();
            moments[$"{s.Name}.exp_avg_sq"] = s.ExpAvgSq.to_type(ScalarType.Float64).data<double>().ToArray();
        }
        return new Held([], weights, moments, default)
        {
            ParameterBytes = model.parameters().Sum(p => p.numel() * p.element_size()),
            OptimizerBytes = optimizer.StateTensors().Sum(kv => kv.Value.numel() * kv.Value.element_size()),
        };
    }

    internal static readonly Lazy<Held> Single = new(() => RunSingle(ScalarType.Float64));

    /// <summary>
    /// Every rank's steps are the single process's (or another <paramref name="reference"/>'s) bit for bit: the loss, the
    /// MTP loss, the clipped norm (the clip active in every step, so that it is tested) and every MoE layer's expert loads.
    /// </summary>
    internal static void AssertStepsEqualSingle(IEnumerable<IReadOnlyList<StepMetrics>> ranks, IReadOnlyList<StepMetrics> single, double clipNorm,
                                                ITestOutputHelper output, string where, string reference = "single")
    {
        var all = ranks.ToList();
        for (int s = 0; s < single.Count; s++)
        {
            var one = single[s];
            Assert.True(one.GradNorm > clipNorm, $"step {s + 1}: the clip should be active (norm {one.GradNorm})");
            foreach (var (m, r) in all.Select((x, i) => (x[s], i)))
            {
                output.WriteLine($"{where} rank {r} step {s + 1}: loss {m.Loss:R} ({reference} {one.Loss:R}), MTP {m.MtpLoss:R}, norm {m.GradNorm:R} ({reference} {one.GradNorm:R})");
                Assert.Equal(one.Loss, m.Loss);
                Assert.Equal(one.MtpLoss, m.MtpLoss);
                Assert.Equal(one.GradNorm, m.GradNorm);
                Assert.Equal(one.ExpertLoad.Select(l => string.Join(",", l)), m.ExpertLoad.Select(l => string.Join(",", l)));
            }
        }
    }

    /// <summary>
    /// Every weight of the single process (routing biases included) is held, bit for bit, by exactly the ranks that should
    /// hold it: a routed expert's by its dp / ep holders, every other weight by all dp ranks.
    /// </summary>
    internal static void AssertWeightsEqualSingle(IReadOnlyList<IReadOnlyDictionary<string, double[]>> ranks, IReadOnlyDictionary<string, double[]> single, int dp, int ep)
    {
        Assert.Contains(single.Keys, n => n.EndsWith("e_score_correction_bias", StringComparison.Ordinal));
        foreach (var (name, values) in single)
        {
            var holders = ranks.Select((x, i) => (Held: x, Rank: i)).Where(h => h.Held.ContainsKey(name)).ToList();
            Assert.True(holders.Count == (ExpertParallel.IsExpertParameter(name) ? dp / ep : dp), $"'{name}' is held by ranks [{string.Join(", ", holders.Select(h => h.Rank))}]");
            foreach (var (held, r) in holders)
                Assert.True(values.AsSpan().SequenceEqual(held[name]), $"weight '{name}' on rank {r} differs from the single process");
        }
    }

    static TrainingOptions OptionsFor(ScalarType dtype) => Options with { Precision = dtype == ScalarType.BFloat16 ? "bf16" : "fp32" };

    static Held RunSingle(ScalarType dtype, int? steps = null)
    {
        using var model = NewModel(dtype);
        using var trainer = new Trainer(model, Data.Value.Train, null, OptionsFor(dtype), CPU, peakFlops: 1e11);
        var metrics = Enumerable.Range(0, steps ?? (int)Options.Steps).Select(_ => trainer.TrainStep()).ToList();
        return Capture(trainer, metrics, default);
    }

    internal static Held[] RunEp(int dp, int ep, Action<Trainer>? after = null, string experts = "auto", ScalarType dtype = ScalarType.Float64,
                                 Action<DeepSeekForCausalLM>? configure = null, int? steps = null)
    {
        var config = Micro(Data.Value.Vocab);
        var layout = ParallelLayout.Even(dp, 1, config.NumHiddenLayers).WithShards(ep, 0, config.NRoutedExperts);
        var models = Enumerable.Range(0, dp).Select(r =>
        {
            var m = NewModel(dtype);
            ExpertParallel.ShardModel(m, layout, r);
            configure?.Invoke(m);
            return m;
        }).ToArray();
        try
        {
            return RankGroup.Run(dp, c =>
            {
                var reducer = new BucketedGradientReducer(c, bucketBytes: 4 << 10);
                using var trainer = new Trainer(models[c.Rank], Data.Value.Train, null, OptionsFor(dtype) with { Ep = ep, Experts = experts }, CPU, 1e11, c.Rank, dp, reducer);
                var metrics = Enumerable.Range(0, steps ?? (int)Options.Steps).Select(_ => trainer.TrainStep()).ToList();
                after?.Invoke(trainer);
                return Capture(trainer, metrics, trainer.Model.MoeLayers().First().Parallel!.TakeTraffic());
            }, limit: TimeSpan.FromSeconds(150));
        }
        finally { foreach (var m in models) m.Dispose(); }
    }

    [Theory]
    [InlineData(2, 2)]
    [InlineData(4, 4)]
    [InlineData(4, 2)]
    public void ExpertParallelOverTcpEqualsTheSingleProcessBitForBit(int dp, int ep)
    {
        var clock = Stopwatch.StartNew();
        var ranks = RunEp(dp, ep);
        output.WriteLine($"dp {dp} ep {ep}: {clock.Elapsed.TotalSeconds:F1} s");
        var single = Single.Value;
        var config = Micro(Data.Value.Vocab);
        int perShard = config.NRoutedExperts / ep;

        Assert.All(single.Steps, one => Assert.All(one.ExpertLoad, l => Assert.Equal(0, l[Starved])));
        AssertStepsEqualSingle(ranks.Select(r => r.Steps), single.Steps, Options.ClipNorm, output, $"dp {dp} x ep {ep}");

        // Every tensor on every rank that holds it; a routed expert on exactly dp/ep ranks, the rest on all of them.
        int ExpertOf(string name) => int.Parse(name.Split(".mlp.experts.")[1].Split('.')[0]);
        foreach (var (expected, kind) in new[] { (single.Weights, "weight"), (single.Moments, "moment") })
            foreach (var (name, values) in expected)
            {
                var holders = ranks.Select((x, i) => (Held: x, Rank: i)).Where(h => (kind == "weight" ? h.Held.Weights : h.Held.Moments).ContainsKey(name)).ToList();
                bool expert = ExpertParallel.IsExpertParameter(name);
                Assert.True(holders.Count == (expert ? dp / ep : dp), $"'{name}' is held by ranks [{string.Join(", ", holders.Select(h => h.Rank))}]");
                foreach (var (held, r) in holders)
                {
                    if (expert) Assert.Equal(ExpertOf(name) / perShard, r % ep);
                    var got = kind == "weight" ? held.Weights[name] : held.Moments[name];
                    Assert.True(values.AsSpan().SequenceEqual(got), $"{kind} '{name}' on rank {r} differs from the single process (largest difference {values.Zip(got).Max(x => Math.Abs(x.First - x.Second)):E2})");
                }
            }
        Assert.Contains(single.Weights.Keys, n => n.EndsWith("e_score_correction_bias", StringComparison.Ordinal));

        // The starved expert's gradient was zero in every step: both moments stay exactly zero.
        var starved = single.Moments.Keys.Where(n => n.Contains($".mlp.experts.{Starved}.", StringComparison.Ordinal)).ToList();
        Assert.Equal(2 * 3 * 3, starved.Count); // 3 MoE layers x 3 projections x 2 moments
        foreach (var name in starved)
            foreach (var held in ranks.Where(h => h.Moments.ContainsKey(name)))
                Assert.All(held.Moments[name], v => Assert.Equal(0.0, v));

        // Resident bytes against the planner: parameters and optimizer state hold 1/ep of the routed experts, and so do
        // the exact gradient words (each rank sums only the experts it holds).
        var layout = ParallelLayout.Even(dp, 1, config.NumHiddenLayers).WithShards(ep, 0, config.NRoutedExperts);
        var inputs = new MemoryInputs("fp64", "none", Options.MicroBatch, Options.SeqLen);
        foreach (var (held, r) in ranks.Select((x, i) => (x, i)))
        {
            var predicted = MemoryPlanner.Predict(config, layout, r, inputs);
            output.WriteLine($"rank {r}: parameters {held.ParameterBytes} B (predicted {predicted.Parameters}, one process {single.ParameterBytes}), optimizer {held.OptimizerBytes} B (predicted {predicted.Optimizer}), gradient words {held.WordBytes} B (predicted {predicted.GradientWords})");
            foreach (var (what, got, want) in new[] { ("parameter", held.ParameterBytes, predicted.Parameters), ("optimizer", held.OptimizerBytes, predicted.Optimizer), ("gradient word", held.WordBytes, predicted.GradientWords) })
                Assert.True(Math.Abs(got - want) <= 0.10 * want, $"rank {r} of dp {dp} x ep {ep} holds {got} {what} bytes; the planner predicts {want}");
        }
        Assert.True(ranks[0].ParameterBytes < single.ParameterBytes, "an expert-parallel rank holds fewer parameter bytes than one process");

        // Fan-out: ranks a token's experts live on. With one group per rank (ep 4), topk_group = 2 bounds it.
        foreach (var (held, r) in ranks.Select((x, i) => (x, i)))
        {
            output.WriteLine($"rank {r}: fan-out {held.Traffic.FanOut:F3} ranks/token over {held.Traffic.Tokens} tokens, {held.Traffic.SentBytes} B sent to other ranks (all MoE layers, 3 steps)");
            Assert.True(held.Traffic.FanOut >= 1 && held.Traffic.FanOut <= Math.Min(ep, config.NumExpertsPerTok), $"rank {r}: fan-out {held.Traffic.FanOut}");
            if (ep == config.NGroup) Assert.True(held.Traffic.FanOut <= config.TopkGroup, $"rank {r}: fan-out {held.Traffic.FanOut} exceeds topk_group {config.TopkGroup}");
            Assert.True(held.Traffic.SentBytes > 0, $"rank {r} sent no token to another rank");
        }
    }

    /// <summary>
    /// In bf16 on a CPU the ep path runs each source's rows of an expert on a window rounded up to 64 rows, the single
    /// process's rule (DeepSeekMoe.AutoRowBucket), so oneDNN sees the shapes one process gives it for that micro-batch
    /// (and reuses its primitives): every window an expert runs its own source's rows on (a module hook) is a multiple
    /// of 64, and dp 2 x ep 2 equals the single-process bf16 training bit for bit in loss, norm, every weight and both
    /// moments, as float64 does. Two steps (bf16 on the CPU is slow to warm): the second runs on updated weights and biases.
    /// </summary>
    [Fact]
    public void InBFloat16ExpertParallelRoundsExpertRowsAsOneProcessAndEqualsItBitForBit()
    {
        const int steps = 2;
        var single = RunSingle(ScalarType.BFloat16, steps);
        var windows = new System.Collections.Concurrent.ConcurrentBag<long>();
        var ranks = RunEp(2, 2, dtype: ScalarType.BFloat16, configure: model =>
        {
            foreach (var moe in model.MoeLayers())
                for (int e = 0; e < moe.experts.Count; e++)
                    moe.experts[e].register_forward_pre_hook((_, rows) => { windows.Add(rows.shape[0]); return rows; });
        }, steps: steps);
        Assert.NotEmpty(windows);
        Assert.All(windows, rows => Assert.Equal(0, rows % 64));
        Assert.Contains(windows, rows => rows > 0);
        for (int s = 0; s < steps; s++)
            foreach (var (m, r) in ranks.Select((x, i) => (x.Steps[s], i)))
            {
                output.WriteLine($"rank {r} step {s + 1}: loss {m.Loss:R} (single {single.Steps[s].Loss:R}), norm {m.GradNorm:R} (single {single.Steps[s].GradNorm:R})");
                Assert.Equal((single.Steps[s].Loss, single.Steps[s].MtpLoss, single.Steps[s].GradNorm), (m.Loss, m.MtpLoss, m.GradNorm));
            }
        foreach (var (held, r) in ranks.Select((x, i) => (x, i)))
            foreach (var (name, values) in held.Weights.Concat(held.Moments))
            {
                var want = single.Weights.GetValueOrDefault(name) ?? single.Moments[name];
                Assert.True(want.AsSpan().SequenceEqual(values), $"'{name}' on rank {r} differs from the single process (largest difference {want.Zip(values).Max(x => Math.Abs(x.First - x.Second)):E2})");
            }
    }

    /// <summary>Every tensor <paramref name="held"/> has equals the single process's, bit for bit.</summary>
    static void AssertHeldEqualsSingle(Held held, string where)
    {
        var single = Single.Value;
        foreach (var (name, values) in held.Weights) Assert.True(single.Weights[name].AsSpan().SequenceEqual(values), $"weight '{name}' differs after loading into {where}");
        foreach (var (name, values) in held.Moments) Assert.True(single.Moments[name].AsSpan().SequenceEqual(values), $"moment '{name}' differs after loading into {where}");
    }

    /// <summary>
    /// An ep 2 job saves its checkpoint as a cluster does (each rank writes its file: its rows of the replicated tensors
    /// and of the experts it holds, nothing gathered); it loads into one process bitwise, that process's checkpoint loads
    /// into the shards of dp 4 x ep 2 bitwise, and so does the ep 2 checkpoint itself.
    /// </summary>
    [Fact]
    public async Task AnExpertParallelCheckpointLoadsIntoOneProcessAndBackIntoShardsBitwise()
    {
        var config = Micro(Data.Value.Vocab);
        var layout = ParallelLayout.Even(2, 1, config.NumHiddenLayers).WithShards(2, 0, config.NRoutedExperts);
        var position = new CheckpointPosition(Options.Steps, 1, Options.Steps * Options.GlobalBatch, Options.Steps);
        using var store = new FolderCheckpointStore(root, "ep-job");
        var files = new ManifestFile[2];
        var plans = new ShardingPlan[2];
        RunEp(2, 2, trainer =>
        {
            plans[trainer.Rank] = new ShardingPlan(layout, CheckpointTensors.Catalog(trainer.Model, trainer.Optimizer));
            files[trainer.Rank] = ShardedCheckpointWriter.WriteRank(store, plans[trainer.Rank], trainer.Rank, Options.Steps, trainer.CheckpointTensors());
        });
        Assert.Equal(plans[0].Tensors.Select(t => t.Name).Order(), plans[1].Tensors.Select(t => t.Name).Order());
        await store.CommitAsync(ShardedCheckpointWriter.Manifest("ep-job", plans[0], position, files, config.ToJson(), null));

        // ep 2 -> one process; then that process writes a dp 1 checkpoint.
        using var one = new FolderCheckpointStore(root, "one-job");
        using (var model = NewModel())
        using (var optimizer = Trainer.CreateOptimizer(model, Options))
        {
            await ShardedCheckpointLoader.LoadReplicaAsync(store, Options.Steps, model, optimizer);
            Assert.Equal(Options.Steps, optimizer.StepCount);
            var loaded = Capture(model, optimizer);
            Assert.Equal(Single.Value.Weights.Count, loaded.Weights.Count);
            Assert.Equal(Single.Value.Moments.Count, loaded.Moments.Count);
            AssertHeldEqualsSingle(loaded, "one process");
            var plan = new ShardingPlan(ParallelLayout.Even(1, 1, config.NumHiddenLayers), CheckpointTensors.Catalog(model, optimizer));
            var file = ShardedCheckpointWriter.WriteRank(one, plan, 0, Options.Steps, CheckpointTensors.Collect(model, optimizer).ToDictionary());
            await one.CommitAsync(ShardedCheckpointWriter.Manifest("one-job", plan, position, [file], config.ToJson(), null));
        }

        // Both checkpoints -> each rank of dp 4 x ep 2 (a model holding one shard, its optimizer with the experts last).
        var wide = ParallelLayout.Even(4, 1, config.NumHiddenLayers).WithShards(2, 0, config.NRoutedExperts);
        foreach (var source in new[] { store, one })
            for (int r = 0; r < 4; r++)
            {
                using var model = NewModel();
                ExpertParallel.ShardModel(model, wide, r);
                using var optimizer = Trainer.CreateOptimizer(model, Options with { Ep = 2 }, r, 4);
                await ShardedCheckpointLoader.LoadReplicaAsync(source, Options.Steps, model, optimizer);
                var loaded = Capture(model, optimizer);
                Assert.Equal(config.NRoutedExperts / 2 * 3 * 3, loaded.Weights.Keys.Count(ExpertParallel.IsExpertParameter));
                AssertHeldEqualsSingle(loaded, $"rank {r} of dp 4 x ep 2");
            }
    }

    public void Dispose() => Directory.Delete(root, recursive: true);
}
