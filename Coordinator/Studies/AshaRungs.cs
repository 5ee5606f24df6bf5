// ASHA's rung table of a study: the results recorded at each rung and the stop-or-continue rule; kept in the study's state.
namespace DeepSeekCluster.Coordinator.Studies;

/// <summary>
/// Asynchronous successive halving (Li et al., "A System for Massively Parallel Hyperparameter Tuning"), in its stopping
/// form: a trial that reaches rung k with result m stops unless m is within the best 1/η of the results other trials
/// recorded at rung k before it; the cut-off is the 1/η quantile of those results (linear interpolation, as numpy's
/// percentile), so the first trial at a rung always continues. Nothing waits for a rung to fill: promotion is
/// asynchronous, and a late trial is judged against whoever came before it. Results are kept as "lower is better"
/// (a max-mode metric is negated by the caller).
/// </summary>
[GenerateSerializer]
public sealed class AshaRungs
{
    /// <summary>Rung k: (trial, result) in the order they were recorded.</summary>
    [Id(0)] public List<List<RungResult>> Recorded { get; set; } = [];
    [Id(1)] public long[] Steps { get; set; } = [];
    [Id(2)] public int ReductionFactor { get; set; } = 3;

    public static AshaRungs For(long[] steps, int reductionFactor) =>
        new() { Steps = steps, ReductionFactor = reductionFactor, Recorded = [.. steps.Select(_ => new List<RungResult>())] };

    /// <summary>The cut-off a new result at rung <paramref name="rung"/> must not exceed; null while the rung is empty.</summary>
    public double? Cutoff(int rung)
    {
        var results = Recorded[rung].Select(r => r.Result).Order().ToArray();
        return results.Length == 0 ? null : Quantile(results, 1.0 / ReductionFactor);
    }

    /// <summary>Records <paramref name="trial"/>'s result at <paramref name="rung"/> and says whether it continues.</summary>
    public bool Continues(int rung, int trial, double result)
    {
        if (Recorded[rung].Any(r => r.Trial == trial)) throw new InvalidOperationException($"trial {trial} already recorded a result at rung {rung}");
        bool continues = Cutoff(rung) is not { } cutoff || !(result > cutoff) && !double.IsNaN(result);
        Recorded[rung].Add(new RungResult(trial, result));
        return continues;
    }

    /// <summary>numpy.percentile's linear rule over sorted values: position q·(n−1), interpolated between neighbours.</summary>
    public static double Quantile(double[] sorted, double q)
    {
        double at = q * (sorted.Length - 1);
        int below = (int)Math.Floor(at);
        int above = Math.Min(below + 1, sorted.Length - 1);
        return sorted[below] + (sorted[above] - sorted[below]) * (at - below);
    }
}

[GenerateSerializer, Immutable]
public sealed record RungResult([property: Id(0)] int Trial, [property: Id(1)] double Result);
