// Model FLOPs utilization as the job status reports it: each member's achieved FLOP/s against its device's peak, and
// the cluster's figure, the summed achieved FLOP/s over the summed peaks (never an average of percentages).
namespace DeepSeekCluster.Contracts.Grains;

/// <summary>A device's peak FLOP/s at a precision and where it came from (Training/Perf/HardwarePeak.cs, proto DevicePeak).</summary>
/// <param name="Source">"declared", "calibrated", "option", "measured" or "given".</param>
/// <param name="Description">"declared: NVIDIA H100 80GB HBM3 fp32", "calibrated 2026-12-06 on AMD EPYC 7763 (2 cores)".</param>
/// <param name="Hardware">The physical device ("cpu:host", "cuda:GPU-…"): members that share one count its peak once.</param>
[GenerateSerializer, Immutable]
public sealed record DevicePeakInfo(
    [property: Id(0)] double Flops, [property: Id(1)] string Precision, [property: Id(2)] string Source,
    [property: Id(3)] string Description, [property: Id(4)] string Hardware);

/// <summary>One member's latest step: its achieved model FLOP/s and the peak they are measured against.</summary>
[GenerateSerializer, Immutable]
public sealed record MemberUtilization(
    [property: Id(0)] int Rank, [property: Id(1)] long Generation, [property: Id(2)] long Step,
    [property: Id(3)] double AchievedFlops, [property: Id(4)] DevicePeakInfo Peak)
{
    /// <summary>Achieved over peak, capped at 1 (see <see cref="Utilization.Ratio"/>).</summary>
    public double Mfu => Utilization.Ratio(AchievedFlops, Peak.Flops);
}

/// <summary>
/// The cluster's MFU: <see cref="AchievedFlops"/> summed over the members over <see cref="PeakFlops"/> summed over the
/// distinct devices they run on (two CPU workers on one machine share its peak; two GPUs are two peaks). <see cref="Mfu"/>
/// is capped at 1; <see cref="PeakTooLow"/> says the uncapped figure went above it, so a display can warn rather than
/// hide it.
/// </summary>
[GenerateSerializer, Immutable]
public sealed record Utilization
{
    [Id(0)] public double AchievedFlops { get; init; }
    [Id(1)] public double PeakFlops { get; init; }
    [Id(2)] public double Mfu { get; init; }
    [Id(3)] public bool PeakTooLow { get; init; }
    /// <summary>"declared: NVIDIA H100 80GB HBM3 fp32 ×2" — each distinct peak description and how many devices have it.</summary>
    [Id(4)] public string[] Peaks { get; init; } = [];
    [Id(5)] public MemberUtilization[] Members { get; init; } = [];

    /// <summary>achieved / peak, capped at 1; 0 when no peak is known.</summary>
    public static double Ratio(double achievedFlops, double peakFlops) =>
        peakFlops > 0 && double.IsFinite(achievedFlops) ? Math.Min(achievedFlops / peakFlops, 1) : 0;

    /// <summary>The cluster figure of <paramref name="members"/>; null when none has reported a peak.</summary>
    public static Utilization? Of(IReadOnlyCollection<MemberUtilization> members)
    {
        var known = members.Where(m => m.Peak.Flops > 0).OrderBy(m => m.Rank).ToArray();
        if (known.Length == 0) return null;
        // One peak per physical device: the largest any member on it reported (a member with fewer threads reports its share).
        var devices = known.GroupBy(m => m.Peak.Hardware is { Length: > 0 } h ? h : $"rank {m.Rank}")
                           .Select(g => g.MaxBy(m => m.Peak.Flops)!.Peak).ToArray();
        double achieved = known.Sum(m => m.AchievedFlops), peak = devices.Sum(p => p.Flops);
        return new Utilization
        {
            AchievedFlops = achieved, PeakFlops = peak, Mfu = Ratio(achieved, peak), PeakTooLow = achieved > peak || known.Any(m => m.AchievedFlops > m.Peak.Flops),
            Peaks = [.. devices.GroupBy(p => p.Description).Select(g => g.Count() == 1 ? g.Key : $"{g.Key} ×{g.Count()}")],
            Members = known,
        };
    }
}
