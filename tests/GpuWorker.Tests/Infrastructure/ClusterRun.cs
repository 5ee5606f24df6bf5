// One cluster test's world: the checkpoint store, the real Coordinator in this process, a scratch folder, the workers'
// shared log, and real ClusterWorkers started and stopped by id. Disposing stops every worker (each finishes what it is
// doing), removes the folder, then stops the Coordinator and the store.
using System.Net.Http.Json;
using DeepSeekCluster.Contracts.Grains;
using DeepSeekCluster.GpuWorker.Cluster;

namespace DeepSeekCluster.GpuWorker.Tests.Infrastructure;

internal sealed class ClusterRun : IAsyncDisposable
{
    readonly DataShardsHost data;
    readonly TextWriter syncLog;
    readonly Dictionary<string, CancellationTokenSource> stops = [];
    readonly Dictionary<string, Task<int>> workers = [];

    ClusterRun(DataShardsHost data, StoreHost store, InProcessCoordinator coordinator, string scratch)
    {
        (this.data, Store, Coordinator, Scratch) = (data, store, coordinator, scratch);
        syncLog = TextWriter.Synchronized(Log);
    }

    public StoreHost Store { get; }
    public InProcessCoordinator Coordinator { get; }
    public HttpClient Http => Coordinator.Http;
    public string Scratch { get; }
    /// <summary>Every worker's log lines (the tests assert on them and print them when they fail).</summary>
    public StringWriter Log { get; } = new();

    public static async Task<ClusterRun> StartAsync(DataShardsHost data, string name)
    {
        var store = await StoreHost.StartAsync();
        try
        {
            var coordinator = await InProcessCoordinator.StartAsync(store.Address);
            return new ClusterRun(data, store, coordinator, Directory.CreateTempSubdirectory($"{name}-").FullName);
        }
        catch
        {
            await store.DisposeAsync();
            throw;
        }
    }

    /// <summary>Starts a ClusterWorker named <paramref name="id"/> (its files under the scratch folder; <paramref name="configure"/> changes its settings).</summary>
    public void StartWorker(string id, Func<WorkerSettings, WorkerSettings>? configure = null)
    {
        var stop = new CancellationTokenSource();
        stops.Add(id, stop);
        var settings = Coordinator.Worker(id, data.Address, Store.Address, Path.Combine(Scratch, id));
        workers.Add(id, new ClusterWorker(configure?.Invoke(settings) ?? settings, syncLog).RunAsync(stop.Token));
    }

    /// <summary>
    /// Waits until the Coordinator lists <paramref name="count"/> online workers: a job submitted before a started worker
    /// registered forms without it and re-forms when it arrives, which a test that counts generations cannot allow.
    /// </summary>
    public Task Online(int count) => InProcessCoordinator.Until(async () =>
        (await Http.GetFromJsonAsync<WorkerStatus[]>("/workers", JobSpecJson.Options))!.Count(w => w.Online) == count,
        $"{count} workers are online", Log);

    /// <summary>Worker <paramref name="id"/>'s run: it ends with the worker's exit code.</summary>
    public Task<int> Running(string id) => workers[id];

    /// <summary>Asks worker <paramref name="id"/> to leave: it finishes the step in flight and stops.</summary>
    public Task StopWorker(string id) => stops[id].CancelAsync();

    /// <summary>A folder under the scratch folder (a checkpoint's staging).</summary>
    public string Folder(string name) => Path.Combine(Scratch, name);

    public async ValueTask DisposeAsync()
    {
        foreach (var s in stops.Values) await s.CancelAsync();
        foreach (var w in workers.Values) await w.WaitAsync(TimeSpan.FromMinutes(1));
        foreach (var s in stops.Values) s.Dispose();
        Directory.Delete(Scratch, recursive: true);
        await Coordinator.DisposeAsync();
        await Store.DisposeAsync();
    }
}
