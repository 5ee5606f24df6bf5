// The job's checkpoints as its ranks and the committer report them: complete steps handed to the committer, commits,
// failures and retention's deletions, recorded in the CheckpointBook. Not the store: the committer talks to it.
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.Coordinator.Grains;

public sealed partial class TrainingJobGrain
{
    public async Task<bool> ReportCheckpointAsync(long generation, CheckpointReport report)
    {
        // A rank's report of the last generation may still arrive after the commit that completed the job.
        Fence(generation, "checkpoint", acceptedWhenCompleted: true);
        var complete = S.CheckpointBook.Report(generation, S.Workers.Count, report);
        await job.WriteStateAsync();
        if (complete is null) return false;
        logger.LogInformation("Job {Job}: checkpoint at step {Step}: all {World} ranks reported; handed to the committer", JobId, report.Step, complete.World);
        committer.Commit(JobId, complete, S.TakeEvaluationDocument(complete.Step));
        return true;
    }

    public async Task ReportCheckpointFailedAsync(long generation, long step, int rank, string error)
    {
        Fence(generation, "checkpoint", acceptedWhenCompleted: true);
        string then = step >= S.Spec!.Steps ? "; the rank saves the final checkpoint again until the store takes it" : "; training goes on";
        Event(New(JobEventKinds.CheckpointNotCommitted, $"checkpoint at step {step} (generation {generation}) not committed: rank {rank} {error}{then}")
            with { ResumeStep = step, Reason = $"rank {rank}: {error}" });
        if (!await ReleaseWithoutPreemptionCheckpointAsync(generation, "checkpoint_failed", $"rank {rank}'s save of step {step} failed")) await job.WriteStateAsync();
    }

    public async Task CheckpointCommittedAsync(CommittedCheckpoint checkpoint)
    {
        if (S.Spec is null) throw new KeyNotFoundException($"no job '{JobId}'");
        if (!S.CheckpointBook.Commit(checkpoint)) return; // a retried commit
        Event(New(JobEventKinds.CheckpointCommitted, $"checkpoint at step {checkpoint.Step} committed: {checkpoint.Files} files, {checkpoint.Bytes} bytes")
            with { ResumeStep = checkpoint.Step });
        // Retention: a generation that has not resumed yet may be loading the step its Assignment named.
        long? resuming = S.GenerationResumedAt is null && !S.State.IsTerminal() ? S.GenerationResumeStep : null;
        var deletable = S.CheckpointBook.Deletable(S.Spec.KeepLast, resuming);
        if (deletable.Count > 0) committer.Prune(JobId, S.CheckpointBook.KeptBesides(deletable));
        if (!await CompleteIfFinalCheckpointCommittedAsync() && !await ReleaseIfPreemptionCheckpointAsync(checkpoint)) await job.WriteStateAsync();
    }

    public async Task CheckpointsDeletedAsync(long[] steps, long[] leftovers)
    {
        if (S.Spec is null) throw new KeyNotFoundException($"no job '{JobId}'");
        S.CheckpointBook.Deleted(steps, clock.GetUtcNow());
        var what = new List<string>();
        if (steps.Length > 0) what.Add($"the checkpoints of steps {string.Join(", ", steps)}");
        if (leftovers.Length > 0) what.Add($"the uncommitted files of steps {string.Join(", ", leftovers)}");
        Event(New(JobEventKinds.CheckpointsDeleted, $"retention (keepLast {S.Spec.KeepLast}) deleted {string.Join(" and ", what)}") with { Reason = "retention" });
        await job.WriteStateAsync();
    }

    public async Task CheckpointNotCommittedAsync(long generation, long step, string reason)
    {
        if (S.Spec is null) throw new KeyNotFoundException($"no job '{JobId}'");
        S.CheckpointBook.NotCommitted(step);
        Event(New(JobEventKinds.CheckpointNotCommitted, $"checkpoint at step {step} (generation {generation}) not committed: {reason}")
            with { ResumeStep = step, Reason = reason });
        // Every rank uploaded the final checkpoint but it cannot be committed (refused, no store, storage gone past the
        // retries): training is over, so the job completes and says what is missing rather than waiting forever.
        if (step >= S.Spec.Steps && S.Step >= S.Spec.Steps && generation == S.Generation && !S.State.IsTerminal())
            await FinishAsync(JobState.Completed, JobEventKinds.Completed, $"completed {S.Step} steps; the final checkpoint was not committed: {reason}");
        else if (!await ReleaseWithoutPreemptionCheckpointAsync(generation, "checkpoint_not_committed", $"the store did not commit step {step}: {reason}")) await job.WriteStateAsync();
    }
}
