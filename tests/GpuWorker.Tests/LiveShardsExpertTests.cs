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
using static DeepSeekCluster.GpuWorker.Tests.WholeExpertState;
using static DeepSeekCluster.GpuWorker.Tests.Infrastructure.TcpRanks;

namespace DeepSeekCluster.GpuWorker.Tests;

public class LiveShardsExpertTests
{
    /// <summary>Every weight and every state row of <paramref name="target"/> is the whole state's, bit for bit.</summary>
    static void AssertHeldBy(WholeExpertState whole, ReplicaState target)
    {
        Assert.Equal((5L, 77L, 17L), (target.Step, target.Lineage, target.Optimizer.StepCount));
        foreach (var (name, t) in CheckpointTensors.Collect(target.Model, null))
            Assert.True(Same(whole.Weights[name], t), $"{name} is not the whole model's");
        foreach (var s in target.Optimizer.Slots)
            foreach (var (kind, t) in new[] { ("exp_avg", s.ExpAvg), ("exp_avg_sq", s.ExpAvgSq), ("master", s.Master) })
            {
                if (t is null) continue;
                var all = whole.State[$"optimizer.{s.Name}.{kind}"];
                using var rows = s.RowCount is { } n && all.dim() > 0 ? all.narrow(0, s.RowStart, n) : all.alias();
                Assert.True(Same(rows, t), $"{s.Name}.{kind} rows [{s.RowStart}, +{s.RowCount}) differ from the whole state's");
            }
    }

    [Theory]
    [InlineData(ScalarType.Float32)]
    [InlineData(ScalarType.BFloat16)]
    public void Zero1Dp4Ep2LosesTwoNonAdjacentRanksAndTheSurvivorsReshardOntoDp2WithAnExpertShardMoved(ScalarType dtype)
    {
        using var whole = new WholeExpertState(dtype);
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
            foreach (var target in targets) AssertHeldBy(whole, target);
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
        using var whole = new WholeExpertState(ScalarType.Float32);
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
            foreach (var target in targets) AssertHeldBy(whole, target);
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
        using var whole = new WholeExpertState(ScalarType.Float32);
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
            foreach (var target in targets) AssertHeldBy(whole, target);
        }
        finally
        {
            foreach (var t in targets) { t.Optimizer.Dispose(); t.Model.Dispose(); }
            foreach (var s in old) s.Dispose();
        }
    }
}
