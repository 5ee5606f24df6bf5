// What GET /jobs/{id} shows: state, generation, progress, loss history, workers, checkpoints, events. Never secrets.
namespace DeepSeekCluster.Contracts.Grains;

[GenerateSerializer, Immutable]
public sealed record JobStatus
{
    [Id(0)] public required string JobId { get; init; }
    [Id(1)] public JobState State { get; init; }
    [Id(2)] public long Generation { get; init; }
    [Id(3)] public long Step { get; init; }
    [Id(4)] public JobSpec? Spec { get; init; }
    [Id(5)] public LossPoint[] Loss { get; init; } = [];
    [Id(6)] public JobWorker[] Workers { get; init; } = [];
    [Id(7)] public CheckpointRecord[] Checkpoints { get; init; } = [];
    [Id(8)] public JobEvent[] Events { get; init; } = [];
    [Id(9)] public string? Error { get; init; }
    [Id(10)] public DateTimeOffset? SubmittedAt { get; init; }
    /// <summary>Steps the CheckpointStore committed (oldest first); a re-formation resumes from the newest.</summary>
    [Id(11)] public CommittedCheckpoint[] Committed { get; init; } = [];
    /// <summary>The exactly-once ledger of the current state's lineage: which sample positions its steps consumed.</summary>
    [Id(12)] public Consumption Consumption { get; init; } = new();
    /// <summary>Rank 0's latest routed-token fractions per MoE layer and expert; null before the first report.</summary>
    [Id(13)] public ExpertLoad? ExpertLoad { get; init; }
    /// <summary>The current generation's MFU: each member's latest step and the cluster's sum; null before a report carries a peak.</summary>
    [Id(14)] public Utilization? Utilization { get; init; }
    /// <summary>The validation curve of the current lineage: one held-out loss per validated step, oldest first.</summary>
    [Id(15)] public ValidationPoint[] ValidationLoss { get; init; } = [];
    /// <summary>The evaluation tasks' scores at each evaluated checkpoint step of the current lineage (JobSpec.evalTasks), oldest first.</summary>
    [Id(60)] public EvaluationScore[] Evaluations { get; init; } = [];
}

/// <summary>
/// Samples consumed by the steps that led to the current state (redone steps are dropped on every resume), as merged
/// [start, endExclusive) ranges of epoch-permutation positions. Complete: the ranges are exactly [0, step·globalBatch)
/// with no sample counted twice; a gap shows as two ranges, an overlap as Overlaps &gt; 0.
/// </summary>
[GenerateSerializer, Immutable]
public sealed record Consumption
{
    [Id(0)] public long Samples { get; init; }
    [Id(1)] public long[][] Ranges { get; init; } = [];
    [Id(2)] public bool Complete { get; init; }
    /// <summary>Samples reported more than once within the lineage.</summary>
    [Id(3)] public long Overlaps { get; init; }
    /// <summary>
    /// Samples of steps up to a resume point that no rank reported but the resumed state proves consumed (a rank killed
    /// between its all-reduce and its step report); part of Samples.
    /// </summary>
    [Id(4)] public long Inferred { get; init; }
}

/// <summary>Routed-token fractions: Fractions[i][e] for MoE layer Layers[i], expert e, at Step.</summary>
[GenerateSerializer, Immutable]
public sealed record ExpertLoad
{
    [Id(0)] public long Step { get; init; }
    [Id(1)] public int[] Layers { get; init; } = [];
    [Id(2)] public float[][] Fractions { get; init; } = [];
}

/// <summary>What GET /jobs lists of one job: enough to find it; GET /jobs/{id} has the rest.</summary>
public sealed record JobSummary(string JobId, JobState State, long Generation, long Step, int Workers, double? Loss)
{
    public static JobSummary Of(JobStatus s) => new(s.JobId, s.State, s.Generation, s.Step, s.Workers.Length, s.Loss.LastOrDefault()?.Loss);
}

[GenerateSerializer, Immutable]
public sealed record LossPoint([property: Id(0)] long Step, [property: Id(1)] double Loss, [property: Id(2)] double TokensPerSecond);

/// <summary>One metric of one task at a checkpoint step ("acc", "acc_norm", "perplexity", ...), with its standard error when the harness has one.</summary>
[GenerateSerializer, Immutable]
public sealed record EvaluationScore([property: Id(0)] long Step, [property: Id(1)] string Task, [property: Id(2)] string Metric,
                                     [property: Id(3)] double Value, [property: Id(4)] double? Stderr);

[GenerateSerializer, Immutable]
public sealed record ValidationPoint([property: Id(0)] long Step, [property: Id(1)] double Loss);

/// <summary>A worker in the current generation and the rank it holds.</summary>
[GenerateSerializer, Immutable]
public sealed record JobWorker([property: Id(0)] int Rank, [property: Id(1)] string WorkerId, [property: Id(2)] string Endpoint,
                               [property: Id(3)] string PipelineEndpoint = "");

/// <summary>
/// A checkpoint step: the rank files reported so far; Complete once every rank of the generation reported. Reported is not
/// committed: see <see cref="JobStatus.Committed"/>.
/// </summary>
[GenerateSerializer, Immutable]
public sealed record CheckpointRecord
{
    [Id(0)] public long Step { get; init; }
    [Id(1)] public long Generation { get; init; }
    [Id(2)] public int World { get; init; }
    [Id(3)] public CheckpointReport[] Files { get; init; } = [];
    [Id(4)] public bool Complete { get; init; }
}

/// <summary>
/// A checkpoint the CheckpointStore committed (its manifest is written). DeletedAt: when retention (JobSpec.KeepLast)
/// deleted it from the store; the entry stays so the job's history still says what was saved.
/// </summary>
[GenerateSerializer, Immutable]
public sealed record CommittedCheckpoint(
    [property: Id(0)] long Step, [property: Id(1)] long Generation, [property: Id(2)] int Files, [property: Id(3)] long Bytes)
{
    [Id(4)] public DateTimeOffset? DeletedAt { get; init; }
}

/// <summary>
/// One transition of the job. Message is the sentence for people; Kind (see <see cref="JobEventKinds"/>) and the optional
/// fields are for programs (the chaos tests, the status page, /metrics).
/// </summary>
[GenerateSerializer, Immutable]
public sealed record JobEvent([property: Id(0)] DateTimeOffset At, [property: Id(1)] long Generation, [property: Id(2)] string Message)
{
    [Id(3)] public string Kind { get; init; } = "";
    [Id(4)] public string? WorkerId { get; init; }
    [Id(5)] public string? Reason { get; init; }
    [Id(6)] public long? ResumeStep { get; init; }
    /// <summary>resumed: "replica", "checkpoint" or "start".</summary>
    [Id(7)] public string? ResumeSource { get; init; }
    [Id(8)] public long? StepsRedone { get; init; }
    /// <summary>recovered: from the event that started the re-formation to the first completed step of the new generation.</summary>
    [Id(9)] public double? RecoverySeconds { get; init; }
    /// <summary>recovered: detection → the new generation formed.</summary>
    [Id(10)] public double? FormationSeconds { get; init; }
    /// <summary>recovered: formed → resumed (rendezvous and state restore).</summary>
    [Id(11)] public double? RestoreSeconds { get; init; }
    /// <summary>recovered: resumed → first completed step.</summary>
    [Id(12)] public double? FirstStepSeconds { get; init; }
    /// <summary>resumed: bytes of state broadcast from the replica or loaded from the checkpoint.</summary>
    [Id(13)] public long? StateBytes { get; init; }
    /// <summary>resumed (replica): the rank whose state was broadcast.</summary>
    [Id(14)] public int? SourceRank { get; init; }
}

/// <summary>The kinds of <see cref="JobEvent"/>; other components match on these exact strings.</summary>
public static class JobEventKinds
{
    public const string Submitted = "submitted", Forming = "forming", Formed = "formed", WorkerJoined = "worker_joined",
        WorkerLeft = "worker_left", WorkerLost = "worker_lost", WorkerHung = "worker_hung", WorkerFenced = "worker_fenced",
        Rescaling = "rescaling", Resumed = "resumed", Recovered = "recovered", CheckpointCommitted = "checkpoint_committed",
        CheckpointNotCommitted = "checkpoint_not_committed", CheckpointsDeleted = "checkpoints_deleted", Completed = "completed", Failed = "failed", Stopped = "stopped",
        StepSkipped = "step_skipped", RolledBack = "rolled_back", ExportStarted = "export_started", Exported = "exported", ExportFailed = "export_failed",
        EvaluationStarted = "evaluation_started", Evaluated = "evaluated", EvaluationFailed = "evaluation_failed";
    /// <summary>Preempted: released for a higher-priority job; Scheduling: the registry's decision about this job's claim.</summary>
    public const string Preempted = "preempted", Scheduling = "scheduling";
    /// <summary>The job starts from another job's committed checkpoint (JobSpec.StartFrom): its provenance.</summary>
    public const string StartedFrom = "started_from";
    /// <summary>A preempted job let its workers go: Reason "checkpointed" (its checkpoint at preemption committed) or why not.</summary>
    public const string Released = "released";

    public static readonly string[] All =
    [
        Submitted, Forming, Formed, WorkerJoined, WorkerLeft, WorkerLost, WorkerHung, WorkerFenced, Rescaling, Resumed,
        Recovered, CheckpointCommitted, CheckpointNotCommitted, CheckpointsDeleted, Completed, Failed, Stopped, StepSkipped, RolledBack,
        ExportStarted, Exported, ExportFailed, EvaluationStarted, Evaluated, EvaluationFailed, Preempted, Scheduling, StartedFrom,
        Released,
    ];
}
