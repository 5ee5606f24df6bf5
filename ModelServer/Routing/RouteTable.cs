// Which model version answers a request: a weighted split per public model id, sticky per `user`, or a pinned version.
using System.IO.Hashing;
using System.Text;

namespace DeepSeekCluster.ModelServer.Routing;

/// <summary>
/// An immutable table: public model id → (version, weight) list. A request naming a version directly is pinned to
/// it; one naming a route is split by weight, by a hash of its <c>user</c> field when given (the same user always
/// lands on the same version while the table stays the same), at random otherwise.
/// </summary>
public sealed class RouteTable
{
    public RouteTable(IReadOnlyDictionary<string, IReadOnlyDictionary<string, double>> routes)
    {
        foreach (var (name, split) in routes)
        {
            if (split.Count == 0) throw new ArgumentException($"Serving:Routes:{name} names no version");
            foreach (var (version, weight) in split)
                if (!(weight >= 0) || double.IsInfinity(weight)) throw new ArgumentException($"Serving:Routes:{name}:{version} must be a weight of 0 or more, got {weight}");
            if (split.Values.Sum() <= 0) throw new ArgumentException($"Serving:Routes:{name}: the weights sum to 0; give at least one version a positive weight");
        }
        Routes = routes.ToDictionary(r => r.Key, r => (IReadOnlyList<KeyValuePair<string, double>>)r.Value.OrderBy(v => v.Key, StringComparer.Ordinal).ToList());
    }

    public IReadOnlyDictionary<string, IReadOnlyList<KeyValuePair<string, double>>> Routes { get; }

    /// <summary>The version for a route, or null when <paramref name="model"/> is not a route.</summary>
    public string? Choose(string model, string? user)
    {
        if (!Routes.TryGetValue(model, out var split)) return null;
        double total = split.Sum(v => v.Value);
        double point = (user is null ? Random.Shared.NextDouble() : Unit(model + "\n" + user)) * total;
        foreach (var (version, weight) in split)
        {
            if (point < weight) return version;
            point -= weight;
        }
        return split.Last(v => v.Value > 0).Key;
    }

    /// <summary>A stable number in [0, 1) for a string (XxHash64: the same on every replica and restart).</summary>
    static double Unit(string key) => (XxHash64.HashToUInt64(Encoding.UTF8.GetBytes(key)) >> 11) * (1.0 / (1UL << 53));
}
