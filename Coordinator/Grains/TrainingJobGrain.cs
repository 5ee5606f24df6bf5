// One training job: the state machine Pending → Forming → Running ⇄ Rescaling → Completed | Failed | Stopped,
// generations that fence every report, and the ranks handed to worker grains. Persisted after every change.
using System.Text.Json;
using DeepSeekCluster.Contracts.Grains;
using Microsoft.Extensions.Options;

namespace DeepSeekCluster.Coordinator.Grains;

[GenerateSerializer]
public sealed class TrainingJobGrainState
{
    [Id(0)] public JobSpec? Spec { get; set; }
    [Id(1)] public JobState State { get; set; }
    [Id(2)] public long Generation { get; set; }
    [Id(3)] public long Step { get; set; }
    [Id(4)] public List<LossPoint> Loss { get; set; } = [];
    /// <summary>The current generation's ranks, in rank order.</summary>
    [Id(5)] public List<JobWorker> Workers { get; set; } = [];
    /// <summary>Every worker the registry handed to this job (members and, while forming, those waiting for more).</summary>
    [Id(6)] public List<WorkerCapabilities> Pool { get; set; } = [];
    [Id(7)] public List<CheckpointRecord> Checkpoints { get; set; } = [];
    [Id(8)] public List<JobEvent> Events { get; set; } = [];
    [Id(9)] public string? Error { get; set; }
    [Id(10)] public DateTimeOffset? SubmittedAt { get; set; }
    /// <summary>Steps the CheckpointStore committed, oldest first.</summary>
    [Id(11)] public List<CommittedCheckpoint> Committed { get; set; } = [];
    /// <summary>The exactly-once ledger of the current state's lineage (see <see cref="SampleLedger"/>).</summary>
    [Id(12)] public SampleLedger Ledger { get; set; } = new();
    [Id(13)] public ExpertLoad? ExpertLoad { get; set; }
    /// <summary>The re-formation in progress (null when none): timed from its cause to the first step after it.</summary>
    [Id(14)] public Reformation? Reforming { get; set; }
    /// <summary>The step the current generation resumed from; null until its rank 0 reports Resumed.</summary>
    [Id(15)] public long? GenerationResumedAt { get; set; }
    /// <summary>Each member's latest achieved FLOP/s and device peak: the status's MFU (see <see cref="UtilizationBoard"/>).</summary>
    [Id(40)] public UtilizationBoard Utilization { get; set; } = new();
}

/// <summary>A re-formation's clock: cause (a worker left, was lost or hung, or the job grows) → formed → resumed → first step.</summary>
[GenerateSerializer]
public sealed class Reformation
{
    [Id(0)] public DateTimeOffset DetectedAt { get; set; }
    [Id(1)] public string Cause { get; set; } = "";
    [Id(2)] public DateTimeOffset? FormedAt { get; set; }
    [Id(3)] public DateTimeOffset? ResumedAt { get; set; }
    [Id(4)] public long Generation { get; set; }
    [Id(5)] public long ResumedStep { get; set; }
}

public sealed class TrainingJobGrain(
    [PersistentState("job")] IPersistentState<TrainingJobGrainState> job,
    IOptions<CoordinatorOptions> options,
    CoordinatorMetrics metrics,
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
        var problems = spec.Validate();
        if (problems.Count > 0) throw new JobSpecInvalidException(problems);

        S.Spec = spec with { Name = JobId };
        S.State = JobState.Pending;
        S.SubmittedAt = clock.GetUtcNow();
        Event(JobEventKinds.Submitted, "submitted");
        await job.WriteStateAsync();
        await Registry.AddJobAsync(JobId);

        S.State = JobState.Forming;
        Event(JobEventKinds.Forming, $"forming: waiting for {spec.MinWorkers}..{spec.MaxWorkers} workers");
        await job.WriteStateAsync();
        await TryFormAsync();
        return Status();
    }

    public override Task OnActivateAsync(CancellationToken cancellationToken)
    {
        if (S.Spec is not null && !S.State.IsTerminal()) metrics.JobGeneration(JobId, S.Generation);
        if (S.Spec is not null) metrics.JobStateChanged(JobId, S.State);
        return Task.CompletedTask;
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
        StartReformation(cause);
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
        S.Loss.RemoveAll(p => p.Step > report.Step);
        S.Step = report.Step;
        var now = clock.GetUtcNow();
        if (S.Reforming is { } r && r.Generation == generation) { r.ResumedAt = now; r.ResumedStep = report.Step; }
        metrics.StepsRedone(redone);
        string from = report.Source switch
        {
            "replica" => $"the live state of rank {report.SourceRank}",
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
        if (!await CompleteIfFinalCheckpointCommittedAsync()) await job.WriteStateAsync();
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
        // A resent report (the worker reconnected: its first sending may have died with a Coordinator) fills only what
        // the ledger lacks; counted again it would show as an overlap.
        if (report.SampleCount > 0)
        {
            if (report.Resent) S.Ledger.AddLate(report.Step, report.SampleStart, report.SampleCount, S.Spec!.GlobalBatch);
            else S.Ledger.Add(report.Step, report.SampleStart, report.SampleCount, S.Spec!.GlobalBatch);
        }
        S.Utilization.Record(generation, report);
        if (S.State == JobState.Completed)
        {
            await job.WriteStateAsync();
            return;
        }
        if (report.ExpertLoad.Length > 0 && report.Experts > 0 && report.ExpertLoad.Length == report.ExpertLayers.Length * report.Experts
            && (S.ExpertLoad is null || report.Step >= S.ExpertLoad.Step))
            S.ExpertLoad = new ExpertLoad
            {
                Step = report.Step, Layers = report.ExpertLayers,
                Fractions = [.. Enumerable.Range(0, report.ExpertLayers.Length).Select(i => report.ExpertLoad[(i * report.Experts)..((i + 1) * report.Experts)])],
            };
        if (S.Reforming is { } r && r.Generation == generation && report.Step > r.ResumedStep) Recovered(r);
        bool lastStepReached = report.Step >= S.Spec!.Steps && S.Step < S.Spec.Steps;
        if (report.Step > S.Step) S.Step = report.Step;
        if (!S.Loss.Any(p => p.Step == report.Step))
        {
            S.Loss.Add(new LossPoint(report.Step, report.Loss, report.TokensPerSecond));
            int excess = S.Loss.Count - options.Value.LossHistory;
            if (excess > 0) S.Loss.RemoveRange(0, excess);
        }
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
        if (S.State.IsTerminal() || S.Step < S.Spec!.Steps || !S.Committed.Any(c => c.Step >= S.Spec.Steps)) return false;
        await FinishAsync(JobState.Completed, JobEventKinds.Completed, $"completed {S.Step} steps; the final checkpoint is committed");
        return true;
    }

    public async Task<bool> ReportCheckpointAsync(long generation, CheckpointReport report)
    {
        // A rank's report of the last generation may still arrive after the commit that completed the job.
        Fence(generation, "checkpoint", acceptedWhenCompleted: true);
        int i = S.Checkpoints.FindIndex(c => c.Step == report.Step && c.Generation == generation);
        var record = i >= 0 ? S.Checkpoints[i] : new CheckpointRecord { Step = report.Step, Generation = generation, World = S.Workers.Count };
        var files = record.Files.Where(f => f.Rank != report.Rank).Append(report).OrderBy(f => f.Rank).ToArray();
        bool complete = files.Length == record.World, wasComplete = record.Complete;
        record = record with { Files = files, Complete = complete };
        if (i >= 0) S.Checkpoints[i] = record; else S.Checkpoints.Add(record);
        if (complete && !wasComplete) logger.LogInformation("Job {Job}: checkpoint at step {Step}: all {World} ranks reported", JobId, report.Step, record.World);
        await job.WriteStateAsync();
        return complete;
    }

    public async Task ReportCheckpointFailedAsync(long generation, long step, int rank, string error)
    {
        Fence(generation, "checkpoint", acceptedWhenCompleted: true);
        string then = step >= S.Spec!.Steps ? "; the rank saves the final checkpoint again until the store takes it" : "; training goes on";
        Event(New(JobEventKinds.CheckpointNotCommitted, $"checkpoint at step {step} (generation {generation}) not committed: rank {rank} {error}{then}")
            with { ResumeStep = step, Reason = $"rank {rank}: {error}" });
        await job.WriteStateAsync();
    }

    public Task<CheckpointRecord?> GetCompleteCheckpointAsync(long generation, long step) =>
        Task.FromResult(S.Checkpoints.Find(c => c.Step == step && c.Generation == generation && c.Complete));

    public async Task CheckpointCommittedAsync(CommittedCheckpoint checkpoint)
    {
        if (S.Spec is null) throw new KeyNotFoundException($"no job '{JobId}'");
        if (S.Committed.Any(c => c.Step == checkpoint.Step)) return; // a retried commit
        S.Committed.Add(checkpoint);
        S.Committed.Sort((a, b) => a.Step.CompareTo(b.Step));
        ForgetManifest(checkpoint.Generation, checkpoint.Step);
        Event(New(JobEventKinds.CheckpointCommitted, $"checkpoint at step {checkpoint.Step} committed: {checkpoint.Files} files, {checkpoint.Bytes} bytes")
            with { ResumeStep = checkpoint.Step });
        if (!await CompleteIfFinalCheckpointCommittedAsync()) await job.WriteStateAsync();
    }

    public async Task CheckpointNotCommittedAsync(long generation, long step, string reason)
    {
        if (S.Spec is null) throw new KeyNotFoundException($"no job '{JobId}'");
        ForgetManifest(generation, step);
        Event(New(JobEventKinds.CheckpointNotCommitted, $"checkpoint at step {step} (generation {generation}) not committed: {reason}")
            with { ResumeStep = step, Reason = reason });
        // Every rank uploaded the final checkpoint but it cannot be committed (refused, no store, storage gone past the
        // retries): training is over, so the job completes and says what is missing rather than waiting forever.
        if (step >= S.Spec.Steps && S.Step >= S.Spec.Steps && generation == S.Generation && !S.State.IsTerminal())
            await FinishAsync(JobState.Completed, JobEventKinds.Completed, $"completed {S.Step} steps; the final checkpoint was not committed: {reason}");
        else await job.WriteStateAsync();
    }

    /// <summary>The manifest is needed only until the commit is decided; it can be megabytes for a large model.</summary>
    void ForgetManifest(long generation, long step)
    {
        int i = S.Checkpoints.FindIndex(c => c.Step == step && c.Generation == generation);
        if (i >= 0) S.Checkpoints[i] = S.Checkpoints[i] with { Files = [.. S.Checkpoints[i].Files.Select(f => f with { ManifestJson = "" })] };
    }

    public async Task FailAsync(long generation, string reason)
    {
        Fence(generation, "failure");
        await FinishAsync(JobState.Failed, JobEventKinds.Failed, reason);
    }

    // ---- Formation ----

    /// <summary>
    /// Claims free workers up to maxWorkers and, when the largest usable world (see JobSpec.ChooseDataParallel) differs from
    /// the current one, forms a new generation: ranks 0..N-1 (stage-major), batch slices, an Assignment pushed to every member.
    /// </summary>
    async Task TryFormAsync()
    {
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
        // Members of the last generation first, so ranks move as little as possible.
        var members = S.Pool.OrderBy(p => S.Workers.FindIndex(w => w.WorkerId == p.WorkerId) is var r && r >= 0 ? r : int.MaxValue)
            .Take(world).ToList();
        bool rescale = S.Generation > 0;
        if (running)
        {
            StartReformation("grow");
            S.State = JobState.Rescaling;
            metrics.Rescaled("grow");
            Event(New(JobEventKinds.Rescaling, $"growing from {S.Workers.Count} to {world} workers") with { Reason = "grow" });
        }
        S.Generation++;
        S.GenerationResumedAt = null;
        S.Workers = [.. members.Select((m, rank) => new JobWorker(rank, m.WorkerId, m.CollectiveEndpoint, m.PipelineEndpoint))];
        S.State = JobState.Running;
        if (S.Reforming is { } reforming) { reforming.FormedAt = clock.GetUtcNow(); reforming.Generation = S.Generation; }
        Event(New(JobEventKinds.Formed, $"generation {S.Generation}: {world} workers (dp {dp} × pp {pp}): {string.Join(", ", S.Workers.Select(w => $"{w.Rank}={w.WorkerId}"))}")
            with { Reason = rescale ? S.Reforming?.Cause ?? "rescale" : "initial" });
        await ReleaseExtrasAsync();
        await job.WriteStateAsync();
        metrics.Formed(rescale);
        metrics.JobGeneration(JobId, S.Generation);
        await Registry.SetWaitingAsync(JobId, world < spec.MaxWorkers ? JobWait.ToGrow : JobWait.None);

        string specJson = JobSpecJson.Serialize(spec);
        // Only a committed checkpoint exists; a step every rank reported but the store never committed cannot be loaded.
        long resume = S.Committed.Select(c => c.Step).DefaultIfEmpty(0).Max();
        var linkKey = System.Security.Cryptography.RandomNumberGenerator.GetBytes(32); // this generation's data-plane key (LinkProof)
        // Stage-major ranks (rank = stage·dp + replica): a rank is its checkpoint file's rank in ParallelLayout, and the
        // ranks of one stage (one dp group) are consecutive.
        await Task.WhenAll(S.Workers.Select(w => AssignAsync(w.WorkerId, new Assignment
        {
            JobId = JobId,
            Generation = S.Generation,
            Rank = w.Rank,
            World = world,
            DpRank = w.Rank % dp.Value,
            DpSize = dp.Value,
            PpStage = w.Rank / dp.Value,
            PpSize = pp,
            Peers = [.. S.Workers],
            SpecJson = specJson,
            ResumeStep = resume,
            LinkKey = linkKey,
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
        S.Reforming = null;
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

    /// <summary>A re-formation starts (unless one is already under way: a second failure during recovery extends the first).</summary>
    void StartReformation(string cause)
    {
        if (S.Reforming is not null && S.Reforming.ResumedAt is null) return;
        S.Reforming = new Reformation { DetectedAt = clock.GetUtcNow(), Cause = cause };
    }

    /// <summary>The first step of the re-formed generation completed: the recovery is over.</summary>
    void Recovered(Reformation r)
    {
        var now = clock.GetUtcNow();
        double total = (now - r.DetectedAt).TotalSeconds;
        double? formation = r.FormedAt is { } f ? (f - r.DetectedAt).TotalSeconds : null;
        double? restore = r.FormedAt is { } f2 && r.ResumedAt is { } a ? (a - f2).TotalSeconds : null;
        double? first = r.ResumedAt is { } a2 ? (now - a2).TotalSeconds : null;
        S.Reforming = null;
        metrics.Recovery(total, r.Cause);
        Event(New(JobEventKinds.Recovered, $"recovered from {r.Cause} in {total:0.###} s (formation {formation:0.###} s, restore {restore:0.###} s, first step {first:0.###} s)")
            with { Reason = r.Cause, RecoverySeconds = total, FormationSeconds = formation, RestoreSeconds = restore, FirstStepSeconds = first, ResumeStep = r.ResumedStep });
    }

    JobEvent New(string kind, string message) => new(clock.GetUtcNow(), S.Generation, message) { Kind = kind };

    void Event(string kind, string message) => Event(New(kind, message));

    void Event(JobEvent e)
    {
        S.Events.Add(e);
        if (S.Events.Count > EventsKept) S.Events.RemoveRange(0, S.Events.Count - EventsKept);
        metrics.JobEvent(e.Kind);
        metrics.JobStateChanged(JobId, S.State); // every transition records an event after setting the state
        logger.LogInformation("Job {Job} [{State}, generation {Generation}] {Kind}: {Message}", JobId, S.State, S.Generation, e.Kind, e.Message);
    }

    JobStatus Status() => new()
    {
        JobId = JobId,
        State = S.State,
        Generation = S.Generation,
        Step = S.Step,
        Spec = S.Spec,
        Loss = [.. S.Loss],
        Workers = [.. S.Workers],
        Checkpoints = [.. S.Checkpoints.Select(c => c with { Files = [.. c.Files.Select(f => f with { ManifestJson = "" })] })],
        Committed = [.. S.Committed],
        Consumption = S.Ledger.Summary(S.Spec?.GlobalBatch ?? 0),
        ExpertLoad = S.ExpertLoad,
        Utilization = S.Utilization.Of(S.Generation),
        Events = [.. S.Events],
        Error = S.Error,
        SubmittedAt = S.SubmittedAt,
    };
}
