// Mutual TLS on DataShardService over real sockets: the real service (folder store) on real Kestrel ports with the
// cluster's certificates made at test time. A worker-side client (the ClusterChannel TrainingRun creates) prepares a
// small corpus and reads a batch; no certificate, or one of another CA, is refused in the handshake, counted in
// deepseek_data_auth_refusals_total and logged without secrets; a client of another CA refuses the service; /health
// and /metrics stay cleartext for kubelet and Prometheus; a half-set configuration stops the start naming the key.
using DeepSeekCluster.Contracts.DataShards;
using DeepSeekCluster.DataShardService.Serving;
using DeepSeekCluster.ServiceDefaults;
using Grpc.Core;
using Grpc.Net.Client;

namespace DeepSeekCluster.DataShardService.Tests;

/// <summary>
/// Alone: every host in this process that exports DeepSeekCluster* meters sees every other host's same-named
/// instruments, and another host stopping mid-test could end the stream that carries this host's refusal counter.
/// </summary>
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class MutualTlsCollection
{
    public const string Name = "mutual-tls";
}

[Collection(MutualTlsCollection.Name)]
public sealed class MutualTlsTests(MutualTlsTests.TlsDataShards service) : IClassFixture<MutualTlsTests.TlsDataShards>
{
    const string AddressKey = "services__data-shards__grpc__0";

    [Fact]
    public async Task AWorkerWithACertificateOfTheClusterCaPreparesAndGetsABatch()
    {
        using var channel = ClusterChannel.For(service.Host.GrpcAddress, service.Pki.Member(), AddressKey);
        var client = new DataShards.DataShardsClient(channel);
        string input = TestCorpus.NewFolder("tls-input");
        TestCorpus.WritePlain(input, "bible.txt", TestCorpus.FirstChapters(20));
        var prepared = await client.PrepareAsync(TestCorpus.Request(32, 300, 400, new Source { Name = "bible", Path = input }),
            deadline: DateTime.UtcNow.AddMinutes(5));
        Assert.True(prepared.TrainSamples > 4, $"the prepared corpus has {prepared.TrainSamples} train samples");

        using var call = client.GetBatch(new GetBatchRequest { DatasetId = prepared.DatasetId, Count = 4 }, deadline: DateTime.UtcNow.AddSeconds(60));
        var samples = new List<Sample>();
        while (await call.ResponseStream.MoveNext(CancellationToken.None)) samples.Add(call.ResponseStream.Current);
        Assert.Equal(4, samples.Count);
        Assert.All(samples, s => Assert.Equal(33, s.Tokens.Count)); // seq_len + 1 tokens: inputs and shifted targets
    }

    [Fact]
    public Task AClientWithoutACertificateIsRefusedCountedAndLogged() =>
        service.Host.AssertRefusedAsync(service.Pki, presenting: null, ClusterTls.Missing, "DataShards", "no client certificate presented",
            "ds-anonymous0000", channel => GetBatchAsync(channel, "ds-anonymous0000"));

    [Fact]
    public Task AClientWithACertificateOfAnotherCaIsRefusedCountedAndLogged() =>
        service.Host.AssertRefusedAsync(service.Pki, service.Pki.Stranger(), ClusterTls.Untrusted, "DataShards", "'CN=stranger' issued by 'CN=some other CA', SHA-256",
            "ds-stranger00000", channel => GetBatchAsync(channel, "ds-stranger00000"));

    [Fact]
    public Task AWorkerOfAnotherCaRefusesTheService() =>
        service.Host.AssertAStrangerRefusesTheServiceAsync(service.Pki, AddressKey, channel => GetBatchAsync(channel, "ds-none"));

    [Fact]
    public async Task APlainHttp2ClientGetsNoAnswerFromTheTlsEndpoint()
    {
        using var channel = GrpcChannel.ForAddress($"http://127.0.0.1:{service.Host.GrpcPort}");
        var e = await Assert.ThrowsAsync<RpcException>(() => new DataShards.DataShardsClient(channel)
            .GetManifestAsync(new GetManifestRequest { DatasetId = "ds-none" }, deadline: DateTime.UtcNow.AddSeconds(30)).ResponseAsync);
        Assert.NotEqual(StatusCode.NotFound, e.StatusCode); // NotFound would be the service's answer
    }

    [Fact]
    public async Task ProbesAndMetricsStayCleartext()
    {
        Assert.Equal("Healthy", await service.Host.Http.GetStringAsync("/alive"));
        Assert.Contains("deepseek_data_auth_refusals_total", await service.Host.Http.GetStringAsync("/metrics"));
    }

    [Fact]
    public void HalfAConfigurationACleartextEndpointOrAMissingFileStopsTheStart()
    {
        var half = Settings(service.Pki);
        half[ClusterTls.KeyPathKey] = null;
        var e = Assert.Throws<ArgumentException>(() => Build(half));
        Assert.Contains($"{ClusterTls.CertificatePathKey}='{service.Pki.ServerCertificate}'", e.Message);
        Assert.Contains($"but {ClusterTls.KeyPathKey} not", e.Message);

        var cleartext = Settings(service.Pki);
        cleartext["Kestrel:Endpoints:grpc:Url"] = "http://127.0.0.1:1";
        e = Assert.Throws<ArgumentException>(() => Build(cleartext));
        Assert.Contains("so DataShards serves mutual TLS, but Kestrel:Endpoints:grpc:Url='http://127.0.0.1:1' is not an https:// URL", e.Message);

        string missing = Path.Combine(service.Pki.Folder, "no-such.key");
        e = Assert.Throws<ArgumentException>(() => Build(Settings(service.Pki, key: missing)));
        Assert.Contains($"{ClusterTls.KeyPathKey}='{missing}': no such file", e.Message);
    }

    static Dictionary<string, string?> Settings(TestPki pki, string? key = null) => TlsServiceHost.Settings(pki, TlsDataShards.StoreSettings(pki.Folder), key: key);

    static void Build(Dictionary<string, string?> settings) =>
        TlsServiceHost.Build(settings, b => b.AddDataShards(), a => a.MapDataShards());

    static async Task GetBatchAsync(GrpcChannel channel, string datasetId)
    {
        using var call = new DataShards.DataShardsClient(channel).GetBatch(new GetBatchRequest { DatasetId = datasetId, Count = 1 },
            deadline: DateTime.UtcNow.AddSeconds(30));
        await call.ResponseStream.MoveNext(CancellationToken.None);
    }

    /// <summary>The real DataShardService with mutual TLS, on folders of its own.</summary>
    public sealed class TlsDataShards : IAsyncLifetime
    {
        public TestPki Pki { get; } = TestPki.Create();
        public TlsServiceHost Host { get; private set; } = null!;

        public static Dictionary<string, string?> StoreSettings(string folder) => new()
        {
            ["DataShards:Root"] = Path.Combine(folder, "datasets"),
            ["DataShards:WorkDir"] = Path.Combine(folder, "work"),
        };

        public async Task InitializeAsync() =>
            Host = await TlsServiceHost.StartAsync(Pki, StoreSettings(Pki.Folder), b => b.AddDataShards(), a => a.MapDataShards(),
                "deepseek_data_auth_refusals_total");

        public async Task DisposeAsync() => await Host.DisposeAsync();
    }
}
