// Sharing the cluster, the job's side: a spec checked against other jobs' checkpoints, the lineage a startFrom inherits,
// and the registry's decisions about its claims kept as events (docs/agent.md). Preemption: TrainingJobGrain.Preemption.cs.
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.Coordinator.Grains;

public sealed partial class TrainingJobGrain
{
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
