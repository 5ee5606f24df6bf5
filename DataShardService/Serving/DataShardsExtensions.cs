// AddDataShards / MapDataShards: the service's registrations, shared by Program.cs and the in-process test host.
using System.Text.RegularExpressions;
using Azure.Storage.Blobs;
using DeepSeekCluster.Contracts;
using DeepSeekCluster.DataShardService.Metrics;
using DeepSeekCluster.DataShardService.Preparation;
using DeepSeekCluster.DataShardService.Storage;
using DeepSeekCluster.ServiceDefaults;
using Microsoft.Extensions.Options;

namespace DeepSeekCluster.DataShardService.Serving;

public sealed partial class DataShardsOptions
{
    public const string Section = "DataShards";

    // 5 retries, 0.8 s doubling up to 10 s, 100 s a try: one place for the defaults.
    private static readonly BlobRetry DefaultRetry = new();

    /// <summary>Folder holding the prepared datasets when ConnectionStrings:blobs is not set (DataShards:Root).</summary>
    public string Root { get; set; } = "data-shards";

    /// <summary>Local scratch for a prepare run (spool, shards before they are stored); DataShards:WorkDir.</summary>
    public string WorkDir { get; set; } = Path.Combine(Path.GetTempPath(), "deepseek-data-staging");

    /// <summary>Blob container of the datasets with Azure storage (DataShards:Container).</summary>
    public string Container { get; set; } = "datasets";

    /// <summary>Local folder where shards read from blob storage are cached (DataShards:CacheDir).</summary>
    public string CacheDir { get; set; } = Path.Combine(Path.GetTempPath(), "deepseek-data-cache");

    /// <summary>Size of the blocks a blob upload is staged in (DataShards:BlockBytes); Azure allows 50,000 blocks a blob.</summary>
    public int BlockBytes { get; set; } = 8 << 20;

    /// <summary>Retries of one blob request after the first try (DataShards:BlobRetries), with exponential backoff and jitter.</summary>
    public int BlobRetries { get; set; } = DefaultRetry.MaxRetries;

    /// <summary>Backoff before the first retry, doubling after each (DataShards:BlobRetryDelaySeconds).</summary>
    public double BlobRetryDelaySeconds { get; set; } = DefaultRetry.Delay.TotalSeconds;

    /// <summary>Cap on one backoff (DataShards:BlobRetryMaxDelaySeconds); the defaults back off about 20 s in all before giving up.</summary>
    public double BlobRetryMaxDelaySeconds { get; set; } = DefaultRetry.MaxDelay.TotalSeconds;

    /// <summary>How long one try may go without an answer before it counts as failed (DataShards:BlobNetworkTimeoutSeconds).</summary>
    public double BlobNetworkTimeoutSeconds { get; set; } = DefaultRetry.NetworkTimeout.TotalSeconds;

    public BlobRetry Retry => new(BlobRetries, TimeSpan.FromSeconds(BlobRetryDelaySeconds),
        TimeSpan.FromSeconds(BlobRetryMaxDelaySeconds), TimeSpan.FromSeconds(BlobNetworkTimeoutSeconds));

    /// <summary>ConnectionStrings:blobs: a connection string or an http(s) endpoint URI; null or empty selects the folder store.</summary>
    public string? BlobConnection { get; set; }

    public bool UsesBlobStorage => !string.IsNullOrWhiteSpace(BlobConnection);

    /// <summary>The first problem with the options, naming its configuration key; null when they are valid.</summary>
    public string? Problem()
    {
        if (!UsesBlobStorage)
            return string.IsNullOrWhiteSpace(Root) ? "DataShards:Root must name a folder (ConnectionStrings:blobs is not set, so datasets live in a folder)." : null;
        if (!AzureDatasetStore.IsEndpoint(BlobConnection!, out _))
        {
            try
            {
                _ = new BlobServiceClient(BlobConnection); // parses the string; never connects
            }
            catch (Exception e) when (e is FormatException or ArgumentException or InvalidOperationException)
            {
                // The message names the key only: a connection string may hold an account key.
                return "ConnectionStrings:blobs is neither an Azure Storage connection string (e.g. 'UseDevelopmentStorage=true' or " +
                       "'DefaultEndpointsProtocol=...;AccountName=...;AccountKey=...') nor an http(s) blob endpoint URI.";
            }
        }
        if (!ContainerName().IsMatch(Container))
            return $"DataShards:Container '{Container}' is not an Azure container name: 3-63 lower-case letters, digits and single hyphens.";
        if (string.IsNullOrWhiteSpace(CacheDir))
            return "DataShards:CacheDir must name a folder for the shard cache.";
        if (BlockBytes is < 64 * 1024 or > 100 * 1024 * 1024)
            return $"DataShards:BlockBytes is {BlockBytes}: expected 65536 to 104857600.";
        if (BlobRetries is < 0 or > 50)
            return $"DataShards:BlobRetries is {BlobRetries}: expected 0 to 50.";
        if (!(BlobRetryDelaySeconds > 0 && BlobRetryDelaySeconds <= 600))
            return $"DataShards:BlobRetryDelaySeconds is {BlobRetryDelaySeconds}: expected more than 0 and at most 600.";
        if (!(BlobRetryMaxDelaySeconds >= BlobRetryDelaySeconds && BlobRetryMaxDelaySeconds <= 3600))
            return $"DataShards:BlobRetryMaxDelaySeconds is {BlobRetryMaxDelaySeconds}: expected at least DataShards:BlobRetryDelaySeconds ({BlobRetryDelaySeconds}) and at most 3600.";
        if (!(BlobNetworkTimeoutSeconds > 0 && BlobNetworkTimeoutSeconds <= 3600))
            return $"DataShards:BlobNetworkTimeoutSeconds is {BlobNetworkTimeoutSeconds}: expected more than 0 and at most 3600.";
        return null;
    }

    [GeneratedRegex("^[a-z0-9](?!.*--)[a-z0-9-]{1,61}[a-z0-9]$")]
    private static partial Regex ContainerName();
}

public static class DataShardsExtensions
{
    /// <summary>ConnectionStrings:blobs set → Azure Blob storage (Azurite or an account); otherwise the folder DataShards:Root.</summary>
    public static IHostApplicationBuilder AddDataShards(this IHostApplicationBuilder builder)
    {
        builder.Services.AddGrpc(o => o.Interceptors.Add<ClusterTokenGate>());
        builder.Services.AddMetrics();
        builder.Services.AddOptions<DataShardsOptions>().BindConfiguration(DataShardsOptions.Section)
            .Configure<IConfiguration>((o, config) => o.BlobConnection = config.GetConnectionString(ServiceNames.Blobs))
            .ValidateOnStart();
        builder.Services.AddSingleton<IValidateOptions<DataShardsOptions>, DataShardsOptionsValidator>();
        builder.Services.AddSingleton<PrepareHooks>();
        builder.Services.AddSingleton<DataShardsMetrics>();
        builder.Services.AddSingleton<IDatasetStore>(sp =>
        {
            var o = sp.GetRequiredService<IOptions<DataShardsOptions>>().Value;
            return o.UsesBlobStorage
                ? AzureDatasetStore.Create(o.BlobConnection!, o.Container, o.CacheDir, o.BlockBytes, o.Retry)
                : new FolderDatasetStore(o.Root);
        });
        builder.Services.AddSingleton(sp => new DatasetPreparer(
            sp.GetRequiredService<IDatasetStore>(),
            sp.GetRequiredService<IOptions<DataShardsOptions>>().Value.WorkDir,
            sp.GetRequiredService<PrepareHooks>(),
            sp.GetRequiredService<DataShardsMetrics>()));
        builder.Services.AddSingleton<DatasetCatalog>();
        // Cluster:Tls:* set: the grpc endpoint requires client certificates of the cluster CA (the workers', the AppHost's).
        builder.AddClusterTlsEndpoint("DataShards", sp => sp.GetRequiredService<DataShardsMetrics>().AuthRefused);
        // Cluster:Token set: every call (Prepare, GetManifest, GetBatch, GetTokenizer) must carry it, as on ClusterControl.
        ClusterTokenGate.AddClusterTokenGate(builder, "DataShards", sp => sp.GetRequiredService<DataShardsMetrics>().TokenRefused);
        return builder;
    }

    public static WebApplication MapDataShards(this WebApplication app)
    {
        app.MapGrpcService<DataShardsService>();
        // The instruments now, so every series (the refusal counter's zeros included) is on /metrics from the first scrape.
        app.Services.GetRequiredService<DataShardsMetrics>();
        app.Services.GetRequiredService<ClusterTokenGate>(); // says at start when the gate is open
        return app;
    }

    private sealed class DataShardsOptionsValidator : IValidateOptions<DataShardsOptions>
    {
        public ValidateOptionsResult Validate(string? name, DataShardsOptions options) =>
            options.Problem() is { } problem ? ValidateOptionsResult.Fail(problem) : ValidateOptionsResult.Success;
    }
}
