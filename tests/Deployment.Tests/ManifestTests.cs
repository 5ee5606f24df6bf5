// The kustomizations build with the real kubectl, and every object is a valid typed Kubernetes object.
using k8s;
using k8s.Models;
using YamlDotNet.RepresentationModel;

namespace DeepSeekCluster.Deployment.Tests;

public class ManifestTests
{
    public static TheoryData<string> Folders() => new(Kustomize.Folders);
    public static TheoryData<string> Overlays() => new(Kustomize.Overlays);

    [Theory, MemberData(nameof(Folders))]
    public void EveryKustomizationBuildsAndEveryObjectParsesIntoItsTypedModel(string folder)
    {
        string yaml = Kustomize.Build(folder);
        var documents = new YamlStream();
        documents.Load(new StringReader(yaml));
        var objects = Kustomize.Parse(yaml); // strict: an unknown or misspelt field fails here
        Assert.NotEmpty(objects);
        Assert.Equal(documents.Documents.Count, objects.Count);
        foreach (var o in objects)
        {
            Assert.Contains(o.GetType(), Kustomize.TypeMap.Values);
            Assert.False(string.IsNullOrEmpty(((IMetadata<V1ObjectMeta>)o).Metadata?.Name), $"{folder}: a {o.Kind} without a name");
        }
    }

    [Theory, MemberData(nameof(Overlays))]
    public void AnOverlayHasEveryPartOfTheCluster(string overlay)
    {
        var build = Build.Of(overlay);
        Assert.Equal(2, build.Workload("coordinator").Replicas);
        Assert.Equal("StatefulSet", build.Workload("gpu-worker").Kind);
        foreach (var name in new[] { "data-shards", "checkpoints" }) build.Workload(name);
        // Redis in-cluster only where nothing else provides it: the local overlay. Production points at a managed one.
        Assert.Equal(overlay == "k8s/overlays/local", build.Workloads.Any(w => w.Name == "redis"));
        Assert.All(build.Objects.Where(o => o is not V1Namespace), o => Assert.Equal("deepseek", ((IMetadata<V1ObjectMeta>)o).Metadata.NamespaceProperty));
        Assert.Equal("deepseek", build.All<V1Namespace>().Single().Metadata.Name);

        var pdbs = build.All<V1PodDisruptionBudget>().ToList();
        foreach (var name in new[] { "coordinator", "gpu-worker" })
        {
            var labels = build.Workload(name).Template.Metadata.Labels;
            Assert.Contains(pdbs, p => p.Spec.Selector.MatchLabels.All(kv => labels.TryGetValue(kv.Key, out var v) && v == kv.Value));
        }
    }

    [Theory, MemberData(nameof(Overlays))]
    public void EveryContainerHasResourceRequestsAndLimits(string overlay)
    {
        foreach (var w in Build.Of(overlay).Workloads)
        {
            var r = w.Container.Resources;
            Assert.True(r?.Requests?.ContainsKey("cpu") == true && r.Requests.ContainsKey("memory"), $"{overlay}/{w.Name}: cpu and memory requests");
            Assert.True(r!.Limits?.ContainsKey("memory") == true, $"{overlay}/{w.Name}: a memory limit");
        }
    }

    [Fact]
    public void WorkersRequestOneGpuAndTheLocalOverlayRemovesIt()
    {
        foreach (var folder in new[] { "k8s/base", "k8s/overlays/azure" })
        {
            var r = Build.Of(folder).Workload("gpu-worker").Container.Resources;
            Assert.Equal("1", r.Requests["nvidia.com/gpu"].ToString());
            Assert.Equal("1", r.Limits["nvidia.com/gpu"].ToString());
        }
        var local = Build.Of("k8s/overlays/local").Workload("gpu-worker").Container.Resources;
        Assert.DoesNotContain("nvidia.com/gpu", local.Requests.Keys);
        Assert.DoesNotContain("nvidia.com/gpu", local.Limits.Keys);
    }

    [Theory, MemberData(nameof(Overlays))]
    public void WorkersHaveTimeToFinishAStepAndLeave(string overlay)
    {
        var worker = Build.Of(overlay).Workload("gpu-worker").Template.Spec;
        Assert.True(worker.TerminationGracePeriodSeconds >= 120, $"{overlay}: the workers' grace period is {worker.TerminationGracePeriodSeconds} s");
        var coordinator = Build.Of(overlay).Workload("coordinator").Template.Spec;
        Assert.True(coordinator.TerminationGracePeriodSeconds >= 30);
    }

    [Fact]
    public void TheAzureOverlayUsesWorkloadIdentityGpuNodesAndNoKeys()
    {
        var build = Build.Of("k8s/overlays/azure");
        // Only the two processes that touch Blob storage get an Azure identity, each its own.
        var federated = build.All<V1ServiceAccount>().Where(a => a.Metadata.Annotations?.ContainsKey("azure.workload.identity/client-id") == true)
            .Select(a => a.Metadata.Name).Order().ToArray();
        Assert.Equal(["checkpoints", "data-shards"], federated);
        foreach (var w in build.Workloads.Where(w => w.Name is not ("checkpoints" or "data-shards")))
            Assert.False(w.Template.Metadata.Labels.ContainsKey("azure.workload.identity/use"), $"{w.Name} must not get an Azure identity");
        foreach (var name in new[] { "checkpoints", "data-shards" })
        {
            var w = build.Workload(name);
            var account = build.All<V1ServiceAccount>().Single(a => a.Metadata.Name == w.Template.Spec.ServiceAccountName);
            Assert.True(Guid.TryParse(account.Metadata.Annotations["azure.workload.identity/client-id"], out _));
            Assert.Equal("true", w.Template.Metadata.Labels["azure.workload.identity/use"]);
            Assert.Equal(name, w.Template.Spec.ServiceAccountName);
            string blobs = build.Configuration(w)["ConnectionStrings:blobs"];
            Assert.StartsWith("https://", blobs);
            Assert.DoesNotContain("AccountKey", blobs, StringComparison.OrdinalIgnoreCase);
        }
        var worker = build.Workload("gpu-worker").Template.Spec;
        Assert.NotEmpty(worker.NodeSelector);
        Assert.Contains(worker.Tolerations, t => t.Key == "nvidia.com/gpu");
    }

    [Fact]
    public void TheLocalOverlayRunsAzurite()
    {
        var build = Build.Of("k8s/overlays/local");
        build.Workload("azurite");
        var service = build.All<V1Service>().Single(s => s.Metadata.Name == "azurite");
        string blobs = build.Configuration(build.Workload("checkpoints"))["ConnectionStrings:blobs"];
        int port = service.Spec.Ports.Single().Port;
        Assert.Contains($"BlobEndpoint=http://azurite:{port}/devstoreaccount1", blobs);
    }

    [Fact]
    public void TheKedaExampleScalesTheWorkersOnDemandWithAnExplicitScaleDown()
    {
        var yaml = new YamlStream();
        yaml.Load(new StringReader(Repository.Read("k8s", "examples", "gpu-worker-keda.yaml")));
        var spec = (YamlMappingNode)((YamlMappingNode)yaml.Documents.Single().RootNode)["spec"];
        var target = (YamlMappingNode)spec["scaleTargetRef"];
        Assert.Equal(("StatefulSet", "gpu-worker"), (target["kind"].ToString(), target["name"].ToString()));
        var query = ((YamlMappingNode)((YamlMappingNode)((YamlSequenceNode)spec["triggers"]).Children[0])["metadata"])["query"].ToString();
        Assert.Equal(new[] { "deepseek_cluster_workers_wanted" }, PromQl.MetricNames(query).ToArray());
        Assert.All(PromQl.MetricNames(query), n => Assert.Contains(n, MetricsCatalogue.SeriesNames));
        // cooldownPeriod governs only the step to zero: above it, the behavior KEDA hands its HPA decides.
        var scaleDown = (YamlMappingNode)((YamlMappingNode)((YamlMappingNode)((YamlMappingNode)spec["advanced"])["horizontalPodAutoscalerConfig"])["behavior"])["scaleDown"];
        Assert.True(int.Parse(scaleDown["stabilizationWindowSeconds"].ToString()) >= 300);
    }
}
