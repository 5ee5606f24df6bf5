using DeepSeekCluster.Text.Data;

namespace DeepSeekCluster.Training.Tests.Data;

public class SamplePermutationTests
{
    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(3)]
    [InlineData(7)]
    [InlineData(100)]
    [InlineData(1000)]
    [InlineData(4097)]
    public void EachEpochIsAPermutationOfAllSamples(long sampleCount)
    {
        var perm = new SamplePermutation(sampleCount, seed: 42);

        for (long epoch = 0; epoch < 3; epoch++)
        {
            var seen = new HashSet<long>();
            for (long p = 0; p < sampleCount; p++)
            {
                long sample = perm.SampleAt(epoch * sampleCount + p);
                Assert.InRange(sample, 0, sampleCount - 1);
                Assert.True(seen.Add(sample), $"sample {sample} repeated in epoch {epoch}");
            }
            Assert.Equal(sampleCount, seen.Count);
        }
    }

    [Fact]
    public void ThePermutationShufflesAndEachEpochShufflesDifferently()
    {
        const long n = 1000;
        var perm = new SamplePermutation(n, seed: 42);

        long[] epoch0 = Enumerable.Range(0, (int)n).Select(p => perm.SampleAt(p)).ToArray();
        long[] epoch1 = Enumerable.Range(0, (int)n).Select(p => perm.SampleAt(n + p)).ToArray();

        Assert.True(epoch0.Where((s, p) => s == p).Count() < 10, "too many fixed points for a shuffle");
        Assert.NotEqual(epoch0, epoch1);
        Assert.Equal(1, perm.EpochOf(n));
    }

    [Fact]
    public void DifferentSeedsGiveDifferentOrdersAndTheSameSeedTheSameOrder()
    {
        var a = new SamplePermutation(500, seed: 1);
        var b = new SamplePermutation(500, seed: 2);
        var aAgain = new SamplePermutation(500, seed: 1);

        var first = Enumerable.Range(0, 500).Select(i => a.SampleAt(i)).ToArray();
        Assert.NotEqual(first, Enumerable.Range(0, 500).Select(i => b.SampleAt(i)));
        Assert.Equal(first, Enumerable.Range(0, 500).Select(i => aAgain.SampleAt(i)));
    }

    [Fact]
    public void TheOrderIsPinned()
    {
        // Checkpoints resume by consumed-sample count, so a changed algorithm would silently
        // change which samples a resumed job sees. Update these only with a decisions.md entry.
        var perm = new SamplePermutation(1_000_003, seed: 20250101);

        long[] got = [perm.SampleAt(0), perm.SampleAt(1), perm.SampleAt(999_999), perm.SampleAt(1_000_003), perm.SampleAt(5_000_000_000)];

        Assert.Equal(PinnedSamples, got);
    }

    // Also reproduced by a 25-line Python re-implementation of the documented algorithm.
    private static readonly long[] PinnedSamples = [69517, 853645, 700184, 492236, 517398];

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(3)]
    [InlineData(5)]
    public void TheRanksSlicesTogetherAreTheGlobalBatchForAnyWorldSize(int worldSize)
    {
        // 97 samples and a batch of 30: steps 3, 6 and 9 straddle epoch boundaries.
        var perm = new SamplePermutation(97, seed: 3);
        const int globalBatch = 30;

        for (long step = 0; step < 10; step++)
        {
            var expected = perm.Slice(step, globalBatch, rank: 0, worldSize: 1);
            var joined = Enumerable.Range(0, worldSize).SelectMany(r => perm.Slice(step, globalBatch, r, worldSize)).ToList();

            Assert.Equal(expected, joined);
            Assert.Equal(Enumerable.Range(0, globalBatch).Select(i => perm.SampleAt(step * globalBatch + i)), expected);
        }
    }

    [Fact]
    public void AGlobalBatchThatTheWorldSizeDoesNotDivideIsRefused()
    {
        var perm = new SamplePermutation(100, seed: 0);

        var e = Assert.Throws<ArgumentException>(() => perm.Slice(0, globalBatch: 10, rank: 0, worldSize: 3));
        Assert.Contains("divisible", e.Message);
    }

    [Fact]
    public void ARankOutsideTheWorldIsRefused()
    {
        var perm = new SamplePermutation(100, seed: 0);

        Assert.Throws<ArgumentOutOfRangeException>(() => perm.Slice(0, globalBatch: 10, rank: 2, worldSize: 2));
    }
}
