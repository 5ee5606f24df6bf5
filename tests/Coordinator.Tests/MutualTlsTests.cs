// Mutual TLS on ClusterControl over real sockets: the real Coordinator on real Kestrel ports, with a CA, a server
// certificate and client certificates made at test time (tests/Shared/TestPki.cs) and handed over as PEM files (the
// shape a Kubernetes Secret mounts). A member registers and heartbeats; no certificate, or one of another CA, is refused in the handshake,
// counted and logged without secrets; the worker's side refuses a server of another CA; bad files stop the start.
using System.Net.Security;
using System.Net.Http.Json;
using System.Security.Authentication;
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
        var tls = ClusterTls.Load(coordinator.Pki.ClientCertificate, coordinator.Pki.ClientKey, coordinator.Pki.Ca)!;
        using var channel = coordinator.Channel(tls.ClientOptions());
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
        double before = await coordinator.RefusalsAsync(ClusterTls.Missing);
        // It trusts the Coordinator (so the refusal is the server's) but has no certificate to present.
        var trustsServer = ClusterTls.Load(coordinator.Pki.ClientCertificate, coordinator.Pki.ClientKey, coordinator.Pki.Ca)!;
        using var channel = coordinator.Channel(new SslClientAuthenticationOptions
        {
            RemoteCertificateValidationCallback = (_, c, chain, _) => trustsServer.CheckServer(c, chain) is null,
        });
        await AssertRefusedAsync(channel, "tls-anonymous");

        await coordinator.EventuallyCountedAsync(ClusterTls.Missing, before + 1, "the counted refusal of a client without a certificate");
        Assert.Contains(coordinator.Logs, l => l.Contains("Refused a TLS connection to ClusterControl") && l.Contains("no client certificate presented"));
        coordinator.AssertNoSecretsLogged();
    }

    [Fact]
    public async Task AClientWithACertificateOfAnotherCaIsRefusedInTheHandshakeCountedAndLogged()
    {
        double before = await coordinator.RefusalsAsync(ClusterTls.Untrusted);
        var stranger = ClusterTls.Load(coordinator.Pki.StrangerCertificate, coordinator.Pki.StrangerKey, coordinator.Pki.OtherCa)!;
        var trustsServer = ClusterTls.Load(coordinator.Pki.ClientCertificate, coordinator.Pki.ClientKey, coordinator.Pki.Ca)!;
        using var channel = coordinator.Channel(new SslClientAuthenticationOptions
        {
            ClientCertificateContext = stranger.CertificateContext,
            RemoteCertificateValidationCallback = (_, c, chain, _) => trustsServer.CheckServer(c, chain) is null,
        });
        await AssertRefusedAsync(channel, "tls-stranger");

        await coordinator.EventuallyCountedAsync(ClusterTls.Untrusted, before + 1, "the counted refusal of another CA's client");
        Assert.Contains(coordinator.Logs, l => l.Contains("Refused a TLS connection to ClusterControl") && l.Contains("CN=stranger") && l.Contains("not trusted"));
        coordinator.AssertNoSecretsLogged();
    }

    [Fact]
    public async Task AWorkerRefusesACoordinatorWhoseCertificateIsNotOfItsCa()
    {
        // A worker of another cluster (its CA is OtherCa): it must not talk to this Coordinator, whatever the server thinks of it.
        var otherCluster = ClusterTls.Load(coordinator.Pki.StrangerCertificate, coordinator.Pki.StrangerKey, coordinator.Pki.OtherCa)!;
        using var channel = coordinator.Channel(otherCluster.ClientOptions());
        var e = await Assert.ThrowsAsync<RpcException>(() => new ClusterControl.ClusterControlClient(channel)
            .GetJobAsync(new GetJobRequest { JobId = "none" }, Bearer, deadline: DateTime.UtcNow.AddSeconds(30)).ResponseAsync);
        Assert.True(e.StatusCode is StatusCode.Unavailable or StatusCode.Internal, $"expected a transport failure, got {e.StatusCode}");
        Assert.True(Chain(e).OfType<AuthenticationException>().Any(), $"expected the client's handshake to fail on the server certificate: {e}");
    }

    [Fact]
    public async Task APlainHttp2ClientGetsNothingFromTheTlsEndpoint()
    {
        using var channel = GrpcChannel.ForAddress($"http://127.0.0.1:{coordinator.GrpcPort}");
        var e = await Assert.ThrowsAsync<RpcException>(() => new ClusterControl.ClusterControlClient(channel)
            .GetJobAsync(new GetJobRequest { JobId = "none" }, Bearer, deadline: DateTime.UtcNow.AddSeconds(30)).ResponseAsync);
        Assert.NotEqual(StatusCode.NotFound, e.StatusCode); // NotFound would be an answer from the service
    }

    async Task AssertRefusedAsync(GrpcChannel channel, string workerId)
    {
        var client = new ClusterControl.ClusterControlClient(channel);
        var e = await Assert.ThrowsAnyAsync<Exception>(async () =>
        {
            using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(30));
            using var stream = client.Connect(Bearer, cancellationToken: cts.Token);
            await stream.RequestStream.WriteAsync(new WorkerMessage { Hello = new Hello { WorkerId = workerId, Device = "cpu", Host = "127.0.0.1", CollectiveEndpoint = "127.0.0.1:41102" } });
            await stream.RequestStream.WriteAsync(new WorkerMessage { Heartbeat = new Heartbeat { Generation = 0 } });
            await stream.ResponseStream.MoveNext(cts.Token);
        });
        Assert.True(e is RpcException { StatusCode: StatusCode.Unavailable or StatusCode.Internal } or IOException or HttpRequestException,
            $"expected a transport failure, got {e}");
        // The token was right: only the handshake kept it out, and its Hello never reached the gRPC service (whose log
        // would name the worker). Not checked on /metrics: every in-process host's exporter sees every host's meters.
        Assert.Null(await coordinator.WorkerAsync(workerId));
        Assert.DoesNotContain(coordinator.Logs, l => l.Contains(workerId));
    }

    static IEnumerable<Exception> Chain(Exception e)
    {
        for (Exception? x = e; x is not null; x = x.InnerException) yield return x;
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
        TlsServiceHost _host = null!;

        public TestPki Pki { get; } = TestPki.Create();
        public int GrpcPort => _host.GrpcPort;
        public HttpClient Http => _host.Http;
        public IReadOnlyCollection<string> Logs => _host.Logs;

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
        public static Dictionary<string, string?> Settings(TestPki pki, string? certificate = null, string? key = null, string? ca = null)
        {
            var all = TlsServiceHost.Endpoints(0, 0);
            foreach (var (k, v) in pki.Settings(certificate, key, ca).Concat(CoordinatorSettings())) all[k] = v;
            return all;
        }

        public static WebApplication Build(IDictionary<string, string?> settings) =>
            TlsServiceHost.Build(settings, b => b.AddCoordinator(), a => a.MapCoordinator());

        public async Task InitializeAsync() =>
            _host = await TlsServiceHost.StartAsync(Pki, CoordinatorSettings(), b => b.AddCoordinator(), a => a.MapCoordinator(),
                "deepseek_coordinator_auth_refusals_total");

        public GrpcChannel Channel(SslClientAuthenticationOptions ssl) => _host.Channel(ssl);

        public async Task<WorkerStatus?> WorkerAsync(string id) =>
            (await Http.GetFromJsonAsync<WorkerStatus[]>("/workers", CoordinatorJson.Options))!.SingleOrDefault(w => w.WorkerId == id);

        /// <summary>deepseek_coordinator_auth_refusals_total{surface="tls"} for a reason, summed; 0 before the first refusal.</summary>
        public async Task<double> RefusalsAsync(string reason)
        {
            Assert.DoesNotContain(CoordinatorHost.Token, await Http.GetStringAsync("/metrics"));
            return await _host.RefusalsAsync(reason);
        }

        public Task EventuallyCountedAsync(string reason, double atLeast, string what) => _host.EventuallyCountedAsync(reason, atLeast, what);

        /// <summary>Neither the token nor any private key (its PEM armour or its base64 body) is in any log line.</summary>
        public void AssertNoSecretsLogged() => _host.AssertNoSecretsLogged(Pki, CoordinatorHost.Token);

        public async Task DisposeAsync() => await _host.DisposeAsync();
    }
}
