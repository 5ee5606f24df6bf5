// Resources: workers in the Guaranteed QoS class with whole CPUs; every container bounds its ephemeral storage and every
// emptyDir its size, so a full staging folder evicts one pod instead of filling the node; memory-backed volumes fit
// inside the memory limit they count against.
using k8s.Models;

namespace DeepSeekCluster.Deployment.Tests;

public class ResourceTests
{
    public static TheoryData<string> Deployable() => new(Kustomize.Deployable);

    [Theory, MemberData(nameof(Deployable))]
    public void WorkersAreGuaranteedQosWithWholeCpus(string folder)
    {
        var r = Build.Of(folder).Workload("gpu-worker").Container.Resources;
        Assert.Equal(r.Limits.Keys.Order(), r.Requests.Keys.Order());
        foreach (var (name, limit) in r.Limits)
            Assert.True(limit.ToDecimal() == r.Requests[name].ToDecimal(), $"{folder}: gpu-worker requests {r.Requests[name]} {name} but is limited to {limit}");
        decimal cpu = r.Limits["cpu"].ToDecimal();
        Assert.True(cpu >= 1 && cpu == decimal.Truncate(cpu), $"{folder}: gpu-worker cpu {cpu} is not a whole number of CPUs");
    }

    [Theory, MemberData(nameof(Deployable))]
    public void EveryContainerBoundsItsEphemeralStorageAndEveryEmptyDirItsSize(string folder)
    {
        foreach (var w in Build.Of(folder).Workloads)
        {
            var c = w.Container;
            string where = $"{folder}/{w.Name}";
            Assert.True(c.Resources.Requests.ContainsKey("ephemeral-storage"), $"{where}: no ephemeral-storage request");
            Assert.True(c.Resources.Limits.TryGetValue("ephemeral-storage", out var disk), $"{where}: no ephemeral-storage limit");
            decimal onDisk = 0, inMemory = 0;
            foreach (var v in (w.Template.Spec.Volumes ?? []).Where(v => v.EmptyDir is not null))
            {
                Assert.True(v.EmptyDir.SizeLimit is not null, $"{where}: emptyDir {v.Name} has no sizeLimit");
                if (v.EmptyDir.Medium == "Memory") inMemory += v.EmptyDir.SizeLimit!.ToDecimal();
                else onDisk += v.EmptyDir.SizeLimit!.ToDecimal();
            }
            Assert.True(onDisk <= disk!.ToDecimal(), $"{where}: emptyDirs may hold {onDisk} bytes, more than the ephemeral-storage limit {disk}");
            // A memory-backed emptyDir is charged to the container's memory: the rest must still hold the process.
            decimal memory = c.Resources.Limits["memory"].ToDecimal();
            Assert.True(inMemory <= memory / 2, $"{where}: memory-backed volumes ({inMemory}) take more than half the memory limit ({memory})");
        }
    }
}
