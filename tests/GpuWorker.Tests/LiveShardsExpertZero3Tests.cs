// parallel.redundancy under ep with ZeRO-3 over a real tcp ring (ranks are threads of this process). dp 4 x ep 2 x zero 3:
// every rank holds only its rows of every parameter, the replicated ones split over all four replicas and each expert
// shard's over its two holders, so each rank's rows (and moments, and in bf16 master rows) are held once and its ring
// neighbour keeps a copy. Lost: old rank 1 (a spare takes a place, and two survivors move to the other expert shard), or
// old ranks 1 and 3 (not adjacent; old rank 2 moves from expert shard 0 to 1 on dp 2 x ep 2). Every weight row, assembled
// from the new ranks' own rows, both moments, the master rows and the routing biases equal one whole state bit for bit.
// Also lost: old rank 3 alone, the survivors keeping their models beside a spare (the source's broadcast of replicated
// tensors must not overwrite the rows they are yet to send).
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

public class LiveShardsExpertZero3Tests
{
    /// <summary>
    /// Replica <paramref name="replica"/> of dp x ep 2 x zero 3 at step 5, as a ZeRO-3 worker keeps it between generations:
    /// every parameter full-shaped with its own rows of the whole model and NaN elsewhere (never to be read), its rows of the state.
    /// </summary>
    static ReplicaState Replica(WholeExpertState whole, int replica, int dp, ScalarType dtype)
    {
        var state = whole.Replica(replica, dp, zero: 3, dtype);
        using (no_grad())
            foreach (var s in state.Optimizer.Slots)
            {
                if (s.Param.dim() == 0) continue;
                using var own = s.Own(s.Param);
                using var rows = own.clone();
                s.Param.fill_(double.NaN);
                own.copy_(rows);
            }
        return state;
    }

    /// <summary>
    /// Each new rank's moments and master rows, and its routing biases, are the whole state's; the new ranks' own parameter
    /// rows (all a ZeRO-3 rank keeps of the weights), laid side by side, are every row of every weight of the whole model.
    /// </summary>
    static void AssertHeldBy(WholeExpertState whole, IReadOnlyList<ReplicaState> targets)
    {
        var assembled = whole.Weights.Where(kv => whole.Optimizer.Slots.Any(s => s.Name == kv.Key))
            .ToDictionary(kv => kv.Key, kv => full_like(kv.Value, double.NaN));
        foreach (var target in targets)
        {
            Assert.Equal((5L, 77L, 17L), (target.Step, target.Lineage, target.Optimizer.StepCount));
            var parameters = target.Optimizer.Slots.Select(s => s.Name).ToHashSet();
            foreach (var (name, t) in CheckpointTensors.Collect(target.Model, null).Where(kv => !parameters.Contains(kv.Key)))
                Assert.True(Same(whole.Weights[name], t), $"rank {target.ZeroShard}: buffer {name} is not the whole model's");
            foreach (var s in target.Optimizer.Slots)
            {
                using (var own = s.Own(s.Param))
                using (var into = s.Own(assembled[s.Name]))
                    into.copy_(own);
                foreach (var (kind, t) in new[] { ("exp_avg", s.ExpAvg), ("exp_avg_sq", s.ExpAvgSq), ("master", s.Master) })
                {
                    if (t is null) continue;
                    var all = whole.State[$"optimizer.{s.Name}.{kind}"];
                    using var rows = s.RowCount is { } n && all.dim() > 0 ? all.narrow(0, s.RowStart, n) : all.alias();
                    Assert.True(Same(rows, t), $"rank {target.ZeroShard}: {s.Name}.{kind} rows [{s.RowStart}, +{s.RowCount}) differ from the whole state's");
                }
            }
        }
        // A row no new rank holds stays NaN and fails here, as does a held row of other bits.
        foreach (var (name, t) in assembled)
            Assert.True(Same(whole.Weights[name], t), $"{name}: the new ranks' parameter rows are not the whole model's");
        Assert.Equal(whole.Optimizer.Slots.Count, assembled.Count);
        foreach (var t in assembled.Values) t.Dispose();
    }

    /// <summary>The four old ranks' copies refreshed; each copy's bytes are the planner's for its holder, and what the neighbour sent.</summary>
    static ReplicaState[] Refreshed(WholeExpertState whole, ScalarType dtype)
    {
        var old = Enumerable.Range(0, 4).Select(r => Replica(whole, r, 4, dtype)).ToArray();
        var sent = Run(4, c => LiveShards.Refresh(c, old[c.Rank]));
        Assert.All(old, s => Assert.Equal(5, s.Neighbour!.Step));
        for (int r = 0; r < 4; r++)
        {
            // The neighbour's replicated rows / 4 and its experts' / 2, each with its parameter rows (fp32) or master rows (bf16).
            var (elements, rows) = MemoryPlanner.NeighbourElements(Config, Layout(4, zero: 3), r);
            Assert.Equal(elements, rows); // ZeRO-3: every copied row's weights travel with it
            long expected = dtype == ScalarType.Float32 ? (2 * elements + rows) * 4 : 3 * elements * 4;
            long held = old[r].Neighbour!.Words.numel() * old[r].Neighbour!.Words.element_size();
            Assert.InRange(held, expected * 0.99, expected * 1.01);
            Assert.Equal(sent[(r + 1) % 4], held);
        }
        return old;
    }

    static void Dispose(IEnumerable<ReplicaState> targets, ReplicaState[] old)
    {
        var kept = old.Select(s => s.Model).ToHashSet(ReferenceEqualityComparer.Instance);
        foreach (var t in targets) { t.Optimizer.Dispose(); if (!kept.Contains(t.Model)) t.Model.Dispose(); }
        foreach (var s in old) s.Dispose();
    }

    [Theory]
    [InlineData(ScalarType.Float32)]
    [InlineData(ScalarType.BFloat16)]
    public void Dp4Ep2Zero3LosesTwoNonAdjacentRanksAndTheSurvivorsReshardOntoDp2WithAnExpertShardMovedFromTheCopiedParameterRows(ScalarType dtype)
    {
        using var whole = new WholeExpertState(dtype);
        var old = Refreshed(whole, dtype);
        var targets = new List<ReplicaState>();
        try
        {
            var outcomes = Reshard([old[0], old[2]], dp: 2, zero: 3, dtype);
            targets.AddRange(outcomes.Select(o => o.Target));
            var cover = outcomes[0].Cover;
            // Pieces: the replicated rows of shards 0-3, then expert shard 0's parts 0 and 1, expert shard 1's parts 0 and 1.
            Assert.Equal([0, 0, 1, 1, 0, 1, 0, 1], cover.Holders);
            Assert.Equal([false, true, false, true, false, false, true, true], cover.FromCopy);
            Assert.Equal([true, false], cover.Keeps); // old rank 2 held expert shard 0; as new rank 1 it holds shard 1
            AssertHeldBy(whole, targets);
            Assert.Contains(targets[1].Optimizer.Slots, s => s.Name.Contains(".mlp.experts.7.", StringComparison.Ordinal));
        }
        finally { Dispose(targets, old); }
    }

    [Fact]
    public void Dp4Ep2Zero3LosesOneRankAndASpareAndTwoSurvivorsThatChangeExpertShardTakeItsRowsFromTheCopy()
    {
        using var whole = new WholeExpertState(ScalarType.Float32);
        var old = Refreshed(whole, ScalarType.Float32);
        var targets = new List<ReplicaState>();
        try
        {
            // Old ranks 0, 2, 3 are new ranks 0, 1, 2 (old 2 and 3 change expert shard), a spare is new rank 3.
            var outcomes = Reshard([old[0], old[2], old[3], null], dp: 4, zero: 3, ScalarType.Float32);
            targets.AddRange(outcomes.Select(o => o.Target));
            var cover = outcomes[0].Cover;
            // Old rank 1's replicated rows (shard 1) and its part of expert shard 1 (part 0) come from old rank 0's copy.
            Assert.Equal([0, 0, 1, 2, 0, 1, 0, 2], cover.Holders);
            Assert.Equal([false, true, false, false, false, false, true, false], cover.FromCopy);
            Assert.Equal([true, false, false, false], cover.Keeps);
            Assert.False(cover.InPlace);
            AssertHeldBy(whole, targets);
        }
        finally { Dispose(targets, old); }
    }

    [Theory]
    [InlineData(ScalarType.Float32)]
    [InlineData(ScalarType.BFloat16)]
    public void Dp4Ep2Zero3LosesTheLastRankAndTheSurvivorsKeepingTheirModelsBesideASpareSendTheirOwnRowsNotTheSourcesBroadcast(ScalarType dtype)
    {
        // The spare has no weights, so the source broadcasts its replicated tensors; under ZeRO-3 the source holds only its
        // own rows of each parameter, and survivors 1 and 2 keep their models: their own rows, still to be sent as pieces,
        // must not be overwritten by the source's rows (found in the cluster: NaN after such a resume).
        using var whole = new WholeExpertState(dtype);
        var old = Refreshed(whole, dtype);
        var targets = new List<ReplicaState>();
        try
        {
            var outcomes = Reshard([old[0], old[1], old[2], null], dp: 4, zero: 3, dtype);
            targets.AddRange(outcomes.Select(o => o.Target));
            var cover = outcomes[0].Cover;
            // Old rank 3's replicated rows (shard 3) and its part of expert shard 1 (part 1) come from old rank 2's copy.
            Assert.Equal([0, 1, 2, 2, 0, 2, 1, 2], cover.Holders);
            Assert.Equal([false, false, false, true, false, false, false, true], cover.FromCopy);
            Assert.Equal([true, true, true, false], cover.Keeps);
            AssertHeldBy(whole, targets);
        }
        finally { Dispose(targets, old); }
    }
}
