// Which survivors cover a ZeRO layout's shards (parallel.redundancy): each old shard from its own rank, else from the
// neighbour copy of the same step; a shard lost with its copy (two adjacent ranks) or a stale copy is covered by none.
using DeepSeekCluster.GpuWorker.Cluster;

namespace DeepSeekCluster.GpuWorker.Tests;

public class LiveShardsTests
{
    const long Lineage = 77;

    // Old rank r of dp 4 holds shard r and the copy of shard (r + 1) mod 4, all at step 5.
    static HeldShards Old(int rank, long step = 5, long copyStep = 5) => new(step, Lineage, rank, 4, (rank + 1) % 4, copyStep, 9);

    [Fact]
    public void ALostRanksShardIsReadFromTheCopyItsNeighbourKeepsAndTheOthersFromTheirOwnRanks()
    {
        // Old rank 1 is gone; old ranks 0, 2, 3 are new ranks 0, 1, 2 of dp 3.
        var (cover, why) = LiveShards.Cover([Old(0), Old(2), Old(3)], step: 5, source: 0, dp: 3);
        Assert.True(cover is not null, why);
        Assert.Equal([0, 0, 1, 2], cover.Holders);
        Assert.Equal([false, true, false, false], cover.FromCopy);
        Assert.Equal((5L, Lineage, 9L, 4, false), (cover.Step, cover.Lineage, cover.OptimizerSteps, cover.Shards, cover.InPlace));
    }

    [Fact]
    public void TwoAdjacentRanksLostLeaveAShardHeldByNoSurvivor()
    {
        // Old ranks 1 and 2 are gone: shard 1's copy was on rank 0, but shard 2's only copy was on rank 1.
        var (cover, why) = LiveShards.Cover([Old(0), Old(3)], step: 5, source: 0, dp: 2);
        Assert.Null(cover);
        Assert.Contains("shard 2 of 4 at step 5 is held by no survivor", why);
    }

    [Fact]
    public void ACopyOfAnEarlierStepOrAnotherHistoryCoversNothing()
    {
        // Rank 0's copy of shard 1 is of step 4 (the refresh of step 5 did not finish), and the reason says so.
        var (stale, staleWhy) = LiveShards.Cover([Old(0, copyStep: 4), Old(2), Old(3)], step: 5, source: 0, dp: 3);
        Assert.Null(stale);
        Assert.Equal("shard 1 of 4 at step 5 is held by no survivor (its rank is gone and the copy a survivor keeps is of step 4)", staleWhy);
        // Ranks 2 and 3 hold step 5 of another history: their shards and copies count for nothing, so shard 2 comes
        // from rank 1's copy, but shard 3's only copy was rank 2's.
        var (cover, why) = LiveShards.Cover([Old(0), Old(1), Old(2) with { Lineage = 78 }, Old(3) with { Lineage = 78 }], step: 5, source: 0, dp: 4);
        Assert.Null(cover);
        Assert.Contains("shard 3 of 4", why);
        // Rank 3 alone of another history: its shard is covered by rank 2's copy.
        Assert.Equal([0, 1, 2, 2], LiveShards.Cover([Old(0), Old(1), Old(2), Old(3) with { Lineage = 78 }], step: 5, source: 0, dp: 4).Cover!.Holders);
    }

    [Fact]
    public void EveryRankInPlaceMovesNothingAndASpareIsCoveredButNotCurrent()
    {
        var (inPlace, _) = LiveShards.Cover([Old(0), Old(1), Old(2), Old(3)], step: 5, source: 0, dp: 4);
        Assert.True(inPlace!.InPlace);
        // A spare that holds nothing joins in place of old rank 3: covered from rank 2's copy, and the spare needs the weights.
        var spare = new HeldShards(-1, 0, -1, 0, -1, -1, 0);
        var (withSpare, why) = LiveShards.Cover([Old(0), Old(1), Old(2), spare], step: 5, source: 0, dp: 4);
        Assert.True(withSpare is not null, why);
        Assert.Equal([0, 1, 2, 2], withSpare.Holders);
        Assert.Equal([true, true, true, false], withSpare.Current);
        Assert.False(withSpare.InPlace);
    }
}
