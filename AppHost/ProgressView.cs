// The AppHost's view of the job: one live status line at the bottom of a terminal, plain log lines otherwise (CI, files).
using System.Globalization;
using DeepSeekCluster.Contracts.Grains;
using DeepSeekCluster.Text.Display;

namespace DeepSeekCluster.AppHost;

/// <summary>What the follow loop knows about the job at one poll. <paramref name="Mfu"/>: the job status's cluster figure.</summary>
public sealed record JobProgress(string State, long Generation, long Step, long TotalSteps, double? Loss, double? TokensPerSecond,
    Utilization? Mfu, int Workers, long? LastCheckpoint, TimeSpan? Eta);

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
            p.TokensPerSecond is double t ? TokenThroughput.Format(t) : TokenThroughput.Missing,
            p.Mfu is { } u ? string.Create(c, $"MFU {u.Mfu * 100:F2}% of {Flops(u.PeakFlops)}") + (u.PeakTooLow ? " (capped: the peak looks too low)" : "") : "MFU -",
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

    /// <summary>
    /// The line that says what the MFU is against: the summed peak of the members' devices and where each came from
    /// ("declared: NVIDIA H100 80GB HBM3 fp32 ×2"). Printed when it changes, so the status line can stay short.
    /// </summary>
    public static string PeakLine(Utilization u) =>
        $"MFU is the members' model FLOP/s over {Flops(u.PeakFlops)}, the sum of their devices' peaks: {string.Join("; ", u.Peaks)}" +
        (u.PeakTooLow ? string.Create(CultureInfo.InvariantCulture, $" (warning: the members did {u.AchievedFlops / u.PeakFlops:F2}× that: the peak looks too low, MFU is shown as at most 100%)") : "");

    public static string Flops(double flopsPerSecond) => flopsPerSecond >= 1e12
        ? string.Create(CultureInfo.InvariantCulture, $"{flopsPerSecond / 1e12:F1} TFLOP/s")
        : string.Create(CultureInfo.InvariantCulture, $"{flopsPerSecond / 1e9:F1} GFLOP/s");
}
