// Sharing the cluster, the job's side: released for a job of a higher priority, and the registry's decisions about its
// claims kept as events (docs/agent.md).
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.Coordinator.Grains;

public sealed partial class TrainingJobGrain
{
    /// <summary>
    /// The members stop at their step boundary (Rescale: a worker keeps the live state, as in any re-formation), every
    /// worker goes back to the registry, and the job waits to form again. The next generation resumes from a live state
    /// still held or from the newest committed checkpoint; steps trained after that checkpoint are redone and the ledger
    /// drops their first consumption (ReportResumedAsync), so the lineage of the weights consumes every sample once.
    /// </summary>
    public async Task PreemptAsync(string byJob, string reason)
    {
        if (S.Spec is null || S.State.IsTerminal() || S.Pool.Count == 0) return;
        var members = S.Workers.ToList();
        if (S.State == JobState.Running)
        {
            S.Recovery.Start(JobEventKinds.Preempted, clock.GetUtcNow());
            S.State = JobState.Rescaling;
            metrics.Rescaled(JobEventKinds.Preempted);
        }
        Event(New(JobEventKinds.Preempted, $"{reason}; releasing {S.Pool.Count} workers ({string.Join(", ", S.Pool.Select(p => p.WorkerId))}); " +
                $"resumes from the live state or the committed checkpoint of step {S.CheckpointBook.NewestCommitted} when workers are free")
            with { Reason = $"preempted by {byJob}" });
        S.Pool.Clear();
        await job.WriteStateAsync();
        if (S.State == JobState.Rescaling)
        {
            var rescale = new ControlCommand { Kind = ControlCommandKind.Rescale, JobId = JobId, Generation = S.Generation, Reason = $"preempted by {byJob}" };
            await Task.WhenAll(members.Select(w => SendAsync(w.WorkerId, rescale)));
        }
        await Registry.ReleaseWorkersAsync(JobId, null);
        await TryFormAsync();
    }

    public async Task ScheduledAsync(string decision, string message)
    {
        if (S.Spec is null || S.State.IsTerminal()) return;
        Event(New(JobEventKinds.Scheduling, message) with { Reason = decision });
        await job.WriteStateAsync();
    }
}
