// Each rank's latest achieved FLOP/s and device peak, kept in the job grain's state; the job status's MFU comes from it.
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.Coordinator.Grains;

/// <summary>
/// The latest step report with a peak from each rank, per generation: a re-formation's ranks are other processes (or
/// the same ones with other ranks), so only the current generation's members make the cluster figure.
/// </summary>
[GenerateSerializer]
public sealed class UtilizationBoard
{
    [Id(0)] public Dictionary<int, MemberUtilization> Latest { get; set; } = [];

    /// <summary>Keeps <paramref name="report"/> when it carries a peak and is not older than what the rank already reported.</summary>
    public void Record(long generation, StepReport report)
    {
        if (report.Peak is null) return;
        if (Latest.TryGetValue(report.Rank, out var held) && (held.Generation, held.Step).CompareTo((generation, report.Step)) > 0) return;
        foreach (var stale in Latest.Where(kv => kv.Value.Generation < generation).Select(kv => kv.Key).ToList()) Latest.Remove(stale);
        Latest[report.Rank] = new MemberUtilization(report.Rank, generation, report.Step, report.AchievedFlops, report.Peak);
    }

    /// <summary>The cluster figure of <paramref name="generation"/>'s members; null when none reported a peak.</summary>
    public Utilization? Of(long generation) => Utilization.Of([.. Latest.Values.Where(m => m.Generation == generation)]);
}
