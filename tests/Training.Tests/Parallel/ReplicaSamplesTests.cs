// The one function that gives a replica its samples of a step: the replicas' shares tile each step's global batch.
using DeepSeekCluster.Training.Parallel;

namespace DeepSeekCluster.Training.Tests.Parallel;

public class ReplicaSamplesTests
{
    [Theory]
    [InlineData(8, 1)]
    [InlineData(8, 2)]
    [InlineData(12, 3)]
    public void TheReplicasSharesTileEveryStepInOrderWithoutGapOrOverlap(int globalBatch, int replicas)
    {
        long next = 0;
        for (long step = 0; step < 4; step++)
            for (int r = 0; r < replicas; r++)
            {
                var share = ParallelLayout.ReplicaSamples(step, globalBatch, r, replicas);
                Assert.Equal((next, globalBatch / replicas), (share.Start, share.Count));
                next = share.End;
            }
    }

    [Fact]
    public void AWidthThatDoesNotDivideTheBatchOrAReplicaOutsideItIsNamed()
    {
        Assert.Contains("3 replicas must divide the global batch 8", Assert.Throws<ArgumentOutOfRangeException>(() => ParallelLayout.ReplicaSamples(0, 8, 0, 3)).Message);
        Assert.Contains("replica 2 is not in [0, 2)", Assert.Throws<ArgumentOutOfRangeException>(() => ParallelLayout.ReplicaSamples(0, 8, 2, 2)).Message);
    }
}
