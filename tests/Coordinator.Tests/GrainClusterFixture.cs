// An in-process Orleans cluster with the Coordinator's grains and real persistence (files, or Redis), restartable on the same store.
using DeepSeekCluster.Contracts.Grains;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Orleans.TestingHost;
using StackExchange.Redis;

namespace DeepSeekCluster.Coordinator.Tests;

public sealed class GrainCluster : IAsyncDisposable
{
    private readonly InProcessTestCluster _cluster;

    private GrainCluster(InProcessTestCluster cluster) => _cluster = cluster;

    public IGrainFactory Grains => _cluster.Client;

    /// <param name="stateFolder">File storage here, unless <paramref name="redis"/> is given.</param>
    public static async Task<GrainCluster> StartAsync(string stateFolder, string? redis = null, TimeSpan? heartbeatTimeout = null)
    {
        var builder = new InProcessTestClusterBuilder(1);
        builder.Options.ServiceId = "coordinator-tests"; // the storage key includes it: a restarted cluster must find its state
        builder.ConfigureSilo((_, silo) =>
        {
            silo.Services.AddCoordinatorGrainServices();
            silo.Services.Configure<CoordinatorOptions>(o => o.HeartbeatTimeout = heartbeatTimeout ?? TimeSpan.FromSeconds(30));
            if (redis is null)
                silo.AddFileGrainStorageAsDefault(new ConfigurationBuilder().AddInMemoryCollection(
                    new Dictionary<string, string?> { ["Coordinator:StateFolder"] = stateFolder }).Build());
            else
                silo.AddRedisGrainStorageAsDefault(o => o.ConfigurationOptions = ConfigurationOptions.Parse(redis));
        });
        var cluster = builder.Build();
        await cluster.DeployAsync();
        return new GrainCluster(cluster);
    }

    public ITrainingJobGrain Job(string id) => Grains.GetGrain<ITrainingJobGrain>(id);

    public IGpuWorkerGrain Worker(string id) => Grains.GetGrain<IGpuWorkerGrain>(id);

    /// <summary>The (single) silo's services: its meter factory scopes the Coordinator's instruments to this cluster.</summary>
    public IServiceProvider SiloServices => _cluster.Silos[0].ServiceProvider;

    public async ValueTask DisposeAsync()
    {
        await _cluster.StopAllSilosAsync();
        await _cluster.DisposeAsync();
    }
}
