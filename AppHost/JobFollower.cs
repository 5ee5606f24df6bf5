// Follows one job through the Coordinator's REST API until it ends: progress on the console, the workers' endpoints in
// endpoints.json (from GET /workers), and the wait for the final checkpoint.
using DeepSeekCluster.AppHost.Hosting;
using DeepSeekCluster.Contracts;
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.AppHost;

public sealed class JobFollower(CoordinatorClient coordinator, EndpointsFile endpoints)
{
    /// <summary>
    /// Shows progress as the job advances (a live status line on a terminal, a log line every 10 steps otherwise);
    /// returns its final status.
    /// </summary>
    public async Task<JobStatus> FollowAsync(string jobId, CancellationToken ct)
    {
        bool live = ProgressView.IsLive();
        JobProgress? last = null;
        // The ETA is measured from the first step seen, so corpus preparation and model set-up do not inflate it.
        (long step, DateTime at)? pace = null;
        try
        {
            while (true)
            {
                var s = await coordinator.JobAsync(jobId, ct);
                await RefreshWorkersAsync(ct);
                long total = s.Spec?.Steps ?? 0;
                if (s.Step > 0 && pace is null) pace = (s.Step, DateTime.UtcNow);
                var loss = s.Loss.LastOrDefault();
                var now = new JobProgress(s.State.ToString(), s.Generation, s.Step, total, loss?.Loss, loss?.TokensPerSecond,
                    s.Utilization, s.Workers.Length, s.Committed.LastOrDefault()?.Step,
                    pace is { } p ? ProgressView.Eta(p.step, DateTime.UtcNow - p.at, s.Step, total) : null);
                bool terminal = s.State.IsTerminal();
                if (now.Mfu is { } u && (last?.Mfu is not { } before || !before.Peaks.SequenceEqual(u.Peaks) || before.PeakTooLow != u.PeakTooLow))
                    Log.AppHost(ProgressView.PeakLine(u));
                if (live)
                {
                    // State and generation changes stay in the log; the status line below it follows every poll.
                    if (last is null || now.State != last.State || now.Generation != last.Generation) Log.AppHost(ProgressView.Format(now));
                    Log.Status(terminal ? null : ProgressView.Format(now));
                }
                else if (ProgressView.PlainLineDue(now, last, every: 10)) Log.AppHost(ProgressView.Format(now));
                last = now;
                if (terminal)
                {
                    if (s.Error is { } error) Log.AppHost($"error: {error}");
                    if (s.State == JobState.Completed) await WaitForFinalCommitAsync(jobId, total, ct);
                    return s;
                }
                await Task.Delay(1000, ct);
            }
        }
        finally { if (live) Log.Status(null); }
    }

    /// <summary>The workers the Coordinator knows and where their /metrics are (each announces it in its Hello).</summary>
    public async Task RefreshWorkersAsync(CancellationToken ct)
    {
        var workers = await coordinator.WorkersAsync(ct);
        endpoints.SetWorkers(ServiceNames.GpuWorker, workers.Where(w => w.Online && w.Capabilities is { MetricsEndpoint.Length: > 0 })
            .ToDictionary(w => w.WorkerId, w => w.Capabilities!.MetricsEndpoint));
    }

    /// <summary>The final checkpoint commits after the last step report: wait for it (bounded) so the run ends complete.</summary>
    async Task WaitForFinalCommitAsync(string jobId, long steps, CancellationToken ct)
    {
        var deadline = DateTime.UtcNow + TimeSpan.FromMinutes(2);
        while (DateTime.UtcNow < deadline)
        {
            if ((await coordinator.JobAsync(jobId, ct)).Committed.LastOrDefault() is { } last && last.Step >= steps)
            {
                Log.AppHost($"checkpoint of step {last.Step} committed ({last.Files} files, {last.Bytes / 1e6:F1} MB)");
                return;
            }
            await Task.Delay(500, ct);
        }
        Log.AppHost($"the final checkpoint was not committed within 2 minutes (see the job's events: GET /jobs/{jobId})");
    }
}
