// The real CheckpointStore service in this process on a free loopback port (Kestrel, HTTP/2 cleartext), with a real gRPC channel.
using System.Runtime.CompilerServices;
using DeepSeekCluster.CheckpointStore.Storage;
using DeepSeekCluster.Contracts.Checkpoints;
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
    private readonly StrongBox<int> _uploadsInFlight;

    private StoreHost(WebApplication app, GrpcChannel channel, StrongBox<int> uploadsInFlight)
    {
        _app = app;
        _uploadsInFlight = uploadsInFlight;
        Channel = channel;
        Client = new Store.CheckpointStoreClient(channel);
    }

    /// <summary>UploadShard calls the service is still handling: a dropped stream counts until its handler has returned.</summary>
    public int UploadsInFlight => Volatile.Read(ref _uploadsInFlight.Value);

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
        var uploadsInFlight = new StrongBox<int>();
        app.Use(async (context, next) =>
        {
            bool upload = context.Request.Path.Value?.EndsWith("/UploadShard", StringComparison.Ordinal) == true;
            if (upload) Interlocked.Increment(ref uploadsInFlight.Value);
            try { await next(context); }
            finally { if (upload) Interlocked.Decrement(ref uploadsInFlight.Value); }
        });
        app.MapDefaultEndpoints();
        app.MapCheckpointStore();
        await app.StartAsync();
        var channel = GrpcChannel.ForAddress($"http://localhost:{port}", new GrpcChannelOptions { MaxReceiveMessageSize = 16 << 20 });
        return new StoreHost(app, channel, uploadsInFlight);
    }

    /// <summary>Polls the upload's status until the store has staged some of it (a test drops the stream only then).</summary>
    public async Task WaitUntilStagedAsync(UploadStatusRequest status)
    {
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(30);
        while ((await Client.GetUploadStatusAsync(status)).ReceivedBytes == 0)
        {
            if (DateTime.UtcNow > deadline) throw new TimeoutException($"the store staged none of {status.FileName} (step {status.Step}) within 30 s");
            await Task.Delay(20); // a poll interval
        }
    }

    /// <summary>
    /// The bytes the store kept of an upload whose stream was dropped, once the store has finished with that stream: its
    /// handler may still be staging the block it held when the stream dropped. Then two equal reads in a row, because a
    /// backend may still apply a write the store abandoned (Azurite finishes a Put Block whose whole body it received).
    /// </summary>
    public async Task<long> ReceivedAfterDropAsync(UploadStatusRequest status)
    {
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(30);
        while (UploadsInFlight > 0)
        {
            if (DateTime.UtcNow > deadline) throw new TimeoutException($"the store was still handling an upload 30 s after the stream of {status.FileName} dropped");
            await Task.Delay(20); // a poll interval
        }
        long previous = -1;
        while (true)
        {
            long now = (await Client.GetUploadStatusAsync(status)).ReceivedBytes;
            if (now == previous) return now;
            if (DateTime.UtcNow > deadline) throw new TimeoutException($"the staged length of {status.FileName} still moved 30 s after its stream dropped (last {now})");
            previous = now;
            await Task.Delay(100); // a poll interval
        }
    }

    public async ValueTask DisposeAsync()
    {
        Channel.Dispose();
        await _app.StopAsync();
        await _app.DisposeAsync();
    }
}
