// POST /v1/completions, POST /v1/chat/completions and GET /v1/models in OpenAI's request and response shapes.
using System.Text.Json;
using System.Text.Json.Nodes;
using DeepSeekCluster.ModelServer.Metrics;
using DeepSeekCluster.ModelServer.Routing;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Routing;

namespace DeepSeekCluster.ModelServer.Api;

public static class OpenAiEndpoints
{
    public static IEndpointRouteBuilder MapOpenAiApi(this IEndpointRouteBuilder app)
    {
        app.MapGet("/v1/models", (ModelRegistry registry) =>
        {
            var created = DateTimeOffset.UtcNow.ToUnixTimeSeconds();
            var data = registry.Routes.Routes.Keys.Select(id => new { id, @object = "model", created, owned_by = "deepseek-cluster", kind = "route" })
                .Concat(registry.Versions.Values.Select(v => new { id = v.Version, @object = "model", created = v.LoadedAt.ToUnixTimeSeconds(), owned_by = "deepseek-cluster", kind = "version" }));
            return Results.Json(new { @object = "list", data });
        });
        app.MapPost("/v1/completions", (HttpContext http, ModelRegistry registry, ServingMetrics metrics) => Serve(http, registry, metrics, chat: false));
        app.MapPost("/v1/chat/completions", (HttpContext http, ModelRegistry registry, ServingMetrics metrics) => Serve(http, registry, metrics, chat: true));
        return app;
    }

    static async Task Serve(HttpContext http, ModelRegistry registry, ServingMetrics metrics, bool chat)
    {
        string version = "none"; // requests refused before routing are counted under this label
        try
        {
            using var body = await ReadBody(http);
            var root = body.RootElement;
            var p = chat ? ChatRequest.Parameters(root) : CompletionRequest.Parameters(root);
            var served = registry.Acquire(p.Model, p.User);
            version = served.Version;
            try
            {
                int[] prompt = chat ? ChatRequest.Prompt(served, root) : CompletionRequest.Prompt(served, root);
                if (chat) await ChatRequest.RespondAsync(http, served, prompt, p, root);
                else await CompletionRequest.RespondAsync(http, served, prompt, p);
                metrics.Request(version, 200);
            }
            finally
            {
                served.Release();
            }
        }
        catch (ApiError e)
        {
            metrics.Request(version, e.Status);
            if (!http.Response.HasStarted) await e.WriteAsync(http.Response);
        }
        catch (OperationCanceledException) when (http.RequestAborted.IsCancellationRequested)
        {
            metrics.Request(version, 499); // the client closed the connection (nginx's code; nothing is sent)
        }
        catch (IOException) when (http.RequestAborted.IsCancellationRequested)
        {
            metrics.Request(version, 499);
        }
        catch (InvalidOperationException e) // the engine failed or stopped under the request
        {
            metrics.Request(version, 500);
            if (!http.Response.HasStarted) await new ApiError(500, e.Message, type: "server_error").WriteAsync(http.Response);
            else await Sse.WriteAsync(http, new JsonObject { ["error"] = new JsonObject { ["message"] = e.Message, ["type"] = "server_error" } });
        }
    }

    static async Task<JsonDocument> ReadBody(HttpContext http)
    {
        try
        {
            return await JsonDocument.ParseAsync(http.Request.Body, cancellationToken: http.RequestAborted);
        }
        catch (JsonException e)
        {
            throw ApiError.BadRequest($"the request body is not valid JSON: {e.Message}");
        }
    }

    /// <summary>OpenAI's usage object.</summary>
    public static JsonObject Usage(int prompt, int completion) =>
        new() { ["prompt_tokens"] = prompt, ["completion_tokens"] = completion, ["total_tokens"] = prompt + completion };
}

/// <summary>Server-sent events as OpenAI streams them: "data: {json}\n\n" per chunk, "data: [DONE]\n\n" last.</summary>
public static class Sse
{
    public static void Start(HttpContext http)
    {
        http.Response.StatusCode = 200;
        http.Response.ContentType = "text/event-stream";
        http.Response.Headers.CacheControl = "no-cache";
        http.Response.Headers["X-Accel-Buffering"] = "no"; // proxies must not hold tokens back
    }

    public static async Task WriteAsync(HttpContext http, JsonNode chunk)
    {
        await http.Response.WriteAsync("data: " + chunk.ToJsonString() + "\n\n", http.RequestAborted);
        await http.Response.Body.FlushAsync(http.RequestAborted);
    }

    public static async Task DoneAsync(HttpContext http)
    {
        await http.Response.WriteAsync("data: [DONE]\n\n", http.RequestAborted);
        await http.Response.Body.FlushAsync(http.RequestAborted);
    }
}
