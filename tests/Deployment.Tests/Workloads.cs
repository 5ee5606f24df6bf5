// The cluster's workloads in one kustomize build, with each container's effective environment (env + envFrom ConfigMaps).
using k8s;
using k8s.Models;

namespace DeepSeekCluster.Deployment.Tests;

public sealed record Workload(string Name, string Kind, V1PodTemplateSpec Template, int? Replicas)
{
    public V1Container Container => Template.Spec.Containers.Single();

    /// <summary>The cluster's own .NET processes: scraped by Prometheus and run from a deepseek/ image (Redis, Azurite and the DCGM exporter are not).</summary>
    public bool IsDeepSeekProcess => Template.Metadata.Annotations?.TryGetValue("prometheus.io/scrape", out var s) == true && s == "true"
        && Container.Image.Contains("deepseek/", StringComparison.Ordinal);
}

public sealed class Build
{
    public string Folder { get; }
    public IReadOnlyList<IKubernetesObject> Objects { get; }
    public IReadOnlyList<Workload> Workloads { get; }

    public Build(string folder)
    {
        Folder = folder;
        Objects = Kustomize.Objects(folder);
        Workloads = Objects.Select(o => o switch
        {
            V1Deployment d => new Workload(d.Metadata.Name, "Deployment", d.Spec.Template, d.Spec.Replicas),
            V1StatefulSet s => new Workload(s.Metadata.Name, "StatefulSet", s.Spec.Template, s.Spec.Replicas),
            V1DaemonSet d => new Workload(d.Metadata.Name, "DaemonSet", d.Spec.Template, null),
            _ => null,
        }).OfType<Workload>().ToList();
    }

    public Workload Workload(string name) =>
        Workloads.SingleOrDefault(w => w.Name == name) ?? throw new InvalidOperationException($"{Folder}: no workload '{name}'");

    public IEnumerable<T> All<T>() => Objects.OfType<T>();

    /// <summary>
    /// Environment name → value as the container sees it; a Secret reference reads "secret:{name}/{key}" and a field
    /// reference "field:{path}". envFrom ConfigMaps first, env entries override them, as in Kubernetes.
    /// </summary>
    public IReadOnlyDictionary<string, string> Environment(Workload w)
    {
        var env = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (var from in w.Container.EnvFrom ?? [])
        {
            Assert.True(from.ConfigMapRef is not null, $"{Folder}/{w.Name}: envFrom only from ConfigMaps (secrets go through secretKeyRef)");
            var map = All<V1ConfigMap>().SingleOrDefault(m => m.Metadata.Name == from.ConfigMapRef!.Name)
                ?? throw new InvalidOperationException($"{Folder}/{w.Name}: envFrom names ConfigMap '{from.ConfigMapRef!.Name}', which the build lacks");
            foreach (var (k, v) in map.Data ?? new Dictionary<string, string>()) env[k] = v;
        }
        foreach (var e in w.Container.Env ?? [])
            env[e.Name] = e.ValueFrom switch
            {
                null => e.Value ?? "",
                { SecretKeyRef: { } s } => $"secret:{s.Name}/{s.Key}",
                { FieldRef: { } f } => $"field:{f.FieldPath}",
                _ => throw new InvalidOperationException($"{Folder}/{w.Name}: env {e.Name} has a source these tests do not know"),
            };
        return env;
    }

    /// <summary>The configuration keys (A:B form) the environment sets, case-insensitively as .NET reads them.</summary>
    public IReadOnlyDictionary<string, string> Configuration(Workload w) =>
        Environment(w).ToDictionary(kv => kv.Key.Replace("__", ":"), kv => kv.Value, StringComparer.OrdinalIgnoreCase);

    static readonly Dictionary<string, Build> cache = new();

    public static Build Of(string folder)
    {
        lock (cache)
        {
            if (!cache.TryGetValue(folder, out var b)) cache[folder] = b = new Build(folder);
            return b;
        }
    }
}
