// Mutual TLS on CheckpointStore over real sockets: the real store (folder backend) on real Kestrel ports with the
// cluster's certificates made at test time. A member (a worker, or the Coordinator's committer, through the same
// ClusterChannel) uploads a shard; no certificate, or one of another CA, is refused in the handshake, counted in
// deepseek_checkpoint_store_auth_refusals_total and logged without secrets; a client of another CA refuses the store;
// /metrics and /health stay cleartext.
using System.Net.Security;
using System.Security.Authentication;
using System.Security.Cryptography;
using DeepSeekCluster.CheckpointStore;
using DeepSeekCluster.Contracts.Checkpoints;
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
    public async Task AClientWithoutACertificateIsRefusedCountedAndLogged()
    {
        double before = await store.Host.RefusalsAsync(ClusterTls.Missing);
        var trustsServer = store.Pki.Member();
        using var channel = store.Host.Channel(new SslClientAuthenticationOptions
        {
            RemoteCertificateValidationCallback = (_, c, chain, _) => trustsServer.CheckServer(c, chain) is null,
        });
        await AssertRefusedAsync(channel, "tls-anonymous");

        await store.Host.EventuallyCountedAsync(ClusterTls.Missing, before + 1, "the counted refusal of a client without a certificate");
        Assert.Contains(store.Host.Logs, l => l.Contains("Refused a TLS connection to CheckpointStore") && l.Contains("no client certificate presented"));
        store.Host.AssertNoSecretsLogged(store.Pki);
    }

    [Fact]
    public async Task AClientWithACertificateOfAnotherCaIsRefusedCountedAndLogged()
    {
        double before = await store.Host.RefusalsAsync(ClusterTls.Untrusted);
        var trustsServer = store.Pki.Member();
        using var channel = store.Host.Channel(new SslClientAuthenticationOptions
        {
            ClientCertificateContext = store.Pki.Stranger().CertificateContext,
            RemoteCertificateValidationCallback = (_, c, chain, _) => trustsServer.CheckServer(c, chain) is null,
        });
        await AssertRefusedAsync(channel, "tls-stranger");

        await store.Host.EventuallyCountedAsync(ClusterTls.Untrusted, before + 1, "the counted refusal of another CA's client");
        Assert.Contains(store.Host.Logs, l => l.Contains("Refused a TLS connection to CheckpointStore") && l.Contains("CN=stranger") && l.Contains("not trusted"));
        store.Host.AssertNoSecretsLogged(store.Pki);
    }

    [Fact]
    public async Task AClientOfAnotherCaRefusesTheStore()
    {
        // A member of another cluster: whatever the store thinks of it, it must not send its shards there.
        using var channel = ClusterChannel.For(store.Host.GrpcAddress, store.Pki.Stranger(), "services__checkpoints__grpc__0");
        var e = await Assert.ThrowsAsync<RpcException>(() => new Store.CheckpointStoreClient(channel)
            .ListCheckpointsAsync(new ListCheckpointsRequest { Job = "tls-job" }, deadline: DateTime.UtcNow.AddSeconds(30)).ResponseAsync);
        Assert.True(e.StatusCode is StatusCode.Unavailable or StatusCode.Internal, $"expected a transport failure, got {e.StatusCode}");
        Assert.True(Chain(e).OfType<AuthenticationException>().Any(), $"expected the client's handshake to fail on the server certificate: {e}");
    }

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

    async Task AssertRefusedAsync(GrpcChannel channel, string job)
    {
        var e = await Assert.ThrowsAnyAsync<Exception>(() => new Store.CheckpointStoreClient(channel)
            .ListCheckpointsAsync(new ListCheckpointsRequest { Job = job }, deadline: DateTime.UtcNow.AddSeconds(30)).ResponseAsync);
        Assert.True(e is RpcException { StatusCode: StatusCode.Unavailable or StatusCode.Internal } or IOException or HttpRequestException,
            $"expected a transport failure, got {e}");
        Assert.DoesNotContain(store.Host.Logs, l => l.Contains(job)); // the call never reached the service
    }

    static IEnumerable<Exception> Chain(Exception e)
    {
        for (Exception? x = e; x is not null; x = x.InnerException) yield return x;
    }

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
