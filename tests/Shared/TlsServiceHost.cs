// A real service (Coordinator, DataShardService or CheckpointStore) on real Kestrel ports with mutual TLS on its "grpc"
// endpoint and cleartext "http" (probes, /metrics), its log lines captured; reads its TLS refusal counter from /metrics.
using System.Collections.Concurrent;
using System.Net.Security;
using System.Security.Authentication;
using System.Text.RegularExpressions;
using DeepSeekCluster.ServiceDefaults;
using Grpc.Core;
using Grpc.Net.Client;
using Microsoft.AspNetCore.Builder;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;

namespace DeepSeekCluster.Tests.Shared;

public sealed class TlsServiceHost : IAsyncDisposable
{
    readonly WebApplication _app;
    readonly ConcurrentQueue<string> _logs;
    readonly string _refusalCounter;

    TlsServiceHost(WebApplication app, ConcurrentQueue<string> logs, string refusalCounter, int httpPort, int grpcPort)
    {
        (_app, _logs, _refusalCounter, HttpPort, GrpcPort) = (app, logs, refusalCounter, httpPort, grpcPort);
        Http = new HttpClient { BaseAddress = new Uri($"http://127.0.0.1:{httpPort}") };
    }

    public int HttpPort { get; }
    public int GrpcPort { get; }
    public Uri GrpcAddress => new($"https://127.0.0.1:{GrpcPort}");
    /// <summary>The cleartext endpoint, as kubelet and Prometheus reach it.</summary>
    public HttpClient Http { get; }
    public IReadOnlyCollection<string> Logs => _logs;

    /// <summary>The two endpoints of ServiceDefaults' layout: "http" cleartext HTTP/1.1, "grpc" https HTTP/2.</summary>
    public static Dictionary<string, string?> Endpoints(int httpPort, int grpcPort) => new()
    {
        ["Kestrel:Endpoints:http:Url"] = $"http://127.0.0.1:{httpPort}",
        ["Kestrel:Endpoints:http:Protocols"] = "Http1",
        ["Kestrel:Endpoints:grpc:Url"] = $"https://127.0.0.1:{grpcPort}",
        ["Kestrel:Endpoints:grpc:Protocols"] = "Http2",
    };

    /// <summary>
    /// Everything a service with mutual TLS starts with: the endpoints, Cluster:Tls:* (<paramref name="pki"/>'s server
    /// files unless given) and the service's own <paramref name="service"/> settings.
    /// </summary>
    public static Dictionary<string, string?> Settings(TestPki pki, IEnumerable<KeyValuePair<string, string?>> service, int httpPort = 0, int grpcPort = 0,
        string? certificate = null, string? key = null, string? ca = null)
    {
        var all = Endpoints(httpPort, grpcPort);
        foreach (var (k, v) in pki.Settings(certificate, key, ca).Concat(service)) all[k] = v;
        return all;
    }

    /// <summary>The service as its Program.cs builds it: basic ServiceDefaults, <paramref name="add"/>, default endpoints, <paramref name="map"/>.</summary>
    public static WebApplication Build(IDictionary<string, string?> settings, Action<WebApplicationBuilder> add, Action<WebApplication> map, ILoggerProvider? logs = null)
    {
        // An empty content root: no appsettings.json of whichever service project was copied last into the test output.
        var builder = WebApplication.CreateBuilder(new WebApplicationOptions
        {
            EnvironmentName = "Testing", ContentRootPath = Directory.CreateTempSubdirectory("tls-host-").FullName,
        });
        builder.Configuration.AddInMemoryCollection(settings);
        builder.Logging.ClearProviders();
        if (logs is not null)
        {
            builder.Logging.AddProvider(logs);
            // Kestrel says why a handshake failed at Debug only: kept for the failure messages.
            builder.Logging.AddFilter<CapturingLogger>("Microsoft.AspNetCore.Server.Kestrel.Https", LogLevel.Debug);
        }
        builder.AddBasicServiceDefaults();
        add(builder);
        var app = builder.Build();
        app.MapDefaultEndpoints();
        map(app);
        return app;
    }

    /// <summary>
    /// Starts the service with <paramref name="pki"/>'s server certificate on fresh ports; <paramref name="refusalCounter"/>
    /// is the Prometheus name of its counter of refused handshakes (labels surface, reason).
    /// </summary>
    public static async Task<TlsServiceHost> StartAsync(TestPki pki, IDictionary<string, string?> settings, Action<WebApplicationBuilder> add,
        Action<WebApplication> map, string refusalCounter)
    {
        int httpPort = FreePort.Next(), grpcPort = FreePort.Next();
        var logs = new ConcurrentQueue<string>();
        var app = Build(Settings(pki, settings, httpPort, grpcPort), add, map, new CapturingLogger(logs));
        try { await app.StartAsync(); }
        catch
        {
            await app.DisposeAsync();
            throw;
        }
        return new TlsServiceHost(app, logs, refusalCounter, httpPort, grpcPort);
    }

    /// <summary>A channel to the grpc endpoint with exactly these TLS options (a certificate or none, a trust decision).</summary>
    public GrpcChannel Channel(SslClientAuthenticationOptions ssl, GrpcChannelOptions? options = null)
    {
        options ??= new GrpcChannelOptions();
        options.HttpHandler = new SocketsHttpHandler { SslOptions = ssl };
        return GrpcChannel.ForAddress(GrpcAddress, options);
    }

    /// <summary>
    /// A client that trusts this service's certificate (so any refusal is the server's) and presents the certificate of
    /// <paramref name="presenting"/>, or none.
    /// </summary>
    public GrpcChannel ChannelPresenting(TestPki pki, ClusterTls? presenting)
    {
        var member = pki.Member();
        return Channel(new SslClientAuthenticationOptions
        {
            ClientCertificateContext = presenting?.CertificateContext,
            RemoteCertificateValidationCallback = (_, c, chain, _) => member.CheckServer(c, chain) is null,
        });
    }

    /// <summary>
    /// A client presenting <paramref name="presenting"/>'s certificate (or none) is refused in the handshake: the
    /// <paramref name="call"/> (which names <paramref name="marker"/>) fails in transport and never reaches the service,
    /// the refusal is counted under <paramref name="reason"/>, logged as a refusal by <paramref name="service"/> with
    /// <paramref name="detail"/>, and no private key and none of <paramref name="secrets"/> is logged.
    /// </summary>
    public async Task AssertRefusedAsync(TestPki pki, ClusterTls? presenting, string reason, string service, string detail, string marker,
        Func<GrpcChannel, Task> call, params string[] secrets)
    {
        double before = await RefusalsAsync(reason);
        using (var channel = ChannelPresenting(pki, presenting))
        {
            var e = await Assert.ThrowsAnyAsync<Exception>(() => call(channel));
            Assert.True(e is RpcException { StatusCode: StatusCode.Unavailable or StatusCode.Internal } or IOException or HttpRequestException,
                $"expected a transport failure, got {e}");
        }
        Assert.DoesNotContain(Logs, l => l.Contains(marker)); // the call never reached the service, whose log would name it
        await EventuallyCountedAsync(reason, before + 1, $"the counted refusal ({reason})");
        Assert.Contains(Logs, l => l.Contains($"Refused a TLS connection to {service}") && l.Contains(detail));
        AssertNoSecretsLogged(pki, secrets);
    }

    /// <summary>A client of another cluster (its CA is <see cref="TestPki.OtherCa"/>) refuses this service's certificate itself.</summary>
    public async Task AssertAStrangerRefusesTheServiceAsync(TestPki pki, string addressKey, Func<GrpcChannel, Task> call)
    {
        using var channel = ClusterChannel.For(GrpcAddress, pki.Stranger(), addressKey);
        var e = await Assert.ThrowsAsync<RpcException>(() => call(channel));
        Assert.True(e.StatusCode is StatusCode.Unavailable or StatusCode.Internal, $"expected a transport failure, got {e.StatusCode}");
        var chain = new List<Exception>();
        for (Exception? x = e; x is not null; x = x.InnerException) chain.Add(x);
        Assert.True(chain.OfType<AuthenticationException>().Any(), $"expected the client's handshake to fail on the server certificate: {e}");
    }

    /// <summary>The refusal counter for a reason (surface "tls"), summed over its series; 0 before the first refusal.</summary>
    public async Task<double> RefusalsAsync(string reason, string surface = "tls")
    {
        string text = await Http.GetStringAsync("/metrics");
        return Regex.Matches(text, $@"^{Regex.Escape(_refusalCounter)}\{{([^}}]*)\}} (\S+)", RegexOptions.Multiline)
            .Where(m => m.Groups[1].Value.Contains($"surface=\"{surface}\"") && m.Groups[1].Value.Contains($"reason=\"{reason}\""))
            .Sum(m => double.Parse(m.Groups[2].Value, System.Globalization.CultureInfo.InvariantCulture));
    }

    /// <summary>Polls the refusal counter until it reaches <paramref name="atLeast"/>; on timeout the failure carries what the TLS layer logged.</summary>
    public async Task EventuallyCountedAsync(string reason, double atLeast, string what)
    {
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(30);
        double seen;
        while ((seen = await RefusalsAsync(reason)) < atLeast)
        {
            if (DateTime.UtcNow > deadline)
                throw new TimeoutException($"{what}: {_refusalCounter}{{reason=\"{reason}\"}} is {seen}, expected at least {atLeast} within 30 s\n" +
                    $"log of the TLS layer:\n{string.Join("\n", _logs.Where(l => l.Contains("TLS") || l.Contains("HTTPS") || l.Contains("handshake")).TakeLast(20))}");
            await Task.Delay(100); // a poll interval: the condition is the counter, with the deadline above
        }
    }

    /// <summary>No private key (its PEM armour or its base64 body) and none of <paramref name="secrets"/> is in any log line.</summary>
    public void AssertNoSecretsLogged(TestPki pki, params string[] secrets)
    {
        foreach (var line in _logs)
            foreach (var secret in pki.KeyMaterial().Concat(secrets))
                Assert.False(line.Contains(secret, StringComparison.Ordinal), $"a secret is in the log: {line}");
    }

    public async ValueTask DisposeAsync()
    {
        Http.Dispose();
        await _app.StopAsync();
        await _app.DisposeAsync();
    }
}

/// <summary>Every log line of a host, formatted, with its exception's type and message.</summary>
public sealed class CapturingLogger(ConcurrentQueue<string> lines) : ILoggerProvider, ILogger
{
    public ILogger CreateLogger(string categoryName) => this;
    public IDisposable? BeginScope<TState>(TState state) where TState : notnull => null;
    public bool IsEnabled(LogLevel logLevel) => true; // the host's filters decide

    public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter) =>
        lines.Enqueue($"{logLevel}: {formatter(state, exception)} {exception?.GetType().Name}: {exception?.Message}");

    public void Dispose() { }
}
