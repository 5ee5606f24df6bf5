// Evaluation as a job of its own (POST /evaluations): a committed checkpoint scored on evaluation tasks by free workers,
// each its share of the examples. The request, the record, the order each worker gets, and the grain that runs one.
// Not the scoring (Training/Evaluation) nor the in-training evaluation at checkpoints (JobSpec.evalTasks).
namespace DeepSeekCluster.Contracts.Grains;

/// <summary>The body of POST /evaluations.</summary>
[GenerateSerializer, Immutable]
public sealed record EvaluationSpec
{
    public const int MaxWorkers = 64;

    [Id(0)] public string Job { get; init; } = "";
    [Id(1)] public long Step { get; init; }
    [Id(2)] public string[] Tasks { get; init; } = [];
    /// <summary>Examples per task (0: every example), as JobSpec.evalLimit.</summary>
    [Id(3)] public int Limit { get; init; }
    /// <summary>How many free workers share the examples.</summary>
    [Id(4)] public int Workers { get; init; } = 1;
    /// <summary>Score the store's export of the step in this format (exports/{job}/{step}/{format}) instead of the checkpoint.</summary>
    [Id(5)] public string? Export { get; init; }

    /// <summary>The exports a worker loads back into the model (GGUF and ONNX are for other runtimes).</summary>
    public static readonly string[] ScorableExports = ["hf", "hf-bf16"];

    /// <summary>Every problem, each naming its JSON field and what was expected.</summary>
    public List<SpecProblem> Validate()
    {
        var problems = new List<SpecProblem>();
        if (!JobSpec.IsValidName(Job)) problems.Add(new("job", $"'{Job}' must be a job id: 1-64 characters of a-z, A-Z, 0-9, '-', '_' or '.'"));
        if (Step <= 0) problems.Add(new("step", $"{Step} must be a committed checkpoint step (positive)"));
        if (Tasks is null || Tasks.Length == 0 || Tasks.Length > JobSpec.MaxEvalTasks || Tasks.Any(t => !IsTaskName(t)) || Tasks.Distinct().Count() != Tasks.Length)
            problems.Add(new("tasks", $"must be 1 to {JobSpec.MaxEvalTasks} distinct task names of a-z, 0-9 and '_' (the shipped tasks: kjv_cloze, kjv_nextverse, kjv_heldout)"));
        if (Limit < 0) problems.Add(new("limit", $"{Limit} must be 0 (every example) or the number of examples per task"));
        if (Workers is < 1 or > MaxWorkers) problems.Add(new("workers", $"{Workers} must be 1 to {MaxWorkers} free workers"));
        if (Export is not null && !ScorableExports.Contains(Export))
            problems.Add(new("export", $"'{Export}' must be an export format the workers load back: {string.Join(" or ", ScorableExports)} (or absent: the checkpoint)"));
        return problems;
    }

    static bool IsTaskName(string? name) => name is { Length: >= 1 and <= 64 } && name.All(c => char.IsAsciiLetterLower(c) || char.IsAsciiDigit(c) || c == '_');
}

/// <summary>The states of an <see cref="EvaluationRecord"/>.</summary>
public static class EvaluationStates
{
    public const string Running = "running", Done = "done", Failed = "failed";
}

/// <summary>One evaluation: GET /evaluations/{id}. ResultsJson is lm-evaluation-harness's results document.</summary>
[GenerateSerializer, Immutable]
public sealed record EvaluationRecord
{
    [Id(0)] public required string Id { get; init; }
    [Id(1)] public required EvaluationSpec Spec { get; init; }
    [Id(2)] public string State { get; init; } = EvaluationStates.Running;
    /// <summary>The workers in rank order: rank r scores share r of the plan's batches.</summary>
    [Id(3)] public string[] Workers { get; init; } = [];
    [Id(4)] public DateTimeOffset RequestedAt { get; init; }
    [Id(5)] public DateTimeOffset? FinishedAt { get; init; }
    [Id(6)] public string? ResultsJson { get; init; }
    [Id(7)] public EvaluationScore[] Scores { get; init; } = [];
    [Id(8)] public string? Error { get; init; }
    /// <summary>The ranks that reported their end.</summary>
    [Id(9)] public int[] Finished { get; init; } = [];
}

/// <summary>
/// What one worker is told: score share <paramref name="Rank"/> of <paramref name="World"/> of the tasks on the job's
/// committed step, gather every share over a ring of <paramref name="Peers"/> (collective endpoints in rank order, admitted
/// with <paramref name="LinkKey"/>); rank 0 combines. <paramref name="BatchSize"/>: the job's micro-batch, as its in-training evaluation.
/// </summary>
[GenerateSerializer, Immutable]
public sealed record EvaluationOrder(
    [property: Id(0)] string EvaluationId, [property: Id(1)] string Job, [property: Id(2)] long Step, [property: Id(3)] string Dataset,
    [property: Id(4)] string[] Tasks, [property: Id(5)] int Limit, [property: Id(6)] int BatchSize, [property: Id(7)] int Rank,
    [property: Id(8)] int World, [property: Id(9)] string[] Peers, [property: Id(10)] byte[] LinkKey, [property: Id(11)] string? Export = null);

/// <summary>The answer to POST /evaluations: the record, or a refusal (the same kinds as an export's).</summary>
[GenerateSerializer, Immutable]
public sealed record EvaluationOutcome([property: Id(0)] EvaluationRecord? Record, [property: Id(1)] ExportRefusal Refusal, [property: Id(2)] string Reason);

/// <summary>One evaluation (key: evaluation id).</summary>
public interface IEvaluationGrain : IGrainWithStringKey
{
    /// <summary>Checks the spec against the job's committed checkpoints, claims the free workers and orders their shares.</summary>
    Task<EvaluationOutcome> StartAsync(EvaluationSpec spec);

    /// <summary>A rank ended: rank 0 with the combined results JSON, any rank with an error.</summary>
    Task FinishedAsync(string workerId, int rank, string? resultsJson, string? error);

    /// <summary>A worker's control stream ended while it evaluated: the evaluation fails.</summary>
    Task WorkerLostAsync(string workerId, string reason);

    /// <summary>The record; null when no evaluation has this id.</summary>
    Task<EvaluationRecord?> GetAsync();
}
