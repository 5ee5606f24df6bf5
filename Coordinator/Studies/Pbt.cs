// Population-based training's two moves (docs/studies.md): which trial a trial at a perturbation boundary copies
// (exploit), and the values it goes on with (explore). Draws depend only on the seed, the trial and the boundary, so a
// restarted Coordinator decides exactly what it would have decided.
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.Coordinator.Studies;

/// <summary>An exploit: copy <paramref name="Donor"/>'s committed checkpoint and go on with <paramref name="Values"/>.</summary>
public sealed record PbtMove(int Donor, double[] Values);

public static class Pbt
{
    public static Random RandomFor(int seed, int trial, long boundary) =>
        new(unchecked(seed * 1_000_003 + trial * 7_919 + (int)boundary * 104_729 + 0x0BB7));

    /// <summary>
    /// The top and bottom quantiles of the scored trials (lower is better; ties by trial index), each at least one trial.
    /// Fewer than two trials scored: no quantiles.
    /// </summary>
    public static (int[] Top, int[] Bottom) Quantiles(IReadOnlyDictionary<int, double> scores, double quantile)
    {
        if (scores.Count < 2) return ([], []);
        int cut = Math.Max(1, (int)Math.Floor(scores.Count * quantile));
        var order = scores.OrderBy(kv => kv.Value).ThenBy(kv => kv.Key).Select(kv => kv.Key).ToArray();
        return (order[..cut], order[^cut..]);
    }

    /// <summary>
    /// What trial <paramref name="trial"/> does at <paramref name="boundary"/>: null when it is not in the bottom quantile,
    /// or when no top-quantile trial has a committed checkpoint (<paramref name="hasCheckpoint"/>): a trial that saved
    /// nothing is never copied. Otherwise a donor drawn uniformly among the top trials with a checkpoint, and its values
    /// explored (<see cref="Explore"/>), with one generator in that order.
    /// </summary>
    public static PbtMove? Decide(StudySpec spec, IReadOnlyDictionary<int, double> scores, int trial, long boundary,
        Func<int, bool> hasCheckpoint, Func<int, double[]> valuesOf)
    {
        var (top, bottom) = Quantiles(scores, spec.Scheduler.Quantile);
        if (!bottom.Contains(trial) || top.Contains(trial)) return null;
        var donors = top.Where(hasCheckpoint).ToArray();
        if (donors.Length == 0) return null;
        var random = RandomFor(spec.Sampler.Seed, trial, boundary);
        int donor = donors[random.Next(donors.Length)];
        return new PbtMove(donor, Explore(spec.Space, valuesOf(donor), spec.Scheduler, random));
    }

    /// <summary>
    /// Per dimension, in order: with resampleProbability a fresh draw from the dimension; otherwise a categorical index
    /// moves one step down or up (clamped), and a number is multiplied by a factor drawn from perturbFactors, clamped to
    /// [low, high] (an int dimension rounded).
    /// </summary>
    public static double[] Explore(IReadOnlyList<SearchDimension> space, double[] values, SchedulerSpec s, Random random)
    {
        var next = new double[space.Count];
        for (int i = 0; i < space.Count; i++)
        {
            var d = space[i];
            if (random.NextDouble() < s.ResampleProbability) { next[i] = StudySamplers.Draw(d, random); continue; }
            if (d.Categorical) { next[i] = Math.Clamp(values[i] + (random.Next(2) == 0 ? -1 : 1), 0, d.Values.Count - 1); continue; }
            double v = Math.Clamp(values[i] * s.PerturbFactors[random.Next(s.PerturbFactors.Length)], d.Low, d.High);
            next[i] = d.Kind == "int" ? Math.Clamp(Math.Round(v), Math.Ceiling(d.Low), Math.Floor(d.High)) : v;
        }
        return next;
    }
}
