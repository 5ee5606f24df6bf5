// A hyperparameter study (key: study id): its trials are ordinary jobs; the grain samples, schedules and records them.
using System.Text.Json;

namespace DeepSeekCluster.Contracts.Grains;

public interface IStudyGrain : IGrainWithStringKey
{
    /// <summary>Accepts a study spec as JSON (throws <see cref="JobSpecInvalidException"/> listing every problem) and starts its trials.</summary>
    Task<StudyStatus> CreateAsync(string specJson);

    /// <summary>Trials with their values, states, curves and rung results; the rungs' cut-offs; the best trial.</summary>
    Task<StudyStatus> GetStatusAsync();

    /// <summary>Stops every running trial (their workers are free at once) and the study.</summary>
    Task<StudyStatus> StopAsync();

    /// <summary>Follows the trials once now (the grain also does so every second while it runs); activates it after a restart.</summary>
    Task WakeAsync();
}

/// <summary>The ids of every study, so a restarted Coordinator wakes the ones still running.</summary>
public interface IStudyIndexGrain : IGrainWithStringKey
{
    public const string Key = "studies";
    Task AddAsync(string studyId);
    Task<string[]> ListAsync();
}

public enum StudyState { Running, Completed, Stopped }

public enum TrialState { Running, Completed, Pruned, Stopped, Failed }

[GenerateSerializer, Immutable]
public sealed record StudyStatus
{
    [Id(0)] public required string StudyId { get; init; }
    [Id(1)] public StudyState State { get; init; }
    /// <summary>The spec as submitted (JSON).</summary>
    [Id(2)] public string SpecJson { get; init; } = "";
    [Id(3)] public TrialStatus[] Trials { get; init; } = [];
    [Id(4)] public RungStatus[] Rungs { get; init; } = [];
    /// <summary>The trial with the best last metric (completed trials first), if any has one.</summary>
    [Id(5)] public TrialStatus? Best { get; init; }
    [Id(6)] public string[] Events { get; init; } = [];
    [Id(7)] public string Metric { get; init; } = "validationLoss";
    [Id(8)] public string Mode { get; init; } = "min";
    [Id(9)] public DateTimeOffset? CreatedAt { get; init; }

    /// <summary>
    /// A study spec a user submits (POST /studies, <see cref="IStudyGrain.CreateAsync"/>): a field it, its base job or any
    /// part of them does not have ("zero_stage" in the base job) is refused with its JSON path, as a submitted job's is.
    /// </summary>
    public static StudySpec ParseSubmittedSpec(string json) => JsonSerializer.Deserialize<StudySpec>(json, JobSpecJson.Submitted)!;

    /// <summary>
    /// A study spec the grain stored (<see cref="SpecJson"/>), re-read after every restart: leniently, so a spec stored
    /// before a field was dropped from the job spec, or by a newer Coordinator, still loads (docs/decisions.md).
    /// </summary>
    public static StudySpec ParseStoredSpec(string json) => JsonSerializer.Deserialize<StudySpec>(json, JobSpecJson.Options)!;
}

[GenerateSerializer, Immutable]
public sealed record TrialStatus
{
    [Id(0)] public int Index { get; init; }
    [Id(1)] public string JobId { get; init; } = "";
    /// <summary>Field path → value as JSON text.</summary>
    [Id(2)] public Dictionary<string, string> Parameters { get; init; } = [];
    [Id(3)] public TrialState State { get; init; }
    [Id(4)] public long Step { get; init; }
    /// <summary>The metric at the last point the trial reported; null before the first.</summary>
    [Id(5)] public double? Metric { get; init; }
    [Id(6)] public ValidationPoint[] Curve { get; init; } = [];
    /// <summary>Pruned: the rung (0-based) it stopped at.</summary>
    [Id(7)] public int? StoppedAtRung { get; init; }
    /// <summary>The newest committed checkpoint of the trial's job: checkpoints/{jobId}/{step}.</summary>
    [Id(8)] public long? CheckpointStep { get; init; }
    [Id(9)] public string? Error { get; init; }
    /// <summary>Worker-hours the trial's jobs held workers (see StudyBudget.WorkerHours).</summary>
    [Id(10)] public double WorkerHours { get; init; }
}

[GenerateSerializer, Immutable]
public sealed record RungStatus([property: Id(0)] int Rung, [property: Id(1)] long Step, [property: Id(2)] int Results, [property: Id(3)] double? Cutoff, [property: Id(4)] int Stopped);
