// Collectives among subgroups of a tcp group (the holders of each expert shard under ep x ZeRO), against references
// computed from the definitions: the world's subgroups run at once, each exchange staying inside its subgroup.
using DeepSeekCluster.Training.Collectives;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Tests.Collectives;

public class SubgroupCollectiveTests
{
    /// <summary>Element <paramref name="i"/> of world rank <paramref name="rank"/>'s input: different on every rank and element.</summary>
    static long Value(int rank, int i) => (rank + 1) * 1000 + i * 7 - 20;

    [Theory]
    [InlineData(4, 2)] // subgroups {0, 2} and {1, 3}: dp 4 x ep 2's expert holders
    [InlineData(6, 3)] // {0, 3}, {1, 4}, {2, 5}
    [InlineData(3, 1)] // one subgroup of the whole world
    public void SubgroupsReduceScatterAndGatherOnlyAmongTheirMembers(int world, int groups)
    {
        const int n = 5;
        int members = world / groups;
        List<int> MembersOf(int rank) => [.. Enumerable.Range(0, world).Where(r => r % groups == rank % groups)];
        var results = RankGroup.Run(world, c =>
        {
            var sub = new SubgroupCollective(c, MembersOf(c.Rank));
            Assert.Equal(members, sub.WorldSize);
            Assert.Equal(c.Rank / groups, sub.Rank);
            var sum = tensor(Enumerable.Range(0, n).Select(i => Value(c.Rank, i)).ToArray());
            var max = tensor(Enumerable.Range(0, n).Select(i => (double)Value(c.Rank, i) * (i % 2 == 0 ? 1 : -1)).ToArray());
            sub.AllReduce(sum, ReduceOp.Sum);
            sub.AllReduce(max, ReduceOp.Max);
            var scatterInput = tensor(Enumerable.Range(0, members * n).Select(i => Value(c.Rank, i)).ToArray());
            var scattered = full(n, -1L, dtype: ScalarType.Int64);
            sub.ReduceScatter(scatterInput, scattered, ReduceOp.Sum);
            var gathered = full(members * n, -1L, dtype: ScalarType.Int64);
            sub.AllGather(tensor(Enumerable.Range(0, n).Select(i => Value(c.Rank, i)).ToArray()), gathered);
            return (Sum: sum.data<long>().ToArray(), Max: max.data<double>().ToArray(), Scattered: scattered.data<long>().ToArray(), Gathered: gathered.data<long>().ToArray());
        });
        for (int r = 0; r < world; r++)
        {
            var group = MembersOf(r);
            int me = group.IndexOf(r);
            Assert.Equal(Enumerable.Range(0, n).Select(i => group.Sum(m => Value(m, i))), results[r].Sum);
            Assert.Equal(Enumerable.Range(0, n).Select(i => group.Max(m => (double)Value(m, i) * (i % 2 == 0 ? 1 : -1))), results[r].Max);
            Assert.Equal(Enumerable.Range(0, n).Select(i => group.Sum(m => Value(m, me * n + i))), results[r].Scattered);
            Assert.Equal(group.SelectMany(m => Enumerable.Range(0, n).Select(i => Value(m, i))), results[r].Gathered);
        }
    }

    [Fact]
    public void AMemberListThatDoesNotHoldTheRankOrIsUnorderedIsRefused()
    {
        RankGroup.Run(2, c =>
        {
            var notMe = Assert.Throws<ArgumentException>(() => new SubgroupCollective(c, [1 - c.Rank]));
            Assert.Contains($"rank {c.Rank} is not a member", notMe.Message);
            var unordered = Assert.Throws<ArgumentException>(() => new SubgroupCollective(c, [1, 0]));
            Assert.Contains("ascending order", unordered.Message);
            return 0;
        });
    }
}
