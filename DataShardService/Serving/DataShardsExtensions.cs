// AddDataShards / MapDataShards: the service's registrations, shared by Program.cs and the in-process test host.
using DeepSeekCluster.DataShardService.Preparation;
using DeepSeekCluster.DataShardService.Storage;

namespace DeepSeekCluster.DataShardService.Serving;

public sealed class DataShardsOptions
{
    /// <summary>Folder holding the prepared datasets (configuration key DataShards:Root).</summary>
    public string Root { get; set; } = "data-shards";

    /// <summary>Local scratch for a prepare run (spool, shards before they are stored); DataShards:WorkDir.</summary>
    public string WorkDir { get; set; } = Path.Combine(Path.GetTempPath(), "deepseek-data-staging");
}

public static class DataShardsExtensions
{
    public static IHostApplicationBuilder AddDataShards(this IHostApplicationBuilder builder)
    {
        builder.Services.AddGrpc();
        builder.Services.AddOptions<DataShardsOptions>().BindConfiguration("DataShards")
            .Validate(o => !string.IsNullOrWhiteSpace(o.Root), "DataShards:Root must name a folder.")
            .ValidateOnStart();
        builder.Services.AddSingleton<PrepareHooks>();
        builder.Services.AddSingleton<IDatasetStore>(sp =>
            new FolderDatasetStore(sp.GetRequiredService<Microsoft.Extensions.Options.IOptions<DataShardsOptions>>().Value.Root));
        builder.Services.AddSingleton(sp => new DatasetPreparer(
            sp.GetRequiredService<IDatasetStore>(),
            sp.GetRequiredService<Microsoft.Extensions.Options.IOptions<DataShardsOptions>>().Value.WorkDir,
            sp.GetRequiredService<PrepareHooks>()));
        builder.Services.AddSingleton<DatasetCatalog>();
        return builder;
    }

    public static WebApplication MapDataShards(this WebApplication app)
    {
        app.MapGrpcService<DataShardsService>();
        return app;
    }
}
