// Runs the real `kubectl kustomize` on a folder of k8s/ and parses its output into KubernetesClient's typed models.
using System.Collections.Concurrent;
using System.Diagnostics;
using System.Reflection;
using k8s;
using k8s.Models;

namespace DeepSeekCluster.Deployment.Tests;

public static class Kustomize
{
    /// <summary>Every kustomization of the repository: the base, the overlays, and the monitoring folders.</summary>
    public static readonly string[] Folders = ["k8s/base", "k8s/overlays/local", "k8s/overlays/azure", "k8s/overlays/azure-multi-gpu", "k8s/prometheus", "k8s/grafana"];

    /// <summary>The deployable builds: what `kubectl apply -k` is run on.</summary>
    public static readonly string[] Overlays = ["k8s/overlays/local", "k8s/overlays/azure"];

    /// <summary>
    /// Every rendering a cluster may be given: the overlays, the production overlay with its placeholders filled, and
    /// each overlay with the mutual-TLS component (test fixtures under tests/Deployment.Tests/). The security, network,
    /// scaling and resource rules hold for each (the multi-GPU one adds IPC_LOCK to its workers, and nothing else).
    /// </summary>
    public static readonly string[] Deployable =
        [.. Overlays, "tests/Deployment.Tests/production", "tests/Deployment.Tests/mtls/local", "tests/Deployment.Tests/mtls/azure", MultiGpu];

    /// <summary>The filled production overlay with k8s/components/multi-gpu-node: one worker pod per GPU node.</summary>
    public const string MultiGpu = "tests/Deployment.Tests/production-multi-gpu";

    static readonly ConcurrentDictionary<string, Lazy<string>> builds = new();

    /// <summary>The YAML `kubectl kustomize` prints for a folder (built once per test run).</summary>
    public static string Build(string folder) =>
        builds.GetOrAdd(folder, f => new Lazy<string>(() => RunKubectl(f))).Value;

    /// <summary>The build's objects, each as its typed model (V1Deployment, V1StatefulSet, ...; strict: unknown fields fail).</summary>
    public static IReadOnlyList<IKubernetesObject> Objects(string folder) => Parse(Build(folder));

    public static IReadOnlyList<IKubernetesObject> Parse(string yaml) =>
        KubernetesYaml.LoadAllFromString(yaml, TypeMap, strict: true).Cast<IKubernetesObject>().ToList();

    /// <summary>"apiVersion/kind" → model type, for every built-in model of the package plus the CRDs we ship.</summary>
    public static IDictionary<string, Type> TypeMap { get; } = BuildTypeMap();

    static Dictionary<string, Type> BuildTypeMap()
    {
        var map = new Dictionary<string, Type>(StringComparer.Ordinal);
        foreach (var t in typeof(V1Deployment).Assembly.GetTypes())
        {
            var a = t.GetCustomAttribute<KubernetesEntityAttribute>();
            if (a is null || t.Namespace != "k8s.Models" || a.Kind is null) continue;
            string apiVersion = string.IsNullOrEmpty(a.Group) ? a.ApiVersion : $"{a.Group}/{a.ApiVersion}";
            map[$"{apiVersion}/{a.Kind}"] = t;
        }
        map[$"{ServiceMonitor.ApiVersionValue}/{ServiceMonitor.KindValue}"] = typeof(ServiceMonitor);
        map["monitoring.coreos.com/v1/PrometheusRule"] = typeof(PrometheusRule);
        map["cert-manager.io/v1/Certificate"] = typeof(Certificate);
        map["cert-manager.io/v1/Issuer"] = typeof(Issuer);
        return map;
    }

    static string RunKubectl(string folder)
    {
        var psi = new ProcessStartInfo("kubectl") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        psi.ArgumentList.Add("kustomize");
        psi.ArgumentList.Add(Repository.PathOf(folder));
        Process process;
        try
        {
            process = Process.Start(psi)!;
        }
        catch (System.ComponentModel.Win32Exception e)
        {
            throw new InvalidOperationException(
                "kubectl is not installed or not on PATH: these tests build the kustomizations with the real " +
                "`kubectl kustomize` (kubectl 1.27 or later; see docs/kubernetes.md). " + e.Message, e);
        }
        using (process)
        {
            var stdout = process.StandardOutput.ReadToEndAsync();
            var stderr = process.StandardError.ReadToEndAsync();
            if (!process.WaitForExit(60_000))
            {
                process.Kill(entireProcessTree: true);
                throw new TimeoutException($"kubectl kustomize {folder} ran over 60 s");
            }
            if (process.ExitCode != 0)
                throw new InvalidOperationException($"kubectl kustomize {folder} failed (exit {process.ExitCode}): {stderr.Result}");
            return stdout.Result;
        }
    }
}
