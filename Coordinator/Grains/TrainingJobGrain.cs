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
}

public sealed class TrainingJobGrain(
    [PersistentState("job")] IPersistentState<TrainingJobGrainState> job,
    IOptions<CoordinatorOptions> options,
    CoordinatorMetrics metrics,
    TimeProvider clock,
    ILogger<TrainingJobGrain> logger) : Grain, ITrainingJobGrain
{
    const int EventsKept = 200;

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
        Event("submitted");
        await job.WriteStateAsync();
        await Registry.AddJobAsync(JobId);

        S.State = JobState.Forming;
        Event($"forming: waiting for {spec.MinWorkers}..{spec.MaxWorkers} workers");
        await job.WriteStateAsync();
        await TryFormAsync();
        return Status();
    }

    public override Task OnActivateAsync(CancellationToken cancellationToken)
    {
        if (S.Spec is not null && !S.State.IsTerminal()) metrics.JobGeneration(JobId, S.Generation);
        return Task.CompletedTask;
    }

    public Task<JobStatus> GetStatusAsync() => Task.FromResult(Status());

    public async Task<JobStatus> StopAsync()
    {
        if (S.Spec is null) throw new KeyNotFoundException($"no job '{JobId}'");
        if (!S.State.IsTerminal()) await FinishAsync(JobState.Stopped, "stopped on request");
        return Status();
    }

    public async Task WorkerJoinedAsync(string workerId)
    {
        if (S.Spec is null || S.State.IsTerminal()) return;
        await TryFormAsync();
    }

    public async Task WorkerLeftAsync(string workerId, string reason)
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
        S.State = JobState.Rescaling;
        metrics.Rescaled("worker_left");
        Event($"worker {workerId} left ({reason}): rescaling");
        await job.WriteStateAsync();
        // The survivors stop at the step boundary; the next Assignment (new generation) tells them how to go on.
        var rescale = new ControlCommand { Kind = ControlCommandKind.Rescale, JobId = JobId, Generation = S.Generation, Reason = $"worker {workerId} left" };
        await Task.WhenAll(S.Workers.Select(w => SendAsync(w.WorkerId, rescale)));
        await TryFormAsync();
    }

    public async Task ReportStepAsync(long generation, StepReport report)
    {
        Fence(generation, "step");
        if (report.Step > S.Step) S.Step = report.Step;
        if (!S.Loss.Any(p => p.Step == report.Step))
        {
            S.Loss.Add(new LossPoint(report.Step, report.Loss, report.TokensPerSecond));
            int excess = S.Loss.Count - options.Value.LossHistory;
            if (excess > 0) S.Loss.RemoveRange(0, excess);
        }
        if (S.Step >= S.Spec!.Steps) await FinishAsync(JobState.Completed, $"completed {S.Step} steps");
        else await job.WriteStateAsync();
    }

    public async Task<bool> ReportCheckpointAsync(long generation, CheckpointReport report)
    {
        // The last step's checkpoint may arrive after the step report that completed the job.
        Fence(generation, "checkpoint", acceptedWhenCompleted: true);
        int i = S.Checkpoints.FindIndex(c => c.Step == report.Step && c.Generation == generation);
        var record = i >= 0 ? S.Checkpoints[i] : new CheckpointRecord { Step = report.Step, Generation = generation, World = S.Workers.Count };
        var files = record.Files.Where(f => f.Rank != report.Rank).Append(report).OrderBy(f => f.Rank).ToArray();
        bool complete = files.Length == record.World, wasComplete = record.Complete;
        record = record with { Files = files, Complete = complete };
        if (i >= 0) S.Checkpoints[i] = record; else S.Checkpoints.Add(record);
        if (complete && !wasComplete) Event($"checkpoint at step {report.Step}: all {record.World} ranks reported");
        await job.WriteStateAsync();
        return complete;
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
        Event($"checkpoint at step {checkpoint.Step} committed: {checkpoint.Files} files, {checkpoint.Bytes} bytes");
        await job.WriteStateAsync();
    }

    public async Task CheckpointNotCommittedAsync(long generation, long step, string reason)
    {
        if (S.Spec is null) throw new KeyNotFoundException($"no job '{JobId}'");
        ForgetManifest(generation, step);
        Event($"checkpoint at step {step} (generation {generation}) not committed: {reason}");
        await job.WriteStateAsync();
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
        await FinishAsync(JobState.Failed, reason);
    }

    // ---- Formation ----

    /// <summary>
    /// Claims free workers up to maxWorkers and, when the largest usable world (see JobSpec.ChooseDataParallel) differs from
    /// the current one, forms a new generation: ranks 0..N-1, batch slices, an Assignment pushed to every member.
    /// </summary>
    async Task TryFormAsync()
    {
        var spec = S.Spec!;
        int want = spec.MaxWorkers - S.Pool.Count;
        if (want > 0)
        {
            var claimed = await Registry.ClaimWorkersAsync(JobId, want);
            S.Pool.AddRange(claimed.Where(c => S.Pool.All(p => p.WorkerId != c.WorkerId)));
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
            S.State = JobState.Rescaling;
            metrics.Rescaled("grow");
            Event($"growing to {world} workers");
        }
        S.Generation++;
        S.Workers = [.. members.Select((m, rank) => new JobWorker(rank, m.WorkerId, m.CollectiveEndpoint))];
        S.State = JobState.Running;
        Event($"generation {S.Generation}: {world} workers (dp {dp} × pp {pp}): {string.Join(", ", S.Workers.Select(w => $"{w.Rank}={w.WorkerId}"))}");
        await ReleaseExtrasAsync();
        await job.WriteStateAsync();
        metrics.Formed(rescale);
        metrics.JobGeneration(JobId, S.Generation);
        await Registry.SetWaitingAsync(JobId, world < spec.MaxWorkers ? JobWait.ToGrow : JobWait.None);

        string specJson = JsonSerializer.Serialize(spec, CoordinatorJson.Options);
        // Only a committed checkpoint exists; a step every rank reported but the store never committed cannot be loaded.
        long resume = S.Committed.Select(c => c.Step).DefaultIfEmpty(0).Max();
        int perReplica = spec.GlobalBatch / dp.Value;
        await Task.WhenAll(S.Workers.Select(w => AssignAsync(w.WorkerId, new Assignment
        {
            JobId = JobId,
            Generation = S.Generation,
            Rank = w.Rank,
            World = world,
            DpRank = w.Rank / pp,
            DpSize = dp.Value,
            PpStage = w.Rank % pp,
            PpSize = pp,
            BatchOffset = w.Rank / pp * perReplica,
            BatchCount = perReplica,
            GradAccumSteps = perReplica / spec.MicroBatch,
            Peers = [.. S.Workers],
            SpecJson = specJson,
            ResumeStep = resume,
        })));
    }

    async Task ReleaseExtrasAsync()
    {
        var extras = S.Pool.Where(p => S.Workers.All(w => w.WorkerId != p.WorkerId)).Select(p => p.WorkerId).ToArray();
        if (extras.Length == 0) return;
        S.Pool.RemoveAll(p => extras.Contains(p.WorkerId));
        await Registry.ReleaseWorkersAsync(JobId, extras);
    }

    async Task FinishAsync(JobState final, string why)
    {
        var members = S.Workers.ToList();
        S.State = final;
        if (final == JobState.Failed) S.Error = why;
        Event(why);
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

    void Event(string message)
    {
        S.Events.Add(new JobEvent(clock.GetUtcNow(), S.Generation, message));
        if (S.Events.Count > EventsKept) S.Events.RemoveRange(0, S.Events.Count - EventsKept);
        logger.LogInformation("Job {Job} [{State}, generation {Generation}]: {Message}", JobId, S.State, S.Generation, message);
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
        Events = [.. S.Events],
        Error = S.Error,
        SubmittedAt = S.SubmittedAt,
    };
}
