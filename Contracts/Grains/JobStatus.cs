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
}

[GenerateSerializer, Immutable]
public sealed record LossPoint([property: Id(0)] long Step, [property: Id(1)] double Loss, [property: Id(2)] double TokensPerSecond);

/// <summary>A worker in the current generation and the rank it holds.</summary>
[GenerateSerializer, Immutable]
public sealed record JobWorker([property: Id(0)] int Rank, [property: Id(1)] string WorkerId, [property: Id(2)] string Endpoint);

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

/// <summary>A checkpoint that exists: its manifest is written in the CheckpointStore.</summary>
[GenerateSerializer, Immutable]
public sealed record CommittedCheckpoint(
    [property: Id(0)] long Step, [property: Id(1)] long Generation, [property: Id(2)] int Files, [property: Id(3)] long Bytes);

[GenerateSerializer, Immutable]
public sealed record JobEvent([property: Id(0)] DateTimeOffset At, [property: Id(1)] long Generation, [property: Id(2)] string Message);
