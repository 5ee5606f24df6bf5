// A real model server on a loopback port (Kestrel, the production services and endpoints), and the official OpenAI
// client pointed at it.
using System.ClientModel;
using System.ClientModel.Primitives;
using System.Text.Json.Nodes;
using DeepSeekCluster.ModelServer.Hosting;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Hosting.Server;
using Microsoft.AspNetCore.Hosting.Server.Features;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using OpenAI;
using OpenAI.Chat;

namespace DeepSeekCluster.ModelServer.Tests;

public sealed class ServerHost : IAsyncDisposable
{
    public const string ApiKey = "test-key";
    public const string ClusterToken = "cluster-secret";

    readonly WebApplication app;
    ServerHost(WebApplication app, string url) { this.app = app; Url = url; }

    public string Url { get; }
    public IServiceProvider Services => app.Services;

    public static async Task<ServerHost> StartAsync(IDictionary<string, string?> settings)
    {
        // An empty content root: the CheckpointStore's appsettings.json (HTTP/2-only Kestrel) is in the test output too.
        var builder = WebApplication.CreateBuilder(new WebApplicationOptions
        {
            EnvironmentName = "Test", ContentRootPath = Directory.CreateTempSubdirectory("model-server-root-").FullName,
        });
        builder.Configuration.AddInMemoryCollection(new Dictionary<string, string?>
        {
            ["Serving:ApiKeys:0"] = ApiKey, ["Cluster:Token"] = ClusterToken,
        }.Concat(settings));
        builder.WebHost.UseUrls("http://127.0.0.1:0");
        builder.Logging.ClearProviders();
        builder.AddBasicServiceDefaults();
        builder.AddModelServer();
        var app = builder.Build();
        app.MapDefaultEndpoints();
        app.MapModelServer();
        await app.StartAsync();
        await app.Services.GetRequiredService<ModelLoader>().Loaded;
        var url = app.Services.GetRequiredService<IServer>().Features.Get<IServerAddressesFeature>()!.Addresses.First();
        return new ServerHost(app, url);
    }

    /// <summary>Client options for this server: no retries (a 429 must reach the test), a generous timeout for 2 loaded cores.</summary>
    public OpenAIClientOptions ClientOptions() => new()
    {
        Endpoint = new Uri(Url + "/v1"), RetryPolicy = new ClientRetryPolicy(maxRetries: 0), NetworkTimeout = TimeSpan.FromMinutes(3),
    };

    public ChatClient Chat(string model, string key = ApiKey) => new(model, new ApiKeyCredential(key), ClientOptions());

    /// <summary>
    /// POST /v1/completions through the official client's pipeline (its auth, transport and error mapping): the
    /// package's legacy completions client is internal in 2.15.0. A non-2xx answer throws ClientResultException.
    /// </summary>
    public async Task<JsonObject> CompleteAsync(JsonObject body, string key = ApiKey)
    {
        var client = Chat("unused", key);
        using var message = client.Pipeline.CreateMessage();
        message.Request.Method = "POST";
        message.Request.Uri = new Uri(Url + "/v1/completions");
        message.Request.Headers.Set("Content-Type", "application/json");
        message.Request.Content = BinaryContent.Create(BinaryData.FromString(body.ToJsonString()));
        message.ResponseClassifier = PipelineMessageClassifier.Create(stackalloc ushort[] { 200 });
        await client.Pipeline.SendAsync(message);
        // The pipeline classifies the status; the body goes into the message as the generated clients put it there.
        if (message.Response!.IsError)
            throw new ClientResultException($"Service request failed.\nStatus: {message.Response.Status} ({message.Response.ReasonPhrase})\n\nContent:\n{message.Response.Content}", message.Response);
        return JsonNode.Parse(message.Response.Content.ToString())!.AsObject();
    }

    public async ValueTask DisposeAsync()
    {
        await app.StopAsync();
        await app.DisposeAsync();
    }
}
