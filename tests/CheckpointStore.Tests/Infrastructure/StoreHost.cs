// The real CheckpointStore service in this process on a free loopback port (Kestrel, HTTP/2 cleartext), with a real gRPC channel.
using DeepSeekCluster.CheckpointStore.Storage;
using Grpc.Net.Client;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.Extensions.Configuration;
using Microsoft.AspNetCore.Server.Kestrel.Core;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using Store = DeepSeekCluster.Contracts.Checkpoints.CheckpointStore;

namespace DeepSeekCluster.CheckpointStore.Tests.Infrastructure;

public sealed class StoreHost : IAsyncDisposable
{
    private readonly WebApplication _app;

    private StoreHost(WebApplication app, GrpcChannel channel)
    {
        _app = app;
        Channel = channel;
        Client = new Store.CheckpointStoreClient(channel);
    }

    public GrpcChannel Channel { get; }
    /// <summary>The running service's container: a test reaches the blob backend behind it, as the store sees it.</summary>
    public IServiceProvider Services => _app.Services;
    public Store.CheckpointStoreClient Client { get; }

    /// <summary>Small blocks and short backoffs so the tests exercise block boundaries and give up within seconds.</summary>
    public static readonly Dictionary<string, string?> TestSettings = new()
    {
        ["Storage:BlockBytes"] = "65536",
        ["Storage:RetryCount"] = "3",
        ["Storage:RetryBaseDelayMs"] = "50",
        ["Storage:NetworkTimeoutSeconds"] = "5",
    };

    /// <summary>Starts the service with <paramref name="settings"/>; <paramref name="wrap"/> may decorate the backend the configuration selects.</summary>
    public static async Task<StoreHost> StartAsync(IDictionary<string, string?> settings, Func<IBlobBackend, IBlobBackend>? wrap = null)
    {
        int port = FreePort.Next();
        var builder = WebApplication.CreateBuilder(new WebApplicationOptions { EnvironmentName = Environments.Development });
        builder.Configuration.AddInMemoryCollection(TestSettings);
        builder.Configuration.AddInMemoryCollection(settings); // later sources win
        builder.Logging.ClearProviders();
        builder.WebHost.ConfigureKestrel(k => k.ListenLocalhost(port, o => o.Protocols = HttpProtocols.Http2));
        builder.AddServiceDefaults();
        builder.AddCheckpointStore();
        if (wrap is not null)
        {
            var selected = builder.Services.Last(d => d.ServiceType == typeof(IBlobBackend));
            builder.Services.Remove(selected);
            builder.Services.AddSingleton(sp => wrap((IBlobBackend)selected.ImplementationFactory!(sp)));
        }
        var app = builder.Build();
        app.MapDefaultEndpoints();
        app.MapCheckpointStore();
        await app.StartAsync();
        var channel = GrpcChannel.ForAddress($"http://localhost:{port}", new GrpcChannelOptions { MaxReceiveMessageSize = 16 << 20 });
        return new StoreHost(app, channel);
    }

    public async ValueTask DisposeAsync()
    {
        Channel.Dispose();
        await _app.StopAsync();
        await _app.DisposeAsync();
    }
}
