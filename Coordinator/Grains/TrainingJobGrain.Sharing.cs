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

    /// <summary>The spec's own problems, and a startFrom checkpoint that is not committed (PBT never copies one that is not).</summary>
    async Task<IReadOnlyList<SpecProblem>> ValidateAsync(JobSpec spec)
    {
        var problems = spec.Validate();
        if (problems.Count > 0 || spec.StartFrom is not { } from) return problems;
        if (from.Job == JobId) return [new SpecProblem("startFrom", $"job '{JobId}' cannot start from its own checkpoint")];
        var source = await GrainFactory.GetGrain<ITrainingJobGrain>(from.Job).GetStatusAsync();
        var committed = source.Committed.Where(c => c.DeletedAt is null).Select(c => c.Step).ToList();
        return committed.Contains(from.Step) ? problems
            : [new SpecProblem("startFrom", $"job '{from.Job}' has no committed checkpoint of step {from.Step} (committed: {(committed.Count == 0 ? "none" : string.Join(", ", committed))})")];
    }

    /// <summary>At submission: the registry learns the job's share; a job started from another's checkpoint inherits its lineage.</summary>
    async Task JoinClusterAsync()
    {
        if (S.Spec!.StartFrom is { } from)
        {
            // Steps 1..from.Step consumed their global batches once in the source's lineage (its ledger proves it).
            S.Ledger.Prefix = from.Step;
            S.Step = from.Step;
            Event(New(JobEventKinds.StartedFrom, $"starts from the committed checkpoint of job {from.Job} at step {from.Step}; steps 1..{from.Step} are that job's lineage")
                with { ResumeStep = from.Step, Reason = $"{from.Job}@{from.Step}" });
        }
        await Registry.SetShareAsync(JobId, JobShare.Of(S.Spec));
    }

    public async Task ScheduledAsync(string decision, string message)
    {
        if (S.Spec is null || S.State.IsTerminal()) return;
        Event(New(JobEventKinds.Scheduling, message) with { Reason = decision });
        await job.WriteStateAsync();
    }
}
