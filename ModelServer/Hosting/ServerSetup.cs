// The model server's services and endpoints, as Program.cs and the tests compose them.
using DeepSeekCluster.ModelServer.Api;
using DeepSeekCluster.ModelServer.Metrics;
using DeepSeekCluster.ModelServer.Quantization;
using DeepSeekCluster.ModelServer.Routing;
using DeepSeekCluster.Training.Engine;
using Microsoft.AspNetCore.Builder;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Diagnostics.HealthChecks;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using static TorchSharp.torch;

namespace DeepSeekCluster.ModelServer.Hosting;

public static class ServerSetup
{
    public static IHostApplicationBuilder AddModelServer(this IHostApplicationBuilder builder)
    {
        var settings = ServingSettings.From(builder.Configuration); // a bad key stops the process here, naming it
        builder.Services.AddSingleton(settings);
        builder.Services.AddSingleton(sp => new ServingMetrics(sp.GetService<System.Diagnostics.Metrics.IMeterFactory>()));
        builder.Services.AddSingleton<ModelRegistry>();
        builder.Services.AddSingleton<ModelLoader>();
        builder.Services.AddHostedService(sp => sp.GetRequiredService<ModelLoader>());
        builder.Services.AddTransient<ApiKeyCheck>();
        // Readiness only: a process still loading weights is alive, but must not get traffic.
        builder.Services.AddHealthChecks().AddCheck<ModelLoader>("models");
        return builder;
    }

    public static WebApplication MapModelServer(this WebApplication app)
    {
        app.UseMiddleware<ApiKeyCheck>();
        app.MapOpenAiApi();
        app.MapAdminApi();
        return app;
    }

    public static Device DeviceOf(ServingSettings settings) => StandaloneRun.ResolveDevice(settings.Device);
}

/// <summary>Loads the configured models after the server starts listening (so /alive answers during a long load).</summary>
public sealed class ModelLoader(ServingSettings settings, ModelRegistry registry, ServingMetrics metrics, ILogger<ModelLoader> log)
    : BackgroundService, IHealthCheck
{
    readonly TaskCompletionSource loaded = new(TaskCreationOptions.RunContinuationsAsynchronously);

    /// <summary>Completes when every configured model serves and the routes are set; faults with the load error.</summary>
    public Task Loaded => loaded.Task;

    protected override Task ExecuteAsync(CancellationToken stoppingToken) => Task.Run(async () =>
    {
        try
        {
            var device = ServerSetup.DeviceOf(settings);
            foreach (var source in settings.Models)
            {
                var format = WeightQuantizer.Parse(source.Quantization, $"Serving:Models ({source.Version}):Quantization");
                string folder = source.Store is { } place
                    ? await StoreModels.FetchAsync(settings.Store!, place, source.Tokenizer, stoppingToken)
                    : source.Path!;
                var model = ServedModel.Load(source.Version, folder, format, settings.Engine, metrics, device);
                log.LogInformation("Model {Version} from {Path} ({Format}{Report}) serves; latent cache {Blocks} blocks of {BlockSize} tokens ({Bytes} MiB)",
                    source.Version, source.Store is { } from ? $"{from} in the CheckpointStore, at {folder}" : folder, format, model.Quantization is { } q ? $", {q.Tensors} tensors {q.Fp32Bytes >> 20} MiB → {q.QuantizedBytes >> 20} MiB" : "",
                    model.Engine.Pool.BlockCount, model.Engine.Pool.BlockSize, model.Engine.Pool.BytesPerBlock * model.Engine.Pool.BlockCount >> 20);
                await registry.AddAsync(model, settings.Drain);
            }
            registry.SetRoutes(new RouteTable(settings.Routes));
            loaded.TrySetResult();
        }
        catch (Exception e)
        {
            log.LogCritical(e, "Loading the configured models failed");
            loaded.TrySetException(e);
            throw;
        }
    }, stoppingToken);

    public Task<HealthCheckResult> CheckHealthAsync(HealthCheckContext context, CancellationToken cancellationToken = default) =>
        Task.FromResult(loaded.Task.IsCompletedSuccessfully ? HealthCheckResult.Healthy()
            : loaded.Task.IsFaulted ? HealthCheckResult.Unhealthy("loading the models failed", loaded.Task.Exception)
            : HealthCheckResult.Unhealthy("loading the models"));
}
