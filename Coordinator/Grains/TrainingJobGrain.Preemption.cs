// Preemption, the job's side (docs/scheduling.md): a running job released for one of a higher priority first saves a
// checkpoint at the step its members hold, through the ordinary two-phase commit, so it redoes nothing when it resumes.
// Not the choice of victims: that is the registry's (SharePolicy.Victims).
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.Coordinator.Grains;

/// <summary>A preempted job whose members save its checkpoint before they are released (TrainingJobGrainState.Preemption).</summary>
[GenerateSerializer]
public sealed class PreemptionCheckpoint
{
    [Id(0)] public string ByJob { get; set; } = "";
    /// <summary>The checkpoint-only generation (Assignment.CheckpointOnly): its commit releases the workers.</summary>
    [Id(1)] public long Generation { get; set; }
    /// <summary>When the workers go without it (the preemption + CoordinatorOptions.PreemptionCheckpointTimeout).</summary>
    [Id(2)] public DateTimeOffset Deadline { get; set; }
    /// <summary>
    /// When the checkpoint-only generation formed (null in state written before it was kept): a restarted Coordinator
    /// re-arms the deadline from it and the bound configured now.
    /// </summary>
    [Id(3)] public DateTimeOffset? Since { get; set; }
}

public sealed partial class TrainingJobGrain
{
    IGrainTimer? preemptionTimer;

    /// <summary>
    /// A running job's members stop at their step boundary (Rescale: each keeps its live state) and form a checkpoint-only
    /// generation on the same workers: it resumes from those live states (the ranks agree on the step as in any
    /// re-formation), saves a checkpoint of that step through the ordinary commit, and trains nothing. The commit releases
    /// the workers, so the job resumes later at the step it was preempted at, redoing none. When that checkpoint fails, a
    /// member is lost, or no commit comes within the bound, the workers go without it and the job resumes from a live state
    /// still held or its newest committed checkpoint, redoing the steps after it; the ledger drops their first consumption
    /// (ReportResumedAsync), so either way the lineage consumes every sample once. A job that is not running (forming, or
    /// re-forming after a fault) holds no consistent live state to save and lets its workers go at once.
    /// </summary>
    public async Task PreemptAsync(string byJob, string reason)
    {
        if (S.Spec is null || S.State.IsTerminal() || S.Pool.Count == 0 || S.Preemption is not null) return;
        var bound = options.Value.PreemptionCheckpointTimeout;
        var members = S.Workers.ToList();
        bool running = S.State == JobState.Running;
        if (running)
        {
            S.Recovery.Start(JobEventKinds.Preempted, clock.GetUtcNow());
            S.State = JobState.Rescaling;
            metrics.Rescaled(JobEventKinds.Preempted);
        }
        string workers = $"{S.Pool.Count} workers ({string.Join(", ", S.Pool.Select(p => p.WorkerId))})";
        var rescale = new ControlCommand { Kind = ControlCommandKind.Rescale, JobId = JobId, Generation = S.Generation, Reason = $"preempted by {byJob}" };
        if (running && bound > TimeSpan.Zero)
        {
            Event(New(JobEventKinds.Preempted, $"{reason}; saving a checkpoint at the step its members hold (step {S.Step} or the one in flight) before releasing " +
                    $"its {workers}; without a commit within {bound.TotalSeconds:0.#} s they go and it resumes from the committed checkpoint of step {S.CheckpointBook.NewestCommitted}")
                with { Reason = $"preempted by {byJob}" });
            await Task.WhenAll(members.Select(w => SendAsync(w.WorkerId, rescale)));
            await FormCheckpointOnlyGenerationAsync(byJob, bound);
            return;
        }
        Event(New(JobEventKinds.Preempted, $"{reason}; releasing {workers}; resumes from the live state or the committed checkpoint of step " +
                $"{S.CheckpointBook.NewestCommitted} when workers are free") with { Reason = $"preempted by {byJob}" });
        S.Pool.Clear();
        await job.WriteStateAsync();
        if (running) await Task.WhenAll(members.Select(w => SendAsync(w.WorkerId, rescale)));
        await Registry.ReleaseWorkersAsync(JobId, null);
        await TryFormAsync();
    }

    /// <summary>A new generation of the same ranks whose Assignment says CheckpointOnly (GpuWorker's StepLoop).</summary>
    async Task FormCheckpointOnlyGenerationAsync(string byJob, TimeSpan bound)
    {
        S.NextGeneration();
        S.GenerationResumeStep = ResumeStepOfNextGeneration();
        var now = clock.GetUtcNow();
        S.Preemption = new PreemptionCheckpoint { ByJob = byJob, Generation = S.Generation, Deadline = now + bound, Since = now };
        // Not a recovery's formation (RecoveryClock.Formed): the recovery the preemption started ends at the first step after
        // the job forms again, so its time includes the wait for workers.
        Event(New(JobEventKinds.Formed, $"generation {S.Generation}: the same {S.Workers.Count} workers save a checkpoint for the preemption and train nothing " +
                $"({string.Join(", ", S.Workers.Select(w => $"{w.Rank}={w.WorkerId}"))})") with { Reason = "preemption_checkpoint" });
        await job.WriteStateAsync();
        metrics.JobGeneration(JobId, S.Generation);
        ArmPreemptionDeadline();
        int pp = Math.Max(1, S.Spec!.Parallel.Pp);
        await AssignGenerationAsync(S.Workers.Count / pp, pp, checkpointOnly: true);
    }

    /// <summary>
    /// The timer that releases the workers at the deadline. A grain timer lives in one activation: after a Coordinator
    /// restart it is armed again when the job activates, which the silo's start does for every job holding workers
    /// (CoordinatorExtensions.WakeJobsHoldingWorkers), so a preemption whose members never report again still ends.
    /// </summary>
    void ArmPreemptionDeadline()
    {
        if (S.Preemption is not { } p) return;
        preemptionTimer?.Dispose();
        var deadline = p.Since is { } since ? since + options.Value.PreemptionCheckpointTimeout : p.Deadline;
        var due = deadline - clock.GetUtcNow();
        preemptionTimer = this.RegisterGrainTimer(_ => PreemptionDeadlinePassedAsync(p.Generation),
            new GrainTimerCreationOptions { DueTime = due > TimeSpan.Zero ? due : TimeSpan.Zero, Period = Timeout.InfiniteTimeSpan, KeepAlive = true });
    }

    Task PreemptionDeadlinePassedAsync(long generation) => S.Preemption?.Generation == generation
        ? ReleasePreemptedAsync(null, "checkpoint_timeout", $"no checkpoint committed within {options.Value.PreemptionCheckpointTimeout.TotalSeconds:0.#} s")
        : Task.CompletedTask;

    /// <summary>The checkpoint-only generation resumed at a step already committed (or at the start): there is nothing to save.</summary>
    async Task<bool> ReleaseIfNothingToSaveAsync(long generation, long step)
    {
        if (S.Preemption?.Generation != generation || step > S.GenerationResumeStep) return false;
        await ReleasePreemptedAsync(step, null, $"nothing newer than step {step} to save");
        return true;
    }

    /// <summary>The preemption's checkpoint committed: the workers go.</summary>
    async Task<bool> ReleaseIfPreemptionCheckpointAsync(CommittedCheckpoint checkpoint)
    {
        if (S.Preemption?.Generation != checkpoint.Generation) return false;
        await ReleasePreemptedAsync(checkpoint.Step, null, $"the checkpoint of step {checkpoint.Step} committed");
        return true;
    }

    /// <summary>The preemption's checkpoint will not commit (a rank's save failed, the store refused it): the workers go without it.</summary>
    async Task<bool> ReleaseWithoutPreemptionCheckpointAsync(long generation, string reason, string why)
    {
        if (S.Preemption?.Generation != generation) return false;
        await ReleasePreemptedAsync(null, reason, why);
        return true;
    }

    /// <summary>
    /// Lets the preempted job's workers go, after its checkpoint of <paramref name="savedStep"/> or without one (then
    /// <paramref name="reason"/> says why, and the members are told to stop the checkpoint-only run), and says in the
    /// event where the job resumes and how many steps it redoes there.
    /// </summary>
    async Task ReleasePreemptedAsync(long? savedStep, string? reason, string why)
    {
        if (S.Preemption is not { } p) return;
        S.Preemption = null;
        preemptionTimer?.Dispose();
        preemptionTimer = null;
        var members = S.Workers.ToList();
        string released = $"released {S.Pool.Count} workers for {p.ByJob}";
        if (savedStep is { } step)
            Event(New(JobEventKinds.Released, $"{released}: {why}; the job resumes at step {step}, no step redone")
                with { Reason = "checkpointed", ResumeStep = step, StepsRedone = 0 });
        else
        {
            long resume = S.CheckpointBook.NewestCommitted, redone = Math.Max(0, S.Step - resume);
            Event(New(JobEventKinds.Released, $"{released} without a checkpoint at preemption ({why}); the job resumes from a live state still held or " +
                    $"the committed checkpoint of step {resume}, up to {redone} steps redone") with { Reason = reason, ResumeStep = resume, StepsRedone = redone });
        }
        S.Pool.Clear();
        await job.WriteStateAsync();
        if (savedStep is null)
        {
            var rescale = new ControlCommand { Kind = ControlCommandKind.Rescale, JobId = JobId, Generation = S.Generation, Reason = $"preempted by {p.ByJob}: {why}" };
            await Task.WhenAll(members.Select(w => SendAsync(w.WorkerId, rescale)));
        }
        await Registry.ReleaseWorkersAsync(JobId, null);
        await TryFormAsync();
    }
}
