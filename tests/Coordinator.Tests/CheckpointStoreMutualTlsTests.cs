// Mutual TLS on CheckpointStore over real sockets: the real store (folder backend) on real Kestrel ports with the
// cluster's certificates made at test time. A worker uploads a shard and the real Coordinator (itself on mutual TLS)
// commits it, both through ClusterChannel; no certificate, or one of another CA, is refused in the handshake, counted in
// deepseek_checkpoint_store_auth_refusals_total and logged without secrets; a client of another CA refuses the store;
// /metrics and /health stay cleartext.
using System.Security.Cryptography;
using DeepSeekCluster.CheckpointStore;
using System.Text.Json;
using DeepSeekCluster.Contracts.Checkpoints;
using DeepSeekCluster.Contracts.Control;
using DeepSeekCluster.ServiceDefaults;
using Google.Protobuf;
using Grpc.Core;
using Grpc.Net.Client;
using Store = DeepSeekCluster.Contracts.Checkpoints.CheckpointStore;

namespace DeepSeekCluster.Coordinator.Tests;

[Collection(MutualTlsCollection.Name)]
public sealed class CheckpointStoreMutualTlsTests(CheckpointStoreMutualTlsTests.TlsStore store) : IClassFixture<CheckpointStoreMutualTlsTests.TlsStore>
{
    [Fact]
    public async Task AMemberWithACertificateOfTheClusterCaUploadsAShard()
    {
        // The channel TrainingRun creates: this process's certificate, the cluster CA alone.
        using var channel = ClusterChannel.For(store.Host.GrpcAddress, store.Pki.Member(), "services__checkpoints__grpc__0");
        var client = new Store.CheckpointStoreClient(channel);
        byte[] bytes = RandomNumberGenerator.GetBytes(100_000);
        string sha = await UploadAsync(client, "tls-job", 3, bytes, chunk: 60_000);

        var status = await client.GetUploadStatusAsync(new UploadStatusRequest { Job = "tls-job", Step = 3, FileName = "rank-0.safetensors", Sha256 = sha });
        Assert.True(status.Complete, "the store holds the uploaded shard under its final name");
        Assert.Equal(bytes.Length, status.ReceivedBytes);
    }

    [Fact]
    public async Task TheCoordinatorCommitsIntoTheStoreWithItsCertificate()
    {
        // The Coordinator over mutual TLS too, its committer dialling the store's https address with the Coordinator's
        // certificate (server and client usage, as docs/kubernetes.md issues it).
        var settings = MutualTlsTests.TlsCoordinator.CoordinatorSettings();
        settings[CheckpointCommitterKey] = store.Host.GrpcAddress.ToString();
        await using var coordinator = await TlsServiceHost.StartAsync(store.Pki, settings, b => b.AddCoordinator(), a => a.MapCoordinator(),
            "deepseek_coordinator_auth_refusals_total");
        using var control = coordinator.Channel(store.Pki.Member().ClientOptions());
        var bearer = new Metadata { { "authorization", $"Bearer {CoordinatorHost.Token}" } };
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(60));
        using var worker = new ClusterControl.ClusterControlClient(control).Connect(bearer, cancellationToken: cts.Token);
        await worker.RequestStream.WriteAsync(new WorkerMessage { Hello = new Hello { WorkerId = "tls-w0", Device = "cpu", Host = "127.0.0.1", CollectiveEndpoint = "127.0.0.1:41103" } });
        string spec = JsonSerializer.Serialize(TestSpecs.Tiny(minWorkers: 1, maxWorkers: 1, steps: 100) with { Name = "tls-commit" }, DeepSeekCluster.Contracts.Grains.JobSpecJson.Options);
        var job = await new ClusterControl.ClusterControlClient(control).SubmitJobAsync(new SubmitJobRequest { JobSpecJson = spec }, bearer);
        Assignment? assignment = null;
        try
        {
            while (assignment is null && await worker.ResponseStream.MoveNext(cts.Token)) assignment = worker.ResponseStream.Current.Assignment;
        }
        catch (RpcException) when (cts.IsCancellationRequested)
        {
            // What the Coordinator did instead (seen once in CI under load): its log says where the formation stopped.
            Assert.Fail($"no assignment for tls-w0 within 60 s; the Coordinator's log:\n{string.Join("\n", coordinator.Logs.TakeLast(60))}");
        }
        Assert.NotNull(assignment);

        // The worker's side: upload over its own TLS channel, then report; the Coordinator commits over its channel.
        using var channel = ClusterChannel.For(store.Host.GrpcAddress, store.Pki.Member(), "services__checkpoints__grpc__0");
        var client = new Store.CheckpointStoreClient(channel);
        byte[] shard = RandomNumberGenerator.GetBytes(50_000);
        string sha = await UploadAsync(client, job.JobId, 2, shard, chunk: shard.Length);
        string manifest = JsonSerializer.Serialize(new { format = "deepseek-cluster/sharded-checkpoint/1", job = job.JobId, step = 2, generation = assignment!.Generation,
            consumed_samples = 16, layout = new { dp = 1, pp = 1 }, tensors = new { } });
        await worker.RequestStream.WriteAsync(new WorkerMessage
        {
            Checkpoint = new CheckpointReport
            {
                Generation = assignment.Generation, Step = 2, Rank = 0, File = "rank-0.safetensors", SizeBytes = shard.Length, Sha256 = sha, ManifestJson = manifest,
            },
        });

        var listed = await TestSpecs.EventuallyAsync(() => client.ListCheckpointsAsync(new ListCheckpointsRequest { Job = job.JobId }).ResponseAsync,
            l => l.Checkpoints.Count == 1, "the Coordinator's commit of step 2 over mutual TLS", seconds: 60);
        Assert.Equal((2L, 1, (long)shard.Length), (listed.Checkpoints[0].Step, listed.Checkpoints[0].FileCount, listed.Checkpoints[0].TotalBytes));
        Assert.DoesNotContain(store.Host.Logs, l => l.Contains("Refused a TLS connection")); // neither client was refused
        await worker.RequestStream.CompleteAsync();
    }

    [Fact]
    public Task AClientWithoutACertificateIsRefusedCountedAndLogged() =>
        store.Host.AssertRefusedAsync(store.Pki, presenting: null, ClusterTls.Missing, "CheckpointStore", "no client certificate presented",
            "tls-anonymous", channel => ListAsync(channel, "tls-anonymous"));

    [Fact]
    public Task AClientWithACertificateOfAnotherCaIsRefusedCountedAndLogged() =>
        store.Host.AssertRefusedAsync(store.Pki, store.Pki.Stranger(), ClusterTls.Untrusted, "CheckpointStore", "'CN=stranger' issued by 'CN=some other CA', SHA-256",
            "tls-stranger", channel => ListAsync(channel, "tls-stranger"));

    [Fact]
    public Task AClientOfAnotherCaRefusesTheStore() =>
        // A member of another cluster: whatever the store thinks of it, it must not send its shards there.
        store.Host.AssertAStrangerRefusesTheServiceAsync(store.Pki, CheckpointCommitterKey, channel => ListAsync(channel, "tls-job"));

    [Fact]
    public async Task ProbesAndMetricsStayCleartext()
    {
        Assert.Equal("Healthy", await store.Host.Http.GetStringAsync("/health"));
        Assert.Contains("deepseek_checkpoint_store_auth_refusals_total", await store.Host.Http.GetStringAsync("/metrics"));
    }

    [Fact]
    public void ACleartextAddressWithCertificatesIsRefusedNamingTheKey()
    {
        var e = Assert.Throws<ArgumentException>(() => ClusterChannel.For(new Uri("http://checkpoints:8081"), store.Pki.Member(), CheckpointCommitterKey));
        Assert.Contains($"{CheckpointCommitterKey}='http://checkpoints:8081/' must be an https:// address", e.Message);
    }

    const string CheckpointCommitterKey = Checkpoints.CheckpointCommitter.AddressKey;

    /// <summary>Uploads <paramref name="bytes"/> as rank 0's shard of a step, in chunks; returns its SHA-256, which the store confirmed.</summary>
    static async Task<string> UploadAsync(Store.CheckpointStoreClient client, string job, long step, byte[] bytes, int chunk)
    {
        string sha = Convert.ToHexStringLower(SHA256.HashData(bytes));
        using var call = client.UploadShard(deadline: DateTime.UtcNow.AddSeconds(60));
        await call.RequestStream.WriteAsync(new UploadShardMessage { Header = new UploadHeader { Job = job, Step = step, Rank = 0, TotalSize = bytes.Length, Sha256 = sha } });
        for (int offset = 0; offset < bytes.Length; offset += chunk)
            await call.RequestStream.WriteAsync(new UploadShardMessage
            {
                Chunk = new UploadChunk { Offset = offset, Data = ByteString.CopyFrom(bytes, offset, Math.Min(chunk, bytes.Length - offset)) },
            });
        await call.RequestStream.CompleteAsync();
        var reply = await call;
        Assert.Equal((bytes.Length, sha), (reply.Size, reply.Sha256));
        return sha;
    }

    static Task ListAsync(GrpcChannel channel, string job) => new Store.CheckpointStoreClient(channel)
        .ListCheckpointsAsync(new ListCheckpointsRequest { Job = job }, deadline: DateTime.UtcNow.AddSeconds(30)).ResponseAsync;

    /// <summary>The real CheckpointStore with mutual TLS, on a folder of its own.</summary>
    public sealed class TlsStore : IAsyncLifetime
    {
        public TestPki Pki { get; } = TestPki.Create();
        public TlsServiceHost Host { get; private set; } = null!;

        public async Task InitializeAsync() =>
            Host = await TlsServiceHost.StartAsync(Pki, new Dictionary<string, string?> { ["Storage:Folder"] = Path.Combine(Pki.Folder, "blobs") },
                b => b.AddCheckpointStore(), a => a.MapCheckpointStore(), "deepseek_checkpoint_store_auth_refusals_total");

        public async Task DisposeAsync() => await Host.DisposeAsync();
    }
}
