// Every configuration key a service reads is either set by the manifests for the pods that need it or has a default
// that is right in a pod; the services__/ConnectionStrings__ values point at real Services and ports; the token is a
// Secret reference, never a value.
using k8s.Models;

namespace DeepSeekCluster.Deployment.Tests;

public class ConfigurationKeyTests
{
    public static TheoryData<string, string> OverlaysAndServices()
    {
        var data = new TheoryData<string, string>();
        foreach (var o in Kustomize.Overlays.Append("k8s/base"))
            foreach (var s in ConfigurationKeys.ProjectOf.Keys) data.Add(o, s);
        return data;
    }

    [Fact]
    public void EveryKeyTheSourcesReadIsClassified()
    {
        var problems = new List<string>();
        foreach (var (service, project) in ConfigurationKeys.ProjectOf)
        {
            var known = ConfigurationKeys.Required[service]
                .Concat(ConfigurationKeys.RequiredInOverlays.GetValueOrDefault(service, []))
                .Concat(ConfigurationKeys.DefaultIsRight[service]).Concat(ConfigurationKeys.DefaultIsRight["*"])
                .ToHashSet(StringComparer.OrdinalIgnoreCase);
            foreach (var key in ConfigurationKeys.ReadBy(project).Where(k => !known.Contains(k)))
                problems.Add($"{project} reads '{key}': set it in k8s/ for {service} and add it to ConfigurationKeys.Required, or add it to DefaultIsRight");
        }
        Assert.True(problems.Count == 0, string.Join("\n", problems));
    }

    [Fact]
    public void TheScanFindsTheKeysWeKnowTheServicesRead()
    {
        // Guards the scanner itself: if these went missing, the test above would pass on nothing.
        Assert.Superset(new HashSet<string>(["ConnectionStrings:orleans-redis", "Cluster:Token", "Coordinator:StateFolder", "Orleans:ClusterId", "Orleans:SiloPort"]),
            ConfigurationKeys.ReadBy("Coordinator").ToHashSet());
        Assert.Superset(new HashSet<string>(["ConnectionStrings:blobs", "Storage:Folder", "Storage:Container"]), ConfigurationKeys.ReadBy("CheckpointStore").ToHashSet());
        Assert.Superset(new HashSet<string>(["ConnectionStrings:blobs", "DataShards:Root", "DataShards:CacheDir"]), ConfigurationKeys.ReadBy("DataShardService").ToHashSet());
        Assert.Superset(new HashSet<string>(["Cluster:Token", "Worker:OutputDir", "POD_IP"]), ConfigurationKeys.ReadBy("GpuWorker").ToHashSet());
    }

    [Theory, MemberData(nameof(OverlaysAndServices))]
    public void EveryRequiredKeyIsSetForThePodsThatNeedIt(string folder, string service)
    {
        var build = Build.Of(folder);
        var config = build.Configuration(build.Workload(service));
        var required = ConfigurationKeys.Required[service].AsEnumerable();
        if (folder != "k8s/base") required = required.Concat(ConfigurationKeys.RequiredInOverlays.GetValueOrDefault(service, []));
        var missing = required.Where(k => !config.TryGetValue(k, out var v) || string.IsNullOrWhiteSpace(v)).ToList();
        Assert.True(missing.Count == 0, $"{folder}/{service} lacks {string.Join(", ", missing)}");
    }

    [Theory, MemberData(nameof(OverlaysAndServices))]
    public void FolderKeysPointIntoMountedVolumes(string folder, string service)
    {
        var build = Build.Of(folder);
        var w = build.Workload(service);
        var config = build.Configuration(w);
        var mounts = (w.Container.VolumeMounts ?? []).Where(m => m.ReadOnlyProperty != true).Select(m => m.MountPath.TrimEnd('/') + "/").ToList();
        foreach (var key in ConfigurationKeys.FolderKeys.Where(config.ContainsKey))
        {
            string path = config[key];
            Assert.True(path.StartsWith('/'), $"{folder}/{service}: {key}={path} must be absolute (the working folder /app is read-only)");
            Assert.True(mounts.Any(m => (path.TrimEnd('/') + "/").StartsWith(m, StringComparison.Ordinal)),
                $"{folder}/{service}: {key}={path} is on no writable volume mount ({string.Join(", ", mounts)})");
        }
        Assert.True(w.Container.SecurityContext?.ReadOnlyRootFilesystem == true, $"{folder}/{service}: read-only root filesystem");
    }

    [Theory, MemberData(nameof(Folders))]
    public void TheClusterTokenIsASecretReferenceNeverAValue(string folder)
    {
        var build = Build.Of(folder);
        // The user creates deepseek-cluster-token (docs/kubernetes.md). The one Secret a build may carry is the local
        // overlay's connection string of its password-less in-cluster Redis (production's is created by the user too).
        foreach (var secret in build.All<V1Secret>())
        {
            Assert.Equal(("k8s/overlays/local", "deepseek-redis"), (folder, secret.Metadata.Name));
            Assert.DoesNotContain("password", System.Text.Encoding.UTF8.GetString(secret.Data["connection-string"]), StringComparison.OrdinalIgnoreCase);
        }
        foreach (var map in build.All<V1ConfigMap>())
            Assert.DoesNotContain(map.Data?.Keys ?? [], k => k.Contains("Token", StringComparison.OrdinalIgnoreCase));
        foreach (var w in build.Workloads)
            foreach (var e in (w.Container.Env ?? []).Where(e => e.Name == "Cluster__Token"))
            {
                Assert.Null(e.Value);
                Assert.Equal(("deepseek-cluster-token", "token"), (e.ValueFrom.SecretKeyRef.Name, e.ValueFrom.SecretKeyRef.Key));
            }
    }

    public static TheoryData<string> Folders() => new(Kustomize.Overlays.Append("k8s/base"));

    [Theory, MemberData(nameof(Folders))]
    public void ServiceUrlsNameARealServiceAndItsPort(string folder)
    {
        var build = Build.Of(folder);
        var services = build.All<V1Service>().ToDictionary(s => s.Metadata.Name);
        foreach (var w in build.Workloads.Where(w => w.IsDeepSeekProcess))
            foreach (var (key, value) in build.Environment(w))
            {
                var parts = key.Split("__");
                if (parts is ["services", var name, var endpoint, "0"])
                {
                    var url = new Uri(value);
                    Assert.True(services.TryGetValue(url.Host, out var svc), $"{folder}/{w.Name}: {key}={value} names no Service");
                    Assert.Equal(name, url.Host); // Aspire's convention: the resource name is the host name
                    Assert.Contains(svc!.Spec.Ports, p => p.Name == endpoint && p.Port == url.Port);
                }
                else if (key == "ConnectionStrings__orleans-redis")
                {
                    // From the Secret deepseek-redis: generated in the local overlay (its in-cluster Redis), created by
                    // the user for a managed Redis elsewhere, which no Service of the build may then pretend to be.
                    Assert.Equal("secret:deepseek-redis/connection-string", value);
                    var secret = build.All<V1Secret>().SingleOrDefault(s => s.Metadata.Name == "deepseek-redis");
                    if (secret is null)
                    {
                        Assert.False(services.ContainsKey("redis"), $"{folder}: a redis Service, but the Coordinator's Redis is external");
                        continue;
                    }
                    var hostPort = System.Text.Encoding.UTF8.GetString(secret.Data["connection-string"]).Split(',')[0].Split(':');
                    Assert.Contains(services[hostPort[0]].Spec.Ports, p => p.Port == int.Parse(hostPort[1]));
                }
            }
    }
}
