// Registers the Coordinator: options, cluster token, mutual TLS on ClusterControl (when certificates are configured),
// Orleans silo (clustering and grain storage chosen by configuration), ClusterControl gRPC with reflection, the REST
// API, and checkpoint commits through CheckpointStore.
using DeepSeekCluster.Contracts.Grains;
using DeepSeekCluster.Coordinator.Api;
using DeepSeekCluster.Coordinator.Checkpoints;
using DeepSeekCluster.Coordinator.Control;
using DeepSeekCluster.Coordinator.Security;
using DeepSeekCluster.Coordinator.Storage;
using Microsoft.Extensions.Options;
using Orleans.Configuration;
using Orleans.Providers;
using Orleans.Runtime.Hosting;
using Orleans.Serialization;
using Orleans.Serialization.Serializers;
using Orleans.Storage;
using StackExchange.Redis;

namespace DeepSeekCluster.Coordinator;

public static class CoordinatorExtensions
{
    /// <summary>Aspire's ConnectionStrings__orleans-redis: Redis clustering and grain storage when set.</summary>
    public const string RedisConnectionName = "orleans-redis";

    public static IHostApplicationBuilder AddCoordinator(this IHostApplicationBuilder builder)
    {
        var config = builder.Configuration;
        builder.Services.AddOptions<CoordinatorOptions>().BindConfiguration(CoordinatorOptions.Section).ValidateDataAnnotations().ValidateOnStart();
        builder.Services.AddCoordinatorGrainServices();
        builder.AddControlChannelTls();
        builder.Services.AddSingleton(sp => ClusterToken.FromConfiguration(config,
            sp.GetRequiredService<IOptions<CoordinatorOptions>>().Value.StateFolder, sp.GetRequiredService<ILogger<ClusterToken>>()));
        builder.Services.AddSingleton<JobSubmission>();
        builder.Services.AddSingleton<RequireClusterToken>();
        builder.Services.AddSingleton<CheckpointCommitter>();
        builder.Services.AddHostedService(sp => sp.GetRequiredService<CheckpointCommitter>());
        builder.Services.AddSingleton<ICheckpointCommitter>(sp => sp.GetRequiredService<CheckpointCommitter>());
        builder.Services.ConfigureHttpJsonOptions(o => JobSpecJson.Configure(o.SerializerOptions));
        builder.Services.AddGrpc();
        builder.Services.AddGrpcReflection();

        string? redis = config.GetConnectionString(RedisConnectionName);
        builder.UseOrleans(silo =>
        {
            silo.Configure<ClusterOptions>(o =>
            {
                o.ClusterId = config["Orleans:ClusterId"] ?? "deepseek";
                o.ServiceId = config["Orleans:ServiceId"] ?? "deepseek-cluster";
            });
            silo.KeepDefaultValuesInGrainState();
            silo.WakeJobsHoldingWorkers();
            int siloPort = config.GetValue("Orleans:SiloPort", EndpointOptions.DEFAULT_SILO_PORT);
            int gatewayPort = config.GetValue("Orleans:GatewayPort", EndpointOptions.DEFAULT_GATEWAY_PORT);
            if (string.IsNullOrWhiteSpace(redis))
            {
                silo.UseLocalhostClustering(siloPort, gatewayPort);
                // Grain state as files, so a restart of the single local silo loses nothing even without Redis.
                silo.AddFileGrainStorageAsDefault(config);
            }
            else
            {
                silo.ConfigureEndpoints(siloPort, gatewayPort, listenOnAnyHostAddress: true);
                string connection = redis;
                builder.Services.AddSingleton(_ => new RedisReadiness(connection));
                builder.Services.AddHealthChecks().AddCheck<RedisReadiness>(RedisReadiness.Name); // /health only, never /alive
                silo.UseRedisClustering(redis);
                silo.AddRedisGrainStorageAsDefault(o => o.ConfigurationOptions = ConfigurationOptions.Parse(redis));
            }
        });
        // After the silo has started: wake the workers that were online before a restart (see GpuWorkerGrain.OnActivateAsync).
        builder.Services.AddHostedService<WorkerWakeUp>();
        builder.Services.AddHostedService<Studies.StudyWakeUp>();
        return builder;
    }

    /// <summary>What the grains need besides Orleans; also used by the grain tests' silos.</summary>
    public static IServiceCollection AddCoordinatorGrainServices(this IServiceCollection services)
    {
        services.AddMetrics();
        services.AddOptions<CoordinatorOptions>();
        services.AddSingleton<CoordinatorMetrics>();
        services.AddSingleton(TimeProvider.System);
        return services;
    }

    /// <summary>
    /// Orleans' grain-state JSON leaves out (and on reading, skips) every value equal to its type's default, so a field whose
    /// initializer is not that default came back changed after a restart: a job's schedule.minLr 0 read back as 3e-5 (its
    /// trainer then refused the ratio), keepLast 0 as 3. With this, every value is written and read as it was.
    /// </summary>
    public static ISiloBuilder KeepDefaultValuesInGrainState(this ISiloBuilder silo)
    {
        silo.Services.Configure<OrleansJsonSerializerOptions>(o => o.JsonSerializerSettings.DefaultValueHandling = Newtonsoft.Json.DefaultValueHandling.Include);
        return silo;
    }

    /// <summary>
    /// Once the silo runs, activates every job that holds workers: a job's timers (the preemption's checkpoint deadline)
    /// live in its activation, and nothing else may call a job whose members stay connected but silent.
    /// </summary>
    public static ISiloBuilder WakeJobsHoldingWorkers(this ISiloBuilder silo) => silo.AddStartupTask(async (services, ct) =>
    {
        var grains = services.GetRequiredService<IGrainFactory>();
        var jobs = await grains.GetGrain<IClusterRegistryGrain>(IClusterRegistryGrain.Key).ListJobsHoldingWorkersAsync();
        foreach (var id in jobs) await grains.GetGrain<ITrainingJobGrain>(id).GetStatusAsync();
        if (jobs.Length > 0)
            services.GetRequiredService<ILoggerFactory>().CreateLogger(typeof(CoordinatorExtensions)).LogInformation("Woke {Count} jobs holding workers", jobs.Length);
    });

    /// <summary>
    /// File storage under Coordinator:StateFolder as the default grain storage, each write a whole-file replace (see
    /// <see cref="AtomicFileGrainStorage"/>: a kill mid-write must not leave a state the restart cannot read).
    /// </summary>
    public static ISiloBuilder AddFileGrainStorageAsDefault(this ISiloBuilder silo, IConfiguration config)
    {
        string folder = config[$"{CoordinatorOptions.Section}:StateFolder"] is { Length: > 0 } f ? f : new CoordinatorOptions().StateFolder;
        silo.Services.AddGrainStorage(ProviderConstants.DEFAULT_STORAGE_PROVIDER_NAME, (sp, name) => new AtomicFileGrainStorage(
            name, Path.Combine(folder, "grains"), sp.GetRequiredService<IOptions<ClusterOptions>>().Value.ServiceId,
            sp.GetRequiredService<IGrainStorageSerializer>(), sp.GetRequiredService<IActivatorProvider>()));
        return silo;
    }

    public static WebApplication MapCoordinator(this WebApplication app)
    {
        // Create the token now, so a generated one is announced at start and not at the first request.
        _ = app.Services.GetRequiredService<ClusterToken>();
        app.MapGrpcService<ClusterControlService>();
        app.MapGrpcReflectionService();
        app.MapJobsApi();
        app.MapExportsApi();
        app.MapEvaluationsApi();
        app.MapStudiesApi();
        app.MapSchedulingApi();
        app.MapStatusPage();
        return app;
    }

    sealed class WorkerWakeUp(IGrainFactory grains, ILogger<WorkerWakeUp> logger) : IHostedService
    {
        public async Task StartAsync(CancellationToken cancellationToken)
        {
            var ids = await grains.GetGrain<IClusterRegistryGrain>(IClusterRegistryGrain.Key).ListWorkersAsync();
            foreach (var id in ids) await grains.GetGrain<IGpuWorkerGrain>(id).GetAsync();
            if (ids.Length > 0) logger.LogInformation("Woke {Count} known workers; those that do not reconnect in time leave their jobs", ids.Length);
        }

        public Task StopAsync(CancellationToken cancellationToken) => Task.CompletedTask;
    }
}
