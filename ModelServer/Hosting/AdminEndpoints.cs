// /admin: load a version beside the running ones, change the route table, retire a version (cluster token only).
using System.Text.Json;
using DeepSeekCluster.ModelServer.Api;
using DeepSeekCluster.ModelServer.Metrics;
using DeepSeekCluster.ModelServer.Quantization;
using DeepSeekCluster.ModelServer.Routing;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Routing;

namespace DeepSeekCluster.ModelServer.Hosting;

public static class AdminEndpoints
{
    /// <summary>Either <c>path</c> (a folder) or <c>store</c> (exports/{job}/{step}/{format} or {job}/{step}, with <c>tokenizer</c> for a checkpoint).</summary>
    public sealed record LoadBody(string? Version, string? Path, string? Quantization, string? Store = null, string? Tokenizer = null);

    public static IEndpointRouteBuilder MapAdminApi(this IEndpointRouteBuilder app)
    {
        app.MapPost("/admin/models", async (HttpContext http, ModelRegistry registry, ServingSettings settings, ServingMetrics metrics) =>
        {
            await Guard(http, async () =>
            {
                var body = await http.Request.ReadFromJsonAsync<LoadBody>(JsonSerializerOptions.Web) ?? throw ApiError.BadRequest("a JSON body {version, path, quantization} is required");
                if (body.Version is null) throw ApiError.BadRequest("'version' is required", "version");
                if ((body.Path is null) == (body.Store is null)) throw ApiError.BadRequest("exactly one of 'path' (a model folder) and 'store' (a place in the CheckpointStore) is required", "path");
                StoreModelRef? place = null;
                if (body.Store is not null)
                {
                    try { place = StoreModelRef.Parse(body.Store, "store"); }
                    catch (ArgumentException e) { throw ApiError.BadRequest(e.Message, "store"); }
                    if (settings.Store is null) throw ApiError.BadRequest("this server has no Serving:Store configured, so it cannot load from the CheckpointStore", "store");
                }
                WeightFormat format;
                try { format = WeightQuantizer.Parse(body.Quantization, "quantization"); }
                catch (ArgumentException e) { throw ApiError.BadRequest(e.Message, "quantization"); }
                ServedModel model;
                try
                {
                    string folder = place is null ? body.Path! : await StoreModels.FetchAsync(settings.Store!, place, body.Tokenizer, http.RequestAborted);
                    model = await Task.Run(() => ServedModel.Load(body.Version, folder, format, settings.Engine, metrics, ServerSetup.DeviceOf(settings)));
                }
                catch (Exception e) when (e is IOException or ArgumentException or InvalidDataException)
                {
                    throw ApiError.BadRequest($"cannot load '{body.Path ?? body.Store}': {e.Message}", place is null ? "path" : "store");
                }
                await registry.AddAsync(model, settings.Drain);
                await Results.Json(new { version = model.Version, path = model.Folder, quantization = model.Format.ToString().ToLowerInvariant() }, statusCode: 201).ExecuteAsync(http);
            });
        });
        app.MapPut("/admin/routes", async (HttpContext http, ModelRegistry registry) =>
        {
            await Guard(http, async () =>
            {
                var routes = await http.Request.ReadFromJsonAsync<Dictionary<string, Dictionary<string, double>>>() ?? throw ApiError.BadRequest("a JSON body {route: {version: weight}} is required");
                RouteTable table;
                try { table = new RouteTable(routes.ToDictionary(r => r.Key, r => (IReadOnlyDictionary<string, double>)r.Value)); }
                catch (ArgumentException e) { throw ApiError.BadRequest(e.Message, "routes"); }
                registry.SetRoutes(table);
                await Results.Json(table.Routes).ExecuteAsync(http);
            });
        });
        app.MapDelete("/admin/models/{version}", async (HttpContext http, string version, ModelRegistry registry, ServingSettings settings) =>
        {
            await Guard(http, async () =>
            {
                await registry.RemoveAsync(version, settings.Drain);
                http.Response.StatusCode = 204;
            });
        });
        return app;
    }

    static async Task Guard(HttpContext http, Func<Task> action)
    {
        try { await action(); }
        catch (ApiError e) { await e.WriteAsync(http.Response); }
        catch (JsonException e) { await ApiError.BadRequest($"the request body is not valid JSON: {e.Message}").WriteAsync(http.Response); }
    }
}
