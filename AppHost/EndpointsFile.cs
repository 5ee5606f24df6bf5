// {runDir}/endpoints.json: every running instance and its endpoints, for Prometheus, scripts and tests. Workers bind
// their /metrics port at start (port 0) and announce it to the Coordinator, so their entries come from GET /workers.
using System.Text.Json;
using DeepSeekCluster.AppHost.Hosting;

namespace DeepSeekCluster.AppHost;

public sealed class EndpointsFile(string path)
{
    readonly Lock gate = new();
    readonly SortedDictionary<string, Instance> instances = new(StringComparer.Ordinal);

    public string Path { get; } = path;

    public sealed record Instance(string Name, string Resource, IReadOnlyDictionary<string, string> Endpoints);

    /// <summary>An instance whose endpoints the AppHost chose (every resource but the workers).</summary>
    public void Add(string instance, Resource r)
    {
        if (r.Endpoints.Count == 0) return;
        Set(new Instance(instance, r.Name, r.Endpoints.ToDictionary(e => e.Name, e => e.Url)));
    }

    /// <summary>
    /// The instances of <paramref name="resource"/> that serve http now (instance → http://host:port, as the Coordinator
    /// lists its online workers); the resource's other entries are dropped. Written only when something changed.
    /// </summary>
    public void SetWorkers(string resource, IReadOnlyDictionary<string, string> http)
    {
        lock (gate)
        {
            bool changed = false;
            foreach (var gone in instances.Values.Where(i => i.Resource == resource && !http.ContainsKey(i.Name)).Select(i => i.Name).ToList())
                changed |= instances.Remove(gone);
            foreach (var (name, url) in http)
            {
                if (instances.TryGetValue(name, out var had) && had.Resource == resource && had.Endpoints.TryGetValue("http", out var u) && u == url) continue;
                instances[name] = new Instance(name, resource, new Dictionary<string, string> { ["http"] = url.TrimEnd('/') });
                changed = true;
            }
            if (changed) Write();
        }
    }

    public void Remove(string instance)
    {
        lock (gate) { if (instances.Remove(instance)) Write(); }
    }

    public IReadOnlyList<Instance> Snapshot() { lock (gate) return instances.Values.ToList(); }

    void Set(Instance instance)
    {
        lock (gate) { instances[instance.Name] = instance; Write(); }
    }

    void Write()
    {
        var json = JsonSerializer.Serialize(new
        {
            instances = instances.Values.Select(i => new { instance = i.Name, resource = i.Resource, endpoints = i.Endpoints }),
        }, new JsonSerializerOptions { WriteIndented = true });
        // Readers never see half a file: write aside, then rename over.
        var temp = Path + ".tmp";
        File.WriteAllText(temp, json);
        File.Move(temp, Path, overwrite: true);
    }
}
