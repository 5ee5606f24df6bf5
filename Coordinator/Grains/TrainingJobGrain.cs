// One training job: the state machine Pending → Forming → Running ⇄ Rescaling → Completed | Failed | Stopped,
// generations that fence every report, and the ranks handed to worker grains. What it records lives in plain classes
// of its state (TrainingJobGrainState: SampleLedger, CheckpointBook, RecoveryClock), persisted after every change.
using System.Text.Json;
using DeepSeekCluster.Contracts.Grains;
using DeepSeekCluster.Coordinator.Checkpoints;
using Microsoft.Extensions.Options;

namespace DeepSeekCluster.Coordinator.Grains;

public sealed partial class TrainingJobGrain(
    [PersistentState("job")] IPersistentState<TrainingJobGrainState> job,
    IOptions<CoordinatorOptions> options,
    CoordinatorMetrics metrics,
    ICheckpointCommitter committer,
    TimeProvider clock,
    ILogger<TrainingJobGrain> logger) : Grain, ITrainingJobGrain
{
    const int EventsKept = 200;

    /// <summary>(worker, generation) pairs already recorded as fenced in this activation.</summary>
    readonly HashSet<(string, long)> fenced = [];

    TrainingJobGrainState S => job.State;
    string JobId => this.GetPrimaryKeyString();
    IClusterRegistryGrain Registry => GrainFactory.GetGrain<IClusterRegistryGrain>(IClusterRegistryGrain.Key);

    public async Task<JobStatus> SubmitAsync(JobSpec spec)
    {
        if (S.Spec is not null) throw new InvalidOperationException($"job '{JobId}' already exists");
        var problems = await ValidateAsync(spec);
        if (problems.Count > 0) throw new JobSpecInvalidException(problems);

        S.Spec = spec with { Name = JobId };
        S.State = JobState.Pending;
        S.SubmittedAt = clock.GetUtcNow();
        Event(JobEventKinds.Submitted, "submitted");
        await job.WriteStateAsync();
        await JoinClusterAsync();
        await Registry.AddJobAsync(JobId);

        S.State = JobState.Forming;
        Event(JobEventKinds.Forming, $"forming: waiting for {spec.MinWorkers}..{spec.MaxWorkers} workers");
        await job.WriteStateAsync();
        await TryFormAsync();
        return Status();
    }

    public override async Task OnActivateAsync(CancellationToken cancellationToken)
    {
        if (S.MoveLegacyState()) await job.WriteStateAsync(cancellationToken);
        if (S.Spec is not null && !S.State.IsTerminal()) metrics.JobGeneration(JobId, S.Generation);
        if (S.Spec is not null) metrics.JobStateChanged(JobId, S.State, S.Spec.MaxWorkers);
        if (S.Preemption is not null && !S.State.IsTerminal()) ArmPreemptionDeadline();
    }

    public override Task OnDeactivateAsync(DeactivationReason reason, CancellationToken cancellationToken)
    {
        metrics.JobDeactivated(JobId);
        return Task.CompletedTask;
    }

    public Task<JobStatus> GetStatusAsync() => Task.FromResult(Status());

    public async Task<JobStatus> StopAsync()
    {
        if (S.Spec is null) throw new KeyNotFoundException($"no job '{JobId}'");
        if (!S.State.IsTerminal()) await FinishAsync(JobState.Stopped, JobEventKinds.Stopped, "stopped on request");
        return Status();
    }

    public async Task WorkerJoinedAsync(string workerId)
    {
        if (S.Spec is null || S.State.IsTerminal()) return;
        await TryFormAsync();
    }

    public async Task WorkerLeftAsync(string workerId, string reason, LeaveKind kind)
    {
        if (S.Spec is null || S.State.IsTerminal()) return;
        bool member = S.Workers.Any(w => w.WorkerId == workerId);
        S.Pool.RemoveAll(w => w.WorkerId == workerId);
        await Registry.ReleaseWorkersAsync(JobId, [workerId]);
        if (!member)
        {
            await job.WriteStateAsync();
            return;
        }

        S.Workers.RemoveAll(w => w.WorkerId == workerId);
        var (eventKind, verb) = kind switch
        {
            LeaveKind.Lost => (JobEventKinds.WorkerLost, "was lost"),
            LeaveKind.Hung => (JobEventKinds.WorkerHung, "hung"),
            _ => (JobEventKinds.WorkerLeft, "left"),
        };
        Event(New(eventKind, $"worker {workerId} {verb} ({reason})") with { WorkerId = workerId, Reason = reason });
        await ReformAsync(eventKind, "worker_left", New(JobEventKinds.Rescaling, $"rescaling without worker {workerId}: {S.Workers.Count} left")
            with { WorkerId = workerId, Reason = eventKind }, $"worker {workerId} left");
    }

    /// <summary>
    /// A running job re-forms: the recovery clock starts, the members are told to stop at their step boundary (the next
    /// Assignment, a new generation, tells them how to go on), and a generation forms from the workers the job has.
    /// </summary>
    async Task ReformAsync(string cause, string metricReason, JobEvent rescaling, string commandReason)
    {
        if (await ReleaseWithoutPreemptionCheckpointAsync(S.Generation, cause, commandReason)) return; // no checkpoint from fewer ranks
        S.Recovery.Start(cause, clock.GetUtcNow());
        S.State = JobState.Rescaling;
        metrics.Rescaled(metricReason);
        Event(rescaling);
        await job.WriteStateAsync();
        var rescale = new ControlCommand { Kind = ControlCommandKind.Rescale, JobId = JobId, Generation = S.Generation, Reason = commandReason };
        await Task.WhenAll(S.Workers.Select(w => SendAsync(w.WorkerId, rescale)));
        await TryFormAsync();
    }

    public async Task ReportCollectiveFailedAsync(long generation, string workerId, string reason)
    {
        if (await ReleaseWithoutPreemptionCheckpointAsync(generation, "collective_failed", $"the ring broke on worker {workerId}: {reason}")) return;
        if (S.Spec is null || S.State != JobState.Running || generation != S.Generation) return;
        logger.LogWarning("Job {Job}: the collective of generation {Generation} failed on worker {Worker}: {Reason}", JobId, generation, workerId, reason);
        await ReformAsync("collective_failed", "collective_failed", New(JobEventKinds.Rescaling,
            $"re-forming: the collective of generation {generation} failed on worker {workerId} ({reason})") with { WorkerId = workerId, Reason = "collective_failed" },
            "the collective failed");
    }

    public async Task WorkerFencedAsync(string workerId, long reportedGeneration, string what)
    {
        if (S.Spec is null) return;
        // One event per zombie and generation: a paused worker that wakes sends a burst of stale reports.
        if (!fenced.Add((workerId, reportedGeneration))) return;
        Event(New(JobEventKinds.WorkerFenced, $"worker {workerId}: a {what} from generation {reportedGeneration} was refused (current {S.Generation}); told to rejoin")
            with { WorkerId = workerId, Reason = $"stale {what} from generation {reportedGeneration}" });
        await job.WriteStateAsync();
    }

    public async Task ShareNcclUniqueIdAsync(long generation, int fromRank, int group, byte[] id, string reason)
    {
        Fence(generation, "nccl-unique-id");
        int pp = Math.Max(1, S.Spec!.Parallel.Pp), dp = Math.Max(1, S.Workers.Count / pp);
        // Ranks are stage-major: group g is ranks g·dp … g·dp + dp - 1, and its first makes the id.
        if (group < 0 || group >= pp || fromRank != group * dp)
            throw new InvalidOperationException($"rank {fromRank} sent the NCCL unique id of group {group}; in generation {generation} (dp {dp} × pp {pp}) that is rank {group * dp}'s to make");
        var share = new ControlCommand { Kind = ControlCommandKind.NcclUniqueId, JobId = JobId, Generation = generation, Group = group, Payload = id, Reason = reason };
        await Task.WhenAll(S.Workers.Where(w => w.Rank / dp == group && w.Rank != fromRank).Select(w => SendAsync(w.WorkerId, share)));
    }

    public async Task ReportResumedAsync(long generation, ResumedReport report)
    {
        Fence(generation, "resumed");
        long redone = Math.Max(0, S.Step - report.Step);
        // The state now descends from step report.Step: what later steps consumed was thrown away with them.
        S.Ledger.ResumedAt(report.Step, S.Spec!.GlobalBatch);
        S.GenerationResumedAt = report.Step;
        S.DropCurvesAfter(report.Step);
        S.Step = report.Step;
        S.Recovery.Resumed(generation, report.Step, clock.GetUtcNow());
        metrics.StepsRedone(redone);
        string from = report.Source switch
        {
            "replica" => $"the live state of rank {report.SourceRank}",
            "shards" => LiveShardsResumed(S.Spec.Parallel),
            "checkpoint" => $"the committed checkpoint of step {report.Step}",
            _ => "the start",
        };
        Event(New(JobEventKinds.Resumed, $"generation {generation} resumed at step {report.Step} from {from} " +
                $"({report.StateBytes} bytes in {report.RestoreSeconds:0.###} s); {redone} steps redone")
            with
            {
                ResumeStep = report.Step, ResumeSource = report.Source, StepsRedone = redone, SourceRank = report.SourceRank >= 0 ? report.SourceRank : null,
                StateBytes = report.StateBytes, RestoreSeconds = report.RestoreSeconds,
            });
        // A generation that resumes at the last step trains nothing: it saves the final checkpoint, whose commit completes the job.
        if (!await CompleteIfFinalCheckpointCommittedAsync() && !await ReleaseIfNothingToSaveAsync(generation, report.Step)) await job.WriteStateAsync();
        await ReplayStepsBeforeResumeAsync(generation);
    }

    public async Task ReportStepAsync(long generation, StepReport report)
    {
        // A report of the previous generation that crossed the re-formation is refused (below), but its samples belong
        // to the lineage when its step is not beyond the state the new generation resumed from (until that is known,
        // ResumedAt drops any step beyond it): the ranks finished that step, and the state that training continues
        // from contains it. Without this a step finished just before the re-formation would show as a gap.
        if (S.Spec is not null && (S.State == JobState.Completed || !S.State.IsTerminal()) && generation == S.Generation - 1 && report.SampleCount > 0
            && (S.GenerationResumedAt is not { } resumed || report.Step <= resumed)
            && S.Ledger.AddLate(report.Step, report.SampleStart, report.SampleCount, S.Spec.GlobalBatch))
            await job.WriteStateAsync();
        // Reports that arrive after the completion (a rank's last step) still count in the ledger.
        Fence(generation, "step", acceptedWhenCompleted: true);
        if (await HoldUntilResumedAsync(generation, report)) return;
        // A resent report (the worker reconnected: its first sending may have died with a Coordinator) fills only what
        // the ledger lacks; counted again it would show as an overlap.
        if (report.SampleCount > 0)
        {
            if (report.Resent) S.Ledger.AddLate(report.Step, report.SampleStart, report.SampleCount, S.Spec!.GlobalBatch);
            else S.Ledger.Add(report.Step, report.SampleStart, report.SampleCount, S.Spec!.GlobalBatch);
        }
        S.Utilization.Record(generation, report);
        // The validation after the last step may arrive once the final commit completed the job.
        S.RecordValidation(report);
        if (S.RecordEvaluation(report) is { } badEvaluation)
            logger.LogWarning("Job {Job}: rank {Rank}'s evaluation results were not recorded: {Problem}", JobId, report.Rank, badEvaluation);
        if (S.State == JobState.Completed)
        {
            await job.WriteStateAsync();
            return;
        }
        S.RecordCurves(report, options.Value.LossHistory);
        if (S.Recovery.StepCompleted(generation, report.Step, clock.GetUtcNow()) is { } recovery) Recovered(recovery);
        bool lastStepReached = report.Step >= S.Spec!.Steps && S.Step < S.Spec.Steps;
        if (report.Step > S.Step) S.Step = report.Step;
        if (lastStepReached) logger.LogInformation("Job {Job}: all {Steps} steps trained; waiting for the final checkpoint to commit", JobId, S.Step);
        if (!await CompleteIfFinalCheckpointCommittedAsync()) await job.WriteStateAsync();
    }

    /// <summary>
    /// The job completes when the last step is trained and its checkpoint is committed, not at the first report of the last
    /// step: a member lost before its final shard is uploaded re-forms the job (see ReportResumedAsync), and the new
    /// generation saves the final checkpoint from the live state, so a completed job always has its final weights stored.
    /// </summary>
    async Task<bool> CompleteIfFinalCheckpointCommittedAsync()
    {
        if (S.State.IsTerminal() || S.Step < S.Spec!.Steps || S.CheckpointBook.NewestCommitted < S.Spec.Steps) return false;
        await FinishAsync(JobState.Completed, JobEventKinds.Completed, $"completed {S.Step} steps; the final checkpoint is committed");
        return true;
    }

    public async Task FailAsync(long generation, string reason)
    {
        Fence(generation, "failure");
        await FinishAsync(JobState.Failed, JobEventKinds.Failed, reason);
    }

    public async Task ReportGuardAsync(long generation, GuardReport r)
    {
        Fence(generation, "guard");
        var e = r.Action == "rolled_back"
            ? New(JobEventKinds.RolledBack, $"step {r.Step}: rolled back to the live state of step {r.RestoredStep} ({r.SamplesSkipped} samples skipped, " +
                $"learning rate x{r.LrScale:0.####}, rollback {r.Rollbacks}): {r.Reason}") with { ResumeStep = r.RestoredStep }
            : New(JobEventKinds.StepSkipped, $"step {r.Step} not applied: {r.Reason}");
        Event(e with { Reason = r.Reason });
        await job.WriteStateAsync();
    }

    // ---- Formation ----

    /// <summary>
    /// Claims free workers up to maxWorkers and, when the largest usable world (see JobSpec.ChooseDataParallel) differs from
    /// the current one, forms a new generation: ranks 0..N-1 (stage-major), batch slices, an Assignment pushed to every member.
    /// </summary>
    async Task TryFormAsync()
    {
        if (S.Preemption is not null) return; // the members save the preemption's checkpoint; then they go
        var spec = S.Spec!;
        int want = spec.MaxWorkers - S.Pool.Count;
        if (want > 0)
        {
            var claimed = await Registry.ClaimWorkersAsync(JobId, want);
            foreach (var c in claimed.Where(c => S.Pool.All(p => p.WorkerId != c.WorkerId)))
            {
                S.Pool.Add(c);
                Event(New(JobEventKinds.WorkerJoined, $"worker {c.WorkerId} joined ({c.Device}, collectives on {c.CollectiveEndpoint})") with { WorkerId = c.WorkerId });
            }
        }

        int? dp = spec.ChooseDataParallel(S.Pool.Count);
        int pp = spec.Parallel.Pp;
        bool running = S.State == JobState.Running;
        if (dp is null || (running && dp.Value * pp <= S.Workers.Count))
        {
            if (running) await ReleaseExtrasAsync();
            await Registry.SetWaitingAsync(JobId, running ? (S.Workers.Count < spec.MaxWorkers ? JobWait.ToGrow : JobWait.None) : JobWait.ToForm);
            await job.WriteStateAsync();
            return;
        }

        int world = dp.Value * pp;
        // Members of the last generation first, so ranks move as little as possible; a sharded job that shrinks keeps
        // survivors that hold every piece of its live state.
        var ordered = S.Pool.OrderBy(p => S.Workers.FindIndex(w => w.WorkerId == p.WorkerId) is var r && r >= 0 ? r : int.MaxValue).ToList();
        var (members, kept) = KeepingLiveState(ordered, world) is { } covering ? (covering, true) : (ordered.Take(world).ToList(), false);
        bool rescale = S.Generation > 0;
        if (running)
        {
            S.Recovery.Start("grow", clock.GetUtcNow());
            S.State = JobState.Rescaling;
            metrics.Rescaled("grow");
            Event(New(JobEventKinds.Rescaling, $"growing from {S.Workers.Count} to {world} workers") with { Reason = "grow" });
        }
        int previousDp = S.GenerationDp;
        S.NextGeneration();
        S.GenerationDp = dp.Value;
        S.Workers = [.. members.Select((m, rank) => new JobWorker(rank, m.WorkerId, m.CollectiveEndpoint, m.PipelineEndpoint))];
        S.State = JobState.Running;
        S.Recovery.Formed(S.Generation, clock.GetUtcNow());
        S.GenerationResumeStep = ResumeStepOfNextGeneration();
        Event(New(JobEventKinds.Formed, $"generation {S.Generation}: {world} workers (dp {dp} × pp {pp}): {string.Join(", ", S.Workers.Select(w => $"{w.Rank}={w.WorkerId}"))}" +
                (kept ? $"; kept the survivors whose live state holds every piece of the dp {previousDp} layout, not the first by rank" : ""))
            with { Reason = rescale ? S.Recovery.Cause ?? "rescale" : "initial" });
        await ReleaseExtrasAsync();
        await job.WriteStateAsync();
        metrics.Formed(rescale);
        metrics.JobGeneration(JobId, S.Generation);
        await Registry.SetWaitingAsync(JobId, world < spec.MaxWorkers ? JobWait.ToGrow : JobWait.None);

        await AssignGenerationAsync(dp.Value, pp, checkpointOnly: false);
    }

    /// <summary>Only a committed checkpoint exists; a step every rank reported but the store never committed cannot be loaded.</summary>
    long ResumeStepOfNextGeneration() => S.CheckpointBook.NewestCommitted is > 0 and var own ? own : S.Spec!.StartFrom?.Step ?? 0;

    /// <summary>The current generation's Assignment, pushed to every member.</summary>
    async Task AssignGenerationAsync(int dp, int pp, bool checkpointOnly)
    {
        int world = dp * pp;
        string specJson = JobSpecJson.Serialize(S.Spec!);
        long resume = S.GenerationResumeStep;
        var linkKey = System.Security.Cryptography.RandomNumberGenerator.GetBytes(32); // this generation's data-plane key (LinkProof)
        // Stage-major ranks (rank = stage·dp + replica): a rank is its checkpoint file's rank in ParallelLayout, and the
        // ranks of one stage (one dp group) are consecutive.
        await Task.WhenAll(S.Workers.Select(w => AssignAsync(w.WorkerId, new Assignment
        {
            JobId = JobId,
            Generation = S.Generation,
            Rank = w.Rank,
            World = world,
            DpRank = w.Rank % dp,
            DpSize = dp,
            PpStage = w.Rank / dp,
            PpSize = pp,
            Peers = [.. S.Workers],
            SpecJson = specJson,
            ResumeStep = resume,
            LinkKey = linkKey,
            CheckpointOnly = checkpointOnly,
        })));
    }

    async Task ReleaseExtrasAsync()
    {
        var extras = S.Pool.Where(p => S.Workers.All(w => w.WorkerId != p.WorkerId)).Select(p => p.WorkerId).ToArray();
        if (extras.Length == 0) return;
        S.Pool.RemoveAll(p => extras.Contains(p.WorkerId));
        await Registry.ReleaseWorkersAsync(JobId, extras);
    }

    async Task FinishAsync(JobState final, string kind, string why)
    {
        var members = S.Workers.ToList();
        S.State = final;
        S.Recovery.Stop();
        S.Preemption = null;
        if (final == JobState.Failed) S.Error = why;
        Event(New(kind, why) with { Reason = why });
        S.Pool.Clear();
        metrics.JobFinished(JobId);
        await job.WriteStateAsync();
        await Registry.SetWaitingAsync(JobId, JobWait.None);
        var stop = new ControlCommand { Kind = ControlCommandKind.Stop, JobId = JobId, Generation = S.Generation, Step = S.Step, Reason = why };
        await Task.WhenAll(members.Select(w => SendAsync(w.WorkerId, stop)));
        await Registry.ReleaseWorkersAsync(JobId, null);
    }

    // ---- Helpers ----

    void Fence(long generation, string what, bool acceptedWhenCompleted = false)
    {
        if (S.Spec is null) throw new KeyNotFoundException($"no job '{JobId}'");
        if (generation != S.Generation)
        {
            metrics.StaleRefused(what);
            logger.LogWarning("Job {Job}: refused a {What} report from generation {Reported} (current {Current})", JobId, what, generation, S.Generation);
            throw new StaleGenerationException(JobId, generation, S.Generation);
        }
        if (S.State.IsTerminal() && !(acceptedWhenCompleted && S.State == JobState.Completed)) throw new InvalidOperationException($"job '{JobId}' is {S.State}; no more reports are accepted");
    }

    async Task AssignAsync(string workerId, Assignment assignment)
    {
        try { await GrainFactory.GetGrain<IGpuWorkerGrain>(workerId).AssignAsync(assignment); }
        catch (Exception e) { logger.LogWarning(e, "Job {Job}: could not assign rank {Rank} to worker {Worker}", JobId, assignment.Rank, workerId); }
    }

    async Task SendAsync(string workerId, ControlCommand command)
    {
        try { await GrainFactory.GetGrain<IGpuWorkerGrain>(workerId).CommandAsync(command); }
        catch (Exception e) { logger.LogWarning(e, "Job {Job}: could not send {Command} to worker {Worker}", JobId, command.Kind, workerId); }
    }

    void Recovered(Recovery r)
    {
        metrics.Recovery(r.Total, r.Cause);
        Event(New(JobEventKinds.Recovered, $"recovered from {r.Cause} in {r.Total:0.###} s (formation {r.Formation:0.###} s, restore {r.Restore:0.###} s, first step {r.FirstStep:0.###} s)")
            with { Reason = r.Cause, RecoverySeconds = r.Total, FormationSeconds = r.Formation, RestoreSeconds = r.Restore, FirstStepSeconds = r.FirstStep, ResumeStep = r.ResumedStep });
    }

    JobEvent New(string kind, string message) => new(clock.GetUtcNow(), S.Generation, message) { Kind = kind };

    void Event(string kind, string message) => Event(New(kind, message));

    void Event(JobEvent e)
    {
        S.Events.Add(e);
        if (S.Events.Count > EventsKept) S.Events.RemoveRange(0, S.Events.Count - EventsKept);
        metrics.JobEvent(e.Kind);
        metrics.JobStateChanged(JobId, S.State, S.Spec?.MaxWorkers ?? 0); // every transition records an event after setting the state
        logger.LogInformation("Job {Job} [{State}, generation {Generation}] {Kind}: {Message}", JobId, S.State, S.Generation, e.Kind, e.Message);
    }

    JobStatus Status() => S.ToStatus(JobId);
}
