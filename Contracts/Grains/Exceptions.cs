// Errors a caller can cause, serializable across grain calls.
namespace DeepSeekCluster.Contracts.Grains;

/// <summary>A report, heartbeat or command from a generation that is not the job's current one: a zombie is fenced off.</summary>
[GenerateSerializer]
public sealed class StaleGenerationException : Exception
{
    public StaleGenerationException() { }

    public StaleGenerationException(string jobId, long reported, long current, bool rejoin = false)
        : base($"job '{jobId}': generation {reported} is not the current generation {current}; the report was refused" +
               (rejoin ? "; rejoin as a free worker" : ""))
    {
        JobId = jobId;
        Reported = reported;
        Current = current;
        Rejoin = rejoin;
    }

    [Id(0)] public string JobId { get; private set; } = "";
    [Id(1)] public long Reported { get; private set; }
    [Id(2)] public long Current { get; private set; }
    /// <summary>The sender no longer belongs to the generation it reports for: it must drop it and say Hello again.</summary>
    [Id(3)] public bool Rejoin { get; private set; }
}

[GenerateSerializer]
public sealed class JobSpecInvalidException : Exception
{
    public JobSpecInvalidException() { }

    public JobSpecInvalidException(IReadOnlyList<SpecProblem> problems)
        : base("invalid job spec: " + string.Join("; ", problems.Select(p => $"{p.Field}: {p.Message}")))
        => Problems = [.. problems];

    [Id(0)] public SpecProblem[] Problems { get; private set; } = [];
}
