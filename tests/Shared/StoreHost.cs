// The real CheckpointStore service (folder backend) in this process on a free loopback port, HTTP/2 cleartext: the store
// workers upload into and the Coordinator commits into.
using System.Net;
using DeepSeekCluster.CheckpointStore;
using Grpc.Net.Client;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Server.Kestrel.Core;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using Store = DeepSeekCluster.Contracts.Checkpoints.CheckpointStore;

namespace DeepSeekCluster.Tests.Shared;

internal sealed class StoreHost : IAsyncDisposable
{
    readonly WebApplication app;
    readonly string folder;

    StoreHost(WebApplication app, string folder, int port)
    {
        (this.app, this.folder, Port) = (app, folder, port);
        Address = $"http://127.0.0.1:{port}";
        Channel = GrpcChannel.ForAddress(Address);
        Client = new Store.CheckpointStoreClient(Channel);
    }

    public int Port { get; }
    public string Address { get; }
    public GrpcChannel Channel { get; }
    public Store.CheckpointStoreClient Client { get; }

    /// <param name="blobConnection">An Azure Blob connection string (e.g. Azurite's) instead of the folder backend.</param>
    public static async Task<StoreHost> StartAsync(string? blobConnection = null)
    {
        int port = FreePort.Next();
        string folder = Directory.CreateTempSubdirectory("store-").FullName;
        // An empty content root: no appsettings.json of whichever service project was copied last into the test output.
        var builder = WebApplication.CreateBuilder(new WebApplicationOptions { EnvironmentName = Environments.Development, ContentRootPath = folder });
        builder.Configuration.AddInMemoryCollection(new Dictionary<string, string?>
        {
            ["Storage:Folder"] = Path.Combine(folder, "blobs"),
            ["Storage:BlockBytes"] = "65536", // small blocks: an interrupted upload leaves staged bytes to resume from
            ["ConnectionStrings:blobs"] = blobConnection,
        });
        builder.Logging.ClearProviders();
        builder.WebHost.ConfigureKestrel(k => k.Listen(IPAddress.Loopback, port, o => o.Protocols = HttpProtocols.Http2));
        builder.AddBasicServiceDefaults();
        builder.AddCheckpointStore();
        var app = builder.Build();
        app.MapDefaultEndpoints();
        app.MapCheckpointStore();
        await app.StartAsync();
        return new StoreHost(app, folder, port);
    }

    public async ValueTask DisposeAsync()
    {
        Channel.Dispose();
        await app.StopAsync();
        await app.DisposeAsync();
        try { Directory.Delete(folder, recursive: true); } catch (IOException) { }
    }
}
