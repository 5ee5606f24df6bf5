// GrpcCheckpointStore against the real CheckpointStore service behind a proxy that goes silent without closing anything:
// a load whose download stops, and an upload the store stops taking in, each end within the store's silence timeout
// with an error naming the store and what was asked, instead of waiting for ever (rank 0's end loads the whole model
// after the job's Stop, when no cancellation reaches it any more).
using DeepSeekCluster.Contracts.Control;
using DeepSeekCluster.Training.Parallel;
using DeepSeekCluster.GpuWorker.Cluster;
using DeepSeekCluster.GpuWorker.Tests.Infrastructure;
using DeepSeekCluster.Training.Checkpoints;
using Grpc.Net.Client;
using Store = DeepSeekCluster.Contracts.Checkpoints.CheckpointStore;

namespace DeepSeekCluster.GpuWorker.Tests;

public sealed class GrpcCheckpointStoreSilenceTests : IAsyncLifetime
{
    StoreHost host = null!;
    readonly string staging = Directory.CreateTempSubdirectory("gpuworker-silence-").FullName;

    static readonly CheckpointPosition Position = new(Step: 12, Generation: 3, ConsumedSamples: 12 * 8, OptimizerSteps: 12);
    static ParallelLayout Dp2 => ParallelLayout.Even(2, 1, TrainedState.Config.NumHiddenLayers);
    static readonly TimeSpan Silence = TimeSpan.FromSeconds(2);
    static readonly GrpcCheckpointStoreOptions Options = new() { ChunkBytes = 64 * 1024, RetryBaseDelay = TimeSpan.FromMilliseconds(50), SilenceTimeout = Silence };
    /// <summary>Far beyond the silence timeout on a loaded machine; without the bound the calls below never end at all.</summary>
    static readonly TimeSpan Hang = TimeSpan.FromMinutes(2);

    public async Task InitializeAsync() => host = await StoreHost.StartAsync();

    public async Task DisposeAsync()
    {
        await host.DisposeAsync();
        Directory.Delete(staging, recursive: true);
    }

    [Fact]
    public async Task ALoadWhoseDownloadTheStoreStopsSendingEndsNamingTheStoreAndTheTensor()
    {
        using var saved = new TrainedState(1);
        var direct = new GrpcCheckpointStore(host.Client, host.Address, "silent-read", staging, Options);
        await ShardedCheckpointWriter.SaveAllRanksAsync(direct, "silent-read", Dp2, saved.Tensors, Position, TrainedState.Config.ToJson(), tokenizerSha256: null);

        // The manifest (a few KiB) gets through; the tensors' bytes (megabytes) stop coming after 256 KiB.
        using var proxy = new StallingProxy(host.Port, downstreamBytes: 256 * 1024);
        string address = $"http://127.0.0.1:{proxy.Port}";
        using var channel = GrpcChannel.ForAddress(address);
        var store = new GrpcCheckpointStore(new Store.CheckpointStoreClient(channel), address, "silent-read", staging, Options);
        using var loaded = new TrainedState(2, fill: false);

        var e = await Assert.ThrowsAsync<IOException>(() => ShardedCheckpointLoader.LoadReplicaAsync(store, 12, loaded.Model, null).WaitAsync(Hang));

        Assert.True(proxy.Stalled, "the proxy never went silent: the load read less than it let through");
        Assert.Contains($"from the checkpoint store at {address}: it sent nothing for 2 s", e.Message);
        Assert.Contains("could not download '", e.Message);
        Assert.Contains("step 12 of job 'silent-read'", e.Message);
    }

    [Fact]
    public async Task AnUploadTheStoreStopsTakingInFailsItsAttemptsAsSilencesAndEndsNamingTheStore()
    {
        using var state = new TrainedState(3);
        var plan = new ShardingPlan(Dp2, CheckpointTensors.Catalog(state.Tensors));
        // Megabytes, so the writes wait on HTTP/2 flow control once the store takes nothing more in.
        using var proxy = new StallingProxy(host.Port, upstreamBytes: 256 * 1024);
        string address = $"http://127.0.0.1:{proxy.Port}";
        using var channel = GrpcChannel.ForAddress(address);
        var store = new GrpcCheckpointStore(new Store.CheckpointStoreClient(channel), address, "silent-write", staging, Options with { Attempts = 2 });

        var e = await Assert.ThrowsAsync<IOException>(() => Task.Run(() => ShardedCheckpointWriter.WriteRank(store, plan, 0, 12, state.Tensors.ToDictionary())).WaitAsync(Hang));

        Assert.True(proxy.Stalled);
        Assert.Contains($"could not upload rank-0.safetensors of step 12 of job 'silent-write' to the checkpoint store at {address}: 2 attempts failed", e.Message);
        Assert.Contains("DeadlineExceeded", e.Message);
        Assert.Contains("nothing for 2 s during the upload of rank-0.safetensors of step 12", e.Message);
        Assert.True(File.Exists(store.LocalPath(12, 0)), "a failed upload keeps the staged file for the next try");
    }

    [Fact]
    public async Task Rank0LoadsTheWholeModelFromAStoreThatAnswersAndEndsWithALineWhenTheStoreGoesSilent()
    {
        using var saved = new TrainedState(5);
        var direct = new GrpcCheckpointStore(host.Client, host.Address, "silent-end", staging, Options);
        await ShardedCheckpointWriter.SaveAllRanksAsync(direct, "silent-end", Dp2, saved.Tensors, Position, TrainedState.Config.ToJson(), tokenizerSha256: null);
        var log = new StringWriter();
        using var cancel = new RunCancellation();
        var run = new RunContext(new Assignment { JobId = "silent-end", Rank = 0, Generation = 3 }, new WorkerSettings
        {
            Coordinator = new Uri("http://127.0.0.1:1"), DataShards = new Uri("http://127.0.0.1:1"), Checkpoints = new Uri(host.Address), Token = "t", WorkerId = "w",
        }, _ => { }, log, null, cancel, new ReplicaHolder());
        cancel.Cancel(TimeSpan.Zero); // the job's Stop came before the end: nothing of the end may depend on the run's tokens

        using (var whole = await Task.Run(() => RunEnd.LoadWholeModel(run, direct, 12, TrainedState.Config, TorchSharp.torch.CPU, "")).WaitAsync(Hang))
        {
            Assert.NotNull(whole);
            var ours = whole!.state_dict();
            Assert.All(saved.Model.state_dict(), kv => Assert.True(TrainedState.BitwiseEqual(kv.Value, ours[kv.Key]), $"{kv.Key} differs"));
        }
        Assert.Contains("[rank 0] loaded the whole model from committed step 12 (saved as dp 2 x pp 1)", log.ToString());

        using var proxy = new StallingProxy(host.Port, downstreamBytes: 256 * 1024);
        string address = $"http://127.0.0.1:{proxy.Port}";
        using var channel = GrpcChannel.ForAddress(address);
        var silent = new GrpcCheckpointStore(new Store.CheckpointStoreClient(channel), address, "silent-end", staging, Options);

        var none = await Task.Run(() => RunEnd.LoadWholeModel(run, silent, 12, TrainedState.Config, TorchSharp.torch.CPU, "")).WaitAsync(Hang);

        Assert.Null(none);
        Assert.Contains($"[rank 0] could not load the whole model from committed step 12, so there is no validation loss, sample or model from rank 0: " +
                        $"could not download '", log.ToString());
        Assert.Contains($"from the checkpoint store at {address}: it sent nothing for 2 s", log.ToString());
    }
}
