// Fault tolerance with real processes: the AppHost runs the system, two workers and a spare; one worker is SIGKILLed in
// the middle of the job. The next generation (survivor and spare) resumes from the survivor's live state, copied to the
// spare over the collective (no step redone), and the job completes with an exactly-once ledger of the samples and the
// very model an undisturbed run of the same job trains (bit for bit: training is exact at any world size).
using System.Collections.Concurrent;
using System.Diagnostics;
using System.Reflection;
using System.Text.Json;
using System.Text.RegularExpressions;
using DeepSeekCluster.Chaos;
using Xunit.Abstractions;

namespace DeepSeekCluster.EndToEnd.Tests;

public class ElasticTests(ITestOutputHelper output)
{
    static readonly string AppHost = typeof(ElasticTests).Assembly.GetCustomAttributes<AssemblyMetadataAttribute>().Single(a => a.Key == "AppHostDll").Value!;
    const int Steps = 30, GlobalBatch = 8;
    static readonly string[] JobArgs =
        ["--steps", $"{Steps}", "--seq-len", "32", "--vocab-size", "512", "--global-batch", $"{GlobalBatch}", "--micro-batch", "2", "--checkpoint-interval", "0"];

    [Fact]
    public async Task AWorkerKilledMidRunIsReplacedByTheSurvivorsLiveStateWithoutRedoingAStep()
    {
        using var clusterLock = await ClusterTestLock.AcquireAsync("elastic end-to-end test");
        var runDir = Directory.CreateTempSubdirectory("e2e-elastic-").FullName;
        // --device cpu: the scenario needs three workers, more than a one-GPU machine has GPUs for.
        using var host = new AppHostProcess(AppHost, runDir, ["--device", "cpu", "--workers", "2", .. JobArgs]);
        try
        {
            string coordinator = host.WaitFor(@"started coordinator \(pid \d+\) on (http://\S+),", TimeSpan.FromMinutes(6)).Groups[1].Value;
            string jobId = host.WaitFor(@"submitted job (\S+):", TimeSpan.FromMinutes(6)).Groups[1].Value;
            // A spare: the job is at maxWorkers (2), so gpu-worker-2 waits free until a member is lost.
            host.Send("add");
            using var http = new HttpClient { BaseAddress = new Uri(coordinator) };
            await Eventually(async () => (await http.GetStringAsync("/workers")).Contains("\"gpu-worker-2\""), "the spare registered", TimeSpan.FromMinutes(5));
            // Mid-run with both members in one generation (no checkpoint exists: only a live replica can avoid a restart).
            host.WaitFor(@"job running \| generation \d+ \| step ([1-9]\d)/\d+ .*\| workers 2 \|", TimeSpan.FromMinutes(8));

            int victim = WorkerPid(runDir, "gpu-worker-1");
            var killedAt = DateTimeOffset.UtcNow;
            Process.GetProcessById(victim).Kill(); // SIGKILL: no goodbye, no flushed report

            using var ended = await EndedJob.CompletedAsync(host, http, jobId, Steps);
            var (job, events) = (ended.Job, ended.Events);
            string Kind(JsonElement e) => EndedJob.Kind(e);

            // The kill is a lost worker (its stream broke); the next generation (the survivor and the spare) resumed from the
            // survivor's live state, copied over the collective to the spare: nothing redone.
            int lost = ended.IndexOf("worker_lost", workerId: "gpu-worker-1");
            ended.IndexOf("worker_joined", from: lost, workerId: "gpu-worker-2");
            int resumed = ended.IndexOf("resumed", from: lost);
            var r = events[resumed];
            Assert.Equal("replica", r.GetProperty("resumeSource").GetString());
            Assert.Equal(0, r.GetProperty("stepsRedone").GetInt64());
            Assert.True(r.GetProperty("resumeStep").GetInt64() >= 10);
            Assert.True(r.GetProperty("stateBytes").GetInt64() > 0, "the spare received no state: " + r);
            int recovered = ended.IndexOf("recovered", from: resumed);
            Assert.DoesNotContain(events, e => Kind(e) == "resumed" && e.TryGetProperty("stepsRedone", out var n) && n.ValueKind == JsonValueKind.Number && n.GetInt64() > 0);

            // The measurements behind the README's numbers (printed, never asserted: the machine may be loaded).
            var lostAt = events[lost].GetProperty("at").GetDateTimeOffset();
            var firstStepAt = events[recovered].GetProperty("at").GetDateTimeOffset();
            output.WriteLine($"detection (SIGKILL -> worker_lost): {(lostAt - killedAt).TotalSeconds:0.###} s");
            output.WriteLine($"death -> next completed step: {(firstStepAt - killedAt).TotalSeconds:0.###} s; recovery event: {events[recovered].GetProperty("message").GetString()}");
            output.WriteLine($"resumed after the kill: {r.GetProperty("message").GetString()}");
            output.WriteLine($"ledger: {job.GetProperty("consumption")}");

            // Exactly once: every step's global batch, no repeat, no gap.
            var consumption = ended.AssertExactlyOnce((long)Steps * GlobalBatch);
            Assert.Equal([0L, (long)Steps * GlobalBatch], consumption.GetProperty("ranges").EnumerateArray().Single().EnumerateArray().Select(x => x.GetInt64()));

            var disturbed = await ModelWeightsAsync(host, runDir);
            host.Send("quit");
            Assert.True(host.WaitForExit(TimeSpan.FromMinutes(2)), "the AppHost did not stop after 'quit'");
            Assert.Empty(ClusterEndToEndTests.ProcessesMentioning(runDir));

            // The same job, undisturbed and on one worker: the same model file, byte for byte.
            var referenceDir = Directory.CreateTempSubdirectory("e2e-elastic-reference-").FullName;
            try
            {
                // Not --exit-when-done: the model is downloaded from the run's store while it is up, then the run is told to quit.
                using var reference = new AppHostProcess(AppHost, referenceDir, ["--device", "cpu", "--workers", "1", .. JobArgs]);
                Assert.True(reference.WaitFor(@"job (\S+) ended: (\w+)", TimeSpan.FromMinutes(10)).Groups[2].Value == "Completed",
                            "the undisturbed run did not complete:\n" + reference.Output);
                var undisturbed = await ModelWeightsAsync(reference, referenceDir);
                Assert.True(disturbed.AsSpan().SequenceEqual(undisturbed),
                            $"the model of the run that lost a worker ({disturbed.Length} bytes) differs from the undisturbed run's ({undisturbed.Length} bytes)");
                reference.Send("quit");
                Assert.True(reference.WaitForExit(TimeSpan.FromMinutes(2)), "the undisturbed AppHost did not stop after 'quit'");
            }
            finally
            {
                foreach (var pid in ClusterEndToEndTests.ProcessesMentioning(referenceDir)) try { Process.GetProcessById(pid).Kill(true); } catch (ArgumentException) { }
                Directory.Delete(referenceDir, true);
            }
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

    internal static async Task Eventually(Func<Task<bool>> condition, string what, TimeSpan limit)
    {
        var deadline = DateTime.UtcNow + limit;
        while (!await condition())
        {
            if (DateTime.UtcNow > deadline) throw new TimeoutException($"{what} did not happen within {limit}");
            await Task.Delay(250);
        }
    }

    /// <summary>The weights of the model rank 0 put into the store at the end of the run, downloaded from it (the run is still up).</summary>
    static async Task<byte[]> ModelWeightsAsync(AppHostProcess host, string runDir)
    {
        var place = host.WaitFor(@"model saved to the checkpoint store as exports/(\S+)/(\d+)/hf", TimeSpan.FromMinutes(2));
        var file = await StoredModel.DownloadWeightsAsync(StoredModel.StoreOfAppHostRun(runDir), File.ReadAllText(Path.Combine(runDir, "cluster.token")),
                                                          place.Groups[1].Value, long.Parse(place.Groups[2].Value), Path.Combine(runDir, "downloaded", "model.safetensors"));
        return File.ReadAllBytes(file);
    }

    /// <summary>The pid of the worker instance started for this run.</summary>
    internal static int WorkerPid(string runDir, string instance)
    {
        foreach (var pid in ClusterEndToEndTests.ProcessesMentioning(runDir))
        {
            try
            {
                var env = File.ReadAllText($"/proc/{pid}/environ").Split('\0');
                if (env.Contains($"DEEPSEEK_INSTANCE={instance}") && File.ReadAllText($"/proc/{pid}/cmdline").Contains("gpu-worker")) return pid;
            }
            catch (IOException) { }
        }
        throw new InvalidOperationException($"no process for {instance}");
    }

    /// <summary>The AppHost as a child process with its console: lines are collected, commands written to its stdin.</summary>
    internal sealed class AppHostProcess : IDisposable
    {
        readonly Process process;
        readonly string runDir;
        readonly List<string> lines = [];
        readonly SemaphoreSlim changed = new(0);
        int openStreams = 2; // stdout and stderr: each ends with a null line once the process and its pipes are done

        public AppHostProcess(string dll, string runDir, params string[] args) : this(dll, runDir, new Dictionary<string, string>(), args) { }

        /// <param name="environment">Variables the AppHost and every process it starts inherit (Worker__InjectFault, say).</param>
        public AppHostProcess(string dll, string runDir, IReadOnlyDictionary<string, string> environment, params string[] args)
        {
            this.runDir = runDir;
            var psi = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true, RedirectStandardInput = true };
            psi.ArgumentList.Add(dll);
            foreach (var a in args) psi.ArgumentList.Add(a);
            psi.ArgumentList.Add("--run-dir");
            psi.ArgumentList.Add(runDir);
            psi.Environment["NO_COLOR"] = "1";
            foreach (var (name, value) in environment) psi.Environment[name] = value;
            process = Process.Start(psi)!;
            process.OutputDataReceived += (_, e) => Add(e.Data);
            process.ErrorDataReceived += (_, e) => Add(e.Data);
            process.BeginOutputReadLine();
            process.BeginErrorReadLine();
        }

        void Add(string? line)
        {
            if (line is null) Interlocked.Decrement(ref openStreams);
            else lock (lines) lines.Add(line);
            changed.Release();
        }

        /// <summary>Both output streams reached their end: every line the AppHost wrote is in <see cref="lines"/>.</summary>
        bool OutputEnded => Volatile.Read(ref openStreams) == 0;

        public string Output { get { lock (lines) return string.Join("\n", lines); } }

        /// <summary>Lines so far: WaitFor(from: Mark) looks only at what comes after now.</summary>
        public int Mark { get { lock (lines) return lines.Count; } }

        /// <summary>
        /// The first line from line <paramref name="from"/> on matching <paramref name="pattern"/>; fails at the deadline with
        /// the output and the managed stacks of the run's processes.
        /// </summary>
        public Match WaitFor(string pattern, TimeSpan limit, int from = 0)
        {
            var regex = new Regex(pattern);
            var deadline = DateTime.UtcNow + limit;
            while (true)
            {
                bool ended = OutputEnded; // read before the lines: a line that came before the end is then among them
                lock (lines)
                    foreach (var line in lines.Skip(from))
                        if (regex.Match(line) is { Success: true } m) return m;
                if (ended)
                    throw new InvalidOperationException($"the AppHost's output ended{(process.HasExited ? $" (exit code {process.ExitCode})" : "")} before '{pattern}':\n{Output}");
                var left = deadline - DateTime.UtcNow;
                // A hang says where every process of the run stood (the AppHost, its services and workers).
                if (left <= TimeSpan.Zero)
                    throw new TimeoutException($"'{pattern}' did not appear within {limit}:\n{Output}\n{ManagedStacks.OfProcessesMentioning(runDir)}");
                changed.Wait(left < TimeSpan.FromSeconds(1) ? left : TimeSpan.FromSeconds(1));
            }
        }

        public void Send(string command) => process.StandardInput.WriteLine(command);

        public bool WaitForExit(TimeSpan limit) => process.WaitForExit(limit);

        public void Dispose()
        {
            try { if (!process.HasExited) process.Kill(entireProcessTree: true); } catch (InvalidOperationException) { }
            process.Dispose();
        }
    }
}
