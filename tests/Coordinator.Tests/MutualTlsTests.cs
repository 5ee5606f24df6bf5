// Mutual TLS on ClusterControl over real sockets: the real Coordinator on real Kestrel ports, with a CA, a server
// certificate and client certificates made at test time and handed over as PEM files (the shape a Kubernetes Secret
// mounts). A member registers and heartbeats; no certificate, or one of another CA, is refused in the handshake,
// counted and logged without secrets; the worker's side refuses a server of another CA; bad files stop the start.
using System.Collections.Concurrent;
using System.Net;
using System.Net.Security;
using System.Net.Http.Json;
using System.Security.Authentication;
using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;
using System.Text.RegularExpressions;
using DeepSeekCluster.Contracts.Control;
using DeepSeekCluster.Contracts.Grains;
using DeepSeekCluster.ServiceDefaults;
using Grpc.Core;
using Grpc.Net.Client;
using Microsoft.AspNetCore.Builder;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;

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
        var pki = Pki.Create();
        string missing = Path.Combine(pki.Folder, "no-such-ca.crt");
        var e = Assert.Throws<ArgumentException>(() => TlsCoordinator.Build(pki.Settings(ca: missing)));
        Assert.Contains($"{ClusterTls.CaPathKey}='{missing}': no such file", e.Message);
    }

    [Fact]
    public void AKeyThatIsNotTheCertificatesStopsTheStartNamingTheKeyAndPath()
    {
        var pki = Pki.Create();
        var e = Assert.Throws<ArgumentException>(() => TlsCoordinator.Build(pki.Settings(key: pki.ClientKey)));
        Assert.Contains($"{ClusterTls.KeyPathKey}='{pki.ClientKey}' is not the private key of the certificate in {ClusterTls.CertificatePathKey}='{pki.ServerCertificate}'", e.Message);
        Assert.DoesNotContain("PRIVATE KEY", e.Message);
    }

    [Fact]
    public void ACertificateOfAnotherCaStopsTheStart()
    {
        var pki = Pki.Create();
        var e = Assert.Throws<ArgumentException>(() => TlsCoordinator.Build(pki.Settings(certificate: pki.StrangerCertificate, key: pki.StrangerKey)));
        Assert.Contains($"{ClusterTls.CertificatePathKey}='{pki.StrangerCertificate}'", e.Message);
        Assert.Contains($"does not chain to the CA in {ClusterTls.CaPathKey}='{pki.Ca}'", e.Message);
    }

    [Fact]
    public void HalfAConfigurationOrACleartextEndpointStopsTheStart()
    {
        var pki = Pki.Create();
        var half = pki.Settings();
        half[ClusterTls.CaPathKey] = null;
        var e = Assert.Throws<ArgumentException>(() => TlsCoordinator.Build(half));
        Assert.Contains($"but {ClusterTls.CaPathKey} not", e.Message);

        var cleartext = pki.Settings();
        cleartext["Kestrel:Endpoints:grpc:Url"] = "http://127.0.0.1:1";
        e = Assert.Throws<ArgumentException>(() => TlsCoordinator.Build(cleartext));
        Assert.Contains("Kestrel:Endpoints:grpc:Url='http://127.0.0.1:1' is not an https:// URL", e.Message);
    }

    /// <summary>A CA, the Coordinator's server certificate, a member's client certificate, and another CA with its own client: PEM files.</summary>
    public sealed record Pki(string Folder, string Ca, string ServerCertificate, string ServerKey, string ClientCertificate, string ClientKey,
        string OtherCa, string StrangerCertificate, string StrangerKey)
    {
        public static Pki Create()
        {
            string folder = TestSpecs.TempFolder();
            var ca = Authority("deepseek test cluster CA");
            var other = Authority("some other CA");
            string Write(string name, string pem) { string path = Path.Combine(folder, name); File.WriteAllText(path, pem); return path; }
            var (server, serverKey) = Issue(ca, "coordinator", server: true);
            var (client, clientKey) = Issue(ca, "worker-0", server: false);
            var (stranger, strangerKey) = Issue(other, "stranger", server: false);
            return new Pki(folder, Write("ca.crt", ca.ExportCertificatePem()),
                Write("server.crt", server.ExportCertificatePem()), Write("server.key", serverKey.ExportPkcs8PrivateKeyPem()),
                Write("client.crt", client.ExportCertificatePem()), Write("client.key", clientKey.ExportPkcs8PrivateKeyPem()),
                Write("other-ca.crt", other.ExportCertificatePem()),
                Write("stranger.crt", stranger.ExportCertificatePem()), Write("stranger.key", strangerKey.ExportPkcs8PrivateKeyPem()));
        }

        /// <summary>The Coordinator's settings: the two endpoints (gRPC on https), the token, the three TLS files.</summary>
        public Dictionary<string, string?> Settings(string? certificate = null, string? key = null, string? ca = null, int httpPort = 0, int grpcPort = 0) => new()
        {
            ["Kestrel:Endpoints:http:Url"] = $"http://127.0.0.1:{httpPort}",
            ["Kestrel:Endpoints:http:Protocols"] = "Http1",
            ["Kestrel:Endpoints:grpc:Url"] = $"https://127.0.0.1:{grpcPort}",
            ["Kestrel:Endpoints:grpc:Protocols"] = "Http2",
            ["Cluster:Token"] = CoordinatorHost.Token,
            ["Coordinator:StateFolder"] = TestSpecs.TempFolder(),
            ["Coordinator:HeartbeatTimeout"] = "00:00:30",
            ["Orleans:SiloPort"] = FreePort.Next().ToString(),
            ["Orleans:GatewayPort"] = FreePort.Next().ToString(),
            [ClusterTls.CertificatePathKey] = certificate ?? ServerCertificate,
            [ClusterTls.KeyPathKey] = key ?? ServerKey,
            [ClusterTls.CaPathKey] = ca ?? Ca,
        };

        /// <summary>A self-signed CA certificate, with its private key.</summary>
        static X509Certificate2 Authority(string name)
        {
            using var key = ECDsa.Create(ECCurve.NamedCurves.nistP256);
            var request = new CertificateRequest($"CN={name}", key, HashAlgorithmName.SHA256);
            request.CertificateExtensions.Add(new X509BasicConstraintsExtension(true, false, 0, true));
            request.CertificateExtensions.Add(new X509KeyUsageExtension(X509KeyUsageFlags.KeyCertSign | X509KeyUsageFlags.CrlSign, true));
            request.CertificateExtensions.Add(new X509SubjectKeyIdentifierExtension(request.PublicKey, false));
            return request.CreateSelfSigned(DateTimeOffset.UtcNow.AddHours(-2), DateTimeOffset.UtcNow.AddDays(2));
        }

        static (X509Certificate2, ECDsa) Issue(X509Certificate2 ca, string name, bool server)
        {
            var key = ECDsa.Create(ECCurve.NamedCurves.nistP256);
            var request = new CertificateRequest($"CN={name}", key, HashAlgorithmName.SHA256);
            request.CertificateExtensions.Add(new X509BasicConstraintsExtension(false, false, 0, true));
            request.CertificateExtensions.Add(new X509KeyUsageExtension(X509KeyUsageFlags.DigitalSignature, true));
            request.CertificateExtensions.Add(new X509EnhancedKeyUsageExtension(
                [server ? new Oid("1.3.6.1.5.5.7.3.1") : new Oid("1.3.6.1.5.5.7.3.2")], false));
            request.CertificateExtensions.Add(X509AuthorityKeyIdentifierExtension.CreateFromCertificate(ca, true, false));
            if (server)
            {
                var names = new SubjectAlternativeNameBuilder();
                names.AddDnsName("localhost");
                names.AddIpAddress(IPAddress.Loopback);
                request.CertificateExtensions.Add(names.Build());
            }
            var certificate = request.Create(ca, DateTimeOffset.UtcNow.AddHours(-1), DateTimeOffset.UtcNow.AddDays(1), RandomNumberGenerator.GetBytes(16));
            return (certificate, key);
        }
    }

    /// <summary>The real Coordinator with mutual TLS on its gRPC endpoint, its log lines captured.</summary>
    public sealed class TlsCoordinator : IAsyncLifetime
    {
        WebApplication _app = null!;
        readonly ConcurrentQueue<string> _logs = new();

        public Pki Pki { get; } = Pki.Create();
        public int GrpcPort { get; } = FreePort.Next();
        public int HttpPort { get; } = FreePort.Next();
        public HttpClient Http { get; private set; } = null!;
        public IReadOnlyCollection<string> Logs => _logs;

        public static WebApplication Build(IDictionary<string, string?> settings, ILoggerProvider? logs = null)
        {
            var builder = WebApplication.CreateBuilder(new WebApplicationOptions { EnvironmentName = "Testing" });
            builder.Configuration.AddInMemoryCollection(settings);
            builder.Logging.ClearProviders();
            if (logs is not null)
            {
                builder.Logging.AddProvider(logs);
                // Kestrel says why a handshake failed at Debug only: kept for the failure messages above.
                builder.Logging.AddFilter<CapturingLogger>("Microsoft.AspNetCore.Server.Kestrel.Https", LogLevel.Debug);
            }
            builder.AddBasicServiceDefaults();
            builder.AddCoordinator();
            var app = builder.Build();
            app.MapDefaultEndpoints();
            app.MapCoordinator();
            return app;
        }

        public async Task InitializeAsync()
        {
            _app = Build(Pki.Settings(httpPort: HttpPort, grpcPort: GrpcPort), new CapturingLogger(_logs));
            await _app.StartAsync();
            Http = new HttpClient { BaseAddress = new Uri($"http://127.0.0.1:{HttpPort}") };
        }

        public GrpcChannel Channel(SslClientAuthenticationOptions ssl) => GrpcChannel.ForAddress($"https://127.0.0.1:{GrpcPort}",
            new GrpcChannelOptions { HttpHandler = new SocketsHttpHandler { SslOptions = ssl } });

        public async Task<WorkerStatus?> WorkerAsync(string id) =>
            (await Http.GetFromJsonAsync<WorkerStatus[]>("/workers", CoordinatorJson.Options))!.SingleOrDefault(w => w.WorkerId == id);

        /// <summary>deepseek_coordinator_auth_refusals_total for a surface (and reason), summed; 0 before the first refusal.</summary>
        public async Task<double> RefusalsAsync(string? reason = null, string surface = "tls")
        {
            string text = await Http.GetStringAsync("/metrics");
            Assert.DoesNotContain(CoordinatorHost.Token, text);
            return Regex.Matches(text, @"^deepseek_coordinator_auth_refusals_total\{([^}]*)\} (\S+)", RegexOptions.Multiline)
                .Where(m => m.Groups[1].Value.Contains($"surface=\"{surface}\"") && (reason is null || m.Groups[1].Value.Contains($"reason=\"{reason}\"")))
                .Sum(m => double.Parse(m.Groups[2].Value, System.Globalization.CultureInfo.InvariantCulture));
        }

        /// <summary>Polls the refusal counter; on timeout the failure carries what Kestrel's TLS layer logged.</summary>
        public async Task EventuallyCountedAsync(string reason, double atLeast, string what)
        {
            try { await TestSpecs.EventuallyAsync(() => RefusalsAsync(reason), n => n >= atLeast, what, seconds: 30); }
            catch (TimeoutException e)
            {
                throw new TimeoutException($"{e.Message}\nlog of the TLS layer:\n{string.Join("\n", _logs.Where(l => l.Contains("TLS") || l.Contains("HTTPS") || l.Contains("handshake")).TakeLast(20))}", e);
            }
        }

        /// <summary>Neither the token nor any private key (its PEM armour or its base64 body) is in any log line.</summary>
        public void AssertNoSecretsLogged()
        {
            var secrets = new List<string> { CoordinatorHost.Token, "PRIVATE KEY" };
            foreach (var keyFile in new[] { Pki.ServerKey, Pki.ClientKey, Pki.StrangerKey })
                secrets.AddRange(File.ReadAllLines(keyFile).Where(l => !l.StartsWith("-----", StringComparison.Ordinal)));
            foreach (var line in _logs)
                foreach (var secret in secrets)
                    Assert.False(line.Contains(secret, StringComparison.Ordinal), $"a secret is in the log: {line}");
        }

        public async Task DisposeAsync()
        {
            Http?.Dispose();
            await _app.StopAsync();
            await _app.DisposeAsync();
        }
    }

    sealed class CapturingLogger(ConcurrentQueue<string> lines) : ILoggerProvider, ILogger
    {
        public ILogger CreateLogger(string categoryName) => this;
        public IDisposable? BeginScope<TState>(TState state) where TState : notnull => null;
        public bool IsEnabled(LogLevel logLevel) => true; // the host's filters decide

        public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter)
        {
            lines.Enqueue($"{logLevel}: {formatter(state, exception)} {exception?.GetType().Name}: {exception?.Message}");
        }

        public void Dispose() { }
    }
}
