// The records that travel between a worker process, its worker grain and the job grain.
namespace DeepSeekCluster.Contracts.Grains;

/// <summary>What a worker announces: device ("cuda:0", "cpu"), memory, host, and the host:port its collectives listen on.</summary>
[GenerateSerializer, Immutable]
public sealed record WorkerCapabilities
{
    [Id(0)] public required string WorkerId { get; init; }
    [Id(1)] public string Device { get; init; } = "cpu";
    [Id(2)] public long MemoryBytes { get; init; }
    [Id(3)] public string Host { get; init; } = "";
    [Id(4)] public string CollectiveEndpoint { get; init; } = "";
    /// <summary>host:port where the worker accepts the link from the pipeline stage before it (jobs with pp &gt; 1).</summary>
    [Id(5)] public string PipelineEndpoint { get; init; } = "";
    /// <summary>http://host:port of the worker's /health and /metrics; empty when it serves none.</summary>
    [Id(6)] public string MetricsEndpoint { get; init; } = "";
}

[GenerateSerializer, Immutable]
public sealed record WorkerMetrics
{
    [Id(0)] public long Step { get; init; }
    [Id(1)] public double Loss { get; init; }
    [Id(2)] public double TokensPerSecond { get; init; }
    [Id(3)] public long MemoryUsedBytes { get; init; }
}

/// <summary>What GET /workers shows of one worker.</summary>
[GenerateSerializer, Immutable]
public sealed record WorkerStatus
{
    [Id(0)] public required string WorkerId { get; init; }
    [Id(1)] public WorkerCapabilities? Capabilities { get; init; }
    [Id(2)] public bool Online { get; init; }
    [Id(3)] public DateTimeOffset? LastHeartbeat { get; init; }
    [Id(4)] public long Generation { get; init; }
    [Id(5)] public Assignment? Assignment { get; init; }
    [Id(6)] public WorkerMetrics? Metrics { get; init; }
    /// <summary>The last model this worker put into the store (rank 0, after a job's last step); null before the first.</summary>
    [Id(7)] public SavedModel? SavedModel { get; init; }
}

/// <summary>A job's model a worker put into the CheckpointStore: Path is its place there, exports/{job}/{step}/hf (a ModelServer's Serving:Models:N:Store).</summary>
[GenerateSerializer, Immutable]
public sealed record SavedModel([property: Id(0)] string JobId, [property: Id(1)] long Step, [property: Id(2)] string Path,
                                [property: Id(3)] DateTimeOffset At);

/// <summary>
/// One worker's part of one generation. Ranks are stage-major, rank = ppStage·dpSize + dpRank, so a rank is also the
/// file rank of its checkpoint shard (ParallelLayout); the samples a replica trains on follow from the spec and its dpRank
/// (the worker's ParallelLayout.ReplicaSamples), so they are not carried here.
/// </summary>
[GenerateSerializer, Immutable]
public sealed record Assignment
{
    [Id(0)] public required string JobId { get; init; }
    [Id(1)] public long Generation { get; init; }
    [Id(2)] public int Rank { get; init; }
    [Id(3)] public int World { get; init; }
    [Id(4)] public int DpRank { get; init; }
    [Id(5)] public int DpSize { get; init; }
    [Id(6)] public int PpStage { get; init; }
    [Id(7)] public int PpSize { get; init; }
    // Ids 8-10 held BatchOffset, BatchCount and GradAccumSteps, which nobody read: not to be reused.
    [Id(11)] public JobWorker[] Peers { get; init; } = [];
    /// <summary>The job spec as JSON, so a worker needs nothing else to build its model and data loader.</summary>
    [Id(12)] public string SpecJson { get; init; } = "";
    /// <summary>The step to resume from: the last complete checkpoint, or 0.</summary>
    [Id(13)] public long ResumeStep { get; init; }
    /// <summary>
    /// The generation's data-plane link key (LinkProof in Training): travels only on the authenticated control stream,
    /// never in REST (GET /workers serializes this record).
    /// </summary>
    [Id(14), System.Text.Json.Serialization.JsonIgnore] public byte[] LinkKey { get; init; } = [];
    /// <summary>
    /// The generation only saves a checkpoint at the step it resumes at and trains nothing: the job was preempted and
    /// lets its workers go once that checkpoint commits (docs/scheduling.md).
    /// </summary>
    [Id(69)] public bool CheckpointOnly { get; init; }
}

[GenerateSerializer, Immutable]
public sealed record StepReport
{
    [Id(0)] public int Rank { get; init; }
    [Id(1)] public long Step { get; init; }
    [Id(2)] public double Loss { get; init; }
    [Id(3)] public double TokensPerSecond { get; init; }
    [Id(4)] public double LearningRate { get; init; }
    /// <summary>This rank's epoch-permutation positions [SampleStart, SampleStart + SampleCount) of the step.</summary>
    [Id(5)] public long SampleStart { get; init; }
    [Id(6)] public int SampleCount { get; init; }
    /// <summary>Rank 0: routed-token fractions, ExpertLayers.Length × Experts flattened; empty otherwise.</summary>
    [Id(7)] public float[] ExpertLoad { get; init; } = [];
    [Id(8)] public int[] ExpertLayers { get; init; } = [];
    [Id(9)] public int Experts { get; init; }
    /// <summary>Sent again after a reconnect into the same generation: counted only where the ledger lacks it.</summary>
    [Id(10)] public bool Resent { get; init; }
    /// <summary>Model FLOP/s this rank's device did in the step; with <see cref="Peak"/>, the job's MFU (see <see cref="Utilization"/>).</summary>
    [Id(11)] public double AchievedFlops { get; init; }
    [Id(12)] public DevicePeakInfo? Peak { get; init; }
    /// <summary>The held-out loss of a validation pass after this step (see cluster_control.proto), when HasValidation.</summary>
    [Id(13)] public double ValidationLoss { get; init; }
    [Id(14)] public bool HasValidation { get; init; }
    /// <summary>Rank 0, at a scheduled checkpoint of a job with evalTasks: the results JSON (lm-evaluation-harness shape); empty otherwise.</summary>
    [Id(60)] public string EvalResultsJson { get; init; } = "";
}

/// <summary>Rank 0's account of where the generation resumed (see cluster_control.proto Resumed).</summary>
[GenerateSerializer, Immutable]
public sealed record ResumedReport
{
    [Id(0)] public long Step { get; init; }
    [Id(1)] public string Source { get; init; } = "";
    [Id(2)] public int SourceRank { get; init; } = -1;
    [Id(3)] public double RestoreSeconds { get; init; }
    [Id(4)] public long StateBytes { get; init; }
}

/// <summary>How a worker left its job: asked to (Leaving, REST leave), its stream broke, or its heartbeats stopped.</summary>
public enum LeaveKind { Left, Lost, Hung }

[GenerateSerializer, Immutable]
public sealed record CheckpointReport
{
    [Id(0)] public int Rank { get; init; }
    [Id(1)] public long Step { get; init; }
    [Id(2)] public string File { get; init; } = "";
    [Id(3)] public long SizeBytes { get; init; }
    [Id(4)] public string Sha256 { get; init; } = "";
    /// <summary>Rank 0 only: the step's manifest JSON, which the Coordinator commits once every rank reported.</summary>
    [Id(5)] public string ManifestJson { get; init; } = "";
}

/// <summary>
/// Leave: finish the step in flight, send Leaving and exit (a graceful scale-in). NcclUniqueId: the communicator id of
/// the command's generation and group (<see cref="ControlCommand.Payload"/>), made by the group's first rank.
/// </summary>
public enum ControlCommandKind { CheckpointNow, Rescale, Stop, Leave, NcclUniqueId }

/// <summary>A command down to a worker process; Stop also ends its assignment.</summary>
[GenerateSerializer, Immutable]
public sealed record ControlCommand
{
    [Id(0)] public ControlCommandKind Kind { get; init; }
    [Id(1)] public string JobId { get; init; } = "";
    [Id(2)] public long Generation { get; init; }
    [Id(3)] public long Step { get; init; }
    [Id(4)] public string Reason { get; init; } = "";
    /// <summary>NcclUniqueId: the pipeline stage whose ranks share the communicator (0 without stages).</summary>
    [Id(5)] public int Group { get; init; }
    /// <summary>NcclUniqueId: the 128-byte id, or empty when the first rank could not make one (<see cref="Reason"/> says why).</summary>
    [Id(6)] public byte[] Payload { get; init; } = [];
}
