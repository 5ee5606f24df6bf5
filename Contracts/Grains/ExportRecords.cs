// Exports run on a free worker at the Coordinator's request (POST /jobs/{id}/exports): the record of each, the order that
// goes down to the worker, and the grain that keeps a job's exports. Not the export itself (Training/Export, the worker).
namespace DeepSeekCluster.Contracts.Grains;

public static class ExportFormats
{
    /// <summary>The formats a committed checkpoint exports to (Training/Export/ModelExport.Formats says the same; a test holds them equal).</summary>
    public static readonly string[] All = ["hf", "hf-bf16", "gguf-f16", "gguf-q8_0", "gguf-q4_0", "onnx"];
}

/// <summary>The states of an <see cref="ExportRecord"/>: running on its worker, then done (committed in the store) or failed.</summary>
public static class ExportStates
{
    public const string Running = "running", Done = "done", Failed = "failed";
}

/// <summary>One export of one committed step into the store's exports/{job}/{step}/{format}/; GET /jobs/{id}/exports lists them.</summary>
[GenerateSerializer, Immutable]
public sealed record ExportRecord
{
    [Id(0)] public required string Job { get; init; }
    [Id(1)] public long Step { get; init; }
    [Id(2)] public required string Format { get; init; }
    [Id(3)] public string State { get; init; } = ExportStates.Running;
    [Id(4)] public string WorkerId { get; init; } = "";
    [Id(5)] public DateTimeOffset RequestedAt { get; init; }
    [Id(6)] public DateTimeOffset? FinishedAt { get; init; }
    /// <summary>Done: the key of the committed export.json in the store (download with gpu-worker export --store … --download).</summary>
    [Id(7)] public string? ManifestKey { get; init; }
    [Id(8)] public int Files { get; init; }
    [Id(9)] public long Bytes { get; init; }
    /// <summary>Failed: why, as the worker or the Coordinator said it.</summary>
    [Id(10)] public string? Error { get; init; }
}

/// <summary>What a worker is told to export; the dataset names the tokenizer the checkpoint was trained with.</summary>
[GenerateSerializer, Immutable]
public sealed record ExportOrder(
    [property: Id(0)] string Job, [property: Id(1)] long Step, [property: Id(2)] string Format, [property: Id(3)] string Dataset);

/// <summary>
/// The answer to an export request: the record (accepted), or a refusal whose kind says which HTTP status it is
/// (NotFound: no job or step; Invalid: the input; Conflict: the step's state, the export exists, no free worker).
/// </summary>
[GenerateSerializer, Immutable]
public sealed record ExportRequestOutcome([property: Id(0)] ExportRecord? Record, [property: Id(1)] ExportRefusal Refusal, [property: Id(2)] string Reason);

public enum ExportRefusal { None, NotFound, Invalid, Conflict }

/// <summary>A job's exports (key: job id).</summary>
public interface IJobExportsGrain : IGrainWithStringKey
{
    /// <summary>Checks the request, claims a free worker and orders the export; refused with the reason otherwise.</summary>
    Task<ExportRequestOutcome> RequestAsync(long step, string format);

    /// <summary>The worker reports the end of its export: committed (<paramref name="error"/> null) or failed.</summary>
    Task FinishedAsync(string workerId, long step, string format, string? error, string? manifestKey, int files, long bytes);

    /// <summary>The worker's control stream ended while it exported: the export fails with <paramref name="reason"/>.</summary>
    Task WorkerLostAsync(string workerId, string reason);

    /// <summary>Every export requested for the job, oldest first.</summary>
    Task<ExportRecord[]> ListAsync();
}
