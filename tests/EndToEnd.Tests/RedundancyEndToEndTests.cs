// parallel.redundancy with real processes: the AppHost runs `--workers 4 --ep 2 --zero 1 --redundancy --precision bf16`
// and a spare; one rank's process is SIGKILLed (by itself, through Worker__InjectFault, so the kill lands at a known
// point: before a step, after the step before it is done). Its ZeRO shard of the replicated state and its part of its
// expert shard's rows (each held once: the shard's two holders split them) live on in its ring neighbour's copy, so the
// next generation (three survivors and the spare, which holds nothing; ranks may move to the other expert shard)
// reshards the survivors' live pieces onto its layout and resumes with 0 steps redone; the job completes with an
// exactly-once ledger.
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

    static readonly string[] Args =
        ["--device", "cpu", "--workers", "4", "--ep", "2", "--zero", "1", "--redundancy", "--precision", "bf16", "--steps", $"{Steps}", "--seq-len", "32",
         "--vocab-size", "512", "--global-batch", $"{GlobalBatch}", "--micro-batch", "2", "--checkpoint-interval", $"{CheckpointInterval}", "--eval-tasks", "none"];

    [Fact]
    public async Task AnEp2Zero1JobWithRedundancyResumesFromTheSurvivorsLiveShardsWithNoStepRedoneAfterARankIsSigkilled()
    {
        using var clusterLock = await ClusterTestLock.AcquireAsync("redundancy end-to-end test");
        var runDir = Directory.CreateTempSubdirectory("e2e-redundancy-").FullName;
        // Every worker reads the setting; only gpu-worker-1 acts on it (a worker's id is its own).
        using var host = new ElasticTests.AppHostProcess(AppHost, runDir,
            new Dictionary<string, string> { ["Worker__InjectFault"] = $"sigkill@{KilledBefore}:gpu-worker-1" }, Args);
        try
        {
            string coordinator = host.WaitFor(@"started coordinator \(pid \d+\) on (http://\S+),", TimeSpan.FromMinutes(6)).Groups[1].Value;
            string jobId = host.WaitFor(@"submitted job (\S+):", TimeSpan.FromMinutes(6)).Groups[1].Value;
            host.WaitFor(@"generation 1: rank 3 of 4, ", TimeSpan.FromMinutes(6));
            // A spare: the job is at maxWorkers (4), so gpu-worker-4 waits free until a member is lost.
            host.Send("add");
            using var http = new HttpClient { BaseAddress = new Uri(coordinator) };
            await ElasticTests.Eventually(async () => (await http.GetStringAsync("/workers")).Contains("\"gpu-worker-4\""), "the spare registered", TimeSpan.FromMinutes(5));

            var killed = host.WaitFor(@"injected fault: worker gpu-worker-1 sends SIGKILL to its own process \(pid (\d+)\) before step (\d+)", TimeSpan.FromMinutes(8));
            Assert.Equal($"{KilledBefore}", killed.Groups[2].Value);
            int victim = int.Parse(killed.Groups[1].Value);
            await ElasticTests.Eventually(() => Task.FromResult(!Alive(victim)), $"gpu-worker-1 (pid {victim}) is gone", TimeSpan.FromMinutes(1));

            using var job = await EndedJob.CompletedAsync(host, http, jobId, Steps);

            // The loss, then a generation that resumed from the survivors' live shards at the step the victim finished.
            var r = job.Events[job.IndexOf("resumed", from: job.IndexOf("worker_lost", workerId: "gpu-worker-1"))];
            output.WriteLine($"resumed after the kill: {r}");
            Assert.Equal("shards", r.GetProperty("resumeSource").GetString());
            Assert.Equal(KilledBefore - 1, r.GetProperty("resumeStep").GetInt64());
            Assert.Equal(0, r.GetProperty("stepsRedone").GetInt64());
            // The lost rank's pieces came from its neighbour's copy; the spare joined the ring without state of its own.
            var reshard = host.WaitFor(@"resuming at step (\d+) from the live shards of the survivors: 4 shard\(s\) \(ep 2\) resharded onto dp 4 " +
                                       @"\(shard \d from rank \d's copy, expert shard \d part \d of 2 from rank \d's copy\)", TimeSpan.FromMinutes(1));
            Assert.Equal($"{KilledBefore - 1}", reshard.Groups[1].Value);

            // Exactly once: every step's batch once, no gap, no overlap.
            output.WriteLine($"ledger: {job.AssertExactlyOnce((long)Steps * GlobalBatch)}");
            Assert.Contains((long)Steps, job.Committed);
            Assert.Contains("memory plan (bf16, zero 1)", host.Output);
            Assert.Contains("redundancy: holds the copy of shard", host.Output);
            host.Send("quit");
            Assert.True(host.WaitForExit(TimeSpan.FromMinutes(2)), "the AppHost did not stop after 'quit'");
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
