// Every rendering closes ingress by default and opens each listening port to its intended peers only: the
// NetworkPolicies are evaluated here as Kubernetes does (policies select pods by label; a pod's allowed ingress is
// the union of the rules of every policy that selects it; a rule without ports admits every port, one without
// peers every source). A new component fails until its ports are given peers here and policies that admit exactly them.
using k8s.Models;

namespace DeepSeekCluster.Deployment.Tests;

public class NetworkPolicyTests
{
    const string Monitoring = "namespace:monitoring";

    /// <summary>Workload and named container port → who may connect (workloads of the namespace, or namespace:NAME).</summary>
    static readonly Dictionary<(string Workload, string Port), string[]> IntendedPeers = new()
    {
        [("coordinator", "http")] = [Monitoring],
        [("coordinator", "grpc")] = ["gpu-worker"],
        [("coordinator", "silo")] = ["coordinator"],
        [("coordinator", "gateway")] = ["coordinator"],
        [("data-shards", "http")] = [Monitoring],
        [("data-shards", "grpc")] = ["gpu-worker"],
        [("checkpoints", "http")] = [Monitoring],
        [("checkpoints", "grpc")] = ["coordinator", "gpu-worker", "model-server"],
        [("gpu-worker", "http")] = ["gpu-worker", Monitoring], // workers reach each other on every port (NCCL), this one included
        [("gpu-worker", "collective")] = ["gpu-worker"],
        [("gpu-worker", "pipeline")] = ["gpu-worker"],
        [("redis", "redis")] = ["coordinator"],
        [("azurite", "blob")] = ["checkpoints", "data-shards"],
        [("dcgm-exporter", "http")] = [Monitoring],
        [("model-server", "http")] = ["namespaces labelled deepseek-cluster.io/model-clients=true", Monitoring],
    };

    /// <summary>Ports no container declares (NCCL's, picked at start): open to the workers among themselves, to nobody else.</summary>
    static readonly Dictionary<string, string[]> UndeclaredPortPeers = new() { ["gpu-worker"] = ["gpu-worker"] };

    public static TheoryData<string> Builds() => new(Kustomize.Deployable);

    [Theory, MemberData(nameof(Builds))]
    public void IngressIsDeniedByDefaultToEveryPod(string folder)
    {
        var policies = Build.Of(folder).All<V1NetworkPolicy>().ToList();
        Assert.Contains(policies, p => IsEmpty(p.Spec.PodSelector) && p.Spec.PolicyTypes?.Contains("Ingress") == true && (p.Spec.Ingress is null or { Count: 0 }));
    }

    [Theory, MemberData(nameof(Builds))]
    public void EachListeningPortAdmitsExactlyItsIntendedPeers(string folder)
    {
        var build = Build.Of(folder);
        var problems = new List<string>();
        foreach (var w in build.Workloads)
        {
            foreach (var port in w.Template.Spec.Containers.SelectMany(c => c.Ports ?? []))
            {
                if (string.IsNullOrEmpty(port.Name)) { problems.Add($"{w.Name}: port {port.ContainerPort} has no name"); continue; }
                var actual = Peers(build, w, port.Name, port.ContainerPort);
                if (!IntendedPeers.TryGetValue((w.Name, port.Name), out var intended))
                {
                    problems.Add($"{w.Name}/{port.Name}: no intended peers known; add them to NetworkPolicyTests.IntendedPeers (admitted now: {Show(actual)})");
                    continue;
                }
                if (!actual.SetEquals(intended)) problems.Add($"{w.Name}/{port.Name} ({port.ContainerPort}): admits {Show(actual)}, intended {Show(intended)}");
            }
            var undeclared = Peers(build, w, portName: null, port: 40000);
            var allowed = UndeclaredPortPeers.GetValueOrDefault(w.Name, []);
            if (!undeclared.SetEquals(allowed)) problems.Add($"{w.Name}: a port no container declares admits {Show(undeclared)}, intended {Show(allowed)}");
        }
        Assert.True(problems.Count == 0, $"{folder}:\n" + string.Join("\n", problems));
    }

    [Fact]
    public void TheEvaluationSeesAnOpenPort()
    {
        // Guards the test above: with the default deny alone every port admits nobody, and an open rule admits everyone.
        var build = Build.Of("k8s/overlays/local");
        var coordinator = build.Workload("coordinator");
        Assert.Equal(["gpu-worker"], Peers(build, coordinator, "grpc", 8081));
        var open = new V1NetworkPolicy { Spec = new V1NetworkPolicySpec { PodSelector = new V1LabelSelector(), Ingress = [new V1NetworkPolicyIngressRule()] } };
        Assert.Contains("*", Peers(build, coordinator, "grpc", 8081, [open]));
    }

    /// <summary>The sources admitted to one port of one workload's pods.</summary>
    static SortedSet<string> Peers(Build build, Workload w, string? portName, int port, IEnumerable<V1NetworkPolicy>? extra = null)
    {
        var labels = w.Template.Metadata.Labels;
        var peers = new SortedSet<string>(StringComparer.Ordinal);
        foreach (var policy in build.All<V1NetworkPolicy>().Concat(extra ?? []))
        {
            if (!Selects(policy.Spec.PodSelector, labels)) continue;
            if (policy.Spec.PolicyTypes is { } types && !types.Contains("Ingress")) continue;
            foreach (var rule in policy.Spec.Ingress ?? [])
            {
                if (rule.Ports is { Count: > 0 } && !rule.Ports.Any(p => (p.Protocol ?? "TCP") == "TCP" && PortMatches(p, portName, port))) continue;
                if (rule.FromProperty is null or { Count: 0 }) { peers.Add("*"); continue; }
                foreach (var from in rule.FromProperty)
                {
                    if (from.IpBlock is not null) peers.Add($"ipBlock:{from.IpBlock.Cidr}");
                    else if (from.NamespaceSelector is not null)
                    {
                        var one = from.NamespaceSelector.MatchExpressions is null or { Count: 0 } && from.NamespaceSelector.MatchLabels is { Count: 1 } ml ? ml.Single() : (KeyValuePair<string, string>?)null;
                        bool allPods = from.PodSelector is null || IsEmpty(from.PodSelector);
                        if (one is { Key: "kubernetes.io/metadata.name" } named) peers.Add(allPods ? $"namespace:{named.Value}" : $"namespace:{named.Value}(some pods)");
                        else if (one is { } label && allPods) peers.Add($"namespaces labelled {label.Key}={label.Value}"); // an operator opts a namespace in
                        else peers.Add("namespace:*");
                    }
                    else if (from.PodSelector is { } selector)
                    {
                        if (IsEmpty(selector)) { peers.Add("every pod of the namespace"); continue; }
                        var matched = build.Workloads.Where(o => Selects(selector, o.Template.Metadata.Labels)).Select(o => o.Name).ToList();
                        if (matched.Count == 0) peers.Add($"no workload ({string.Join(",", selector.MatchLabels ?? new Dictionary<string, string>())})");
                        foreach (var m in matched) peers.Add(m);
                    }
                }
            }
        }
        return peers;
    }

    static bool PortMatches(V1NetworkPolicyPort rule, string? portName, int port)
    {
        string value = rule.Port?.ToString() ?? "";
        if (value.Length == 0) return true;
        return int.TryParse(value, out int number) ? number == port || (rule.EndPort is { } end && port >= number && port <= end) : value == portName;
    }

    static bool IsEmpty(V1LabelSelector? s) => s is null || ((s.MatchLabels is null or { Count: 0 }) && (s.MatchExpressions is null or { Count: 0 }));

    static bool Selects(V1LabelSelector selector, IDictionary<string, string> labels)
    {
        Assert.True(selector.MatchExpressions is null or { Count: 0 }, "these tests evaluate matchLabels selectors only; a matchExpressions selector needs support here first");
        return (selector.MatchLabels ?? new Dictionary<string, string>()).All(kv => labels.TryGetValue(kv.Key, out var v) && v == kv.Value);
    }

    static string Show(IEnumerable<string> peers) => peers.Any() ? string.Join(", ", peers.Order(StringComparer.Ordinal)) : "nobody";
}
