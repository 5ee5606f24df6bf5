// The whole system as a user runs it: the AppHost starts every service and two workers as real processes,
// a data-parallel job trains, loss falls, checkpoints commit, the job completes, and no process is left behind.
using System.Diagnostics;
using System.Reflection;
using System.Text.RegularExpressions;

namespace DeepSeekCluster.EndToEnd.Tests;

public class ClusterEndToEndTests
{
    static readonly string AppHost = typeof(ClusterEndToEndTests).Assembly.GetCustomAttributes<AssemblyMetadataAttribute>().Single(a => a.Key == "AppHostDll").Value!;

    static (int code, string output) RunAppHost(string runDir, params string[] args) => RunAppHost(runDir, new Dictionary<string, string>(), args);

    static (int code, string output) RunAppHost(string runDir, IReadOnlyDictionary<string, string> environment, params string[] args)
    {
        var psi = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true, RedirectStandardInput = true };
        foreach (var (name, value) in environment) psi.Environment[name] = value;
        psi.ArgumentList.Add(AppHost);
        foreach (var a in args) psi.ArgumentList.Add(a);
        psi.ArgumentList.Add("--run-dir");
        psi.ArgumentList.Add(runDir);
        psi.ArgumentList.Add("--exit-when-done");
        psi.Environment["NO_COLOR"] = "1";
        using var p = Process.Start(psi)!;
        p.StandardInput.Close(); // no console: no add/remove commands
        var output = new System.Text.StringBuilder();
        p.OutputDataReceived += (_, e) => { if (e.Data is not null) lock (output) output.AppendLine(e.Data); };
        p.ErrorDataReceived += (_, e) => { if (e.Data is not null) lock (output) output.AppendLine(e.Data); };
        p.BeginOutputReadLine();
        p.BeginErrorReadLine();
        if (!p.WaitForExit(TimeSpan.FromMinutes(12)))
        {
            p.Kill(entireProcessTree: true);
            throw new TimeoutException("the AppHost run did not finish within 12 minutes:\n" + output);
        }
        p.WaitForExit();
        lock (output) return (p.ExitCode, output.ToString());
    }

    /// <summary>Processes whose command line or environment mentions the run folder: the children the AppHost started.</summary>
    internal static List<int> ProcessesMentioning(string text)
    {
        var found = new List<int>();
        foreach (var dir in Directory.GetDirectories("/proc"))
        {
            if (!int.TryParse(Path.GetFileName(dir), out int pid) || pid == Environment.ProcessId) continue;
            try
            {
                var cmd = File.ReadAllText(Path.Combine(dir, "cmdline")).Replace('\0', ' ');
                var env = File.ReadAllText(Path.Combine(dir, "environ")).Replace('\0', ' ');
                if (cmd.Contains(text) || env.Contains(text)) found.Add(pid);
            }
            catch (IOException) { }
            catch (UnauthorizedAccessException) { }
        }
        return found;
    }

    [Fact]
    public void AWorkerCountThatIsNoMultipleOfThePipelineStagesIsRefusedBeforeAnythingStarts()
    {
        var runDir = Directory.CreateTempSubdirectory("e2e-pp-").FullName;
        try
        {
            var (code, output) = RunAppHost(runDir, "--workers", "3", "--pp", "2");
            Assert.NotEqual(0, code);
            Assert.Contains("--workers 3 is not a multiple of --pp 2", output);
            Assert.Contains("usage:", output);
            // Refused while parsing: no service was started, nothing was written to the run folder.
            Assert.Empty(Directory.EnumerateFileSystemEntries(runDir));
            Assert.Empty(ProcessesMentioning(runDir));
        }
        finally { Directory.Delete(runDir, true); }
    }

    [Fact]
    public void CudaWorkersWhereNoGpuIsVisibleAreRefusedBeforeAnythingStarts()
    {
        var runDir = Directory.CreateTempSubdirectory("e2e-cuda-").FullName;
        try
        {
            // Every GPU hidden: a GPU machine sees none either, so this runs (and refuses) everywhere.
            var (code, output) = RunAppHost(runDir, new Dictionary<string, string> { ["CUDA_VISIBLE_DEVICES"] = "" }, "--device", "cuda");
            Assert.Equal(2, code);
            Assert.Contains("--device cuda: the NVIDIA driver reports no GPU here", output);
            Assert.Empty(Directory.EnumerateFileSystemEntries(runDir));
            Assert.Empty(ProcessesMentioning(runDir));
        }
        finally { Directory.Delete(runDir, true); }
    }

    /// <summary>
    /// Ctrl+C leaves the job in the run folder; the next run names it and, with --fresh, stops it over REST before it
    /// submits a new default job, which completes alone; the saved model is learned from the Coordinator (GET /workers).
    /// </summary>
    [Fact]
    public async Task AnInterruptedJobIsNamedByTheNextRunAndFreshStopsItBeforeANewOneCompletes()
    {
        using var clusterLock = await ClusterTestLock.AcquireAsync("cluster end-to-end test");
        var runDir = Directory.CreateTempSubdirectory("e2e-fresh-").FullName;
        string[] job = ["--device", "cpu", "--workers", "2", "--seq-len", "32", "--vocab-size", "512", "--global-batch", "8", "--micro-batch", "4", "--checkpoint-interval", "0"];
        try
        {
            // Through env --default-signal=INT: a run started as a background command of a script (CI) ignores SIGINT, every
            // process below inherits that and .NET then installs no handler, so the kill -INT below would do nothing; a user's
            // Ctrl+C reaches an AppHost whose SIGINT is at its default, as env leaves it here before it execs dotnet.
            var psi = new ProcessStartInfo("env") { RedirectStandardOutput = true, RedirectStandardError = true, RedirectStandardInput = true };
            foreach (var a in new[] { "--default-signal=INT", "dotnet", AppHost }.Concat(job).Concat(["--steps", "500", "--run-dir", runDir])) psi.ArgumentList.Add(a);
            psi.Environment["NO_COLOR"] = "1";
            var first = new System.Text.StringBuilder();
            var running = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            using (var p = Process.Start(psi)!)
            {
                p.OutputDataReceived += (_, e) =>
                {
                    if (e.Data is null) return;
                    lock (first) first.AppendLine(e.Data);
                    if (e.Data.Contains("[apphost] job running")) running.TrySetResult();
                };
                p.ErrorDataReceived += (_, e) => { if (e.Data is not null) lock (first) first.AppendLine(e.Data); };
                p.BeginOutputReadLine();
                p.BeginErrorReadLine();
                await running.Task.WaitAsync(TimeSpan.FromMinutes(8));
                using (var interrupt = Process.Start("kill", ["-INT", p.Id.ToString()])) interrupt.WaitForExit(); // Ctrl+C
                if (!p.WaitForExit(TimeSpan.FromMinutes(2)))
                {
                    // Where it stood and whether the signal could reach it, read before it is killed.
                    var signals = SignalDispositions(p.Id);
                    var stacks = ManagedStacks.OfProcessesMentioning(runDir);
                    p.Kill(entireProcessTree: true);
                    string seen;
                    lock (first) seen = first.ToString();
                    Assert.Fail($"the AppHost did not stop within 2 minutes of SIGINT ({signals}):\n{seen}\n{stacks}");
                }
                p.WaitForExit();
            }
            string firstOutput;
            lock (first) firstOutput = first.ToString();
            var earlier = Regex.Match(firstOutput, @"submitted job (\S+):").Groups[1].Value;
            Assert.True(earlier.Length > 0, "the first run submitted no job:\n" + firstOutput);
            Assert.Contains("a job not yet finished stays in", firstOutput);

            var (code, output) = RunAppHost(runDir, job.Concat(["--steps", "4", "--fresh"]).ToArray());
            Assert.True(code == 0, "the second AppHost run failed:\n" + output);
            Assert.Matches($@"earlier job {Regex.Escape(earlier)} is unfinished \((forming|running|rescaling|pending), step \d+/500", output);
            Assert.Contains("--fresh: stopping it, then submitting a new default job", output);
            Assert.Matches($@"stopped earlier job {Regex.Escape(earlier)} at step \d+", output);
            var fresh = Regex.Match(output, @"submitted job (\S+):").Groups[1].Value;
            Assert.NotEqual(earlier, fresh);
            Assert.Contains($"job {fresh} ended: Completed", output);
            Assert.Matches($@"model of job {Regex.Escape(fresh)} \(step 4\) put by gpu-worker-\d into the checkpoint store as exports/{Regex.Escape(fresh)}/4/hf", output);
            Assert.Empty(ProcessesMentioning(runDir));
        }
        finally
        {
            foreach (var pid in ProcessesMentioning(runDir)) try { Process.GetProcessById(pid).Kill(true); } catch (ArgumentException) { }
            Directory.Delete(runDir, true);
        }
    }

    /// <summary>The signal masks of a process (/proc/PID/status: SigBlk, SigIgn, SigCgt; bit n-1 is signal n, SIGINT is 2).</summary>
    static string SignalDispositions(int pid)
    {
        try
        {
            string[] masks = ["SigBlk:", "SigIgn:", "SigCgt:"];
            return string.Join(", ", File.ReadAllLines($"/proc/{pid}/status").Where(l => masks.Any(m => l.StartsWith(m, StringComparison.Ordinal))).Select(l => l.Replace('\t', ' ')));
        }
        catch (IOException e) { return $"its /proc/{pid}/status could not be read: {e.Message}"; }
    }

    /// <summary>pp 1: two data-parallel replicas; pp 2 (<c>--pp 2</c>): one replica whose two stages are the two workers.</summary>
    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    public async Task TwoWorkersTrainTheDefaultJobToCompletionAndLeaveNoProcessBehind(int pp)
    {
        using var clusterLock = await ClusterTestLock.AcquireAsync("cluster end-to-end test");
        var runDir = Directory.CreateTempSubdirectory("e2e-").FullName;
        try
        {
            // --device cpu: two workers on any machine (on cuda each would need a GPU of its own).
            var (code, output) = RunAppHost(runDir, "--device", "cpu", "--workers", "2", "--pp", $"{pp}", "--steps", "40", "--seq-len", "64", "--vocab-size", "512",
                                            "--global-batch", "16", "--micro-batch", "4", "--checkpoint-interval", "20");
            Assert.True(code == 0, "the AppHost failed:\n" + output);
            Assert.Contains("job", output);
            Assert.Matches(@"job \S+ ended: Completed", output);
            // Both workers took part in one generation: two replicas, or the two stages of one.
            Assert.Matches(pp == 1 ? @"\[gpu-worker-\d\] \[rank 1\] generation 1: rank 1 of 2, " : @"\[gpu-worker-\d\] \[rank 1\] generation 1: rank 1 of 2 = stage 1 ", output);
            Assert.Matches(@"\[gpu-worker-0\].*rank \d of 2", output);
            Assert.Matches(@"\[gpu-worker-1\].*rank \d of 2", output);
            // The loss fell: the first and the last reported losses of rank 0.
            var losses = Regex.Matches(output, @"\[gpu-worker-\d\] \[rank 0\] step (\d+)/40 \| loss ([0-9.]+)")
                .Select(m => (step: int.Parse(m.Groups[1].Value), loss: double.Parse(m.Groups[2].Value, System.Globalization.CultureInfo.InvariantCulture))).ToList();
            Assert.True(losses.Count >= 2, "rank 0 reported no progress:\n" + output);
            Assert.True(losses[^1].loss < losses[0].loss - 0.5, $"loss went from {losses[0].loss} to {losses[^1].loss}");
            // Checkpoints committed (steps 20 and 40), validation and a sample printed, the model put into the store (not onto
            // rank 0's disk) and served from there by the model server.
            Assert.Matches(@"checkpoint of step 40 committed \(2 files", output);
            Assert.Contains("validation loss", output);
            Assert.Contains("sample: In the beginning", output);
            var place = Regex.Match(output, @"model saved to the checkpoint store as (exports/(\S+)/40/hf)");
            Assert.True(place.Success, "rank 0 put no model into the store:\n" + output);
            Assert.Matches($@"model server: http://\S+/v1 \(OpenAI API, model ""default"", {Regex.Escape(place.Groups[1].Value)} from the checkpoint store\)", output);
            Assert.False(Directory.Exists(Path.Combine(runDir, "workers", place.Groups[2].Value)), "a model folder was left on a worker's disk");
            // The run's fresh token never reaches the console.
            var token = File.ReadAllText(Path.Combine(runDir, "cluster.token"));
            Assert.Equal(64, token.Length);
            Assert.DoesNotContain(token, output);
            Assert.Empty(ProcessesMentioning(runDir));
        }
        finally
        {
            foreach (var pid in ProcessesMentioning(runDir)) try { Process.GetProcessById(pid).Kill(true); } catch (ArgumentException) { }
            Directory.Delete(runDir, true);
        }
    }
}
