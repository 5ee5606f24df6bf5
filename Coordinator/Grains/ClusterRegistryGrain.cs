// The cluster's lists of jobs and workers and who holds which worker. It never waits on a job (jobs are told one-way),
// so jobs may call it freely without deadlock.
using DeepSeekCluster.Contracts.Grains;
using Microsoft.Extensions.Options;

namespace DeepSeekCluster.Coordinator.Grains;

[GenerateSerializer]
public sealed class ClusterRegistryGrainState
{
    [Id(0)] public List<string> Jobs { get; set; } = [];
    [Id(1)] public Dictionary<string, JobWait> Waiting { get; set; } = [];
    [Id(2)] public Dictionary<string, RegisteredWorker> Workers { get; set; } = [];
    [Id(3)] public long Sequence { get; set; }
    [Id(4)] public Dictionary<string, ShareRecord> Shares { get; set; } = [];
    /// <summary>The newest scheduling decisions (at most DecisionsKept).</summary>
    [Id(5)] public List<SchedulingDecision> Decisions { get; set; } = [];
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
    CoordinatorMetrics metrics,
    IOptions<CoordinatorOptions> options,
    TimeProvider clock,
    ILogger<ClusterRegistryGrain> logger) : Grain, IClusterRegistryGrain
{
    const int DecisionsKept = 500;

    ClusterRegistryGrainState S => registry.State;
    SharePolicy Policy => new(S, options.Value.Quotas);

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

    public Task<string[]> ListJobsHoldingWorkersAsync() =>
        Task.FromResult(S.Workers.Values.Select(w => w.JobId).OfType<string>().Distinct(StringComparer.Ordinal).Where(S.Jobs.Contains).Order(StringComparer.Ordinal).ToArray());

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
        var was = S.Waiting.GetValueOrDefault(jobId);
        if (was != wait)
        {
            if (wait == JobWait.None) S.Waiting.Remove(jobId); else S.Waiting[jobId] = wait;
            if (S.Shares.TryGetValue(jobId, out var share)) share.WaitingSince = wait == JobWait.ToForm ? ++S.Sequence : 0;
            await registry.WriteStateAsync();
            // Free workers kept for this job (it was ahead in the queue) may now go to the jobs behind it.
            if (was == JobWait.ToForm && Policy.Free() is [var first, ..]) await TellWaitingAsync(first.Key, includeGrowing: false, except: jobId);
        }
        if (wait == JobWait.ToForm) await PreemptForAsync(jobId);
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

    public async Task<string?> WorkerOfflineAsync(string workerId)
    {
        if (!S.Workers.TryGetValue(workerId, out var w)) return null;
        if (!w.Online) return w.JobId;
        w.Online = false;
        await registry.WriteStateAsync();
        CountWorkers();
        return w.JobId;
    }

    public Task<string[]> ListWorkersAsync() => Task.FromResult(S.Workers.Keys.Order(StringComparer.Ordinal).ToArray());

    public async Task<WorkerCapabilities[]> ClaimWorkersAsync(string jobId, int max)
    {
        lastLook[jobId] = freeEvents;
        var policy = Policy;
        var (count, kind, why) = policy.Allowed(jobId, max);
        var free = policy.Free().Take(count).ToList();
        foreach (var (_, w) in free) w.JobId = jobId;
        // An assignment is always recorded (and the claimed workers written); a held-back claim once per distinct decision.
        bool decided = free.Count > 0
            ? Decide(new(clock.GetUtcNow(), jobId, "assigned", $"{string.Join(", ", free.Select(f => f.Key))} assigned " +
                $"(priority {policy.ShareOf(jobId).Priority}, tenant '{policy.ShareOf(jobId).Tenant}'){(why is null ? "" : $"; {why}")}") { Workers = [.. free.Select(f => f.Key)] })
            : kind is not null && Decide(new(clock.GetUtcNow(), jobId, kind, why!));
        if (decided) await registry.WriteStateAsync();
        CountWorkers();
        return [.. free.Select(f => f.Value.Capabilities!)];
    }

    public async Task SetShareAsync(string jobId, JobShare share)
    {
        if (!S.Shares.TryGetValue(jobId, out var r)) S.Shares[jobId] = r = new ShareRecord { Order = ++S.Sequence };
        r.Share = share;
        await registry.WriteStateAsync();
    }

    public Task<SchedulingDecision[]> ListDecisionsAsync() => Task.FromResult(S.Decisions.ToArray());

    /// <summary>Jobs told to release their workers for another, until they hold none (so each is told once).</summary>
    readonly Dictionary<string, string> preempting = new(StringComparer.Ordinal);
    /// <summary>The last held-back decision per job, so a job that asks again and again is not recorded again and again.</summary>
    readonly Dictionary<string, string> lastHeld = new(StringComparer.Ordinal);

    /// <summary>A job that cannot form takes the workers of running jobs of lower priorities (SharePolicy.Victims).</summary>
    async Task PreemptForAsync(string jobId)
    {
        var policy = Policy;
        var me = policy.ShareOf(jobId);
        if (!policy.CanForm(jobId))
        {
            if ((me.Priority > 0 || policy.QuotaLeft(me.Tenant) is not null)
                && Decide(new(clock.GetUtcNow(), jobId, "no_preemption", $"cannot form even by preempting: it lacks {policy.Shortfall(jobId)} workers " +
                    $"(tenant '{me.Tenant}' may take {policy.QuotaLeft(me.Tenant)?.ToString() ?? "any number"}; lower priorities hold fewer)")))
                await registry.WriteStateAsync();
            return;
        }
        if (policy.Victims(jobId) is not { Count: > 0 } victims) return;
        foreach (var (victim, workers) in victims.Where(v => !preempting.ContainsKey(v.JobId)))
        {
            preempting[victim] = jobId;
            string why = $"preempted by {jobId} (priority {me.Priority} over {policy.ShareOf(victim).Priority}): its {workers} workers are needed to form it";
            Decide(new(clock.GetUtcNow(), victim, "preempt", why) { For = jobId, Workers = [.. S.Workers.Where(kv => kv.Value.JobId == victim).Select(kv => kv.Key)] });
            await GrainFactory.GetGrain<ITrainingJobGrain>(victim).PreemptAsync(jobId, why); // one-way
        }
        await registry.WriteStateAsync();
    }

    /// <summary>Records the decision (false: the same held-back decision as the job's last one, not recorded again).</summary>
    bool Decide(SchedulingDecision d)
    {
        if (d.Kind is "held" or "quota" or "no_preemption")
        {
            if (lastHeld.GetValueOrDefault(d.JobId) == d.Message) return false;
            lastHeld[d.JobId] = d.Message;
        }
        else lastHeld.Remove(d.JobId);
        S.Decisions.Add(d);
        if (S.Decisions.Count > DecisionsKept) S.Decisions.RemoveRange(0, S.Decisions.Count - DecisionsKept);
        logger.LogInformation("Scheduling {Kind} for job {Job}: {Message}", d.Kind, d.JobId, d.Message);
        // The job's own events say it too: an assignment as worker_joined, a preemption as preempted (PreemptAsync).
        if (d.Kind is not ("assigned" or "preempt") && S.Shares.ContainsKey(d.JobId)) _ = GrainFactory.GetGrain<ITrainingJobGrain>(d.JobId).ScheduledAsync(d.Kind, d.Message); // one-way
        return true;
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
        if (Policy.Held(jobId) == 0) preempting.Remove(jobId);
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
