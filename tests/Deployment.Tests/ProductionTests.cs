// The production overlay (k8s/overlays/azure): nothing left to fill in once a user has filled it (the placeholder check
// bites on the shipped template and passes on a filled copy), images pinned, mutual TLS on with every certificate Secret
// issued by cert-manager, Redis external and its connection string from a Secret, GPU metrics from the DCGM exporter.
using System.Text.RegularExpressions;
using k8s.Models;

namespace DeepSeekCluster.Deployment.Tests;

public partial class ProductionTests
{
    const string Template = "k8s/overlays/azure";
    const string Filled = "tests/Deployment.Tests/production";

    /// <summary>What is still a placeholder in a rendered build, each with the text that shows it.</summary>
    public static IReadOnlyList<string> Placeholders(Build build)
    {
        var found = new List<string>();
        string yaml = Kustomize.Build(build.Folder);
        foreach (Match m in PlaceholderText().Matches(yaml)) found.Add($"placeholder '{m.Value}'");
        foreach (var w in build.Workloads)
            foreach (var c in w.Template.Spec.Containers)
                if (c.Image.Contains("deepseek/", StringComparison.Ordinal) && !c.Image.Contains("@sha256:", StringComparison.Ordinal))
                    found.Add($"image '{c.Image}' of {w.Name} is not pinned by digest");
        return found;
    }

    [Fact]
    public void TheShippedProductionTemplateIsFlaggedForEachValueToFillIn()
    {
        var found = Placeholders(Build.Of(Template));
        Assert.Contains(found, f => f.Contains("STORAGE_ACCOUNT"));
        Assert.Contains(found, f => f.Contains("00000000-0000-0000-0000-000000000000"));
        Assert.Contains(found, f => f.Contains("myregistry"));
        Assert.Equal(5, found.Count(f => f.Contains("not pinned by digest")));
    }

    [Fact]
    public void AFilledProductionOverlayHasNoPlaceholders()
    {
        var found = Placeholders(Build.Of(Filled));
        Assert.True(found.Count == 0, string.Join("\n", found));
    }

    public static TheoryData<string> Builds() => new(Kustomize.Deployable.Append("k8s/base"));

    [Theory, MemberData(nameof(Builds))]
    public void EveryImageNamesAVersionNeverLatest(string folder)
    {
        foreach (var w in Build.Of(folder).Workloads)
            foreach (var c in w.Template.Spec.Containers)
            {
                var m = ImageReference().Match(c.Image);
                Assert.True(m.Success && (m.Groups["digest"].Success || m.Groups["tag"].Success), $"{folder}/{w.Name}: image '{c.Image}' names no tag or digest");
                Assert.NotEqual("latest", m.Groups["tag"].Value);
            }
    }

    [Fact]
    public void ProductionHasMutualTlsWithEveryCertificateSecretIssuedByCertManager()
    {
        var build = Build.Of(Template);
        var certificates = build.All<Certificate>().ToDictionary(c => (string)c.Spec["secretName"].ToString()!);
        var issuers = build.All<Issuer>().Select(i => i.Metadata.Name).ToHashSet();
        // The model server's API stays plain HTTP for applications with API keys (TLS for them ends at the ingress); its
        // certificate is a client's, for the models it loads from the store.
        var clusterProcesses = build.Workloads.Where(w => w.IsDeepSeekProcess).ToList();
        var mounted = clusterProcesses
            .SelectMany(w => (w.Template.Spec.Volumes ?? []).Where(v => v.Secret is not null && v.Secret.SecretName.EndsWith("-tls", StringComparison.Ordinal))
                                                             .Select(v => (w.Name, v.Secret.SecretName))).ToList();
        Assert.Equal(5, mounted.Select(m => m.Name).Distinct().Count()); // every process has its certificate
        foreach (var (workload, secret) in mounted)
        {
            Assert.True(certificates.TryGetValue(secret, out var certificate), $"{workload} mounts Secret {secret}, which no Certificate issues");
            var issuer = certificate!.Spec["issuerRef"] as IDictionary<object, object>;
            Assert.True(issuer is not null && issuers.Contains(issuer["name"].ToString()!), $"Certificate of {secret} names an issuer the build lacks");
            Assert.True(certificate.Spec.ContainsKey("renewBefore"), $"Certificate of {secret} is never renewed early");
        }
        foreach (var w in clusterProcesses)
            Assert.True(build.Configuration(w).ContainsKey("Cluster:Tls:CaPath"), $"{w.Name}: no mutual TLS in production");
    }

    [Fact]
    public void ProductionRedisIsExternalAndItsConnectionStringASecretTheUserCreates()
    {
        var build = Build.Of(Template);
        Assert.DoesNotContain(build.Workloads, w => w.Name == "redis");
        Assert.DoesNotContain(build.All<V1PersistentVolumeClaim>(), c => c.Metadata.Name.Contains("redis"));
        Assert.Empty(build.All<V1Secret>());
        Assert.Equal("secret:deepseek-redis/connection-string", build.Environment(build.Workload("coordinator"))["ConnectionStrings__orleans-redis"]);
        Assert.Contains("kubectl -n deepseek create secret generic deepseek-redis", Repository.Read("docs", "kubernetes.md"));
    }

    [Fact]
    public void TheGpuOverlayExportsGpuMetricsFromEveryGpuNodeWithoutTakingAGpu()
    {
        var build = Build.Of(Template);
        var dcgm = build.Workload("dcgm-exporter");
        Assert.Equal("DaemonSet", dcgm.Kind);
        Assert.Equal(build.Workload("gpu-worker").Template.Spec.NodeSelector, dcgm.Template.Spec.NodeSelector);
        Assert.DoesNotContain("nvidia.com/gpu", dcgm.Container.Resources.Limits.Keys);
        Assert.Equal("true", dcgm.Template.Metadata.Annotations["prometheus.io/scrape"]);
        var port = dcgm.Container.Ports.Single();
        Assert.Equal(port.ContainerPort.ToString(), dcgm.Template.Metadata.Annotations["prometheus.io/port"]);
        Assert.Equal("http", port.Name); // the port name k8s/prometheus scrapes (prometheus.yml keeps only "http")
        Assert.Contains(Kustomize.Objects("k8s/prometheus").OfType<ServiceMonitor>(), m => m.Spec.Selector.MatchLabels["app.kubernetes.io/name"] == "dcgm-exporter");
        Assert.DoesNotContain(Build.Of("k8s/overlays/local").Workloads, w => w.Name == "dcgm-exporter"); // no GPUs there
    }

    [GeneratedRegex(@"STORAGE_ACCOUNT|myregistry|00000000-0000-0000-0000-000000000000|REPLACE|CHANGE_?ME|example\.(com|org)", RegexOptions.IgnoreCase)]
    private static partial Regex PlaceholderText();

    [GeneratedRegex(@"^(?<name>[^@:]+(:\d+)?/[^@:]+|[^@:/]+)(:(?<tag>[\w][\w.-]*))?(@(?<digest>sha256:[0-9a-f]{64}))?$")]
    private static partial Regex ImageReference();
}
