// Every pod of every rendering meets Pod Security "restricted" and runs as an explicit non-root UID that its image
// declares too, with its own ServiceAccount and no API token. General over workloads: a new component (a Deployment,
// StatefulSet or DaemonSet in any overlay) must meet the same rules.
using System.Text.RegularExpressions;
using k8s.Models;

namespace DeepSeekCluster.Deployment.Tests;

public partial class SecurityContextTests
{
    /// <summary>The .NET images' app user, which every deepseek/ image declares (ContainerUser, USER) and every pod runs as.</summary>
    const long AppUser = 1654;

    public static TheoryData<string> Builds() => new(Kustomize.Deployable.Append("k8s/base"));
    public static TheoryData<string> Deployable() => new(Kustomize.Deployable);

    /// <summary>Volume kinds Pod Security "restricted" admits.</summary>
    static readonly string[] RestrictedVolumes = ["ConfigMap", "Csi", "DownwardAPI", "EmptyDir", "Ephemeral", "PersistentVolumeClaim", "Projected", "Secret"];

    [Theory, MemberData(nameof(Builds))]
    public void EveryPodRunsAsAnExplicitNonRootUserWithRuntimeDefaultSeccomp(string folder)
    {
        var build = Build.Of(folder);
        Assert.NotEmpty(build.Workloads);
        foreach (var w in build.Workloads)
        {
            var pod = w.Template.Spec;
            var sc = pod.SecurityContext;
            string where = $"{folder}/{w.Name}";
            Assert.True(sc is not null, $"{where}: no pod securityContext");
            Assert.True(sc!.RunAsNonRoot == true, $"{where}: runAsNonRoot");
            // runAsNonRoot without a numeric runAsUser: the kubelet refuses an image whose USER is a name or root.
            Assert.True(sc.RunAsUser is > 0, $"{where}: runAsUser must be an explicit non-zero UID");
            Assert.True(sc.RunAsGroup is > 0, $"{where}: runAsGroup must be an explicit non-zero GID");
            Assert.True(pod.HostNetwork != true && pod.HostPID != true && pod.HostIPC != true, $"{where}: host namespaces");
            foreach (var v in pod.Volumes ?? [])
                Assert.True(RestrictedVolumes.Any(kind => typeof(V1Volume).GetProperty(kind)!.GetValue(v) is not null),
                    $"{where}: volume {v.Name} is of a kind Pod Security restricted forbids (hostPath, ...)");
            foreach (var c in pod.Containers.Concat(pod.InitContainers ?? []))
            {
                var csc = c.SecurityContext;
                string at = $"{where}/{c.Name}";
                Assert.True(csc is not null, $"{at}: no container securityContext");
                Assert.True(csc!.AllowPrivilegeEscalation == false, $"{at}: allowPrivilegeEscalation: false");
                Assert.True(csc.Privileged != true, $"{at}: privileged");
                Assert.True(csc.ReadOnlyRootFilesystem == true, $"{at}: readOnlyRootFilesystem");
                Assert.True(csc.Capabilities?.Drop?.Contains("ALL") == true, $"{at}: capabilities drop ALL");
                string[] added = [.. csc.Capabilities.Add ?? []];
                Assert.True(added.SequenceEqual(AddedCapabilities(folder, w.Name)), $"{at}: adds capabilities {string.Join(",", added)}");
                Assert.True(csc.RunAsUser is null or > 0, $"{at}: runAsUser 0");
                var seccomp = csc.SeccompProfile?.Type ?? sc.SeccompProfile?.Type;
                Assert.True(seccomp == "RuntimeDefault", $"{at}: seccompProfile RuntimeDefault (got {seccomp ?? "none"})");
            }
        }
    }

    [Theory, MemberData(nameof(Builds))]
    public void TheClusterProcessesRunAsTheUserTheirImagesDeclare(string folder)
    {
        foreach (var w in Build.Of(folder).Workloads.Where(w => w.IsDeepSeekProcess))
        {
            Assert.Equal(AppUser, w.Template.Spec.SecurityContext.RunAsUser);
            Assert.Equal(AppUser, w.Template.Spec.SecurityContext.RunAsGroup);
            Assert.Equal(AppUser, w.Template.Spec.SecurityContext.FsGroup); // the mounted Secrets (mode 0440) are readable by the group
            string project = ConfigurationKeys.ProjectOf[w.Name];
            string csproj = Repository.Read(project, project + ".csproj");
            var user = ContainerUser().Match(csproj);
            Assert.True(user.Success, $"{project}.csproj sets no <ContainerUser>: its image's user would be a name or root");
            Assert.Equal(AppUser.ToString(), user.Groups[1].Value);
        }
    }

    [Fact]
    public void TheCudaWorkerImageRunsAsTheAppUserAndCarriesIcu()
    {
        var lines = Repository.Read("build", "gpu-worker-cuda.Dockerfile").Split('\n').Select(l => l.Trim()).Where(l => l.Length > 0 && !l.StartsWith('#')).ToList();
        Assert.StartsWith("FROM nvcr.io/nvidia/cuda:", lines[0]);
        Assert.Contains("-runtime-", lines[0]); // the runtime flavour brings libnccl.so.2
        Assert.Equal($"USER {AppUser}:{AppUser}", lines.Last(l => l.StartsWith("USER ", StringComparison.Ordinal)));
        string run = string.Join(' ', lines.Where(l => !l.StartsWith("FROM", StringComparison.Ordinal)));
        Assert.Matches(@"apt-get install[^&]*\blibicu\d+\b", run); // globalization and the tokenizer's NFC (docs/decisions.md)
        Assert.Contains("ca-certificates", run);
        Assert.Contains($"--uid {AppUser}", run);
        Assert.Contains("ENTRYPOINT [\"/app/gpu-worker\"]", lines);
        // The manifests' worker runs with a read-only root: HOME must point somewhere writable that they mount.
        Assert.Contains(lines, l => l.Contains("HOME=/tmp", StringComparison.Ordinal));
        Assert.Contains(Build.Of("k8s/base").Workload("gpu-worker").Container.VolumeMounts, m => m.MountPath == "/tmp");
    }

    /// <summary>
    /// The one departure from Pod Security "restricted": the multi-GPU node pods pin the memory InfiniBand registers
    /// (IPC_LOCK). Everywhere else nothing is added.
    /// </summary>
    static string[] AddedCapabilities(string folder, string workload) =>
        folder == Kustomize.MultiGpu && workload == "gpu-worker" ? ["IPC_LOCK"] : [];

    [Theory, MemberData(nameof(Deployable))]
    public void TheNamespaceEnforcesPodSecurityRestricted(string folder)
    {
        var ns = Build.Of(folder).All<V1Namespace>().Single();
        // IPC_LOCK is admitted by "privileged" only (not "baseline"): the multi-GPU build enforces that, and warns and
        // audits on "restricted" like the others; the test above holds its pods to "restricted" but for IPC_LOCK.
        Assert.Equal(folder == Kustomize.MultiGpu ? "privileged" : "restricted", ns.Metadata.Labels["pod-security.kubernetes.io/enforce"]);
        foreach (var mode in new[] { "warn", "audit" })
            Assert.Equal("restricted", ns.Metadata.Labels[$"pod-security.kubernetes.io/{mode}"]);
    }

    [Theory, MemberData(nameof(Builds))]
    public void EveryComponentHasItsOwnServiceAccountAndNoApiToken(string folder)
    {
        var build = Build.Of(folder);
        var accounts = build.All<V1ServiceAccount>().ToDictionary(a => a.Metadata.Name);
        var used = new HashSet<string>();
        foreach (var w in build.Workloads)
        {
            var pod = w.Template.Spec;
            Assert.True(pod.AutomountServiceAccountToken == false, $"{folder}/{w.Name}: automountServiceAccountToken: false (nothing here calls the Kubernetes API)");
            if (!w.IsDeepSeekProcess) continue;
            Assert.Equal(w.Name, pod.ServiceAccountName);
            Assert.True(accounts.TryGetValue(pod.ServiceAccountName, out var account), $"{folder}/{w.Name}: ServiceAccount {pod.ServiceAccountName} is not in the build");
            Assert.False(account!.AutomountServiceAccountToken ?? true, $"{folder}: ServiceAccount {account.Metadata.Name} mounts an API token");
            Assert.True(used.Add(pod.ServiceAccountName), $"{folder}: ServiceAccount {pod.ServiceAccountName} is shared");
        }
    }

    [GeneratedRegex(@"<ContainerUser>\s*([^<\s]+)\s*</ContainerUser>")]
    private static partial Regex ContainerUser();
}
