// parallel.redundancy with real processes: the AppHost runs a sharded bf16 job with redundancy on four workers and a
// spare, and one rank's process is SIGKILLed (by itself, through Worker__InjectFault, so the kill lands at a known
// point: before a step, after the step before it is done). Its singly held pieces (its ZeRO shard, its part of its
// expert shard's rows) live on in its ring neighbour's copy, so the next generation (three survivors and the spare,
// which holds nothing) reshards the survivors' live pieces onto its layout and resumes with 0 steps redone; the job
// completes with an exactly-once ledger. Two layouts: `--ep 2 --zero 1` (one ring of four), and `--pp 2 --ep 2
// --zero 2` (each stage's two replicas a ring and an expert-parallel group of their own).
using System.Diagnostics;
using System.Reflection;
using System.Text.Json;
using DeepSeekCluster.Chaos;
using Xunit.Abstractions;

namespace DeepSeekCluster.EndToEnd.Tests;

public class RedundancyEndToEndTests(ITestOutputHelper output)
{
    static readonly string AppHost = typeof(RedundancyEndToEndTests).Assembly.GetCustomAttributes<AssemblyMetadataAttribute>().Single(a => a.Key == "AppHostDll").Value!;
    const int Steps = 12, GlobalBatch = 8, CheckpointInterval = 4, KilledBefore = 7;

    static string[] Args(params string[] layout) =>
        ["--device", "cpu", "--workers", "4", .. layout, "--redundancy", "--precision", "bf16", "--steps", $"{Steps}", "--seq-len", "32",
         "--vocab-size", "512", "--global-batch", $"{GlobalBatch}", "--micro-batch", "2", "--checkpoint-interval", $"{CheckpointInterval}", "--eval-tasks", "none"];

    [Fact]
    public async Task AnEp2Zero1JobWithRedundancyResumesFromTheSurvivorsLiveShardsWithNoStepRedoneAfterARankIsSigkilled()
    {
        // Every worker reads the setting; only gpu-worker-1 acts on it (a worker's id is its own).
        await KillOneRankAndResumeLiveAsync("redundancy end-to-end test", Args("--ep", "2", "--zero", "1"), $"sigkill@{KilledBefore}:gpu-worker-1", host =>
        {
            // The lost rank's pieces came from its neighbour's copy; the spare joined the ring without state of its own.
            var reshard = host.WaitFor(@"resuming at step (\d+) from the live shards of the survivors: 4 shard\(s\) \(ep 2\) resharded onto dp 4 " +
                                       @"\(shard \d from rank \d's copy, expert shard \d part \d of 2 from rank \d's copy\)", TimeSpan.FromMinutes(1));
            Assert.Equal($"{KilledBefore - 1}", reshard.Groups[1].Value);
            Assert.Contains("memory plan (bf16, zero 1)", host.Output);
        });
    }

    /// <summary>
    /// dp 2 × pp 2 × ep 2 × zero 2: rank 2 of the first generation is stage 1's replica 0, the last stage (it holds the
    /// head, the final norm and the MTP layer beside two MoE layers), and its ring's first rank. Its survivor, the old
    /// replica 1, becomes the stage's replica 0 and so moves from expert shard 1 to expert shard 0 (a model of its new
    /// shard from the seed, every weight from the ring), the lost ZeRO rows and expert shard come from its neighbour
    /// copy, and the spare, which holds nothing, becomes replica 1 and takes expert shard 1 from the survivor; stage 0
    /// resumes in place. Both stages must agree on one covered step for either to resume live.
    /// </summary>
    [Fact]
    public async Task APp2Ep2Zero2JobWithRedundancyResumesFromTheSurvivorsLiveShardsWithNoStepRedoneAfterTheLastStagesFirstReplicaIsSigkilled()
    {
        await KillOneRankAndResumeLiveAsync("redundancy pipeline end-to-end test", Args("--pp", "2", "--ep", "2", "--zero", "2"),
            $"sigkill@{KilledBefore}:rank 2 of generation 1", host =>
        {
            // Stage 1 rebuilt from the survivor's own pieces and the copy it held of the lost replica's; stage 0 kept its own.
            var stage1 = host.WaitFor(@"stage 1 resuming at step (\d+) from the live shards of the survivors: 2 shard\(s\) \(ep 2\) resharded onto dp 2 " +
                                      @"\((shard 0 from rank \d's copy, expert shard 0 part 0 of 1 from rank \d's copy)\)", TimeSpan.FromMinutes(1));
            output.WriteLine($"stage 1 took {stage1.Groups[2].Value}");
            Assert.Equal($"{KilledBefore - 1}", stage1.Groups[1].Value);
            var stage0 = host.WaitFor(@"stage 0 resuming at step (\d+) from the live shards of the survivors: 2 shard\(s\) \(ep 2\) resharded onto dp 2;", TimeSpan.FromMinutes(1));
            Assert.Equal($"{KilledBefore - 1}", stage0.Groups[1].Value);
            // The spare took the lost rank's place in stage 1 (the Coordinator kept each survivor in its own stage).
            host.WaitFor(@"\[gpu-worker-4\] .*generation \d+: rank 3 of 4 = stage 1 \(layers 2\.\.3\) of replica 1, dp 2 x pp 2", TimeSpan.FromMinutes(1));
            Assert.Contains("memory plan (bf16, zero 2)", host.Output);
        });
    }

    /// <summary>
    /// Starts the AppHost with <paramref name="args"/> and the kill <paramref name="fault"/> (before step
    /// <see cref="KilledBefore"/>), adds a spare, and checks what every layout must show: the job completed, a `resumed`
    /// event after the victim's `worker_lost` from the live shards at the step the victim finished, 0 steps redone,
    /// every step's batch once and the final step committed; <paramref name="reshardSeen"/> checks the layout's own lines.
    /// </summary>
    async Task KillOneRankAndResumeLiveAsync(string what, string[] args, string fault, Action<ElasticTests.AppHostProcess> reshardSeen)
    {
        using var clusterLock = await ClusterTestLock.AcquireAsync(what);
        var runDir = Directory.CreateTempSubdirectory("e2e-redundancy-").FullName;
        var started = Stopwatch.StartNew();
        using var host = new ElasticTests.AppHostProcess(AppHost, runDir, new Dictionary<string, string> { ["Worker__InjectFault"] = fault }, args);
        try
        {
            string coordinator = host.WaitFor(@"started coordinator \(pid \d+\) on (http://\S+),", TimeSpan.FromMinutes(6)).Groups[1].Value;
            string jobId = host.WaitFor(@"submitted job (\S+):", TimeSpan.FromMinutes(6)).Groups[1].Value;
            host.WaitFor(@"generation 1: rank 3 of 4[, ]", TimeSpan.FromMinutes(6));
            // A spare: the job is at maxWorkers (4), so gpu-worker-4 waits free until a member is lost.
            host.Send("add");
            using var http = new HttpClient { BaseAddress = new Uri(coordinator) };
            await ElasticTests.Eventually(async () => (await http.GetStringAsync("/workers")).Contains("\"gpu-worker-4\""), "the spare registered", TimeSpan.FromMinutes(5));

            var killed = host.WaitFor(@"injected fault: worker (\S+) sends SIGKILL to its own process \(pid (\d+)\) before step (\d+)", TimeSpan.FromMinutes(8));
            string victimId = killed.Groups[1].Value;
            Assert.Equal($"{KilledBefore}", killed.Groups[3].Value);
            int victim = int.Parse(killed.Groups[2].Value);
            await ElasticTests.Eventually(() => Task.FromResult(!Alive(victim)), $"{victimId} (pid {victim}) is gone", TimeSpan.FromMinutes(1));

            using var job = await EndedJob.CompletedAsync(host, http, jobId, Steps);

            // The loss, then a generation that resumed from the survivors' live shards at the step the victim finished.
            var r = job.Events[job.IndexOf("resumed", from: job.IndexOf("worker_lost", workerId: victimId))];
            output.WriteLine($"resumed after the kill of {victimId}: {r}");
            Assert.Equal("shards", r.GetProperty("resumeSource").GetString());
            Assert.Equal(KilledBefore - 1, r.GetProperty("resumeStep").GetInt64());
            Assert.Equal(0, r.GetProperty("stepsRedone").GetInt64());
            reshardSeen(host);

            // Exactly once: every step's batch once, no gap, no overlap.
            output.WriteLine($"ledger: {job.AssertExactlyOnce((long)Steps * GlobalBatch)}");
            Assert.Contains((long)Steps, job.Committed);
            Assert.Contains("redundancy: holds the copy of shard", host.Output);
            host.Send("quit");
            Assert.True(host.WaitForExit(TimeSpan.FromMinutes(2)), "the AppHost did not stop after 'quit'");
            output.WriteLine($"{what}: {started.Elapsed.TotalSeconds:0} s from the AppHost's start to its exit");
        }
        catch
        {
            output.WriteLine(host.Output);
            throw;
        }
        finally
        {
            host.Dispose();
            foreach (var pid in ClusterEndToEndTests.ProcessesMentioning(runDir)) try { Process.GetProcessById(pid).Kill(true); } catch (ArgumentException) { }
            Directory.Delete(runDir, true);
        }
    }

    static bool Alive(int pid)
    {
        try { return !Process.GetProcessById(pid).HasExited; }
        catch (ArgumentException) { return false; }
    }
}
