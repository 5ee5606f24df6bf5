// The AppHost's view of the job: one live status line at the bottom of a terminal, plain log lines otherwise (CI, files).
using System.Globalization;

namespace DeepSeekCluster.AppHost;

/// <summary>What the follow loop knows about the job at one poll.</summary>
public sealed record JobProgress(string State, long Generation, long Step, long TotalSteps, double? Loss, double? TokensPerSecond,
    double? Mfu, int Workers, long? LastCheckpoint, TimeSpan? Eta);

public static class ProgressView
{
    /// <summary>
    /// A live, rewritten line only on a terminal that can take it: output not redirected, TERM not "dumb", NO_COLOR unset
    /// (whoever sets NO_COLOR asks for plain output).
    /// </summary>
    public static bool IsLive(bool outputRedirected, Func<string, string?> environment) =>
        !outputRedirected && environment("NO_COLOR") is null && environment("TERM") != "dumb";

    public static bool IsLive() => IsLive(Console.IsOutputRedirected, Environment.GetEnvironmentVariable);

    public static string Format(JobProgress p)
    {
        var c = CultureInfo.InvariantCulture;
        var parts = new List<string>
        {
            $"job {p.State.ToLowerInvariant()}",
            $"generation {p.Generation}",
            p.TotalSteps > 0 ? string.Create(c, $"step {p.Step}/{p.TotalSteps} ({100.0 * p.Step / p.TotalSteps:F0}%)") : $"step {p.Step}",
            p.Loss is double l ? string.Create(c, $"loss {l:F4}") : "loss -",
            p.TokensPerSecond is double t ? string.Create(c, $"{t / 1000:F1}k tok/s") : "tok/s -",
            p.Mfu is double m ? string.Create(c, $"MFU {m * 100:F2}%") : "MFU -",
            $"workers {p.Workers}",
            p.LastCheckpoint is long s ? $"checkpoint step {s}" : "no checkpoint yet",
            p.Eta is TimeSpan eta ? $"ETA {FormatEta(eta)}" : "ETA -",
        };
        return string.Join(" | ", parts);
    }

    public static string FormatEta(TimeSpan eta) =>
        eta.TotalHours >= 1 ? $"{(int)eta.TotalHours}:{eta.Minutes:D2}:{eta.Seconds:D2}" : $"{eta.Minutes:D2}:{eta.Seconds:D2}";

    /// <summary>The time left at the pace since <paramref name="fromStep"/>; null until at least one step has passed.</summary>
    public static TimeSpan? Eta(long fromStep, TimeSpan sinceFrom, long step, long totalSteps) =>
        step > fromStep && totalSteps >= step ? TimeSpan.FromSeconds(sinceFrom.TotalSeconds / (step - fromStep) * (totalSteps - step)) : null;

    /// <summary>Plain output prints a line when the state changes, every <paramref name="every"/> steps and at the last step.</summary>
    public static bool PlainLineDue(JobProgress now, JobProgress? last, int every) =>
        last is null || now.State != last.State || now.Generation != last.Generation ||
        (now.Step != last.Step && (now.Step / Math.Max(1, every) != last.Step / Math.Max(1, every) || now.Step == now.TotalSteps));

    /// <summary>The mean of a metric's samples in Prometheus text exposition (null when absent).</summary>
    public static double? MeanOf(string exposition, string metric)
    {
        double sum = 0;
        int n = 0;
        foreach (var raw in exposition.Split('\n'))
        {
            var line = raw.Trim();
            if (!line.StartsWith(metric, StringComparison.Ordinal) || line.Length == metric.Length || line[metric.Length] is not ('{' or ' ')) continue;
            var rest = line[metric.Length] == '{' ? line[(line.IndexOf('}') + 1)..] : line[metric.Length..];
            var fields = rest.Split(' ', StringSplitOptions.RemoveEmptyEntries);
            if (fields.Length > 0 && double.TryParse(fields[0], NumberStyles.Float, CultureInfo.InvariantCulture, out var v) && double.IsFinite(v)) { sum += v; n++; }
        }
        return n > 0 ? sum / n : null;
    }
}
