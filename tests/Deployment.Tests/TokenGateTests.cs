// DataShardService and CheckpointStore as the pods run them (real processes, the token from Cluster__Token): a call with
// the cluster token reaches the service, one without it or with a wrong one is refused with Unauthenticated before any
// work (Prepare, Commit, ApplyRetention, DownloadTensor, uploads, batches), counted on /metrics by reason, and logged
// without the token. A data-plane refusal is the same for unary, client-streaming and server-streaming calls.
using DeepSeekCluster.Contracts.Checkpoints;
using DeepSeekCluster.Contracts.DataShards;
using DeepSeekCluster.ServiceDefaults;
using Grpc.Core;
using Grpc.Net.Client;
using DataManifestRequest = DeepSeekCluster.Contracts.DataShards.GetManifestRequest;

namespace DeepSeekCluster.Deployment.Tests;

public class TokenGateTests
{
    const string Token = "token-gate-test-Zm9vYmFy";

    static Metadata Bearer(string token) => new() { { "authorization", $"Bearer {token}" } };

    [Fact]
    public async Task DataShardServiceRefusesAndCountsEveryCallWithoutTheClusterToken()
    {
        string root = Directory.CreateTempSubdirectory("token-data-").FullName;
        await using var service = await ServiceProcess.StartAsync("DeepSeekCluster.DataShardService", new Dictionary<string, string>
        {
            ["Cluster__Token"] = Token,
            ["DataShards__Root"] = Path.Combine(root, "datasets"),
            ["DataShards__WorkDir"] = Path.Combine(root, "work"),
            ["DataShards__CacheDir"] = Path.Combine(root, "cache"),
        });
        using var channel = GrpcChannel.ForAddress(service.GrpcAddress);
        var client = new DataShards.DataShardsClient(channel);
        const string Metric = "deepseek_data_auth_refusals_total";
        Assert.Equal(0, await service.MetricAsync(Metric, ("surface", "grpc"), ("reason", "missing")));

        // With the token the call reaches the service, which answers for itself (no such dataset).
        var known = await Assert.ThrowsAsync<RpcException>(() => client.GetManifestAsync(new DataManifestRequest { DatasetId = "absent" }, Bearer(Token)).ResponseAsync);
        Assert.NotEqual(StatusCode.Unauthenticated, known.StatusCode);

        // Without it: unary, a prepare (which would write), a server stream; then a wrong token.
        await AssertRefused(() => client.GetManifestAsync(new DataManifestRequest { DatasetId = "absent" }).ResponseAsync);
        await AssertRefused(() => client.PrepareAsync(new PrepareRequest { SeqLen = 8, VocabSize = 300, Sources = { new Source { Name = "x", Path = "/etc/passwd", Weight = 1 } } }).ResponseAsync);
        await AssertRefused(async () =>
        {
            using var batch = client.GetBatch(new GetBatchRequest { DatasetId = "absent", Count = 1 });
            await batch.ResponseStream.MoveNext();
        });
        await AssertRefused(() => client.GetTokenizerAsync(new DataManifestRequest { DatasetId = "absent" }, Bearer("not-the-token")).ResponseAsync);

        Assert.Equal(3, await service.MetricReachingAsync(3, Metric, ("surface", "grpc"), ("reason", "missing")));
        Assert.Equal(1, await service.MetricReachingAsync(1, Metric, ("surface", "grpc"), ("reason", "wrong")));
        Assert.False(Directory.Exists(Path.Combine(root, "work")) && Directory.EnumerateFileSystemEntries(Path.Combine(root, "work")).Any(),
            "a refused Prepare must not have started");
        await AssertLoggedWithoutSecrets(service, "Prepare");
    }

    [Fact]
    public async Task CheckpointStoreRefusesAndCountsEveryCallWithoutTheClusterToken()
    {
        string folder = Directory.CreateTempSubdirectory("token-store-").FullName;
        await using var service = await ServiceProcess.StartAsync("CheckpointStore", new Dictionary<string, string>
        {
            ["Cluster__Token"] = Token,
            ["Storage__Folder"] = folder,
        });
        using var channel = GrpcChannel.ForAddress(service.GrpcAddress);
        var client = new CheckpointStore.CheckpointStoreClient(channel);
        const string Metric = "deepseek_checkpoint_store_auth_refusals_total";
        Assert.Equal(0, await service.MetricAsync(Metric, ("surface", "grpc"), ("reason", "missing")));

        var listed = await client.ListCheckpointsAsync(new ListCheckpointsRequest { Job = "job-1" }, Bearer(Token));
        Assert.Empty(listed.Checkpoints);

        await AssertRefused(() => client.CommitCheckpointAsync(new CommitCheckpointRequest { Job = "job-1", Step = 10, Generation = 1, ManifestJson = "{}" }).ResponseAsync);
        await AssertRefused(() => client.ApplyRetentionAsync(new ApplyRetentionRequest { Job = "job-1", KeepLast = 1 }).ResponseAsync);
        await AssertRefused(async () =>
        {
            using var download = client.DownloadTensor(new DownloadTensorRequest { Job = "job-1", Step = 10, TensorName = "w" });
            await download.ResponseStream.MoveNext();
        });
        await AssertRefused(async () =>
        {
            // The gate refuses at the call's start, before the stream is read; a message written meanwhile raced that
            // refusal and failed as Cancelled in a CI run, so the call sends none and awaits its status.
            using var upload = client.UploadShard();
            await upload.ResponseAsync;
        });
        await AssertRefused(() => client.ListCheckpointsAsync(new ListCheckpointsRequest { Job = "job-1" }, Bearer("not-the-token")).ResponseAsync);

        Assert.Equal(4, await service.MetricReachingAsync(4, Metric, ("surface", "grpc"), ("reason", "missing")));
        Assert.Equal(1, await service.MetricReachingAsync(1, Metric, ("surface", "grpc"), ("reason", "wrong")));
        Assert.Empty(Directory.EnumerateFiles(folder, "*", SearchOption.AllDirectories)); // nothing committed, nothing uploaded
        await AssertLoggedWithoutSecrets(service, "CommitCheckpoint");
    }

    [Fact]
    public async Task TheClientChannelOfTheWorkersAndTheCoordinatorSendsTheToken()
    {
        // ClusterChannel.For(..., token) is what the workers and the Coordinator's committer dial with.
        string folder = Directory.CreateTempSubdirectory("token-channel-").FullName;
        await using var service = await ServiceProcess.StartAsync("CheckpointStore", new Dictionary<string, string>
        {
            ["Cluster__Token"] = Token,
            ["Storage__Folder"] = folder,
        });
        using var withToken = ClusterChannel.For(service.GrpcAddress, tls: null, "services__checkpoints__grpc__0", token: Token);
        Assert.Empty((await new CheckpointStore.CheckpointStoreClient(withToken).ListCheckpointsAsync(new ListCheckpointsRequest { Job = "j" })).Checkpoints);
        using var without = ClusterChannel.For(service.GrpcAddress, tls: null, "services__checkpoints__grpc__0");
        await AssertRefused(() => new CheckpointStore.CheckpointStoreClient(without).ListCheckpointsAsync(new ListCheckpointsRequest { Job = "j" }).ResponseAsync);
    }

    static async Task AssertRefused(Func<Task> call)
    {
        var e = await Assert.ThrowsAsync<RpcException>(call);
        Assert.Equal(StatusCode.Unauthenticated, e.StatusCode);
    }

    /// <summary>The refusal is logged with the method, and the token appears in no line (polled: the log is asynchronous).</summary>
    static async Task AssertLoggedWithoutSecrets(ServiceProcess service, string method)
    {
        var until = DateTime.UtcNow.AddSeconds(30);
        while (!service.Output.Contains($"/{method}", StringComparison.Ordinal) && DateTime.UtcNow < until) await Task.Delay(50);
        Assert.Contains("Refused", service.Output);
        Assert.Contains($"/{method}", service.Output);
        Assert.DoesNotContain(Token, service.Output);
        Assert.DoesNotContain("not-the-token", service.Output);
    }
}
