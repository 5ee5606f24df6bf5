// The jobs an earlier AppHost run left in this run folder (its Coordinator state persists, so a job interrupted by Ctrl+C
// is still there): said out loud, then resumed (the default) or stopped (--fresh). Never a second job beside them.
using DeepSeekCluster.AppHost.Hosting;
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.AppHost;

public static class EarlierJobs
{
    /// <summary>What to do with the earlier jobs: stop some, follow one instead of submitting, and the lines that say so.</summary>
    public sealed record Plan(IReadOnlyList<string> Stop, string? Follow, IReadOnlyList<string> Messages);

    /// <summary>
    /// Unfinished jobs compete with a new one for the same workers, so there is never a new default job beside them:
    /// without <paramref name="fresh"/> they resume (the Coordinator re-forms them from their last committed checkpoint with
    /// this run's workers) and the newest is followed; with it they are stopped and a new default job is submitted.
    /// Finished jobs are only listed.
    /// </summary>
    public static Plan Decide(IReadOnlyList<JobStatus> jobs, bool fresh)
    {
        var messages = new List<string>();
        var finished = jobs.Where(j => j.State.IsTerminal()).OrderBy(j => j.SubmittedAt).ToList();
        var unfinished = jobs.Where(j => !j.State.IsTerminal()).OrderBy(j => j.SubmittedAt).ToList();
        if (finished.Count > 0)
            messages.Add($"earlier jobs, finished: {string.Join(", ", finished.Select(j => $"{j.JobId} ({Describe(j)})"))}");
        if (unfinished.Count == 0) return new Plan([], null, messages);
        foreach (var j in unfinished) messages.Add($"earlier job {j.JobId} is unfinished ({Describe(j)})");
        if (fresh)
        {
            messages.Add($"--fresh: stopping {Count(unfinished.Count)}, then submitting a new default job");
            return new Plan(unfinished.Select(j => j.JobId).ToList(), null, messages);
        }
        var follow = unfinished[^1];
        messages.Add($"resuming {Count(unfinished.Count)} with this run's workers from {(unfinished.Count == 1 ? "its" : "their")} last committed checkpoint, " +
                     $"and following {follow.JobId}; no new default job while one is unfinished " +
                     "(--fresh stops them and submits a new one; the job options apply to a new job only)");
        return new Plan([], follow.JobId, messages);
    }

    /// <summary>Reads the Coordinator's jobs, says what it found and carries out <see cref="Decide"/>; returns the job to follow, if any.</summary>
    public static async Task<string?> HandleAsync(CoordinatorClient coordinator, bool fresh, CancellationToken ct)
    {
        var summaries = await coordinator.JobsAsync(ct);
        var jobs = await Task.WhenAll(summaries.Select(s => coordinator.JobAsync(s.JobId, ct)));
        var plan = Decide(jobs, fresh);
        foreach (var m in plan.Messages) Log.AppHost(m);
        foreach (var id in plan.Stop)
        {
            var status = await coordinator.StopAsync(id, ct);
            // The stop is a state change in the job grain: poll briefly until it reads back as ended.
            var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(30);
            while (!status.State.IsTerminal() && DateTime.UtcNow < deadline)
            {
                await Task.Delay(200, ct);
                status = await coordinator.JobAsync(id, ct);
            }
            if (!status.State.IsTerminal()) throw new InvalidOperationException($"job {id} did not stop within 30 s (state {status.State})");
            Log.AppHost($"stopped earlier job {id} at step {status.Step}");
        }
        return plan.Follow;
    }

    static string Describe(JobStatus j) =>
        $"{j.State.ToString().ToLowerInvariant()}, step {j.Step}{(j.Spec is { } s ? $"/{s.Steps}" : "")}" +
        (j.SubmittedAt is { } at ? $", submitted {at.UtcDateTime:yyyy-MM-dd HH:mm:ss} UTC" : "");

    static string Count(int n) => n == 1 ? "it" : $"all {n}";
}
