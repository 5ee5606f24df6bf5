// The versions this server holds and the route table over them; swaps are atomic and never cut an accepted request.
using DeepSeekCluster.ModelServer.Api;

namespace DeepSeekCluster.ModelServer.Routing;

/// <summary>
/// Readers take one snapshot (versions + routes) per request, so a swap in the middle of a request changes nothing
/// for it. A request holds its <see cref="ServedModel"/> until its last token: removing a version first takes it out
/// of the snapshot (no new requests), then waits until its engine has finished what it accepted, then frees it.
/// </summary>
public sealed class ModelRegistry : IDisposable
{
    sealed record Snapshot(IReadOnlyDictionary<string, ServedModel> Versions, RouteTable Routes);

    Snapshot current = new(new Dictionary<string, ServedModel>(), new RouteTable(new Dictionary<string, IReadOnlyDictionary<string, double>>()));
    readonly object writeLock = new();

    public IReadOnlyDictionary<string, ServedModel> Versions => Volatile.Read(ref current).Versions;
    public RouteTable Routes => Volatile.Read(ref current).Routes;

    /// <summary>
    /// The version a request for <paramref name="model"/> goes to (a route's choice, or the version it names),
    /// leased: the caller must <see cref="ServedModel.Release"/> it when the request is over.
    /// </summary>
    public ServedModel Acquire(string model, string? user)
    {
        while (true)
        {
            var snap = Volatile.Read(ref current);
            var version = snap.Routes.Choose(model, user) ?? model;
            if (!snap.Versions.TryGetValue(version, out var served)) throw Unknown(snap, model);
            if (served.TryAcquire()) return served;
            // Retired between the snapshot read and the lease: the new snapshot no longer has it.
        }
    }

    static ApiError Unknown(Snapshot snap, string model)
    {
        var known = snap.Routes.Routes.Keys.Concat(snap.Versions.Keys).Order(StringComparer.Ordinal);
        return ApiError.UnknownModel($"The model '{model}' does not exist; this server has: {string.Join(", ", known)}", "model");
    }

    /// <summary>Adds (or replaces, after draining the old one) a version.</summary>
    public async Task AddAsync(ServedModel model, TimeSpan drain)
    {
        ServedModel? old;
        lock (writeLock)
        {
            var versions = new Dictionary<string, ServedModel>(current.Versions);
            versions.TryGetValue(model.Version, out old);
            versions[model.Version] = model;
            Volatile.Write(ref current, current with { Versions = versions });
        }
        if (old is not null) await RetireAsync(old, drain);
    }

    /// <summary>Replaces the route table; every version it names must be loaded.</summary>
    public void SetRoutes(RouteTable routes)
    {
        lock (writeLock)
        {
            foreach (var (name, split) in routes.Routes)
                foreach (var (version, _) in split)
                    if (!current.Versions.ContainsKey(version))
                        throw ApiError.BadRequest($"route '{name}' names version '{version}', which is not loaded (loaded: {string.Join(", ", current.Versions.Keys)})", "routes");
            Volatile.Write(ref current, current with { Routes = routes });
        }
    }

    /// <summary>Takes a version out of service and frees it once its accepted requests are done.</summary>
    public async Task RemoveAsync(string version, TimeSpan drain)
    {
        ServedModel? old;
        lock (writeLock)
        {
            if (!current.Versions.TryGetValue(version, out old)) throw ApiError.NotFound($"version '{version}' is not loaded", "version");
            if (current.Routes.Routes.FirstOrDefault(r => r.Value.Any(v => v.Key == version && v.Value > 0)) is { Key: not null } route)
                throw ApiError.BadRequest($"version '{version}' still receives traffic through route '{route.Key}': change the routes first", "version");
            var versions = new Dictionary<string, ServedModel>(current.Versions);
            versions.Remove(version);
            Volatile.Write(ref current, current with { Versions = versions });
        }
        await RetireAsync(old, drain);
    }

    static async Task RetireAsync(ServedModel old, TimeSpan drain)
    {
        // Every accepted request holds a lease until its last byte, so waiting for the leases waits for them all.
        await old.RetireAsync().WaitAsync(drain).ContinueWith(_ => { }, TaskScheduler.Default);
        old.Dispose();
    }

    public void Dispose()
    {
        foreach (var v in Versions.Values) v.Dispose();
    }
}
