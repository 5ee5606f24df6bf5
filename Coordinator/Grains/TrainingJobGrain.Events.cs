// Job events from outside training (exports run by the job's exports grain): kept apart so the job's state machine stays in one file.
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.Coordinator.Grains;

public sealed partial class TrainingJobGrain
{
    public async Task RecordEventAsync(string kind, string message, string? reason)
    {
        if (S.Spec is null) throw new KeyNotFoundException($"no job '{JobId}'");
        Event(New(kind, message) with { Reason = reason });
        await job.WriteStateAsync();
    }
}
