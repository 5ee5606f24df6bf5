// The nccl backend where there is no GPU: a clear refusal, never a DllNotFoundException; the factory picks tcp for CPU.
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Collectives.Nccl;
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Tests.Collectives;

public class NcclCollectiveTests
{
    [Fact]
    public void CreatingTheNcclBackendWithoutCudaOrLibncclFailsWithAClearMessage()
    {
        if (cuda.is_available()) return; // a GPU machine: nothing to refuse
        var cudaDevice = new Device(DeviceType.CUDA, 0);
        var e = Assert.Throws<CollectiveException>(() => NcclCollective.Create(new byte[128], 0, 1, 1, cudaDevice, TimeSpan.FromSeconds(1)));
        Assert.Equal(CollectiveFailure.Unavailable, e.Failure);
        Assert.Contains("nccl backend needs CUDA", e.Message);
        var viaFactory = Assert.Throws<CollectiveException>(() => Collective.Create(cudaDevice, new CollectiveGroup("job", 1, 0, 1) { NcclUniqueId = new byte[128] }));
        Assert.Equal(e.Message, viaFactory.Message);
    }

    [Fact]
    public void MakingAUniqueIdWithoutLibncclNamesTheLibraryToInstall()
    {
        if (System.Runtime.InteropServices.NativeLibrary.TryLoad("libnccl.so.2", out var handle)) { System.Runtime.InteropServices.NativeLibrary.Free(handle); return; }
        var e = Assert.Throws<CollectiveException>(() => NcclCollective.CreateUniqueId());
        Assert.Contains("libnccl.so.2", e.Message);
        Assert.Contains("install NCCL", e.Message);
    }

    [Fact]
    public void TheFactoryPicksNcclForCudaAndTcpForCpu()
    {
        Assert.Equal("nccl", Collective.BackendFor(new Device(DeviceType.CUDA, 0)));
        Assert.Equal("tcp", Collective.BackendFor(CPU));
        using var single = Collective.Create(CPU, new CollectiveGroup("job", 1, 0, 1) { Endpoints = ["127.0.0.1:0"] });
        Assert.IsType<DeepSeekCluster.Training.Collectives.Tcp.TcpCollective>(single);
    }

    [Theory]
    [InlineData(1)]
    [InlineData(3)]
    public void RankZerosUniqueIdReachesEveryRankOfTheRingByteForByte(int world)
    {
        // Every byte value, so a lossy encoding (a signed byte, a rounding float) would show.
        var id = Enumerable.Range(0, NcclCollective.UniqueIdBytes).Select(i => (byte)(i * 2 + 1)).ToArray();
        id[0] = 0;
        id[1] = 255;
        int made = 0;
        var received = RankGroup.Run(world, ring => Collective.ShareUniqueId(ring, () => { Interlocked.Increment(ref made); return id; }));
        Assert.Equal(1, made); // rank 0 alone: NCCL's bootstrap root listens in the process that made the id
        Assert.All(received, r => Assert.Equal(id, r));
    }

    [Fact]
    public void ARankZeroThatCannotMakeTheIdFailsEveryRankAtOnceInsteadOfLeavingThemWaiting()
    {
        var outcomes = RankGroup.Outcomes(3, ring => Collective.ShareUniqueId(ring,
            () => throw new CollectiveException(CollectiveFailure.Unavailable, "the nccl backend cannot start: libnccl.so.2 could not be loaded")),
            new DeepSeekCluster.Training.Collectives.Tcp.TcpCollectiveOptions { Timeout = TimeSpan.FromSeconds(20) });
        Assert.Contains("libnccl.so.2 could not be loaded", outcomes[0].Error!.Message);
        foreach (var other in outcomes.Skip(1))
        {
            var e = Assert.IsType<CollectiveException>(other.Error);
            Assert.Equal("rank 0 of generation 1 could not make the NCCL unique id (its log says why)", e.Message);
            Assert.True(other.Elapsed < TimeSpan.FromSeconds(10), $"a rank waited {other.Elapsed.TotalSeconds:F1} s");
        }
    }
}
