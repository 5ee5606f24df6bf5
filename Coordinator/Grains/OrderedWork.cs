// Work the Coordinator orders a free worker to do outside any job (an export, an evaluation share) is held in the
// registry under a key of its own; when that worker is lost, the work's grain hears it from here.
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.Coordinator.Grains;

public static class OrderedWork
{
    /// <summary>
    /// Tells the export or evaluation that holds the worker (<paramref name="holder"/>, the registry's hold key) that the
    /// worker is gone; a job id or null holds no ordered work. Each grain fails only what is still running on that worker,
    /// so hearing it twice (the stream's end, then going offline) changes nothing.
    /// </summary>
    public static async Task WorkerLostAsync(IGrainFactory grains, string? holder, string workerId, string reason)
    {
        if (holder is null) return;
        if (holder.StartsWith("export:", StringComparison.Ordinal) && holder.Split(':') is [_, var job, _, _])
            await grains.GetGrain<IJobExportsGrain>(job).WorkerLostAsync(workerId, reason);
        else if (holder.StartsWith("evaluation:", StringComparison.Ordinal))
            await grains.GetGrain<IEvaluationGrain>(holder["evaluation:".Length..]).WorkerLostAsync(workerId, reason);
    }
}
