// {runDir}/endpoints.json: every running instance and its endpoints, for Prometheus, scripts and tests. Workers bind
// their /metrics port at start (port 0), so their entry appears when they announce it.
using System.Text.Json;
using System.Text.RegularExpressions;
using DeepSeekCluster.AppHost.Hosting;

namespace DeepSeekCluster.AppHost;

public sealed partial class EndpointsFile(string path)
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

    /// <summary>Reads a worker's announcement ("health and metrics on http://127.0.0.1:40123 (...)"); true when it was one.</summary>
    public bool Observe(string instance, string resource, string line)
    {
        if (Announcement().Match(line) is not { Success: true } m) return false;
        Set(new Instance(instance, resource, new Dictionary<string, string> { ["http"] = m.Groups[1].Value.TrimEnd('/') }));
        return true;
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

    [GeneratedRegex(@"health and metrics on (https?://[^\s,]+)")]
    private static partial Regex Announcement();
}
