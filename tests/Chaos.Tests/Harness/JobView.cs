// GET /jobs/{id} as the chaos checks read it: state, generation, step, workers, events, the consumption ledger.
using System.Text.Json;

namespace DeepSeekCluster.Chaos;

public sealed record JobEventView(
    DateTimeOffset At, long Generation, string Message, string? Kind, string? WorkerId, string? Reason,
    long? ResumeStep, string? ResumeSource, long? StepsRedone, double? RecoverySeconds,
    double? FormationSeconds = null, double? RestoreSeconds = null, double? FirstStepSeconds = null, long? StateBytes = null)
{
    public override string ToString() =>
        $"{At:HH:mm:ss.fff} g{Generation} {Kind ?? "(no kind)"}{(WorkerId is null ? "" : $" worker={WorkerId}")}{(Reason is null ? "" : $" reason={Reason}")}" +
        $"{(ResumeSource is null ? "" : $" from={ResumeSource}@{ResumeStep}")}{(StepsRedone is null ? "" : $" redone={StepsRedone}")}" +
        $"{(RecoverySeconds is null ? "" : $" recovery={RecoverySeconds:F2}s")}: {Message}";
}

/// <summary>The permutation positions the lineage of the final state consumed, as [start, end) ranges.</summary>
public sealed record ConsumptionView(long Samples, IReadOnlyList<(long Start, long End)> Ranges, bool Complete, long Overlaps);

public sealed record JobView(
    string JobId, string State, long Generation, long Step, IReadOnlyList<(int Rank, string WorkerId)> Workers,
    IReadOnlyList<JobEventView> Events, ConsumptionView? Consumption, IReadOnlyList<long> CommittedSteps, string? Error,
    IReadOnlyList<(long Step, double TokensPerSecond)> Loss)
{
    public bool Terminal => State is "completed" or "failed" or "stopped";

    public IEnumerable<JobEventView> OfKind(string kind) => Events.Where(e => e.Kind == kind);

    public string Describe() =>
        $"job {JobId}: {State}, generation {Generation}, step {Step}, workers [{string.Join(", ", Workers.Select(w => $"{w.Rank}={w.WorkerId}"))}]" +
        $"{(Error is null ? "" : $", error: {Error}")}, committed [{string.Join(", ", CommittedSteps)}]\n  events:\n    " +
        string.Join("\n    ", Events);

    public static JobView Parse(string json)
    {
        using var doc = JsonDocument.Parse(json);
        var s = doc.RootElement;
        static string? Str(JsonElement e, string name) => e.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.String ? v.GetString() : null;
        static long? Long(JsonElement e, string name) => e.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.Number ? v.GetInt64() : null;
        static double? Double(JsonElement e, string name) => e.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.Number ? v.GetDouble() : null;
        static IEnumerable<JsonElement> Array(JsonElement e, string name) =>
            e.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.Array ? v.EnumerateArray() : [];

        var events = Array(s, "events").Select(e => new JobEventView(
            e.GetProperty("at").GetDateTimeOffset(), Long(e, "generation") ?? 0, Str(e, "message") ?? "", Str(e, "kind"), Str(e, "workerId"),
            Str(e, "reason"), Long(e, "resumeStep"), Str(e, "resumeSource"), Long(e, "stepsRedone"), Double(e, "recoverySeconds"),
            Double(e, "formationSeconds"), Double(e, "restoreSeconds"), Double(e, "firstStepSeconds"), Long(e, "stateBytes"))).ToList();
        ConsumptionView? consumption = null;
        if (s.TryGetProperty("consumption", out var c) && c.ValueKind == JsonValueKind.Object)
            consumption = new ConsumptionView(Long(c, "samples") ?? 0,
                Array(c, "ranges").Select(r => (r[0].GetInt64(), r[1].GetInt64())).ToList(),
                c.TryGetProperty("complete", out var done) && done.ValueKind == JsonValueKind.True, Long(c, "overlaps") ?? 0);
        return new JobView(
            Str(s, "jobId") ?? "?", Str(s, "state") ?? "?", Long(s, "generation") ?? 0, Long(s, "step") ?? 0,
            Array(s, "workers").Select(w => (w.GetProperty("rank").GetInt32(), w.GetProperty("workerId").GetString()!)).ToList(),
            // Committed steps that still exist: those retention deleted (deletedAt) are history.
            events, consumption, Array(s, "committed").Where(x => Str(x, "deletedAt") is null).Select(x => x.GetProperty("step").GetInt64()).ToList(), Str(s, "error"),
            Array(s, "loss").Select(l => (l.GetProperty("step").GetInt64(), l.GetProperty("tokensPerSecond").GetDouble())).ToList());
    }
}

/// <summary>The job the scenarios submit: tiny, short, and the same seed and global batch as the reference run.</summary>
public sealed record ChaosJob
{
    public string Name { get; init; } = $"chaos-{Convert.ToHexStringLower(System.Security.Cryptography.RandomNumberGenerator.GetBytes(4))}";
    public int Steps { get; init; } = 20;
    public int SeqLen { get; init; } = 32;
    /// <summary>12 = 6 micro-batches of 2: world sizes 1, 2, 3 (and 6) all divide it, so the job rescales through any of them.</summary>
    public int GlobalBatch { get; init; } = 12;
    public int MicroBatch { get; init; } = 2;
    public int CheckpointInterval { get; init; } = 5;
    /// <summary>The spec's keepLast (its default 3); 0 keeps every committed checkpoint.</summary>
    public int KeepLast { get; init; } = 3;
    public int MinWorkers { get; init; } = 1;
    public int MaxWorkers { get; init; } = 2;
    public int Seed { get; init; } = 1234;
    public double Lr { get; init; } = 3e-3;
    /// <summary>The spec's priority (docs/scheduling.md): a higher one preempts lower ones.</summary>
    public int Priority { get; init; }

    public long Samples => (long)Steps * GlobalBatch;

    public object ToSpec(string datasetId) => new
    {
        name = Name, modelPreset = "tiny", dataset = datasetId, parallel = new { dp = 0, pp = 1 },
        globalBatch = GlobalBatch, microBatch = MicroBatch, seqLen = SeqLen, steps = Steps,
        schedule = new { kind = "cosine", peakLr = Lr, minLr = Lr / 10, warmupSteps = Math.Max(1, Steps / 10) },
        checkpointInterval = CheckpointInterval, keepLast = KeepLast, minWorkers = MinWorkers, maxWorkers = MaxWorkers, seed = Seed,
        priority = Priority,
    };
}
