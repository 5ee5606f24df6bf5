// Mutual TLS on CheckpointStore over real sockets: the real store (folder backend) on real Kestrel ports with the
// cluster's certificates made at test time. A member (a worker, or the Coordinator's committer, through the same
// ClusterChannel) uploads a shard; no certificate, or one of another CA, is refused in the handshake, counted in
// deepseek_checkpoint_store_auth_refusals_total and logged without secrets; a client of another CA refuses the store;
// /metrics and /health stay cleartext.
using System.Security.Cryptography;
using DeepSeekCluster.CheckpointStore;
using DeepSeekCluster.Contracts.Checkpoints;
using DeepSeekCluster.ServiceDefaults;
using Google.Protobuf;
using Grpc.Net.Client;
using Store = DeepSeekCluster.Contracts.Checkpoints.CheckpointStore;

namespace DeepSeekCluster.Coordinator.Tests;

[Collection(MutualTlsCollection.Name)]
public sealed class CheckpointStoreMutualTlsTests(CheckpointStoreMutualTlsTests.TlsStore store) : IClassFixture<CheckpointStoreMutualTlsTests.TlsStore>
{
    [Fact]
    public async Task AMemberWithACertificateOfTheClusterCaUploadsAShard()
    {
        // The channel TrainingRun and CheckpointCommitter create: this process's certificate, the cluster CA alone.
        using var channel = ClusterChannel.For(store.Host.GrpcAddress, store.Pki.Member(), "services__checkpoints__grpc__0");
        var client = new Store.CheckpointStoreClient(channel);
        byte[] bytes = RandomNumberGenerator.GetBytes(100_000);
        string sha = Convert.ToHexStringLower(SHA256.HashData(bytes));

        using (var call = client.UploadShard(deadline: DateTime.UtcNow.AddSeconds(60)))
        {
            await call.RequestStream.WriteAsync(new UploadShardMessage { Header = new UploadHeader { Job = "tls-job", Step = 3, Rank = 0, TotalSize = bytes.Length, Sha256 = sha } });
            await call.RequestStream.WriteAsync(new UploadShardMessage { Chunk = new UploadChunk { Offset = 0, Data = ByteString.CopyFrom(bytes, 0, 60_000) } });
            await call.RequestStream.WriteAsync(new UploadShardMessage { Chunk = new UploadChunk { Offset = 60_000, Data = ByteString.CopyFrom(bytes, 60_000, 40_000) } });
            await call.RequestStream.CompleteAsync();
            var reply = await call;
            Assert.Equal((bytes.Length, sha), (reply.Size, reply.Sha256));
        }
        var status = await client.GetUploadStatusAsync(new UploadStatusRequest { Job = "tls-job", Step = 3, FileName = "rank-0.safetensors", Sha256 = sha });
        Assert.True(status.Complete, "the store holds the uploaded shard under its final name");
        Assert.Equal(bytes.Length, status.ReceivedBytes);
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
