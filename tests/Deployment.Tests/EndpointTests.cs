// Probes, ports and scrape targets agree with the endpoints the services expose: Kestrel endpoints "http" (HTTP/1.1:
// /health, /alive, /metrics) and "grpc" (HTTP/2), as ServiceDefaults maps them. Checked against the sources and the
// manifests; checking against a running process is part of issue 8's live Prometheus test.
using System.Text.RegularExpressions;
using k8s.Models;
using YamlDotNet.RepresentationModel;

namespace DeepSeekCluster.Deployment.Tests;

public class EndpointTests
{
    public static TheoryData<string> Folders() => new(Kustomize.Overlays.Append("k8s/base"));

    [Fact]
    public void ServiceDefaultsMapsTheProbeAndScrapePaths()
    {
        string code = Repository.Read("ServiceDefaults", "Extensions.cs");
        Assert.Contains("MapPrometheusScrapingEndpoint(\"/metrics\")", code);
        Assert.Contains("MapHealthChecks(\"/health\")", code);
        Assert.Matches(new Regex(@"MapHealthChecks\(""/alive"",\s*new HealthCheckOptions\s*\{\s*Predicate = r => r\.Tags\.Contains\(LiveTag\)"), code);
        foreach (var project in new[] { "Coordinator", "DataShardService", "CheckpointStore" })
            Assert.Contains("app.MapDefaultEndpoints()", Repository.Read(project, "Program.cs"));
    }

    [Theory, MemberData(nameof(Folders))]
    public void ProbesAskAliveForLivenessAndHealthForReadinessOnTheHttpPort(string folder)
    {
        foreach (var w in Build.Of(folder).Workloads.Where(w => w.IsDeepSeekProcess))
        {
            var c = w.Container;
            Assert.Equal(("/alive", "http"), (c.LivenessProbe?.HttpGet?.Path, c.LivenessProbe?.HttpGet?.Port?.Value));
            Assert.Equal(("/health", "http"), (c.ReadinessProbe?.HttpGet?.Path, c.ReadinessProbe?.HttpGet?.Port?.Value));
            if (c.StartupProbe is { } startup) Assert.Equal(("/alive", "http"), (startup.HttpGet?.Path, startup.HttpGet?.Port?.Value));
        }
    }

    [Theory, MemberData(nameof(Folders))]
    public void KestrelEndpointsAreTheNamedContainerPorts(string folder)
    {
        var build = Build.Of(folder);
        foreach (var w in build.Workloads.Where(w => w.IsDeepSeekProcess))
        {
            var env = build.Environment(w);
            var ports = w.Container.Ports.ToDictionary(p => p.Name, p => p.ContainerPort);
            var endpoints = env.Keys.Select(k => Regex.Match(k, "^Kestrel__Endpoints__(\\w+)__Url$")).Where(m => m.Success).Select(m => m.Groups[1].Value).ToList();
            Assert.Contains("http", endpoints);
            foreach (var name in endpoints)
            {
                Assert.True(ports.TryGetValue(name, out int port), $"{folder}/{w.Name}: Kestrel endpoint '{name}' has no container port of that name");
                Assert.Equal(port, new Uri(env[$"Kestrel__Endpoints__{name}__Url"].Replace("+", "0.0.0.0")).Port);
                Assert.Equal(name == "grpc" ? "Http2" : "Http1", env[$"Kestrel__Endpoints__{name}__Protocols"]);
            }
            foreach (var name in new[] { "http", "grpc" }.Where(ports.ContainsKey))
                Assert.True(endpoints.Contains(name), $"{folder}/{w.Name}: container port '{name}' but no Kestrel endpoint '{name}'");
            bool servesGrpc = w.Name is not ("gpu-worker" or "model-server"); // those two serve HTTP only
            Assert.Equal(servesGrpc, ports.ContainsKey("grpc"));
        }
    }

    [Theory, MemberData(nameof(Folders))]
    public void ServicesTargetNamedPortsOfThePodsTheySelect(string folder)
    {
        var build = Build.Of(folder);
        foreach (var svc in build.All<V1Service>())
        {
            var selected = build.Workloads.Where(w => svc.Spec.Selector.All(kv => w.Template.Metadata.Labels.TryGetValue(kv.Key, out var v) && v == kv.Value)).ToList();
            Assert.True(selected.Count == 1, $"{folder}: Service {svc.Metadata.Name} selects {selected.Count} workloads");
            var names = selected[0].Container.Ports.Select(p => p.Name).ToHashSet();
            foreach (var p in svc.Spec.Ports)
            {
                Assert.True(names.Contains(p.TargetPort.Value), $"{folder}: Service {svc.Metadata.Name} port {p.Name} targets '{p.TargetPort.Value}', not a named port of {selected[0].Name}");
                Assert.Equal(p.Name, p.TargetPort.Value); // http → http, grpc → grpc: one name from Kestrel to Service
            }
        }
    }

    [Theory, MemberData(nameof(Folders))]
    public void ScrapeAnnotationsPointAtMetricsOnTheHttpPort(string folder)
    {
        var build = Build.Of(folder);
        var scraped = build.Workloads.Where(w => w.IsDeepSeekProcess).Select(w => w.Name).Order().ToList();
        Assert.Equal(["checkpoints", "coordinator", "data-shards", "gpu-worker", "model-server"], scraped);
        foreach (var w in build.Workloads.Where(w => w.IsDeepSeekProcess))
        {
            var a = w.Template.Metadata.Annotations;
            Assert.Equal("/metrics", a["prometheus.io/path"]);
            Assert.Equal(w.Container.Ports.Single(p => p.Name == "http").ContainerPort.ToString(), a["prometheus.io/port"]);
        }
    }

    [Fact]
    public void ServiceMonitorsScrapeEveryProcessOnTheHttpPort()
    {
        var monitors = Kustomize.Objects("k8s/prometheus").OfType<ServiceMonitor>().ToList();
        foreach (var folder in Kustomize.Overlays)
        {
            var build = Build.Of(folder);
            foreach (var w in build.Workloads.Where(w => w.IsDeepSeekProcess))
            {
                var services = build.All<V1Service>().Where(s => s.Spec.Selector.All(kv => w.Template.Metadata.Labels.TryGetValue(kv.Key, out var v) && v == kv.Value)).ToList();
                bool covered = monitors.Any(m => services.Any(s =>
                    m.Spec.Selector.MatchLabels.All(kv => s.Metadata.Labels?.TryGetValue(kv.Key, out var v) == true && v == kv.Value)
                    && m.Spec.Endpoints.Any(e => e.Path == "/metrics" && s.Spec.Ports.Any(p => p.Name == e.Port && p.TargetPort.Value == "http"))));
                Assert.True(covered, $"{folder}: no ServiceMonitor scrapes /metrics of {w.Name} on its http port");
            }
        }
        foreach (var e in monitors.SelectMany(m => m.Spec.Endpoints).SelectMany(e => e.Relabelings ?? []))
            Assert.DoesNotContain(e.TargetLabel, new[] { "worker", "training_job", "job" });
    }

    [Fact]
    public void ThePrometheusScrapeJobKeepsAnnotatedPodsOnTheirHttpPort()
    {
        var yaml = new YamlStream();
        yaml.Load(new StringReader(Repository.Read("k8s", "prometheus", "prometheus.yml")));
        var root = (YamlMappingNode)yaml.Documents.Single().RootNode;
        var job = (YamlMappingNode)((YamlSequenceNode)root["scrape_configs"]).Children.Single();
        var sd = (YamlMappingNode)((YamlSequenceNode)job["kubernetes_sd_configs"]).Children.Single();
        Assert.Equal("pod", sd["role"].ToString());
        var rules = ((YamlSequenceNode)job["relabel_configs"]).Children.Cast<YamlMappingNode>().ToList();
        string Sources(YamlMappingNode r) => string.Join(";", ((YamlSequenceNode)r["source_labels"]).Children.Select(c => c.ToString()));
        string? Get(YamlMappingNode r, string key) => r.Children.TryGetValue(new YamlScalarNode(key), out var v) ? v.ToString() : null;
        Assert.Contains(rules, r => Sources(r) == "__meta_kubernetes_pod_annotation_prometheus_io_scrape" && Get(r, "action") == "keep" && Get(r, "regex") == "true");
        Assert.Contains(rules, r => Sources(r) == "__meta_kubernetes_pod_container_port_name" && Get(r, "action") == "keep" && Get(r, "regex") == "http");
        Assert.Contains(rules, r => Get(r, "target_label") == "__metrics_path__");
        Assert.Contains(rules, r => Get(r, "target_label") == "service");
        Assert.DoesNotContain(rules, r => Get(r, "target_label") is "worker" or "training_job" or "job");
    }
}
