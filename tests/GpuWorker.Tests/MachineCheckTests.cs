// gpu-worker check's walk through every collective operation (MachineCheck.EveryOperation) over the tcp backend: on a
// GPU it checks the nccl binding, which no CI machine here can run, so this is what proves its expected values first.
using DeepSeekCluster.GpuWorker;
using static TorchSharp.torch;
using static DeepSeekCluster.GpuWorker.Tests.Infrastructure.TcpRanks;

namespace DeepSeekCluster.GpuWorker.Tests;

public sealed class MachineCheckTests
{
    /// <summary>
    /// One rank (what a one-GPU machine runs: every operation with itself), two and three (send/recv around the ring,
    /// all-to-all counts that differ by pair): a correct backend passes every expectation of the check.
    /// </summary>
    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(3)]
    public void TheCheckOfEveryCollectiveOperationPassesOnACorrectBackend(int world)
    {
        var ran = Run(world, c =>
        {
            MachineCheck.EveryOperation(c, CPU);
            return c.Rank;
        }, limit: TimeSpan.FromSeconds(60));
        Assert.Equal(Enumerable.Range(0, world), ran);
    }
}
