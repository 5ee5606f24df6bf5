// The members a sharded job keeps when it shrinks without a spare: the choice itself (LiveMembers.Covering over the
// layout's StatePieces, and ByStage for each pipeline stage), and the Coordinator making it when a worker of an
// ep 2 x zero 1 job with redundancy leaves.
using DeepSeekCluster.Contracts.Grains;
using DeepSeekCluster.Contracts.Parallel;
using K = DeepSeekCluster.Contracts.Grains.JobEventKinds;

namespace DeepSeekCluster.Coordinator.Tests;

public class LiveMembersTests
{
    /// <summary>Every piece of <paramref name="pieces"/> is kept by one of <paramref name="replicas"/>, counted independently of Covering.</summary>
    static bool Holds(StatePieces pieces, IEnumerable<int> replicas, bool redundancy)
    {
        var kept = new HashSet<StatePiece>();
        foreach (int r in replicas)
        {
            kept.UnionWith(pieces.Of(r));
            if (redundancy) kept.UnionWith(pieces.Copied((r + 1) % pieces.Dp));
        }
        return pieces.All().All(kept.Contains);
    }

    static void Chooses(int[] expected, int[]? actual)
    {
        Assert.True(actual is not null, $"no covering set was found; expected [{string.Join(", ", expected)}]");
        Assert.Equal(expected, actual);
    }

    [Fact]
    public void Ep2Zero1OnDp4LosingRank2KeepsRanks1And3BecauseTheFirstByRankLeaveRank3sPiecesNowhere()
    {
        // Rank 2 kept rank 3's copy; rank 1 keeps rank 2's, rank 3 keeps rank 0's: {1, 3} holds all eight pieces.
        var pieces = new StatePieces(4, 2, Sharded: true);
        Assert.Equal(8, pieces.All().Count());
        int?[] survivors = [0, 1, 3];
        Assert.False(Holds(pieces, [0, 1], redundancy: true)); // the first by rank: shard 3 and expert shard 1 part 1 are lost
        var chosen = LiveMembers.Covering(pieces, redundancy: true, survivors, 2);
        Chooses([1, 2], chosen); // candidates 1 and 2: replicas 1 and 3
        Assert.True(Holds(pieces, [1, 3], redundancy: true));
    }

    [Fact]
    public void Zero1WithoutEpPrefersTheFirstByRankWhenTheyHoldEveryPiece()
    {
        var pieces = new StatePieces(4, 1, Sharded: true);
        // Lost rank 1: rank 0 keeps its copy and rank 2 keeps rank 3's, so the first two survivors do.
        Chooses([0, 1], LiveMembers.Covering(pieces, true, [0, 2, 3], 2));
        // Lost rank 2: only {1, 3}.
        Chooses([1, 2], LiveMembers.Covering(pieces, true, [0, 1, 3], 2));
        // Three of dp 4 lost but one: no two hold everything, and without redundancy no loss of a ZeRO rank is covered.
        Assert.Null(LiveMembers.Covering(pieces, true, [0, null, null], 2));
        Assert.Null(LiveMembers.Covering(pieces, false, [0, 1, 3], 2));
    }

    [Fact]
    public void Ep2Zero0HoldsEachExpertShardOnTwoReplicasSoTheKeptPairMustSpanBothShards()
    {
        // dp 4 x ep 2 at zero 0: replicas 0 and 2 hold expert shard 0, 1 and 3 shard 1, and nothing is copied (two holders).
        var pieces = new StatePieces(4, 2, Sharded: false);
        Assert.Empty(pieces.Copied(0));
        Assert.False(Holds(pieces, [0, 2], redundancy: true));
        Chooses([0, 2], LiveMembers.Covering(pieces, true, [0, 2, 3], 2)); // replicas 0 and 3
        // dp = ep = 2: each expert shard has one holder, so its neighbour's copy keeps it and either survivor alone holds both.
        var pair = new StatePieces(2, 2, Sharded: false);
        Chooses([0], LiveMembers.Covering(pair, true, [1], 1));
        Assert.Null(LiveMembers.Covering(pair, false, [1], 1));
    }

    [Fact]
    public void SparesFillThePlacesLeftAndEveryCoveringChoiceMatchesAnExhaustiveSearch()
    {
        var pieces = new StatePieces(4, 1, Sharded: true);
        // Spares hold nothing: passed over while survivors are needed, then they fill the places left, the first first.
        Chooses([1, 2], LiveMembers.Covering(pieces, true, [null, 0, 2, null], 2));
        Chooses([0, 1, 2], LiveMembers.Covering(pieces, true, [null, 0, 2, null], 3));
        // Every survivor set of dp 4 and 8 layouts, every count: Covering returns a covering set exactly when one exists,
        // and the first in candidate order (lexicographically) among them.
        foreach (var layout in new[] { new StatePieces(4, 1, true), new StatePieces(4, 2, true), new StatePieces(4, 2, false), new StatePieces(8, 2, true), new StatePieces(8, 4, true), new StatePieces(8, 2, false) })
            foreach (bool redundancy in new[] { true, false })
                for (int mask = 1; mask < 1 << layout.Dp; mask++)
                {
                    int?[] candidates = [.. Enumerable.Range(0, layout.Dp).Where(r => (mask >> r & 1) != 0).Select(r => (int?)r), null];
                    for (int count = 1; count <= candidates.Length; count++)
                    {
                        var subsets = Subsets(candidates.Length, count).Where(s => Holds(layout, s.Where(i => candidates[i] is not null).Select(i => candidates[i]!.Value), redundancy));
                        var expected = subsets.FirstOrDefault();
                        var actual = LiveMembers.Covering(layout, redundancy, candidates, count);
                        Assert.True(expected is null ? actual is null : actual is not null && expected.SequenceEqual(actual),
                            $"{layout} redundancy {redundancy}, candidates [{string.Join(", ", candidates)}], {count}: expected [{string.Join(", ", expected ?? [])}], got [{string.Join(", ", actual ?? [])}]");
                    }
                }
    }

    [Fact]
    public void InAPipelineEachNewStageIsDrawnFromItsOwnStagesSurvivorsThenSpares()
    {
        // pp 2 x dp 3 x zero 1 loses old rank 4 (stage 1, replica 1) and shrinks to dp 2. The first four by rank put old
        // rank 2 into stage 1 and leave out rank 5, the only holder of stage 1's shard 2 besides the lost rank's copy;
        // stage 1 is old ranks 3 and 5 instead (replica 0 holds shard 0 and the copy of 1, replica 2 shard 2 and the copy of 0).
        var pieces = new StatePieces(3, 1, Sharded: true);
        (int, int)?[] survivors = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2)];
        Chooses([0, 1, 3, 4], LiveMembers.ByStage(pieces, 2, survivors, 2));
        // Two adjacent replicas of stage 1 lost (old ranks 3 and 4): its shard 1 and the copy of it are gone.
        Assert.Null(LiveMembers.ByStage(pieces, 2, [(0, 0), (0, 1), (0, 2), (1, 2)], 2));
        // pp 2 x dp 2 losing old rank 1 with a spare: stage 0 is its survivor and the spare, stage 1 keeps both of its own.
        Chooses([0, 3, 1, 2], LiveMembers.ByStage(new StatePieces(2, 1, true), 2, [(0, 0), (1, 0), (1, 1), null], 2));
        // One stage: the same choice as Covering's.
        Chooses([1, 2], LiveMembers.ByStage(new StatePieces(4, 2, true), 1, [(0, 0), (0, 1), (0, 3)], 2));
    }

    /// <summary>The <paramref name="k"/>-subsets of 0..n-1, ascending, in lexicographic order.</summary>
    static IEnumerable<int[]> Subsets(int n, int k, int from = 0)
    {
        if (k == 0) { yield return []; yield break; }
        for (int i = from; i <= n - k; i++)
            foreach (var rest in Subsets(n, k - 1, i + 1)) yield return [i, .. rest];
    }

    [Fact]
    public async Task AnEp2Zero1JobWithRedundancyThatLosesRank2WithoutASpareReFormsOnRanks1And3AndWithoutRedundancyOnTheFirstByRank()
    {
        await using var c = await GrainCluster.StartAsync(TestSpecs.TempFolder());
        var epochs = new Dictionary<string, long>();
        foreach (var id in new[] { "m0", "m1", "m2", "m3" }) epochs[id] = await c.Worker(id).RegisterAsync(TestSpecs.Worker(id), null);
        foreach (bool redundancy in new[] { true, false })
        {
            var job = c.Job($"members-{redundancy}");
            await job.SubmitAsync(TestSpecs.Tiny(minWorkers: 2, maxWorkers: 4, steps: 20) with { Parallel = new ParallelPlan { Ep = 2, Zero = 1, Redundancy = redundancy } });
            var status = await TestSpecs.EventuallyAsync(job.GetStatusAsync, s => s.State == JobState.Running && s.Workers.Length == 4, "formation of four");
            long g = status.Generation;
            var byRank = status.Workers.OrderBy(w => w.Rank).Select(w => w.WorkerId).ToArray();
            await job.ReportResumedAsync(g, new ResumedReport { Step = 0, Source = "start" });
            await job.ReportStepAsync(g, new StepReport { Step = 1, Loss = 5 });

            // Three survivors, dp 2 (ep 2 divides no 3): the first by rank, 0 and 1, would leave rank 3's pieces nowhere.
            await c.Worker(byRank[2]).DisconnectedAsync(epochs[byRank[2]], "connection lost", LeaveKind.Lost);
            status = await TestSpecs.EventuallyAsync(job.GetStatusAsync, s => s.State == JobState.Running && s.Generation == g + 1, "re-formation without rank 2");
            var formed = status.Events.Last(e => e.Kind == K.Formed);
            if (redundancy)
            {
                Assert.Equal([byRank[1], byRank[3]], status.Workers.OrderBy(w => w.Rank).Select(w => w.WorkerId));
                Assert.Contains("kept the survivors whose live state holds every piece of the dp 4 layout, not the first by rank", formed.Message);
            }
            else
            {
                // Nothing is copied, so no choice keeps the job live: the first by rank, as before.
                Assert.Equal([byRank[0], byRank[1]], status.Workers.OrderBy(w => w.Rank).Select(w => w.WorkerId));
                Assert.DoesNotContain("kept the survivors", formed.Message);
            }
            await job.StopAsync();
            // The lost worker comes back for the next job.
            epochs[byRank[2]] = await c.Worker(byRank[2]).RegisterAsync(TestSpecs.Worker(byRank[2]), null);
        }
    }
}
