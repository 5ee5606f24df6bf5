// The real DataShards service on a free loopback port (Kestrel, HTTP/2) and a real GrpcChannel to it.
using System.Net;
using DeepSeekCluster.Contracts.DataShards;
using DeepSeekCluster.DataShardService.Preparation;
using DeepSeekCluster.DataShardService.Serving;
using DeepSeekCluster.DataShardService.Tests.Infrastructure;
using Grpc.Net.Client;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Hosting.Server;
using Microsoft.AspNetCore.Hosting.Server.Features;
using Microsoft.AspNetCore.Server.Kestrel.Core;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;

namespace DeepSeekCluster.DataShardService.Tests;

public sealed class ServiceHost : IAsyncDisposable
{
    private readonly WebApplication _app;
    private readonly GrpcChannel _channel;

    private ServiceHost(WebApplication app, GrpcChannel channel)
    {
        _app = app;
        _channel = channel;
        Client = new DataShards.DataShardsClient(channel);
        Hooks = app.Services.GetRequiredService<PrepareHooks>();
    }

    public DataShards.DataShardsClient Client { get; }

    public PrepareHooks Hooks { get; }

    /// <summary>The host's services (its IMeterFactory, its IDatasetStore).</summary>
    public IServiceProvider Services => _app.Services;

    public static Task<ServiceHost> StartAsync(string storeRoot) => StartAsync(new Dictionary<string, string?>
    {
        ["DataShards:Root"] = storeRoot,
        ["DataShards:WorkDir"] = storeRoot + "-work",
    });

    public static Task<ServiceHost> StartAsync(TestStore store) => StartAsync(store.Settings);

    public static async Task<ServiceHost> StartAsync(IReadOnlyDictionary<string, string?> settings)
    {
        var builder = WebApplication.CreateBuilder(new WebApplicationOptions { EnvironmentName = "Testing" });
        foreach (var (key, value) in settings)
            builder.Configuration[key] = value;
        builder.Logging.ClearProviders();
        builder.WebHost.ConfigureKestrel(k => k.Listen(IPAddress.Loopback, 0, o => o.Protocols = HttpProtocols.Http2));
        builder.AddDataShards();
        var app = builder.Build();
        app.MapDataShards();
        try
        {
            await app.StartAsync();
        }
        catch
        {
            await app.DisposeAsync();
            throw;
        }
        string address = app.Services.GetRequiredService<IServer>().Features.Get<IServerAddressesFeature>()!.Addresses.First();
        return new ServiceHost(app, GrpcChannel.ForAddress(address, new GrpcChannelOptions { MaxReceiveMessageSize = null }));
    }

    public async ValueTask DisposeAsync()
    {
        _channel.Dispose();
        await _app.StopAsync();
        await _app.DisposeAsync();
    }
}
