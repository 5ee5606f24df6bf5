// Job events and records from outside training (exports, evaluation jobs): kept apart so the job's state machine stays in one file.
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.Coordinator.Grains;

public sealed partial class TrainingJobGrain
{
    public async Task RecordEventAsync(string kind, string message, string? reason)
    {
        if (S.Spec is null) throw new KeyNotFoundException($"no job '{JobId}'");
        Event(New(kind, message) with { Reason = reason });
        await job.WriteStateAsync();
    }

    public async Task RecordEvaluationAsync(long step, EvaluationScore[] scores, string message)
    {
        if (S.Spec is null) throw new KeyNotFoundException($"no job '{JobId}'");
        var tasks = scores.Select(s => s.Task).ToHashSet(StringComparer.Ordinal);
        S.Evaluations.RemoveAll(e => e.Step == step && tasks.Contains(e.Task));
        S.Evaluations.AddRange(scores);
        S.Evaluations.Sort((a, b) => a.Step.CompareTo(b.Step));
        Event(New(JobEventKinds.Evaluated, message) with { ResumeStep = step });
        await job.WriteStateAsync();
    }
}
