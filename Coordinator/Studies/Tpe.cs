// The tree-structured Parzen estimator (Bergstra et al. 2011) in its multivariate form (Falkner et al. 2018; Optuna's
// multivariate TPE): one kernel per observation over all dimensions at once.
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.Coordinator.Studies;

/// <summary>
/// Splits the observations at the γ quantile of their results into good (l) and bad (g) and models each group as a
/// Parzen mixture over the whole space: per observation a product of per-dimension kernels (Gaussians in the unit cube,
/// log space for logUniform; for a categorical dimension most weight on the observed value), plus the uniform prior as one
/// more component. It draws <see cref="Candidates"/> candidates from l and keeps the one with the largest l(x)/g(x), the
/// expected-improvement criterion of the paper. Multivariate, not one dimension at a time: a good learning rate tried
/// with a bad weight decay must not make that weight decay look bad on its own.
/// </summary>
public static class Tpe
{
    public const double Gamma = 0.25;
    public const int Candidates = 24;
    /// <summary>The narrowest bandwidth, in the unit cube, is Floor/√n: without it the good points' kernels collapse onto the first good region.</summary>
    public const double Floor = 1.0;
    /// <summary>A categorical kernel's weight on the value it is centred on.</summary>
    const double Stay = 0.75;

    public static double[] Propose(IReadOnlyList<SearchDimension> space, IReadOnlyList<Observation> history, Random random)
    {
        var ordered = history.Where(o => double.IsFinite(o.Result)).OrderBy(o => o.Result).ToList();
        int good = Math.Max(1, (int)Math.Ceiling(Gamma * ordered.Count));
        var units = ordered.Select(o => ToUnit(space, o.Values)).ToList();
        var l = new Parzen(space, units.Take(good).ToList(), ordered.Count);
        var g = new Parzen(space, units.Skip(good).ToList(), ordered.Count);
        double[] best = l.Sample(random);
        double bestRatio = double.NegativeInfinity;
        for (int c = 0; c < Candidates; c++)
        {
            var x = c == 0 ? best : l.Sample(random);
            double ratio = l.LogDensity(x) - g.LogDensity(x);
            if (ratio > bestRatio) (best, bestRatio) = (x, ratio);
        }
        return FromUnit(space, best);
    }

    /// <summary>Continuous values to [0, 1] (log scale for logUniform); categorical ones stay indices.</summary>
    static double[] ToUnit(IReadOnlyList<SearchDimension> space, double[] values) => [.. space.Select((d, i) => d.Kind switch
    {
        "choice" or "grid" => values[i],
        "logUniform" => (Math.Log(values[i]) - Math.Log(d.Low)) / (Math.Log(d.High) - Math.Log(d.Low)),
        _ => (values[i] - d.Low) / (d.High - d.Low),
    })];

    static double[] FromUnit(IReadOnlyList<SearchDimension> space, double[] unit) => [.. space.Select((d, i) => d.Kind switch
    {
        "choice" or "grid" => unit[i],
        "logUniform" => Math.Clamp(Math.Exp(Math.Log(d.Low) + unit[i] * (Math.Log(d.High) - Math.Log(d.Low))), d.Low, d.High),
        "int" => Math.Clamp(Math.Round(d.Low + unit[i] * (d.High - d.Low)), Math.Ceiling(d.Low), Math.Floor(d.High)),
        _ => Math.Clamp(d.Low + unit[i] * (d.High - d.Low), d.Low, d.High),
    })];

    /// <summary>The mixture of one group: a kernel at each of its points and the prior, equally weighted.</summary>
    sealed class Parzen
    {
        readonly IReadOnlyList<SearchDimension> space;
        readonly List<double[]> points;
        readonly double[] sigmas; // per dimension, in the unit cube (Scott's rule over the group's spread, floored)

        public Parzen(IReadOnlyList<SearchDimension> space, List<double[]> points, int observations)
        {
            this.space = space;
            this.points = points;
            double floor = Floor / Math.Sqrt(Math.Max(1, observations));
            sigmas = [.. space.Select((_, d) =>
            {
                if (points.Count < 2) return Math.Max(0.25, floor);
                double mean = points.Average(p => p[d]), sd = Math.Sqrt(points.Sum(p => (p[d] - mean) * (p[d] - mean)) / (points.Count - 1));
                return Math.Clamp(1.06 * sd * Math.Pow(points.Count, -0.2), floor, 0.5);
            })];
        }

        public double[] Sample(Random random)
        {
            int k = random.Next(points.Count + 1);
            var x = new double[space.Count];
            for (int d = 0; d < space.Count; d++)
            {
                if (space[d].Categorical)
                {
                    int n = space[d].Values.Count;
                    x[d] = k == points.Count || (n > 1 && random.NextDouble() >= Stay) ? random.Next(n) : points[k][d];
                }
                else if (k == points.Count) x[d] = random.NextDouble();
                else
                {
                    double v;
                    int tries = 0;
                    do v = points[k][d] + sigmas[d] * Normal(random); while ((v < 0 || v > 1) && ++tries < 64);
                    x[d] = Math.Clamp(v, 0, 1);
                }
            }
            return x;
        }

        public double LogDensity(double[] x)
        {
            double sum = 1; // the prior: uniform over the unit cube and over each categorical dimension's values
            for (int d = 0; d < space.Count; d++) if (space[d].Categorical) sum /= space[d].Values.Count;
            foreach (var p in points)
            {
                double product = 1;
                for (int d = 0; d < space.Count; d++)
                {
                    if (space[d].Categorical)
                    {
                        int n = space[d].Values.Count;
                        product *= n == 1 ? 1 : x[d] == p[d] ? Stay + (1 - Stay) / n : (1 - Stay) / n;
                    }
                    else product *= Math.Exp(-0.5 * Math.Pow((x[d] - p[d]) / sigmas[d], 2)) / (sigmas[d] * Math.Sqrt(2 * Math.PI));
                }
                sum += product;
            }
            return Math.Log(sum / (points.Count + 1) + 1e-300);
        }
    }

    static double Normal(Random random) => Math.Sqrt(-2 * Math.Log(1 - random.NextDouble())) * Math.Cos(2 * Math.PI * random.NextDouble());
}
