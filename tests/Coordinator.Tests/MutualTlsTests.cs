// Mutual TLS on ClusterControl over real sockets: the real Coordinator on real Kestrel ports, with a CA, a server
// certificate and client certificates made at test time (tests/Shared/TestPki.cs) and handed over as PEM files (the
// shape a Kubernetes Secret mounts). A member registers and heartbeats; no certificate, or one of another CA, is refused in the handshake,
// counted and logged without secrets; the worker's side refuses a server of another CA; bad files stop the start.
using System.Net.Security;
using System.Net.Http.Json;
using DeepSeekCluster.Contracts.Control;
using DeepSeekCluster.Contracts.Grains;
using DeepSeekCluster.ServiceDefaults;
using Grpc.Core;
using Grpc.Net.Client;
using Microsoft.AspNetCore.Builder;
using Microsoft.Extensions.Hosting;

namespace DeepSeekCluster.Coordinator.Tests;

/// <summary>
/// Alone, after the parallel collections: the hosts in this process share meter names, and OpenTelemetry merges the
/// same-named instruments of different hosts into one stream that ends when any of those hosts stops, so another
/// collection's Coordinator or silo stopping mid-test would silence this host's refusal counter on /metrics.
/// </summary>
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class MutualTlsCollection
{
    public const string Name = "mutual-tls";
}

[Collection(MutualTlsCollection.Name)]
public sealed class MutualTlsTests(MutualTlsTests.TlsCoordinator coordinator) : IClassFixture<MutualTlsTests.TlsCoordinator>
{
    static Metadata Bearer => new() { { "authorization", $"Bearer {CoordinatorHost.Token}" } };

    [Fact]
    public async Task AWorkerWithACertificateOfTheClusterCaRegistersAndHeartbeats()
    {
        // The options GpuWorker's ClusterWorker puts on its control channel (WorkerSettings.Tls.ClientOptions()).
        using var channel = coordinator.Channel(coordinator.Pki.Member().ClientOptions());
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(60));
        using var stream = new ClusterControl.ClusterControlClient(channel).Connect(Bearer, cancellationToken: cts.Token);
        await stream.RequestStream.WriteAsync(new WorkerMessage { Hello = new Hello { WorkerId = "tls-member", Device = "cpu", Host = "127.0.0.1", CollectiveEndpoint = "127.0.0.1:41101" } });
        await stream.RequestStream.WriteAsync(new WorkerMessage { Heartbeat = new Heartbeat { Generation = 0, MemoryUsedBytes = 424242 } });

        var member = await TestSpecs.EventuallyAsync(() => coordinator.WorkerAsync("tls-member"),
            w => w is { Online: true, Metrics.MemoryUsedBytes: 424242 }, "the member's registration and heartbeat over mutual TLS", seconds: 30);
        Assert.NotNull(member!.LastHeartbeat);
        await stream.RequestStream.CompleteAsync();
    }

    [Fact]
    public async Task AClientWithoutACertificateIsRefusedInTheHandshakeCountedAndLogged()
    {
        Assert.DoesNotContain(CoordinatorHost.Token, await coordinator.Http.GetStringAsync("/metrics"));
        await coordinator.Host.AssertRefusedAsync(coordinator.Pki, presenting: null, ClusterTls.Missing, "ClusterControl", "no client certificate presented",
            "tls-anonymous", channel => ConnectAsync(channel, "tls-anonymous"), CoordinatorHost.Token);
        // The token was right: only the handshake kept it out.
        Assert.Null(await coordinator.WorkerAsync("tls-anonymous"));
    }

    [Fact]
    public async Task AClientWithACertificateOfAnotherCaIsRefusedInTheHandshakeCountedAndLogged()
    {
        await coordinator.Host.AssertRefusedAsync(coordinator.Pki, coordinator.Pki.Stranger(), ClusterTls.Untrusted, "ClusterControl",
            "'CN=stranger' issued by 'CN=some other CA', SHA-256", "tls-stranger", channel => ConnectAsync(channel, "tls-stranger"), CoordinatorHost.Token);
        Assert.Null(await coordinator.WorkerAsync("tls-stranger"));
    }

    [Fact]
    public Task AWorkerRefusesACoordinatorWhoseCertificateIsNotOfItsCa() =>
        // A worker of another cluster (its CA is OtherCa): it must not talk to this Coordinator, whatever the server thinks of it.
        coordinator.Host.AssertAStrangerRefusesTheServiceAsync(coordinator.Pki, "services__coordinator__grpc__0", channel => new ClusterControl.ClusterControlClient(channel)
            .GetJobAsync(new GetJobRequest { JobId = "none" }, Bearer, deadline: DateTime.UtcNow.AddSeconds(30)).ResponseAsync);

    [Fact]
    public async Task APlainHttp2ClientGetsNothingFromTheTlsEndpoint()
    {
        using var channel = GrpcChannel.ForAddress($"http://127.0.0.1:{coordinator.GrpcPort}");
        var e = await Assert.ThrowsAsync<RpcException>(() => new ClusterControl.ClusterControlClient(channel)
            .GetJobAsync(new GetJobRequest { JobId = "none" }, Bearer, deadline: DateTime.UtcNow.AddSeconds(30)).ResponseAsync);
        Assert.NotEqual(StatusCode.NotFound, e.StatusCode); // NotFound would be an answer from the service
    }

    /// <summary>A worker's Hello and heartbeat, with the right token: only the handshake can keep it out.</summary>
    static async Task ConnectAsync(GrpcChannel channel, string workerId)
    {
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(30));
        using var stream = new ClusterControl.ClusterControlClient(channel).Connect(Bearer, cancellationToken: cts.Token);
        await stream.RequestStream.WriteAsync(new WorkerMessage { Hello = new Hello { WorkerId = workerId, Device = "cpu", Host = "127.0.0.1", CollectiveEndpoint = "127.0.0.1:41102" } });
        await stream.RequestStream.WriteAsync(new WorkerMessage { Heartbeat = new Heartbeat { Generation = 0 } });
        await stream.ResponseStream.MoveNext(cts.Token);
    }

    [Fact]
    public void AMissingFileStopsTheStartNamingTheKeyAndPath()
    {
        var pki = TestPki.Create();
        string missing = Path.Combine(pki.Folder, "no-such-ca.crt");
        var e = Assert.Throws<ArgumentException>(() => TlsCoordinator.Build(TlsCoordinator.Settings(pki, ca: missing)));
        Assert.Contains($"{ClusterTls.CaPathKey}='{missing}': no such file", e.Message);
    }

    [Fact]
    public void AKeyThatIsNotTheCertificatesStopsTheStartNamingTheKeyAndPath()
    {
        var pki = TestPki.Create();
        var e = Assert.Throws<ArgumentException>(() => TlsCoordinator.Build(TlsCoordinator.Settings(pki, key: pki.ClientKey)));
        Assert.Contains($"{ClusterTls.KeyPathKey}='{pki.ClientKey}' is not the private key of the certificate in {ClusterTls.CertificatePathKey}='{pki.ServerCertificate}'", e.Message);
        Assert.DoesNotContain("PRIVATE KEY", e.Message);
    }

    [Fact]
    public void ACertificateOfAnotherCaStopsTheStart()
    {
        var pki = TestPki.Create();
        var e = Assert.Throws<ArgumentException>(() => TlsCoordinator.Build(TlsCoordinator.Settings(pki, certificate: pki.StrangerCertificate, key: pki.StrangerKey)));
        Assert.Contains($"{ClusterTls.CertificatePathKey}='{pki.StrangerCertificate}'", e.Message);
        Assert.Contains($"does not chain to the CA in {ClusterTls.CaPathKey}='{pki.Ca}'", e.Message);
    }

    [Fact]
    public void HalfAConfigurationOrACleartextEndpointStopsTheStart()
    {
        var pki = TestPki.Create();
        var half = TlsCoordinator.Settings(pki);
        half[ClusterTls.CaPathKey] = null;
        var e = Assert.Throws<ArgumentException>(() => TlsCoordinator.Build(half));
        Assert.Contains($"but {ClusterTls.CaPathKey} not", e.Message);

        var cleartext = TlsCoordinator.Settings(pki);
        cleartext["Kestrel:Endpoints:grpc:Url"] = "http://127.0.0.1:1";
        e = Assert.Throws<ArgumentException>(() => TlsCoordinator.Build(cleartext));
        Assert.Contains("Kestrel:Endpoints:grpc:Url='http://127.0.0.1:1' is not an https:// URL", e.Message);
    }

    /// <summary>The real Coordinator with mutual TLS on its gRPC endpoint (ServiceDefaults' ClusterTlsEndpoint), its log lines captured.</summary>
    public sealed class TlsCoordinator : IAsyncLifetime
    {
        public TestPki Pki { get; } = TestPki.Create();
        public TlsServiceHost Host { get; private set; } = null!;
        public int GrpcPort => Host.GrpcPort;
        public HttpClient Http => Host.Http;

        /// <summary>The Coordinator's own settings besides its endpoints and Cluster:Tls:*: the token, state folder, silo ports.</summary>
        public static Dictionary<string, string?> CoordinatorSettings() => new()
        {
            ["Cluster:Token"] = CoordinatorHost.Token,
            ["Coordinator:StateFolder"] = TestSpecs.TempFolder(),
            ["Coordinator:HeartbeatTimeout"] = "00:00:30",
            ["Orleans:SiloPort"] = FreePort.Next().ToString(),
            ["Orleans:GatewayPort"] = FreePort.Next().ToString(),
        };

        /// <summary>Everything a Coordinator with mutual TLS is started with; the TLS files are <paramref name="pki"/>'s server's unless given.</summary>
        public static Dictionary<string, string?> Settings(TestPki pki, string? certificate = null, string? key = null, string? ca = null) =>
            TlsServiceHost.Settings(pki, CoordinatorSettings(), certificate: certificate, key: key, ca: ca);

        public static WebApplication Build(IDictionary<string, string?> settings) =>
            TlsServiceHost.Build(settings, b => b.AddCoordinator(), a => a.MapCoordinator());

        public async Task InitializeAsync() =>
            Host = await TlsServiceHost.StartAsync(Pki, CoordinatorSettings(), b => b.AddCoordinator(), a => a.MapCoordinator(),
                "deepseek_coordinator_auth_refusals_total");

        public GrpcChannel Channel(SslClientAuthenticationOptions ssl) => Host.Channel(ssl);

        public async Task<WorkerStatus?> WorkerAsync(string id) =>
            (await Http.GetFromJsonAsync<WorkerStatus[]>("/workers", JobSpecJson.Options))!.SingleOrDefault(w => w.WorkerId == id);

        public async Task DisposeAsync() => await Host.DisposeAsync();
    }
}
