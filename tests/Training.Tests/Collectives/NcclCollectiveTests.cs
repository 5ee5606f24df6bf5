// The nccl backend's refusals: a clear message, never a DllNotFoundException; the factory picks tcp for CPU. The tests run
// on every machine and assert what its CUDA and libnccl.so.2 make the right answer, naming what the machine has.
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Collectives.Nccl;
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Tests.Collectives;

public class NcclCollectiveTests
{
    static bool LibncclLoads()
    {
        if (!System.Runtime.InteropServices.NativeLibrary.TryLoad("libnccl.so.2", out var handle)) return false;
        System.Runtime.InteropServices.NativeLibrary.Free(handle);
        return true;
    }

    static string Machine => $"this machine: CUDA {(cuda.is_available() ? $"available ({cuda.device_count()} device(s))" : "not available")}, " +
                             $"libnccl.so.2 {(LibncclLoads() ? "loads" : "does not load")}";

    /// <summary>
    /// Without CUDA the backend refuses before touching NCCL; with CUDA it gets past that check and refuses a malformed
    /// unique id (or names the missing libnccl.so.2) instead, so a GPU machine never hears "needs CUDA".
    /// </summary>
    [Fact]
    public void CreatingTheNcclBackendRefusesWhatThisMachineLacksWithAClearMessage()
    {
        var cudaDevice = new Device(DeviceType.CUDA, 0);
        if (!cuda.is_available())
        {
            var e = Assert.Throws<CollectiveException>(() => NcclCollective.Create(new byte[128], 0, 1, 1, cudaDevice, TimeSpan.FromSeconds(1)));
            Assert.Equal(CollectiveFailure.Unavailable, e.Failure);
            Assert.Contains("nccl backend needs CUDA", e.Message);
            var viaFactory = Assert.Throws<CollectiveException>(() => Collective.Create(cudaDevice, new CollectiveGroup("job", 1, 0, 1) { NcclUniqueId = new byte[128] }));
            Assert.Equal(e.Message, viaFactory.Message);
            return;
        }
        var refusal = Record.Exception(() => NcclCollective.Create(new byte[5], 0, 1, 1, cudaDevice, TimeSpan.FromSeconds(1)));
        Assert.True(refusal is not null, $"a 5-byte unique id was accepted ({Machine})");
        Assert.DoesNotContain("needs CUDA", refusal.Message);
        if (NcclCollective.Inspect().Problem is { } problem)
            Assert.Contains(problem, refusal.Message);
        else
            Assert.Contains("an NCCL unique id is 128 bytes, got 5", refusal.Message);
    }

    /// <summary>The bootstrap needs no GPU: with a usable libnccl.so.2 the id is made; without one the error names the library.</summary>
    [Fact]
    public void MakingAUniqueIdWorksWithAUsableLibncclAndOtherwiseNamesTheLibraryToInstall()
    {
        if (LibncclLoads() && NcclCollective.Inspect().Problem is null)
        {
            var id = NcclCollective.CreateUniqueId();
            Assert.Equal(128, id.Length);
            Assert.True(id.Any(b => b != 0), $"ncclGetUniqueId returned 128 zero bytes ({Machine})");
            return;
        }
        var e = Assert.Throws<CollectiveException>(() => NcclCollective.CreateUniqueId());
        Assert.Contains("libnccl.so.2", e.Message);
        Assert.Contains(LibncclLoads() ? "or newer" : "install NCCL", e.Message);
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
