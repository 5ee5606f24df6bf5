// The optional mutual-TLS component (k8s/components/mtls) on each deployable overlay, built by the real kubectl
// kustomize: every process of the cluster gets its certificate Secret mounted read-only and Cluster:Tls:* pointing
// into it; the three gRPC services serve https on their grpc endpoint while probes and scrapes stay on cleartext http;
// every client dials https; the Services announce the TLS port.
using k8s.Models;

namespace DeepSeekCluster.Deployment.Tests;

public class MutualTlsComponentTests
{
    static readonly string[] TlsKeys = ["Cluster:Tls:CertificatePath", "Cluster:Tls:KeyPath", "Cluster:Tls:CaPath"];
    static readonly string[] GrpcServers = ["coordinator", "data-shards", "checkpoints"];

    /// <summary>Each deployable overlay with the component added (fixtures under tests/Deployment.Tests/mtls/).</summary>
    static readonly string[] WithComponent = Kustomize.Overlays.Select(o => $"tests/Deployment.Tests/mtls/{Path.GetFileName(o)}").ToArray();

    public static TheoryData<string> Builds() => new(WithComponent);

    public static TheoryData<string, string> BuildsAndWorkloads()
    {
        var data = new TheoryData<string, string>();
        foreach (var b in WithComponent)
            // The model server too: its API is plain HTTP, but it dials the store's mutual-TLS port for models it loads there.
            foreach (var w in ConfigurationKeys.ProjectOf.Keys) data.Add(b, w);
        return data;
    }

    [Theory, MemberData(nameof(BuildsAndWorkloads))]
    public void EveryProcessReadsItsCertificateFilesFromAReadOnlySecretMount(string folder, string workload)
    {
        var build = Build.Of(folder);
        var w = build.Workload(workload);
        var config = build.Configuration(w);
        var expectedFile = new Dictionary<string, string> { [TlsKeys[0]] = "tls.crt", [TlsKeys[1]] = "tls.key", [TlsKeys[2]] = "ca.crt" };
        foreach (var key in TlsKeys)
        {
            Assert.True(config.TryGetValue(key, out var path), $"{folder}/{workload}: {key} is not set");
            var mount = (w.Container.VolumeMounts ?? []).SingleOrDefault(m => path!.StartsWith(m.MountPath.TrimEnd('/') + "/", StringComparison.Ordinal));
            Assert.True(mount is not null, $"{folder}/{workload}: {key}={path} is on no volume mount");
            Assert.True(mount!.ReadOnlyProperty == true, $"{folder}/{workload}: the certificate mount {mount.MountPath} must be read-only");
            var volume = w.Template.Spec.Volumes.Single(v => v.Name == mount.Name);
            Assert.True(volume.Secret is { SecretName.Length: > 0 }, $"{folder}/{workload}: {key} must come from a Secret, not {mount.Name}");
            Assert.Equal(Convert.ToInt32("440", 8), volume.Secret!.DefaultMode); // the app user's group reads, nobody else
            Assert.Equal(expectedFile[key], Path.GetFileName(path));
        }
    }

    [Theory, MemberData(nameof(Builds))]
    public void TheGrpcServersServeHttpsWhileProbesAndScrapesStayOnCleartextHttp(string folder)
    {
        var build = Build.Of(folder);
        foreach (var name in GrpcServers)
        {
            var w = build.Workload(name);
            var config = build.Configuration(w);
            Assert.StartsWith("https://", config["Kestrel:Endpoints:grpc:Url"]);
            Assert.StartsWith("http://", config["Kestrel:Endpoints:http:Url"]);
            // Kubelet and Prometheus present no client certificate: they must never be sent to the TLS port.
            Assert.Equal("http", w.Container.LivenessProbe.HttpGet.Port.Value);
            Assert.Equal("http", w.Container.ReadinessProbe.HttpGet.Port.Value);
            Assert.Equal("8080", w.Template.Metadata.Annotations["prometheus.io/port"]);
            var grpcPort = build.All<V1Service>().Single(s => s.Metadata.Name == name).Spec.Ports.Single(p => p.Name == "grpc");
            Assert.Equal("https", grpcPort.AppProtocol);
        }
    }

    [Theory, MemberData(nameof(Builds))]
    public void EveryClientDialsTheGrpcServicesOverHttps(string folder)
    {
        var build = Build.Of(folder);
        foreach (var w in build.Workloads.Where(w => w.IsDeepSeekProcess))
            foreach (var (key, value) in build.Environment(w).Where(e => e.Key.StartsWith("services__", StringComparison.Ordinal) && e.Key.EndsWith("__grpc__0", StringComparison.Ordinal)))
                Assert.True(value.StartsWith("https://", StringComparison.Ordinal), $"{folder}/{w.Name}: {key}={value} is cleartext while the service serves mutual TLS");
        // The clients the code has: the workers dial all three, the Coordinator commits into the store.
        var worker = build.Configuration(build.Workload("gpu-worker"));
        Assert.All(new[] { "coordinator", "data-shards", "checkpoints" }, s => Assert.StartsWith($"https://{s}:8081", worker[$"services:{s}:grpc:0"]));
        Assert.StartsWith("https://checkpoints:8081", build.Configuration(build.Workload("coordinator"))["services:checkpoints:grpc:0"]);
    }

    [Fact]
    public void OnlyTheLocalOverlayStaysCleartextProductionHasTheComponentBuiltIn()
    {
        // Production (azure) includes the component by default: its build equals the fixture that adds it.
        Assert.Equal(Kustomize.Build("tests/Deployment.Tests/mtls/azure"), Kustomize.Build("k8s/overlays/azure"));
        foreach (var folder in new[] { "k8s/overlays/local", "k8s/base" })
        {
            var build = Build.Of(folder);
            foreach (var w in build.Workloads.Where(w => w.IsDeepSeekProcess))
            {
                var config = build.Configuration(w);
                Assert.DoesNotContain(config.Keys, k => k.StartsWith("Cluster:Tls:", StringComparison.OrdinalIgnoreCase));
                if (config.TryGetValue("Kestrel:Endpoints:grpc:Url", out var url)) Assert.StartsWith("http://", url);
            }
        }
    }
}
