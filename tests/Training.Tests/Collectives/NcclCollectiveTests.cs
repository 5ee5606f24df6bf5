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
        using var single = Collective.Create(CPU, new CollectiveGroup("job", 1, 0, 1) { Endpoints = ["127.0.0.1:0"], LinkKey = LinkKeys.Test });
        Assert.IsType<DeepSeekCluster.Training.Collectives.Tcp.TcpCollective>(single);
    }
}
