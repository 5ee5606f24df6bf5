// The AppHost's GPU placement, as units: which GPUs it sees, how --device and --workers meet the GPU count, and how
// instances get and give back a GPU of their own (NCCL refuses two ranks on one GPU).
using DeepSeekCluster.AppHost;

namespace DeepSeekCluster.Observability.Tests;

public class GpuPlacementTests
{
    static AppHostOptions Parse(string[] gpus, params string[] args) => AppHostOptions.Parse(args, "/repo", gpus);

    [Fact]
    public void TheVisibleGpusAreTheDriversDevicesOrTheEntriesOfCudaVisibleDevices()
    {
        Assert.Empty(LocalGpus.Visible(null, 0));
        Assert.Empty(LocalGpus.Visible("0,1", 0));
        Assert.Equal(["0", "1", "2"], LocalGpus.Visible(null, 3));
        // The driver has applied the parent's list already: its entries are the ids to hand on, in order.
        Assert.Equal(["2", "5"], LocalGpus.Visible("2, 5", 2));
        Assert.Equal(["GPU-8a1c"], LocalGpus.Visible("GPU-8a1c,7", 1)); // an entry past an invalid one is not visible
    }

    [Fact]
    public void WithoutGpusAutoMeansTwoCpuWorkersAndCudaIsRefused()
    {
        var o = Parse([]);
        Assert.Equal(("cpu", 2), (o.Device, o.Workers));
        Assert.Empty(o.Gpus);
        var e = Assert.Throws<ArgumentException>(() => Parse([], "--device", "cuda"));
        Assert.Contains("--device cuda: the NVIDIA driver reports no GPU here", e.Message);
        Assert.Contains("--device 'tpu': expected auto, cpu or cuda", Assert.Throws<ArgumentException>(() => Parse([], "--device", "tpu")).Message);
    }

    [Fact]
    public void WithGpusAutoMeansOneCudaWorkerPerGpuUnlessToldOtherwise()
    {
        var o = Parse(["0", "1", "2"]);
        Assert.Equal(("cuda", 3), (o.Device, o.Workers));
        Assert.Equal(["0", "1", "2"], o.Gpus);
        Assert.Equal(2, Parse(["0", "1", "2"], "--workers", "2").Workers);
        Assert.Equal(2, Parse(["0", "1", "2"], "--pp", "2").Workers); // whole replicas only: 3 GPUs hold one of 2 stages
        var cpu = Parse(["0"], "--device", "cpu", "--workers", "4");
        Assert.Equal(("cpu", 4), (cpu.Device, cpu.Workers));
        Assert.Empty(cpu.Gpus);
    }

    [Fact]
    public void MoreCudaWorkersThanGpusAreRefusedNamingTheCountAndTheWayOut()
    {
        var e = Assert.Throws<ArgumentException>(() => Parse(["0"], "--workers", "2"));
        Assert.Equal("--workers 2 needs 2 GPUs, one per worker (NCCL runs one rank per GPU), and this machine has 1 visible GPU (0): use --workers 1, or --device cpu", e.Message);
        Assert.Contains("--max-workers 3 needs as many GPUs", Assert.Throws<ArgumentException>(() => Parse(["0", "1"], "--max-workers", "3")).Message);
        Assert.Contains("--pp 2 needs 2 GPUs, one per stage", Assert.Throws<ArgumentException>(() => Parse(["0"], "--pp", "2")).Message);
    }

    [Fact]
    public void EachInstanceGetsAGpuOfItsOwnAndAnExitedOnesGpuGoesToTheNext()
    {
        var slots = new GpuSlots(["3", "7"]);
        Assert.Equal("3", slots.Take("gpu-worker-0"));
        Assert.Equal("7", slots.Take("gpu-worker-1"));
        Assert.Equal("3", slots.Take("gpu-worker-0")); // asking again changes nothing
        var full = Assert.Throws<InvalidOperationException>(() => slots.Take("gpu-worker-2"));
        Assert.Equal("no GPU is free for gpu-worker-2: all 2 (3, 7) have a worker, and NCCL runs one rank per GPU", full.Message);
        slots.Release("gpu-worker-0");
        Assert.Equal("3", slots.Take("gpu-worker-2"));
    }
}

public class GpuPlacementProcessTests
{
    [Fact]
    public async Task RealChildProcessesSeeTheirOwnGpuAndAnExitedOnesGpuGoesToTheNextInstance()
    {
        var builder = new DeepSeekCluster.AppHost.Hosting.DistributedApplicationBuilder(Path.GetTempPath(), "Debug");
        var slots = new GpuSlots(["4", "6"]);
        var worker = builder.AddExecutable("gpu-worker", "/bin/sh", "-c", "echo \"gpu=$CUDA_VISIBLE_DEVICES\"")
            .WithReplicas(2)
            .WithInstanceEnvironment(instance => [new("CUDA_VISIBLE_DEVICES", slots.Take(instance))]);
        await using var app = builder.Build();
        var seen = new System.Collections.Concurrent.ConcurrentDictionary<string, string>();
        var exited = new System.Collections.Concurrent.ConcurrentQueue<string>();
        app.LineReceived += (instance, line) => seen[instance] = line;
        app.ChildExited += (instance, _) => { slots.Release(instance); exited.Enqueue(instance); };

        await app.StartAsync(CancellationToken.None);
        await Poll.UntilAsync(() => exited.Count == 2 && seen.Count == 2, TimeSpan.FromSeconds(30), () => $"{exited.Count} exited, {seen.Count} printed");
        Assert.Equal("gpu=4", seen["gpu-worker-0"]);
        Assert.Equal("gpu=6", seen["gpu-worker-1"]);

        // Both GPUs are free again: a third instance gets the first, as 'add' would after the others left.
        app.Start(worker, 2);
        await Poll.UntilAsync(() => seen.ContainsKey("gpu-worker-2"), TimeSpan.FromSeconds(30), () => "the added child printed nothing");
        Assert.Equal("gpu=4", seen["gpu-worker-2"]);
    }

    [Fact]
    public async Task AnInstanceWithNoGpuLeftIsNotStarted()
    {
        var builder = new DeepSeekCluster.AppHost.Hosting.DistributedApplicationBuilder(Path.GetTempPath(), "Debug");
        var slots = new GpuSlots(["0"]);
        var worker = builder.AddExecutable("gpu-worker", "/bin/sleep", "30").WithReplicas(1)
            .WithInstanceEnvironment(instance => [new("CUDA_VISIBLE_DEVICES", slots.Take(instance))]);
        await using var app = builder.Build();
        await app.StartAsync(CancellationToken.None);
        var e = Assert.Throws<InvalidOperationException>(() => app.Start(worker, 1));
        Assert.Equal("no GPU is free for gpu-worker-1: all 1 (0) have a worker, and NCCL runs one rank per GPU", e.Message);
        Assert.Equal(["gpu-worker-0"], app.Instances(worker));
    }
}
