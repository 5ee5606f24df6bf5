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

    Task WorkerOfflineAsync(string workerId);

    Task<string[]> ListWorkersAsync();

    /// <summary>Hands up to <paramref name="max"/> online, free workers to the job (in the order they came online).</summary>
    Task<WorkerCapabilities[]> ClaimWorkersAsync(string jobId, int max);

    /// <summary>Frees the job's hold on these workers (all of them when <paramref name="workerIds"/> is null).</summary>
    Task ReleaseWorkersAsync(string jobId, string[]? workerIds);
}

public enum JobWait { None, ToForm, ToGrow }
