// The workers scale on demand (the Coordinator's deepseek_cluster_workers_wanted), with an explicit, patient
// scale-down, and nothing else fights the scaler over the count; a leave stays a leave; a new worker version is a
// coordinated restart, not a rolling one; readiness asks what the process depends on, liveness only the process.
using k8s.Models;

namespace DeepSeekCluster.Deployment.Tests;

public class ScalingTests
{
    public static TheoryData<string> Deployable() => new(Kustomize.Deployable);

    [Theory, MemberData(nameof(Deployable))]
    public void AWorkloadOwnedByAnAutoscalerCarriesNoReplicaCount(string folder)
    {
        var build = Build.Of(folder);
        foreach (var hpa in build.All<V2HorizontalPodAutoscaler>())
        {
            var target = build.Workloads.SingleOrDefault(w => w.Kind == hpa.Spec.ScaleTargetRef.Kind && w.Name == hpa.Spec.ScaleTargetRef.Name);
            Assert.True(target is not null, $"{folder}: HPA {hpa.Metadata.Name} targets {hpa.Spec.ScaleTargetRef.Kind}/{hpa.Spec.ScaleTargetRef.Name}, which the build lacks");
            Assert.True(target!.Replicas is null, $"{folder}: {target.Name} sets replicas, which every apply would reset under HPA {hpa.Metadata.Name}");
        }
        // Without a scaler the count is explicit, so an apply gives a known size.
        var worker = build.Workload("gpu-worker");
        bool scaled = build.All<V2HorizontalPodAutoscaler>().Any(h => h.Spec.ScaleTargetRef.Name == "gpu-worker");
        Assert.True(scaled || worker.Replicas is > 0, $"{folder}: gpu-worker has neither a scaler nor a replica count");
        Assert.Equal(folder != "k8s/overlays/local" && folder != "tests/Deployment.Tests/mtls/local", scaled); // production scales by demand
    }

    [Theory, MemberData(nameof(Deployable))]
    public void TheAutoscalerFollowsWorkersWantedAndScalesDownPatientlyInOneStep(string folder)
    {
        foreach (var hpa in Build.Of(folder).All<V2HorizontalPodAutoscaler>())
        {
            var metric = Assert.Single(hpa.Spec.Metrics);
            Assert.Equal("External", metric.Type);
            Assert.Equal("deepseek_cluster_workers_wanted", metric.External.Metric.Name);
            Assert.Contains(metric.External.Metric.Name, MetricsCatalogue.SeriesNames);
            // AverageValue = workers per pod: desired replicas = ceil(wanted / workers per pod), the demand itself
            // (Value would multiply by the current count). One worker per pod, or GPUS_PER_POD ranks on multi-GPU nodes.
            Assert.Equal("AverageValue", metric.External.Target.Type);
            var env = Build.Of(folder).Environment(Build.Of(folder).Workload("gpu-worker"));
            decimal perPod = env.TryGetValue("GPUS_PER_POD", out var ranks) ? decimal.Parse(ranks) : 1m;
            Assert.Equal(perPod, metric.External.Target.AverageValue.ToDecimal());
            var down = hpa.Spec.Behavior?.ScaleDown;
            Assert.True(down is not null, $"{folder}: HPA {hpa.Metadata.Name} has no explicit scale-down behaviour");
            Assert.True(down!.StabilizationWindowSeconds >= 300, $"{folder}: scale-down waits {down.StabilizationWindowSeconds} s; every change is a rescale");
            Assert.NotEqual("Disabled", down.SelectPolicy);
            // The surplus goes in one step (one rescale), not one pod per period (one rescale each).
            Assert.Contains(down.Policies, p => p.Type == "Percent" && p.Value >= 100);
            Assert.DoesNotContain(down.Policies, p => p.Type == "Pods");
        }
    }

    [Theory, MemberData(nameof(Deployable))]
    public void WorkersAreRestartedTogetherAndALeaveStaysALeave(string folder)
    {
        var build = Build.Of(folder);
        var set = build.All<V1StatefulSet>().Single(s => s.Metadata.Name == "gpu-worker");
        // OnDelete: a template change waits for the coordinated restart (docs/kubernetes.md) instead of rolling pod by pod.
        Assert.Equal("OnDelete", set.Spec.UpdateStrategy.Type);
        Assert.Equal("Parallel", set.Spec.PodManagementPolicy);
        Assert.Equal("true", build.Configuration(build.Workload("gpu-worker"))["Worker:StayAfterLeave"]);
        Assert.Contains("StayAfterLeave", Repository.Read("GpuWorker", "Cluster", "WorkerSettings.cs"));
    }

    [Theory, MemberData(nameof(Deployable))]
    public void ReadinessAsksTheDependenciesAndLivenessOnlyTheProcess(string folder)
    {
        foreach (var w in Build.Of(folder).Workloads.Where(w => w.IsDeepSeekProcess))
        {
            var c = w.Container;
            Assert.Equal("/alive", c.LivenessProbe.HttpGet.Path);
            Assert.Equal("/health", c.ReadinessProbe.HttpGet.Path);
            if (c.StartupProbe is { } startup) Assert.Equal("/alive", startup.HttpGet.Path);
            // The Coordinator's Redis PING waits up to 2 s (Coordinator/RedisReadiness.cs): the probe must wait longer.
            if (w.Name == "coordinator") Assert.True(c.ReadinessProbe.TimeoutSeconds >= 3, $"{folder}: the Coordinator's readiness probe times out before its Redis check");
        }
    }
}
