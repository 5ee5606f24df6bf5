// The step guard's decision for one step (no tensors): apply it, skip it, roll back, or fail the job. Same inputs on
// every rank (the all-reduced loss and gradient norm), so the same decision on every rank with no word exchanged.
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.GpuWorker.Cluster;

public enum GuardAct { Apply, Skip, Rollback, Fail }

/// <param name="SnapshotDue">Apply only: a good step on the snapshot interval, the next rollback target.</param>
public sealed record GuardVerdict(GuardAct Act, string Reason, bool SnapshotDue = false);

/// <summary>
/// The rule of <see cref="StepGuardSpec"/> (docs/agent.md): a non-finite step is skipped; <c>MaxSkips</c> in a row, or a
/// loss or gradient norm more than <c>Threshold</c> robust deviations above the median of the last <c>Window</c> good
/// steps, is a divergence that rolls back; the rollback after <c>MaxRollbacks</c> fails the job instead. Median and MAD,
/// not mean and standard deviation, because the very spikes the rule looks for would inflate a standard deviation. The
/// job's first <c>Warmup</c> steps are neither judged nor remembered: early training's steep fall of the loss and its
/// swinging gradient norms are not the range the later steps should be held to.
/// </summary>
/// <param name="resumed">The state carried from the step the job resumes at (live state or checkpoint); null: a fresh start.</param>
public sealed class SpikeRule(StepGuardSpec spec, GuardState? resumed = null)
{
    /// <summary>MAD × 1.4826 estimates σ for normal noise.</summary>
    const double MadToSigma = 1.4826;
    /// <summary>The smallest deviation unit, as a share of the median: a flat history (MAD 0) must not make noise a spike.</summary>
    public const double MedianFloor = 0.05;
    /// <summary>The smallest unit of the log gradient norm: with the default threshold 10, a norm e ≈ 2.7 times its median at least.</summary>
    public const double LogFloor = 0.1;

    // A window saved with a larger spec.Window keeps only its newest steps (the spec cannot change within a job today).
    readonly List<double> losses = [.. (resumed?.Losses ?? []).TakeLast(spec.Window)], norms = [.. (resumed?.LogNorms ?? []).TakeLast(spec.Window)];
    int skipsInRow = resumed?.SkipsInRow ?? 0;
    long lastStep = resumed?.Step ?? 0;

    public int Rollbacks { get; private set; } = resumed?.Rollbacks ?? 0;
    /// <summary>The learning-rate multiplier: <c>LrFactor</c> to the power of the rollbacks so far.</summary>
    public double LrScale { get; private set; } = resumed?.LrScale ?? 1;

    /// <summary>Everything the next verdict depends on, after the last step judged: what a re-formation or a checkpoint carries.</summary>
    public GuardState State => new(lastStep, [.. losses], [.. norms], skipsInRow, Rollbacks, LrScale);

    public GuardVerdict Judge(long step, double loss, double gradNorm, bool skipped)
    {
        lastStep = step;
        if (skipped || !double.IsFinite(loss) || !double.IsFinite(gradNorm))
        {
            string what = $"loss {loss:G4}, gradient norm {gradNorm:G4}";
            if (++skipsInRow < spec.MaxSkips) return new(GuardAct.Skip, what + ": not finite, the update was not applied");
            skipsInRow = 0;
            return Diverged($"{spec.MaxSkips} steps in a row with a loss or gradient norm that is not finite (last: {what})");
        }
        skipsInRow = 0;
        if (step <= spec.Warmup) return new(GuardAct.Apply, "", spec.Rollback && step % spec.SnapshotEvery == 0);
        if (spec.Rollback && losses.Count >= spec.MinHistory)
        {
            if (Spike("loss", loss, losses, logScale: false) is { } l) return Diverged(l);
            if (Spike("gradient norm", gradNorm, norms, logScale: true) is { } g) return Diverged(g);
        }
        Remember(losses, loss);
        Remember(norms, Math.Log(Math.Max(gradNorm, 1e-30)));
        return new(GuardAct.Apply, "", spec.Rollback && step % spec.SnapshotEvery == 0);
    }

    GuardVerdict Diverged(string why)
    {
        if (!spec.Rollback) return new(GuardAct.Fail, $"the job diverged: {why} (guard.rollback is off)");
        if (Rollbacks >= spec.MaxRollbacks)
            return new(GuardAct.Fail, $"the job keeps diverging: {why}, after {Rollbacks} rollback{(Rollbacks == 1 ? "" : "s")} (guard.maxRollbacks {spec.MaxRollbacks})");
        Rollbacks++;
        LrScale *= spec.LrFactor;
        return new(GuardAct.Rollback, why);
    }

    /// <summary>
    /// A spike of <paramref name="x"/> against <paramref name="history"/>. The gradient norm is judged on a log scale (its
    /// history is kept as logs), with a unit of at least <see cref="LogFloor"/>: it is routinely a few times its median in
    /// healthy MoE training, and clipping already bounds what such a step can do.
    /// </summary>
    string? Spike(string name, double x, List<double> history, bool logScale)
    {
        double value = logScale ? Math.Log(Math.Max(x, 1e-30)) : x;
        double median = Median(history);
        double mad = Median(history.Select(v => Math.Abs(v - median)).ToList());
        double unit = Math.Max(Math.Max(MadToSigma * mad, MedianFloor * Math.Abs(median)), logScale ? LogFloor : 1e-12);
        double deviations = (value - median) / unit;
        return deviations > spec.Threshold
            ? $"{name} {x:G4} is {deviations:0.#} robust deviations above the median {(logScale ? Math.Exp(median) : median):G4} of the last {history.Count} good steps" +
              $"{(logScale ? " (log scale)" : "")} (guard.threshold {spec.Threshold})"
            : null;
    }

    void Remember(List<double> history, double x)
    {
        history.Add(x);
        if (history.Count > spec.Window) history.RemoveAt(0);
    }

    public static double Median(IReadOnlyList<double> values)
    {
        var sorted = values.Order().ToArray();
        int n = sorted.Length;
        return n == 0 ? double.NaN : n % 2 == 1 ? sorted[n / 2] : (sorted[n / 2 - 1] + sorted[n / 2]) / 2;
    }
}
