// parallel.redundancy under ep over a real tcp ring (ranks are threads of this process). dp 4 x ep 2 with ZeRO-1: each
// expert shard's optimizer rows are split over its two holders, so every rank's part of them (and its replicated ZeRO rows)
// is held once and its ring neighbour keeps a copy; old ranks 1 and 3 are lost and old ranks 0 and 2 reshard onto
// dp 2 x ep 2, old rank 2 (expert shard 0) becoming new rank 1 (expert shard 1) with a model of another seed. dp 2 x ep 2
// with zero 0: each expert shard is held once, so its weights and moments are copied; old rank 1 is lost and a spare takes
// its place; or old rank 0 is lost, and the source of the replicated weights (new rank 0, old rank 1) builds a model for
// expert shard 0 yet sends the weights it held. Either way every new rank's moments, master rows and weights equal, bit
// for bit, one whole state's.
using DeepSeekCluster.GpuWorker.Cluster;
using DeepSeekCluster.Training.Checkpoints;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Parallel;
using TorchSharp;
using static TorchSharp.torch;
using static DeepSeekCluster.GpuWorker.Tests.LiveShardsReshardTests;

namespace DeepSeekCluster.GpuWorker.Tests;

public class LiveShardsExpertTests
{
    // 101 vocabulary rows split unevenly over 4 shards; 8 routed experts, 4 per expert shard.
    static readonly DeepSeekConfig Config = DeepSeekConfig.Preset("tiny") with { VocabSize = 101 };

    /// <summary>One whole model and optimizer state with distinct values everywhere (in bf16 the weights are the master rows rounded, as AdamW writes them).</summary>
    sealed class Whole : IDisposable
    {
        public readonly DeepSeekForCausalLM Model;
        public readonly Training.Optim.AdamW Optimizer;
        public readonly Dictionary<string, Tensor> State, Weights;

        public Whole(ScalarType dtype)
        {
            Model = DeepSeekForCausalLM.FromSeed(Config, 5);
            var generator = new Generator(3);
            using (no_grad()) foreach (var p in Model.parameters()) p.copy_(randn(p.shape, generator: generator));
            Model.to(dtype);
            Optimizer = Trainer.CreateOptimizer(Model, new TrainingOptions());
            using (no_grad())
            {
                foreach (var (_, t) in Optimizer.StateTensors()) t.copy_(randn(t.shape, dtype: t.dtype, generator: generator));
                if (dtype == ScalarType.BFloat16) foreach (var s in Optimizer.Slots) s.Param.copy_(s.Master!);
            }
            State = Optimizer.StateTensors().ToDictionary(kv => kv.Key, kv => kv.Value);
            Weights = CheckpointTensors.Collect(Model, null).ToDictionary(kv => kv.Key, kv => kv.Value);
        }

        /// <summary>Replica <paramref name="replica"/> of dp x ep 2 at step 5: its experts and its rows of the whole state.</summary>
        public ReplicaState Replica(int replica, int dp, int zero, ScalarType dtype)
        {
            var model = DeepSeekForCausalLM.FromSeed(Config, 5);
            ExpertParallel.ShardModel(model, Layout(dp, zero), replica);
            model.to(dtype);
            using (no_grad()) foreach (var (name, t) in CheckpointTensors.Collect(model, null)) t.copy_(Weights[name]);
            var optimizer = Trainer.CreateOptimizer(model, new TrainingOptions { Zero = zero, Ep = 2 }, replica, dp);
            optimizer.LoadStateTensors(State, "the whole state");
            optimizer.StepCount = 17;
            return new ReplicaState { JobId = "j", Fingerprint = "f", Model = model, Optimizer = optimizer, ZeroShard = replica, ZeroShards = dp, Ep = 2, Step = 5, Lineage = 77 };
        }

        /// <summary>Every weight and every state row of <paramref name="target"/> is the whole state's, bit for bit.</summary>
        public void AssertHeldBy(ReplicaState target)
        {
            Assert.Equal((5L, 77L, 17L), (target.Step, target.Lineage, target.Optimizer.StepCount));
            foreach (var (name, t) in CheckpointTensors.Collect(target.Model, null))
                Assert.True(Same(Weights[name], t), $"{name} is not the whole model's");
            foreach (var s in target.Optimizer.Slots)
                foreach (var (kind, t) in new[] { ("exp_avg", s.ExpAvg), ("exp_avg_sq", s.ExpAvgSq), ("master", s.Master) })
                {
                    if (t is null) continue;
                    var all = State[$"optimizer.{s.Name}.{kind}"];
                    using var rows = s.RowCount is { } n && all.dim() > 0 ? all.narrow(0, s.RowStart, n) : all.alias();
                    Assert.True(Same(rows, t), $"{s.Name}.{kind} rows [{s.RowStart}, +{s.RowCount}) differ from the whole state's");
                }
        }

        public void Dispose()
        {
            Optimizer.Dispose();
            Model.Dispose();
        }
    }

    static ParallelLayout Layout(int dp, int zero) => ParallelLayout.Even(dp, 1, Config.NumHiddenLayers).WithShards(2, zero, Config.NRoutedExperts);

    /// <summary>
    /// The reshard of <paramref name="survivors"/> (null: a spare) onto dp <paramref name="dp"/> x ep 2: a rank keeps its model
    /// where its expert shard stays (Resumption.ReshardLive), else builds one of another seed that the reshard overwrites.
    /// </summary>
    static (ShardCover Cover, ReplicaState Target)[] Reshard(ReplicaState?[] survivors, int dp, int zero, ScalarType dtype) => Run(dp, c =>
    {
        var held = survivors[c.Rank];
        var (cover, why) = LiveShards.Cover(LiveShards.Exchange(c, held), step: 5, source: 0, dp: dp, ep: 2, zero: zero);
        if (cover is null) throw new InvalidOperationException(why);
        bool keep = held is not null && held.ZeroShard % 2 == c.Rank % 2;
        DeepSeekForCausalLM model;
        if (keep) model = held!.Model;
        else
        {
            model = DeepSeekForCausalLM.FromSeed(Config, 99);
            ExpertParallel.ShardModel(model, Layout(dp, zero), c.Rank);
            model.to(dtype);
        }
        var optimizer = Trainer.CreateOptimizer(model, new TrainingOptions { Zero = zero, Ep = 2 }, c.Rank, dp);
        var target = new ReplicaState { JobId = "j", Fingerprint = "f", Model = model, Optimizer = optimizer, ZeroShard = c.Rank, ZeroShards = dp, Ep = 2 };
        LiveShards.Reshard(c, cover, held, target);
        return (cover, target);
    });

    [Theory]
    [InlineData(ScalarType.Float32)]
    [InlineData(ScalarType.BFloat16)]
    public void Zero1Dp4Ep2LosesTwoNonAdjacentRanksAndTheSurvivorsReshardOntoDp2WithAnExpertShardMoved(ScalarType dtype)
    {
        using var whole = new Whole(dtype);
        var old = Enumerable.Range(0, 4).Select(r => whole.Replica(r, 4, zero: 1, dtype)).ToArray();
        var targets = new List<ReplicaState>();
        try
        {
            var sent = Run(4, c => LiveShards.Refresh(c, old[c.Rank]));
            Assert.All(old, s => Assert.Equal(5, s.Neighbour!.Step));
            // Each copy holds the neighbour's replicated rows / 4 and its experts' / 2, with the experts' weights (fp32: the
            // parameter rows; bf16: the master rows): the planner's NeighbourElements.
            var (elements, rows) = MemoryPlanner.NeighbourElements(Config, Layout(4, 1), 0);
            long expected = dtype == ScalarType.Float32 ? (2 * elements + rows) * 4 : 3 * elements * 4;
            Assert.InRange(old[0].Neighbour!.Words.numel() * old[0].Neighbour!.Words.element_size(), expected * 0.99, expected * 1.01);
            Assert.Equal(sent[1], old[0].Neighbour!.Words.numel() * old[0].Neighbour!.Words.element_size());

            var outcomes = Reshard([old[0], old[2]], dp: 2, zero: 1, dtype);
            targets.AddRange(outcomes.Select(o => o.Target));
            var cover = outcomes[0].Cover;
            // Pieces: the replicated rows of shards 0-3, then expert shard 0's parts 0 and 1, expert shard 1's parts 0 and 1.
            Assert.Equal([0, 0, 1, 1, 0, 1, 0, 1], cover.Holders);
            Assert.Equal([false, true, false, true, false, false, true, true], cover.FromCopy);
            Assert.Equal([true, false], cover.Keeps); // old rank 2 held expert shard 0; as new rank 1 it holds shard 1
            foreach (var target in targets) whole.AssertHeldBy(target);
            Assert.Contains(targets[1].Optimizer.Slots, s => s.Name.Contains(".mlp.experts.7.", StringComparison.Ordinal));
        }
        finally
        {
            foreach (var t in targets) { t.Optimizer.Dispose(); if (t.Model != old[0].Model) t.Model.Dispose(); }
            foreach (var s in old) s.Dispose();
        }
    }

    [Fact]
    public void Zero0Dp2Ep2CopiesEachExpertShardHeldOnceAndASpareTakesTheLostRanksExpertsFromTheCopy()
    {
        using var whole = new Whole(ScalarType.Float32);
        var old = Enumerable.Range(0, 2).Select(r => whole.Replica(r, 2, zero: 0, ScalarType.Float32)).ToArray();
        var targets = new List<ReplicaState>();
        try
        {
            Run(2, c => LiveShards.Refresh(c, old[c.Rank]));
            // Zero 0 keeps no ZeRO shard; the copy is the neighbour's experts (moments and weights), held nowhere else.
            var (elements, rows) = MemoryPlanner.NeighbourElements(Config, Layout(2, 0), 0);
            Assert.Equal(elements, rows);
            Assert.Equal((2 * elements + rows) * 4, old[0].Neighbour!.Words.numel() * old[0].Neighbour!.Words.element_size());
            // dp 4 x ep 2 with zero 0 holds every expert twice: nothing to copy.
            Assert.Equal((0L, 0L), MemoryPlanner.NeighbourElements(Config, Layout(4, 0), 0));

            var outcomes = Reshard([old[0], null], dp: 2, zero: 0, ScalarType.Float32);
            targets.AddRange(outcomes.Select(o => o.Target));
            Assert.Equal([0, 0, 0], outcomes[0].Cover.Holders);
            Assert.Equal([false, false, true], outcomes[0].Cover.FromCopy);
            foreach (var target in targets) whole.AssertHeldBy(target);
        }
        finally
        {
            foreach (var t in targets) { t.Optimizer.Dispose(); if (t.Model != old[0].Model) t.Model.Dispose(); }
            foreach (var s in old) s.Dispose();
        }
    }

    [Fact]
    public void Zero0Dp2Ep2LosesRank0AndTheSourceWhoseExpertShardMovedSendsTheWeightsItHeldNotItsNewModels()
    {
        using var whole = new Whole(ScalarType.Float32);
        var old = Enumerable.Range(0, 2).Select(r => whole.Replica(r, 2, zero: 0, ScalarType.Float32)).ToArray();
        var targets = new List<ReplicaState>();
        try
        {
            Run(2, c => LiveShards.Refresh(c, old[c.Rank]));
            // Old rank 1 becomes new rank 0, the cover's source: its replica now holds expert shard 0, so its model is one of
            // another seed (and a spare is new rank 1); the replicated weights must still be the ones it held.
            var outcomes = Reshard([old[1], null], dp: 2, zero: 0, ScalarType.Float32);
            targets.AddRange(outcomes.Select(o => o.Target));
            Assert.Equal([false, false], outcomes[0].Cover.Keeps);
            Assert.Equal([0, 0, 0], outcomes[0].Cover.Holders);
            Assert.Equal([false, true, false], outcomes[0].Cover.FromCopy);
            foreach (var target in targets) whole.AssertHeldBy(target);
        }
        finally
        {
            foreach (var t in targets) { t.Optimizer.Dispose(); t.Model.Dispose(); }
            foreach (var s in old) s.Dispose();
        }
    }
}
