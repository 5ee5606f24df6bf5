// Where a study's next trial comes from: random, grid, or TPE over the results so far. Every draw is a function of the
// seed, the trial's index and the history, so a restarted Coordinator draws exactly what it would have drawn.
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.Coordinator.Studies;

/// <summary>A finished or partial trial as a sampler sees it: its values and its result (lower is better) at a budget.</summary>
public sealed record Observation(double[] Values, double Result);

public static class StudySamplers
{
    /// <summary>
    /// The values of trial <paramref name="index"/> (one per dimension; a categorical one's is an index into its values),
    /// or null when the sampler has nothing left (a grid that is done).
    /// </summary>
    public static double[]? Propose(StudySpec spec, int index, IReadOnlyList<Observation> history)
    {
        // Not HashCode.Combine: its seed changes with every process, and a restarted Coordinator must draw the same.
        var random = new Random(unchecked(spec.Sampler.Seed * 1_000_003 + index * 7_919 + 0x5EED));
        return spec.Sampler.Kind switch
        {
            "grid" => Grid(spec.Space, index),
            "tpe" when history.Count >= spec.Sampler.StartupTrials => Tpe.Propose(spec.Space, history, random),
            _ => [.. spec.Space.Select(d => Draw(d, random))],
        };
    }

    /// <summary>The number of points in the grid of <paramref name="space"/> (each dimension's values, crossed).</summary>
    public static long GridSize(IReadOnlyList<SearchDimension> space) => space.Aggregate(1L, (n, d) => n * Math.Max(1, d.Values.Count));

    static double[]? Grid(IReadOnlyList<SearchDimension> space, int index)
    {
        if (index >= GridSize(space)) return null;
        var values = new double[space.Count];
        long rest = index;
        for (int i = space.Count - 1; i >= 0; i--) { values[i] = rest % space[i].Values.Count; rest /= space[i].Values.Count; }
        return values;
    }

    public static double Draw(SearchDimension d, Random random) => d.Kind switch
    {
        "logUniform" => Math.Exp(Math.Log(d.Low) + random.NextDouble() * (Math.Log(d.High) - Math.Log(d.Low))),
        "int" => Math.Min(Math.Floor(Math.Ceiling(d.Low) + random.NextDouble() * (Math.Floor(d.High) - Math.Ceiling(d.Low) + 1)), Math.Floor(d.High)),
        "choice" or "grid" => random.Next(d.Values.Count),
        _ => d.Low + random.NextDouble() * (d.High - d.Low),
    };
}
