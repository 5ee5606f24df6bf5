// The list of jobs and workers (one grain, key "cluster"), and who holds which worker: the only arbiter of free workers.
namespace DeepSeekCluster.Contracts.Grains;

public interface IClusterRegistryGrain : IGrainWithStringKey
{
    public const string Key = "cluster";

    Task AddJobAsync(string jobId);

    /// <summary>Job ids in submission order.</summary>
    Task<string[]> ListJobsAsync();

    /// <summary>
    /// ToForm: told (one-way) whenever a worker becomes free; ToGrow: told only when a worker comes online (so two
    /// running jobs never pass a worker that neither can use back and forth); None: not told.
    /// </summary>
    Task SetWaitingAsync(string jobId, JobWait wait);

    Task WorkerOnlineAsync(WorkerCapabilities capabilities);

    /// <summary>The worker went offline; returns what holds it (a job id, or an export's or evaluation's hold key), null when free.</summary>
    Task<string?> WorkerOfflineAsync(string workerId);

    Task<string[]> ListWorkersAsync();

    /// <summary>The registered jobs that hold workers now (a Coordinator's start wakes them: their timers live in an activation).</summary>
    Task<string[]> ListJobsHoldingWorkersAsync();

    /// <summary>Hands up to <paramref name="max"/> online, free workers to the job (in the order they came online).</summary>
    Task<WorkerCapabilities[]> ClaimWorkersAsync(string jobId, int max);

    /// <summary>Frees the job's hold on these workers (all of them when <paramref name="workerIds"/> is null).</summary>
    Task ReleaseWorkersAsync(string jobId, string[]? workerIds);

    /// <summary>What the job's claims are ranked and limited by (priority, tenant quota, workers it needs to form); given at submission.</summary>
    Task SetShareAsync(string jobId, JobShare share);

    /// <summary>The newest scheduling decisions (assignments, claims held back for fairness or a quota, preemptions), oldest first.</summary>
    Task<SchedulingDecision[]> ListDecisionsAsync();
}

/// <param name="Need">The fewest workers the job can form with (the smallest usable world of minWorkers..maxWorkers).</param>
[GenerateSerializer, Immutable]
public sealed record JobShare([property: Id(0)] int Priority, [property: Id(1)] string Tenant, [property: Id(2)] int Need)
{
    public static JobShare Of(JobSpec spec)
    {
        int need = spec.MinWorkers;
        for (int n = spec.MinWorkers; n <= spec.MaxWorkers; n++)
            if (spec.ChooseDataParallel(n) is { } dp) { need = dp * Math.Max(1, spec.Parallel.Pp); break; }
        return new(spec.Priority, spec.Tenant ?? JobSpec.DefaultTenant, need);
    }
}

/// <summary>One decision of the registry. Kind: assigned, held (fairness), quota, preempt, no_preemption.</summary>
[GenerateSerializer, Immutable]
public sealed record SchedulingDecision(
    [property: Id(0)] DateTimeOffset At, [property: Id(1)] string JobId, [property: Id(2)] string Kind, [property: Id(3)] string Message)
{
    [Id(4)] public string[] Workers { get; init; } = [];
    /// <summary>preempt: the job the workers are taken for.</summary>
    [Id(5)] public string? For { get; init; }
}

public enum JobWait { None, ToForm, ToGrow }
