// Expert parallelism with real processes: the AppHost runs `--workers 4 --ep 2 --zero 1 --precision bf16` (each worker
// holds half the routed experts and a quarter of the optimizer state) and a spare; one rank is SIGKILLed after the first committed checkpoint. The spare holds no live
// state and no peer's can be copied to it (the ranks hold different experts), so the next generation resumes from the
// committed checkpoint and says so; the job completes with an
// exactly-once ledger, and rank 0's Hugging Face folder (assembled from the committed final checkpoint and put into the
// store as the step's hf export, nowhere else) loads from the store in another process and generates.
using System.Diagnostics;
using System.Reflection;
using System.Text.Json;
using DeepSeekCluster.Chaos;
using Xunit.Abstractions;

namespace DeepSeekCluster.EndToEnd.Tests;

public class ExpertParallelEndToEndTests(ITestOutputHelper output)
{
    static readonly string AppHost = typeof(ExpertParallelEndToEndTests).Assembly.GetCustomAttributes<AssemblyMetadataAttribute>().Single(a => a.Key == "AppHostDll").Value!;
    const int Steps = 12, GlobalBatch = 8, CheckpointInterval = 4;

    static readonly string[] Args =
        ["--device", "cpu", "--workers", "4", "--ep", "2", "--zero", "1", "--precision", "bf16", "--steps", $"{Steps}", "--seq-len", "32", "--vocab-size", "512",
         "--global-batch", $"{GlobalBatch}", "--micro-batch", "2", "--checkpoint-interval", $"{CheckpointInterval}",
         "--eval-tasks", "none"]; // the tasks' scores in an ep job are ExpertParallelClusterTests'; this test's time goes to the SIGKILL

    [Fact]
    public async Task AnEp2Zero1Bf16JobOnFourWorkersSurvivesASigkillFromTheCheckpointAndExportsAModelThatGenerates()
    {
        using var clusterLock = await ClusterTestLock.AcquireAsync("expert-parallel end-to-end test");
        var runDir = Directory.CreateTempSubdirectory("e2e-ep-").FullName;
        using var host = new ElasticTests.AppHostProcess(AppHost, runDir, Args);
        try
        {
            string coordinator = host.WaitFor(@"started coordinator \(pid \d+\) on (http://\S+),", TimeSpan.FromMinutes(6)).Groups[1].Value;
            string jobId = host.WaitFor(@"submitted job (\S+):", TimeSpan.FromMinutes(6)).Groups[1].Value;
            // Generation 1 holds all four workers: two expert-parallel groups of two.
            host.WaitFor(@"generation 1: rank 3 of 4, ", TimeSpan.FromMinutes(6));
            // A spare: the job is at maxWorkers (4), so gpu-worker-4 waits free until a member is lost. It holds no
            // state, so the next generation cannot continue from live state whichever ranks the survivors become.
            host.Send("add");
            using var http = new HttpClient { BaseAddress = new Uri(coordinator) };
            await ElasticTests.Eventually(async () => (await http.GetStringAsync("/workers")).Contains("\"gpu-worker-4\""), "the spare registered", TimeSpan.FromMinutes(5));
            // The console's status line is throttled: the job's record says when the first checkpoint is committed and a
            // step after it is done (so that the kill leaves steps to redo).
            long killedAtStep = 0;
            await ElasticTests.Eventually(async () =>
            {
                using var running = JsonDocument.Parse(await http.GetStringAsync($"/jobs/{jobId}"));
                killedAtStep = running.RootElement.GetProperty("step").GetInt64();
                return killedAtStep > CheckpointInterval &&
                       running.RootElement.GetProperty("committed").EnumerateArray().Any(c => c.GetProperty("step").GetInt64() == CheckpointInterval);
            }, $"the commit of step {CheckpointInterval} and a step after it", TimeSpan.FromMinutes(8));
            int victim = ElasticTests.WorkerPid(runDir, "gpu-worker-1");
            Process.GetProcessById(victim).Kill(); // SIGKILL: its experts' live state is gone with it
            output.WriteLine($"SIGKILL gpu-worker-1 (pid {victim}) at step {killedAtStep}, after the commit of step {CheckpointInterval}");

            using var job = await EndedJob.CompletedAsync(host, http, jobId, Steps);

            // The loss, then a generation that resumed from the committed checkpoint (no survivor holds the lost experts).
            var r = job.Events[job.IndexOf("resumed", from: job.IndexOf("worker_lost", workerId: "gpu-worker-1"))];
            output.WriteLine($"resumed after the kill: {r}");
            Assert.Equal("checkpoint", r.GetProperty("resumeSource").GetString());
            var committed = job.Committed;
            Assert.Contains(r.GetProperty("resumeStep").GetInt64(), committed);
            Assert.True(r.GetProperty("resumeStep").GetInt64() >= CheckpointInterval, $"resumed before the first commit: {r}");
            Assert.Contains((long)Steps, committed);
            // The steps done after that checkpoint are redone (unless a later commit landed between the poll and the kill).
            long resumeStep = r.GetProperty("resumeStep").GetInt64();
            Assert.True(r.GetProperty("stepsRedone").GetInt64() >= killedAtStep - resumeStep, $"killed at step {killedAtStep}, resumed at {resumeStep}: {r}");

            // Exactly once: the redone steps' first samples are forgotten with them; every step's batch once, no gap.
            output.WriteLine($"ledger: {job.AssertExactlyOnce((long)Steps * GlobalBatch)}");

            // bf16 with expert and optimizer shards; the end's model is assembled from the committed final checkpoint and exported.
            string text = host.Output;
            Assert.Contains("memory plan (bf16, zero 1)", text);
            host.WaitFor($@"loaded the whole model from committed step {Steps} \(saved as dp \d x pp 1 x ep 2\)", TimeSpan.FromMinutes(2));
            host.WaitFor($@"model saved to the checkpoint store as exports/{jobId}/{Steps}/hf", TimeSpan.FromMinutes(2));

            // The stored folder loads in another process (from the store, with the run's token) and continues a prompt.
            var generated = Generate(StoredModel.StoreOfAppHostRun(runDir), File.ReadAllText(Path.Combine(runDir, "cluster.token")), jobId);
            host.Send("quit");
            Assert.True(host.WaitForExit(TimeSpan.FromMinutes(2)), "the AppHost did not stop after 'quit'");
            output.WriteLine($"generated: {generated}");
            using var result = JsonDocument.Parse(generated);
            Assert.InRange(result.RootElement.GetProperty("generated_ids").GetArrayLength(), 1, 8); // fewer only if it ends with end-of-text
            Assert.False(string.IsNullOrEmpty(result.RootElement.GetProperty("text").GetString()));
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

    /// <summary>`gpu-worker generate` on the job's final hf export in the store: eight greedy tokens, as JSON.</summary>
    static string Generate(string store, string token, string jobId)
    {
        var metadata = typeof(ExpertParallelEndToEndTests).Assembly.GetCustomAttributes<AssemblyMetadataAttribute>().ToDictionary(a => a.Key, a => a.Value);
        string worker = Path.Combine(metadata["RepositoryRoot"]!, "GpuWorker", "bin", metadata["BuildConfiguration"]!, "net10.0", "gpu-worker.dll");
        var psi = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var a in new[] { worker, "generate", "--store", store, "--job", jobId, "--step", $"{Steps}", "--prompt", "In the beginning", "--max-new-tokens", "8", "--greedy", "--json" })
            psi.ArgumentList.Add(a);
        psi.Environment["CUDA_VISIBLE_DEVICES"] = "";
        psi.Environment["Cluster__Token"] = token;
        using var p = Process.Start(psi)!;
        var stderr = p.StandardError.ReadToEndAsync();
        string stdout = p.StandardOutput.ReadToEnd();
        Assert.True(p.WaitForExit(TimeSpan.FromMinutes(2)), "gpu-worker generate did not finish");
        Assert.True(p.ExitCode == 0, $"gpu-worker generate failed ({p.ExitCode}): {stdout}\n{stderr.Result}");
        return stdout.Trim().Split('\n')[^1];
    }
}
