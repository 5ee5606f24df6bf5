// The cluster's lists of jobs and workers and who holds which worker. It never waits on a job (jobs are told one-way),
// so jobs may call it freely without deadlock.
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.Coordinator.Grains;

[GenerateSerializer]
public sealed class ClusterRegistryGrainState
{
    [Id(0)] public List<string> Jobs { get; set; } = [];
    [Id(1)] public Dictionary<string, JobWait> Waiting { get; set; } = [];
    [Id(2)] public Dictionary<string, RegisteredWorker> Workers { get; set; } = [];
    [Id(3)] public long Sequence { get; set; }
}

[GenerateSerializer]
public sealed class RegisteredWorker
{
    [Id(0)] public WorkerCapabilities? Capabilities { get; set; }
    [Id(1)] public bool Online { get; set; }
    [Id(2)] public string? JobId { get; set; }
    /// <summary>Order of coming online: free workers are handed out first come, first served.</summary>
    [Id(3)] public long Since { get; set; }
}

public sealed class ClusterRegistryGrain(
    [PersistentState("registry")] IPersistentState<ClusterRegistryGrainState> registry,
    CoordinatorMetrics metrics) : Grain, IClusterRegistryGrain
{
    ClusterRegistryGrainState S => registry.State;

    public override Task OnActivateAsync(CancellationToken cancellationToken)
    {
        CountWorkers();
        return Task.CompletedTask;
    }

    public override Task OnDeactivateAsync(DeactivationReason reason, CancellationToken cancellationToken)
    {
        metrics.Workers(null); // the next activation, maybe on another silo, reports them
        return Task.CompletedTask;
    }

    /// <summary>The snapshot behind the deepseek.cluster.workers gauge; called after every change of a worker's state.</summary>
    void CountWorkers() => metrics.Workers(S.Workers.Values
        .GroupBy(w => !w.Online ? "offline" : w.JobId is null ? "free" : "assigned")
        .ToDictionary(g => g.Key, g => (long)g.Count()));

    public async Task AddJobAsync(string jobId)
    {
        if (S.Jobs.Contains(jobId)) return;
        S.Jobs.Add(jobId);
        await registry.WriteStateAsync();
    }

    public Task<string[]> ListJobsAsync() => Task.FromResult(S.Jobs.ToArray());

    // A job claims free workers, then says it waits, in two calls. A worker that becomes free between them (comes online,
    // or is released by another job) finds the job not yet waiting and is not offered to it, so the job would wait for
    // the next free worker, forever if none comes. So each worker's moment of becoming free is numbered, each job's last
    // look at the free workers (its claim) too, and SetWaitingAsync tells a job of a worker freed since its look. A
    // job is never told of the workers it released itself (it let them go). In memory: after a reactivation a job may
    // miss such a worker as before, but is never told twice.
    long freeEvents;
    readonly Dictionary<string, long> freedAt = new(StringComparer.Ordinal);
    readonly Dictionary<string, string> releasedBy = new(StringComparer.Ordinal);
    readonly Dictionary<string, long> lastLook = new(StringComparer.Ordinal);

    void Freed(string workerId, string? by)
    {
        freedAt[workerId] = ++freeEvents;
        if (by is null) releasedBy.Remove(workerId); else releasedBy[workerId] = by;
    }

    public async Task SetWaitingAsync(string jobId, JobWait wait)
    {
        if (S.Waiting.GetValueOrDefault(jobId) != wait)
        {
            if (wait == JobWait.None) S.Waiting.Remove(jobId); else S.Waiting[jobId] = wait;
            await registry.WriteStateAsync();
        }
        if (wait == JobWait.None || !lastLook.TryGetValue(jobId, out long looked)) return;
        lastLook[jobId] = freeEvents;
        if (S.Workers.FirstOrDefault(kv => kv.Value.Online && kv.Value.JobId is null && kv.Value.Capabilities is not null
                                           && freedAt.GetValueOrDefault(kv.Key) > looked && releasedBy.GetValueOrDefault(kv.Key) != jobId)
            is { Key: { } missed })
            await GrainFactory.GetGrain<ITrainingJobGrain>(jobId).WorkerJoinedAsync(missed); // one-way
    }

    public async Task WorkerOnlineAsync(WorkerCapabilities capabilities)
    {
        if (!S.Workers.TryGetValue(capabilities.WorkerId, out var w)) S.Workers[capabilities.WorkerId] = w = new RegisteredWorker();
        w.Capabilities = capabilities;
        w.Online = true;
        w.Since = ++S.Sequence;
        Freed(capabilities.WorkerId, by: null);
        await registry.WriteStateAsync();
        CountWorkers();
        if (w.JobId is null) await TellWaitingAsync(capabilities.WorkerId, includeGrowing: true, except: null);
    }

    public async Task WorkerOfflineAsync(string workerId)
    {
        if (!S.Workers.TryGetValue(workerId, out var w) || !w.Online) return;
        w.Online = false;
        await registry.WriteStateAsync();
        CountWorkers();
    }

    public Task<string[]> ListWorkersAsync() => Task.FromResult(S.Workers.Keys.Order(StringComparer.Ordinal).ToArray());

    public async Task<WorkerCapabilities[]> ClaimWorkersAsync(string jobId, int max)
    {
        lastLook[jobId] = freeEvents;
        var free = S.Workers.Values.Where(w => w.Online && w.JobId is null && w.Capabilities is not null)
            .OrderBy(w => w.Since).Take(Math.Max(0, max)).ToList();
        foreach (var w in free) w.JobId = jobId;
        if (free.Count > 0) await registry.WriteStateAsync();
        CountWorkers();
        return [.. free.Select(w => w.Capabilities!)];
    }

    public async Task ReleaseWorkersAsync(string jobId, string[]? workerIds)
    {
        var released = S.Workers.Where(kv => kv.Value.JobId == jobId && (workerIds is null || workerIds.Contains(kv.Key))).ToList();
        if (released.Count == 0) return;
        foreach (var (id, w) in released)
        {
            w.JobId = null;
            Freed(id, by: jobId);
        }
        await registry.WriteStateAsync();
        CountWorkers();
        // Only jobs that cannot run at all hear of released workers; see JobWait.
        foreach (var (id, w) in released)
            if (w.Online) await TellWaitingAsync(id, includeGrowing: false, except: jobId);
    }

    async Task TellWaitingAsync(string workerId, bool includeGrowing, string? except)
    {
        foreach (var (jobId, wait) in S.Waiting.ToList())
            if (jobId != except && (wait == JobWait.ToForm || includeGrowing))
                await GrainFactory.GetGrain<ITrainingJobGrain>(jobId).WorkerJoinedAsync(workerId); // one-way
    }
}
