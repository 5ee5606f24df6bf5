// Registers the checkpoint store (blob backend chosen by configuration, retries, gRPC service, the cluster token on it,
// mutual TLS on it when Cluster:Tls:* are set) and maps its endpoints.
using DeepSeekCluster.CheckpointStore.Services;
using DeepSeekCluster.CheckpointStore.Storage;
using DeepSeekCluster.Contracts;
using DeepSeekCluster.ServiceDefaults;
using Microsoft.Extensions.Options;

namespace DeepSeekCluster.CheckpointStore;

public static class CheckpointStoreExtensions
{
    /// <summary>
    /// ConnectionStrings:blobs set → Azure Blob storage (connection string or endpoint URI); otherwise the
    /// folder Storage:Folder. A test or a host may register its own <see cref="IBlobBackend"/> first.
    /// </summary>
    public static IHostApplicationBuilder AddCheckpointStore(this IHostApplicationBuilder builder)
    {
        builder.Services.AddOptions<StorageOptions>()
            .BindConfiguration(StorageOptions.Section)
            .ValidateDataAnnotations()
            .ValidateOnStart();

        string? connection = builder.Configuration.GetConnectionString(ServiceNames.Blobs);
        builder.Services.TryAddSingletonBackend(sp =>
        {
            var options = sp.GetRequiredService<IOptions<StorageOptions>>().Value;
            return string.IsNullOrWhiteSpace(connection)
                ? new FolderBlobBackend(options.Folder)
                : AzureBlobBackend.Create(connection, options);
        });
        builder.Services.AddSingleton<BlobRetry>();
        builder.Services.AddSingleton<VerifiedChunkCache>();
        builder.Services.AddSingleton<StorageErrorInterceptor>();
        builder.Services.AddGrpc(o =>
        {
            o.Interceptors.Add<ClusterTokenGate>(); // first: a caller without the token reaches nothing
            o.Interceptors.Add<StorageErrorInterceptor>();
            o.MaxReceiveMessageSize = 16 * 1024 * 1024; // upload chunks up to 16 MiB
        });
        builder.Services.AddGrpcReflection();
        builder.Services.AddMetrics();
        builder.Services.AddSingleton<CheckpointStoreMetrics>();
        // Cluster:Tls:* set: the grpc endpoint requires client certificates of the cluster CA (the workers', the Coordinator's).
        builder.AddClusterTlsEndpoint("CheckpointStore", sp => sp.GetRequiredService<CheckpointStoreMetrics>().AuthRefused);
        // Cluster:Token set: every call (Commit, ApplyRetention, DownloadTensor, ...) must carry it, as on ClusterControl.
        ClusterTokenGate.AddClusterTokenGate(builder, "CheckpointStore", sp => sp.GetRequiredService<CheckpointStoreMetrics>().TokenRefused);
        return builder;
    }

    public static WebApplication MapCheckpointStore(this WebApplication app)
    {
        app.MapGrpcService<CheckpointStoreService>();
        app.MapGrpcService<ExportStoreService>();
        app.MapGrpcReflectionService();
        // The instruments now, so the refusal counter's zeros are on /metrics from the first scrape.
        app.Services.GetRequiredService<CheckpointStoreMetrics>();
        app.Services.GetRequiredService<ClusterTokenGate>(); // says at start when the gate is open
        return app;
    }

    private static void TryAddSingletonBackend(this IServiceCollection services, Func<IServiceProvider, IBlobBackend> factory)
    {
        if (services.All(d => d.ServiceType != typeof(IBlobBackend))) services.AddSingleton(factory);
    }
}
