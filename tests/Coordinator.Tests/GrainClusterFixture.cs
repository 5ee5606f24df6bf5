// An in-process Orleans cluster with the Coordinator's grains and real persistence (files, or Redis), restartable on the same store.
using System.Collections.Concurrent;
using DeepSeekCluster.Contracts.Grains;
using DeepSeekCluster.Coordinator.Checkpoints;
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
    public static async Task<GrainCluster> StartAsync(string stateFolder, string? redis = null, TimeSpan? heartbeatTimeout = null,
        Action<CoordinatorOptions>? options = null)
    {
        var builder = new InProcessTestClusterBuilder(1);
        builder.Options.ServiceId = "coordinator-tests"; // the storage key includes it: a restarted cluster must find its state
        builder.ConfigureSilo((_, silo) =>
        {
            silo.Services.AddCoordinatorGrainServices();
            silo.Services.AddSingleton<HandedCheckpoints>();
            silo.Services.AddSingleton<ICheckpointCommitter>(sp => sp.GetRequiredService<HandedCheckpoints>());
            silo.Services.Configure<CoordinatorOptions>(o => o.HeartbeatTimeout = heartbeatTimeout ?? TimeSpan.FromSeconds(30));
            if (options is not null) silo.Services.Configure(options);
            silo.KeepDefaultValuesInGrainState(); // as the Coordinator does, whichever storage
            silo.WakeJobsHoldingWorkers();
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

    /// <summary>What the job grains handed to the committer (the tests play the CheckpointStore's part).</summary>
    public HandedCheckpoints Handed => SiloServices.GetRequiredService<HandedCheckpoints>();

    /// <summary>The (single) silo's services: its meter factory scopes the Coordinator's instruments to this cluster.</summary>
    public IServiceProvider SiloServices => _cluster.Silos[0].ServiceProvider;

    public async ValueTask DisposeAsync()
    {
        await _cluster.StopAllSilosAsync();
        await _cluster.DisposeAsync();
    }
}

/// <summary>
/// The grain tests' committer: it records what the job grains hand over and commits nothing, so a test decides each
/// outcome by calling CheckpointCommittedAsync or CheckpointNotCommittedAsync, as the real committer does after the store
/// answered (CheckpointCommitTests and RetentionTests run the real one against a real CheckpointStore).
/// </summary>
public sealed class HandedCheckpoints : ICheckpointCommitter
{
    public ConcurrentQueue<(string JobId, CheckpointRecord Record)> Commits { get; } = new();
    public ConcurrentQueue<(string JobId, long[] Keep)> Prunes { get; } = new();

    public void Commit(string jobId, CheckpointRecord record, string? evaluationJson = null) => Commits.Enqueue((jobId, record));

    public void Prune(string jobId, long[] keep) => Prunes.Enqueue((jobId, keep));
}
