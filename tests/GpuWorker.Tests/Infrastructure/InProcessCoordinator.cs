// The real Coordinator in this process, started as its Program starts it (silo, REST, ClusterControl), on free loopback
// ports and committing checkpoints through the given CheckpointStore; with the polling and refusal checks its tests share.
using System.Net;
using System.Text.Json;
using System.Text.Json.Nodes;
using DeepSeekCluster.Coordinator;
using DeepSeekCluster.GpuWorker.Cluster;
using DeepSeekCluster.ServiceDefaults;
using Microsoft.AspNetCore.Builder;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;

namespace DeepSeekCluster.GpuWorker.Tests.Infrastructure;

public sealed class InProcessCoordinator : IAsyncDisposable
{
    public const string Token = "coordinator-test-token";

    readonly WebApplication app;
    readonly string state;

    InProcessCoordinator(WebApplication app, string state, int httpPort, int grpcPort)
    {
        (this.app, this.state) = (app, state);
        Http = new HttpClient { BaseAddress = new Uri($"http://127.0.0.1:{httpPort}") };
        Http.DefaultRequestHeaders.Authorization = new("Bearer", Token);
        Grpc = new Uri($"http://127.0.0.1:{grpcPort}");
    }

    /// <summary>REST, with the cluster token on every request.</summary>
    public HttpClient Http { get; }
    public Uri Grpc { get; }

    public static async Task<InProcessCoordinator> StartAsync(string storeAddress)
    {
        int httpPort = FreePort.Next(), grpcPort = FreePort.Next();
        string state = Directory.CreateTempSubdirectory("coordinator-state-").FullName;
        var builder = WebApplication.CreateBuilder(new WebApplicationOptions { EnvironmentName = "Testing" });
        builder.Configuration.AddInMemoryCollection(new Dictionary<string, string?>
        {
            ["Kestrel:Endpoints:http:Url"] = $"http://127.0.0.1:{httpPort}",
            ["Kestrel:Endpoints:http:Protocols"] = "Http1",
            ["Kestrel:Endpoints:grpc:Url"] = $"http://127.0.0.1:{grpcPort}",
            ["Kestrel:Endpoints:grpc:Protocols"] = "Http2",
            ["Cluster:Token"] = Token,
            ["Coordinator:StateFolder"] = state,
            ["Coordinator:HeartbeatTimeout"] = "00:00:30",
            ["Orleans:SiloPort"] = FreePort.Next().ToString(),
            ["Orleans:GatewayPort"] = FreePort.Next().ToString(),
            [WorkerSettings.CheckpointsKey] = storeAddress,
        });
        builder.Logging.ClearProviders();
        builder.AddBasicServiceDefaults();
        builder.AddCoordinator();
        var app = builder.Build();
        app.MapDefaultEndpoints();
        app.MapCoordinator();
        await app.StartAsync();
        return new InProcessCoordinator(app, state, httpPort, grpcPort);
    }

    /// <summary>A worker of this cluster: the real ClusterWorker, on the CPU, with its ports below the ephemeral range.</summary>
    public WorkerSettings Worker(string id, Uri data, string store, string outputDir) => new()
    {
        Coordinator = Grpc, DataShards = data, Checkpoints = new Uri(store), Token = Token, WorkerId = id, Device = "cpu",
        OutputDir = outputDir, CollectivePort = FreePort.Next(), PipelinePort = FreePort.Next(),
    };

    /// <summary>Polls a state the cluster reaches by itself (a job's end, an export's end), up to three minutes.</summary>
    public static async Task Until(Func<Task<bool>> reached, string what, StringWriter log)
    {
        var deadline = DateTime.UtcNow + TimeSpan.FromMinutes(3);
        while (!await reached())
        {
            if (DateTime.UtcNow > deadline) Assert.Fail($"timed out waiting until {what}; worker log:\n{log}");
            await Task.Delay(100);
        }
    }

    /// <summary>The response has <paramref name="status"/> and its body says <paramref name="reason"/>.</summary>
    public static async Task Refused(HttpResponseMessage response, HttpStatusCode status, string reason)
    {
        string body = await response.Content.ReadAsStringAsync();
        Assert.True(response.StatusCode == status, $"expected {status}, got {response.StatusCode}: {body}");
        Assert.Contains(reason, JsonSerializer.Deserialize<JsonNode>(body)!.ToJsonString(new JsonSerializerOptions { Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping }));
    }

    public async ValueTask DisposeAsync()
    {
        Http.Dispose();
        await app.StopAsync();
        await app.DisposeAsync();
        Directory.Delete(state, recursive: true);
    }
}
