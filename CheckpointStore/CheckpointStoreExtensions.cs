// Registers the checkpoint store (blob backend chosen by configuration, retries, gRPC service) and maps its endpoints.
using DeepSeekCluster.CheckpointStore.Services;
using DeepSeekCluster.CheckpointStore.Storage;
using DeepSeekCluster.Contracts;
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
            o.Interceptors.Add<StorageErrorInterceptor>();
            o.MaxReceiveMessageSize = 16 * 1024 * 1024; // upload chunks up to 16 MiB
        });
        builder.Services.AddGrpcReflection();
        return builder;
    }

    public static WebApplication MapCheckpointStore(this WebApplication app)
    {
        app.MapGrpcService<CheckpointStoreService>();
        app.MapGrpcReflectionService();
        return app;
    }

    private static void TryAddSingletonBackend(this IServiceCollection services, Func<IServiceProvider, IBlobBackend> factory)
    {
        if (services.All(d => d.ServiceType != typeof(IBlobBackend))) services.AddSingleton(factory);
    }
}
