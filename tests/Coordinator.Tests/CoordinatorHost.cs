// The real Coordinator (silo, REST, ClusterControl, service defaults) in-process: REST + /metrics on an HTTP/1.1 endpoint,
// gRPC on an HTTP/2 endpoint, both on free loopback ports, exactly as the two-endpoint configuration in ServiceDefaults says.
using System.Collections.Concurrent;
using DeepSeekCluster.Contracts.Control;
using Grpc.Net.Client;
using Microsoft.AspNetCore.Builder;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;

namespace DeepSeekCluster.Coordinator.Tests;

public sealed class CoordinatorHost : IAsyncDisposable
{
    public const string Token = "test-cluster-token";

    private readonly WebApplication _app;
    private readonly GrpcChannel _channel;

    private CoordinatorHost(WebApplication app, int httpPort, int grpcPort, ConcurrentQueue<string> logs)
    {
        _app = app;
        Logs = logs;
        Http = new HttpClient { BaseAddress = new Uri($"http://127.0.0.1:{httpPort}") };
        GrpcAddress = $"http://127.0.0.1:{grpcPort}";
        _channel = GrpcChannel.ForAddress(GrpcAddress);
        Control = new ClusterControl.ClusterControlClient(_channel);
    }

    public HttpClient Http { get; }

    /// <summary>The host's services (its IMeterFactory scopes the Coordinator's instruments to this host).</summary>
    public IServiceProvider Services => _app.Services;

    /// <summary>Every line the Coordinator logged, formatted (see CapturingLogger).</summary>
    public ConcurrentQueue<string> Logs { get; }

    public string GrpcAddress { get; }

    public ClusterControl.ClusterControlClient Control { get; }

    /// <param name="extra">More settings, e.g. services:checkpoints:grpc:0.</param>
    public static async Task<CoordinatorHost> StartAsync(IDictionary<string, string?>? extra = null)
    {
        int httpPort = FreePort.Next(), grpcPort = FreePort.Next();
        var builder = WebApplication.CreateBuilder(new WebApplicationOptions { EnvironmentName = "Testing" });
        var settings = new Dictionary<string, string?>
        {
            ["Kestrel:Endpoints:http:Url"] = $"http://127.0.0.1:{httpPort}",
            ["Kestrel:Endpoints:http:Protocols"] = "Http1",
            ["Kestrel:Endpoints:grpc:Url"] = $"http://127.0.0.1:{grpcPort}",
            ["Kestrel:Endpoints:grpc:Protocols"] = "Http2",
            ["Cluster:Token"] = Token,
            ["Coordinator:StateFolder"] = TestSpecs.TempFolder(),
            ["Coordinator:HeartbeatTimeout"] = "00:00:30",
            ["Orleans:SiloPort"] = FreePort.Next().ToString(),
            ["Orleans:GatewayPort"] = FreePort.Next().ToString(),
        };
        builder.Configuration.AddInMemoryCollection(settings);
        if (extra is not null) builder.Configuration.AddInMemoryCollection(extra);
        builder.Logging.ClearProviders();
        var logs = new ConcurrentQueue<string>();
        builder.Logging.AddProvider(new CapturingLogger(logs));
        builder.AddBasicServiceDefaults();
        builder.AddCoordinator();
        var app = builder.Build();
        app.MapDefaultEndpoints();
        app.MapCoordinator();
        await app.StartAsync();
        return new CoordinatorHost(app, httpPort, grpcPort, logs);
    }

    public async ValueTask DisposeAsync()
    {
        Http.Dispose();
        _channel.Dispose();
        await _app.StopAsync();
        await _app.DisposeAsync();
    }
}

[CollectionDefinition(Name)]
public sealed class CoordinatorCollection : ICollectionFixture<CoordinatorFixture>
{
    public const string Name = "coordinator";
}

/// <summary>One Coordinator for the REST and gRPC tests (a silo takes a second or two to start).</summary>
public sealed class CoordinatorFixture : IAsyncLifetime
{
    public CoordinatorHost Host { get; private set; } = null!;

    public async Task InitializeAsync() => Host = await CoordinatorHost.StartAsync();

    public async Task DisposeAsync() => await Host.DisposeAsync();
}
