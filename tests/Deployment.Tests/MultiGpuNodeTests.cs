// The multi-GPU node component (k8s/components/multi-gpu-node) on the filled production overlay: one pod per node with
// all its GPUs and as many ranks as GPUs, InfiniBand's settings, and its launcher (gpu-ranks.sh, taken from the rendered
// ConfigMap) run for real with a fake gpu-worker that records its environment and blocks until told to stop.
using System.Diagnostics;
using k8s.Models;

namespace DeepSeekCluster.Deployment.Tests;

[System.Runtime.Versioning.SupportedOSPlatform("linux")] // bash, kill and Unix file modes: the launcher runs on Linux nodes
public sealed class MultiGpuNodeTests : IDisposable
{
    static Build Build => Build.Of(Kustomize.MultiGpu);
    static Workload Worker => Build.Workload("gpu-worker");
    static IReadOnlyDictionary<string, string> Env => Build.Environment(Worker);
    static int Ranks => int.Parse(Env["GPUS_PER_POD"]);

    readonly string dir = Directory.CreateTempSubdirectory("gpu-ranks-").FullName;
    readonly List<Process> launchers = [];

    public void Dispose()
    {
        // A failed test must not leave its launcher and ranks behind (they hold the test host's pipes).
        foreach (var p in launchers)
        {
            if (!p.HasExited) p.Kill(entireProcessTree: true);
            p.Dispose();
        }
        Directory.Delete(dir, recursive: true);
    }

    [Fact]
    public void EachPodHoldsAsManyGpusAsTheLauncherStartsRanksAndTheRdmaDevices()
    {
        var r = Worker.Container.Resources;
        Assert.Equal(8, Ranks); // the documented default: a whole ND H100 v5 / ND A100 v4 node
        Assert.Equal(Ranks, (int)r.Limits["nvidia.com/gpu"].ToDecimal());
        Assert.Equal(Ranks, (int)r.Requests["nvidia.com/gpu"].ToDecimal());
        Assert.Contains(r.Limits.Keys, k => k.StartsWith("rdma/", StringComparison.Ordinal)); // the RDMA shared device plugin's resource
        var script = Build.All<V1ConfigMap>().Single(m => m.Metadata.Name.StartsWith("gpu-ranks", StringComparison.Ordinal)).Data["gpu-ranks.sh"];
        Assert.Equal(Repository.Read("k8s", "components", "multi-gpu-node", "gpu-ranks.sh"), script);
        var mount = Worker.Container.VolumeMounts.Single(m => m.Name == "gpu-ranks");
        Assert.Equal(["/bin/bash", $"{mount.MountPath}/gpu-ranks.sh"], Worker.Container.Command);
        Assert.Equal(["join"], Worker.Container.Args);
    }

    [Fact]
    public void OnePodPerNodeWithInfinibandAndSharedMemoryForNccl()
    {
        var spec = Worker.Template.Spec;
        var rule = Assert.Single(spec.Affinity.PodAntiAffinity.RequiredDuringSchedulingIgnoredDuringExecution);
        Assert.Equal("kubernetes.io/hostname", rule.TopologyKey);
        Assert.All(rule.LabelSelector.MatchLabels, kv => Assert.Equal(kv.Value, Worker.Template.Metadata.Labels[kv.Key]));
        var shm = spec.Volumes.Single(v => v.Name == "shm");
        Assert.Equal("Memory", shm.EmptyDir.Medium);
        Assert.True(shm.EmptyDir.SizeLimit.ToDecimal() >= Ranks * 8m * (1L << 30), "NCCL's shared-memory transport between the ranks needs GiBs per rank");
        Assert.Contains(Worker.Container.VolumeMounts, m => m.Name == "shm" && m.MountPath == "/dev/shm");
        Assert.Equal("0", Env["NCCL_IB_DISABLE"]);
        Assert.False(string.IsNullOrEmpty(Env["NCCL_IB_HCA"]));
        Assert.False(string.IsNullOrEmpty(Env["NCCL_SOCKET_IFNAME"]));
        Assert.Equal(["IPC_LOCK"], Worker.Container.SecurityContext.Capabilities.Add);
    }

    [Fact]
    public void TheDeclaredPortsAreRankZerosAndMonitoringReachesEveryRanksMetrics()
    {
        var ports = Worker.Container.Ports.ToDictionary(p => p.Name, p => p.ContainerPort);
        Assert.Equal(int.Parse(Env["RANK_HTTP_BASE_PORT"]), ports["http"]);
        Assert.Equal(int.Parse(Env["Worker__CollectivePort"]), ports["collective"]);
        Assert.Equal(int.Parse(Env["Worker__PipelinePort"]), ports["pipeline"]);
        Assert.True(ports["pipeline"] >= ports["collective"] + Ranks, "the ranks' collective and pipeline port ranges overlap");
        var monitoring = Build.All<V1NetworkPolicy>().Single(p => p.Metadata.Name == "gpu-worker").Spec.Ingress
            .Single(i => i.FromProperty.Any(f => f.NamespaceSelector is not null)).Ports.Single();
        Assert.Equal(ports["http"].ToString(), monitoring.Port.ToString());
        Assert.Equal(ports["http"] + Ranks - 1, monitoring.EndPort);
    }

    [Fact]
    public async Task EachRankGetsItsOwnGpuWorkerIdAndPortsAndSigtermStopsThemAll()
    {
        var launcher = Start();
        var ranks = await ReadyRanks(launcher);
        for (int r = 0; r < Ranks; r++)
        {
            var env = File.ReadAllLines(Path.Combine(dir, $"{r}.env")).Select(l => l.Split('=', 2)).Where(kv => kv.Length == 2).ToDictionary(kv => kv[0], kv => kv[1]);
            Assert.Equal(r.ToString(), env["CUDA_VISIBLE_DEVICES"]);
            Assert.Equal(r.ToString(), env["LOCAL_RANK"]);
            Assert.Equal($"gpu-worker-3-g{r}", env["DEEPSEEK_INSTANCE"]);
            Assert.Equal((29500 + r).ToString(), env["Worker__CollectivePort"]);
            Assert.Equal((29600 + r).ToString(), env["Worker__PipelinePort"]);
            Assert.Equal($"http://+:{8080 + r}", env["Kestrel__Endpoints__http__Url"]);
            Assert.Equal(Path.Combine(dir, "out", $"g{r}"), env["Worker__OutputDir"]);
            Assert.Equal("join", env["FAKE_ARGS"]);
            Assert.True(Directory.Exists(env["Worker__OutputDir"]));
        }
        Signal("TERM", launcher.Id);
        var terminated = await Terminations(launcher);
        await launcher.WaitForExitAsync().WaitAsync(TimeSpan.FromSeconds(30));
        Assert.Equal(Enumerable.Range(0, Ranks).ToHashSet(), terminated); // every rank was asked to leave
        Assert.Equal(0, launcher.ExitCode); // and they all left cleanly
        AssertGone(ranks.Values);
    }

    [Fact]
    public async Task OneRankDyingStopsTheOthersAndTheLauncherExitsNonZero()
    {
        var launcher = Start();
        var ranks = await ReadyRanks(launcher);
        Signal("KILL", ranks[2]);
        var terminated = await Terminations(launcher);
        await launcher.WaitForExitAsync().WaitAsync(TimeSpan.FromSeconds(30));
        Assert.Equal(Enumerable.Range(0, Ranks).Where(r => r != 2).ToHashSet(), terminated);
        Assert.Equal(128 + 9, launcher.ExitCode); // the dead rank's status: the kubelet restarts the pod
        Assert.Contains("ended on its own", await launcher.StandardError.ReadToEndAsync());
        AssertGone(ranks.Values);
    }

    [Fact]
    public async Task ARankCountOtherThanTheGpusHeldIsRefused()
    {
        var launcher = Start(("NVIDIA_VISIBLE_DEVICES", "GPU-aaaa,GPU-bbbb"));
        Assert.Null(await launcher.StandardOutput.ReadLineAsync().WaitAsync(TimeSpan.FromSeconds(30)));
        await launcher.WaitForExitAsync().WaitAsync(TimeSpan.FromSeconds(30));
        Assert.Equal(2, launcher.ExitCode);
        Assert.Contains($"GPUS_PER_POD = {Ranks} but the pod holds 2 GPUs", await launcher.StandardError.ReadToEndAsync());
    }

    /// <summary>The rendered launcher with the rendered pod's rank settings, a fake gpu-worker and a scratch output folder.</summary>
    Process Start(params (string Name, string Value)[] extra)
    {
        string script = Path.Combine(dir, "gpu-ranks.sh");
        File.WriteAllText(script, Build.All<V1ConfigMap>().Single(m => m.Metadata.Name.StartsWith("gpu-ranks", StringComparison.Ordinal)).Data["gpu-ranks.sh"]);
        string fake = Path.Combine(dir, "gpu-worker");
        // Records its environment, says it is ready, and blocks in a builtin read (no child to outlive it) until SIGTERM.
        File.WriteAllText(fake, """
            #!/bin/bash
            FAKE_ARGS="$*" env > "$FAKE_DIR/$CUDA_VISIBLE_DEVICES.env"
            trap 'echo "term $CUDA_VISIBLE_DEVICES"; exit 0' TERM
            mkfifo "$FAKE_DIR/$CUDA_VISIBLE_DEVICES.fifo"
            echo "ready $CUDA_VISIBLE_DEVICES $$"
            read -r _ <> "$FAKE_DIR/$CUDA_VISIBLE_DEVICES.fifo"
            """.Replace("\r", ""));
        File.SetUnixFileMode(fake, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute);
        var psi = new ProcessStartInfo("bash") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        psi.ArgumentList.Add(script);
        foreach (var arg in Worker.Container.Args) psi.ArgumentList.Add(arg);
        foreach (var name in new[] { "GPUS_PER_POD", "RANK_HTTP_BASE_PORT", "Worker__CollectivePort", "Worker__PipelinePort" })
            psi.Environment[name] = Env[name];
        psi.Environment["DEEPSEEK_INSTANCE"] = "gpu-worker-3";
        psi.Environment["Worker__OutputDir"] = Path.Combine(dir, "out");
        psi.Environment["GPU_WORKER"] = fake;
        psi.Environment["FAKE_DIR"] = dir;
        psi.Environment.Remove("NVIDIA_VISIBLE_DEVICES");
        foreach (var (name, value) in extra) psi.Environment[name] = value;
        var launcher = Process.Start(psi)!;
        launchers.Add(launcher);
        return launcher;
    }

    /// <summary>Rank → pid of its fake worker, once every rank has said it is ready (on the launcher's stdout pipe).</summary>
    static async Task<Dictionary<int, int>> ReadyRanks(Process launcher)
    {
        var ranks = new Dictionary<int, int>();
        while (ranks.Count < Ranks)
        {
            var line = await launcher.StandardOutput.ReadLineAsync().WaitAsync(TimeSpan.FromSeconds(30))
                ?? throw new InvalidOperationException($"the launcher closed its output after {ranks.Count} ranks: {await launcher.StandardError.ReadToEndAsync()}");
            var parts = line.Split(' ');
            Assert.Equal("ready", parts[0]);
            ranks.Add(int.Parse(parts[1]), int.Parse(parts[2]));
        }
        return ranks;
    }

    /// <summary>The ranks that reported a SIGTERM, read until the launcher and all ranks have closed the pipe.</summary>
    static async Task<HashSet<int>> Terminations(Process launcher)
    {
        var terminated = new HashSet<int>();
        while (await launcher.StandardOutput.ReadLineAsync().WaitAsync(TimeSpan.FromSeconds(30)) is { } line)
        {
            var parts = line.Split(' ');
            Assert.Equal("term", parts[0]);
            Assert.True(terminated.Add(int.Parse(parts[1])), $"rank {parts[1]} terminated twice");
        }
        return terminated;
    }

    static void Signal(string signal, int pid)
    {
        using var kill = Process.Start("kill", [$"-{signal}", pid.ToString()]);
        kill.WaitForExit();
        Assert.Equal(0, kill.ExitCode);
    }

    static void AssertGone(IEnumerable<int> pids)
    {
        foreach (var pid in pids)
            Assert.Throws<ArgumentException>(() => Process.GetProcessById(pid)); // reaped: the launcher waited for it
    }
}
