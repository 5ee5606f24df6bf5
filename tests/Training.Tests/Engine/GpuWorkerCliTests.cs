// The gpu-worker command line as a user runs it: a real process, its output and exit code.
using System.Diagnostics;
using System.Reflection;
using System.Text.Json;
using DeepSeekCluster.Training.IO;

namespace DeepSeekCluster.Training.Tests.Engine;

public class GpuWorkerCliTests
{
    static readonly string Dll = typeof(GpuWorkerCliTests).Assembly.GetCustomAttributes<AssemblyMetadataAttribute>().Single(a => a.Key == "GpuWorkerDll").Value!;

    static (int code, string stdout, string stderr) Run(params string[] args) => RunWith("dotnet", new Dictionary<string, string>(), args);

    /// <summary>Runs gpu-worker through the dotnet host <paramref name="host"/> with <paramref name="environment"/> added to ours.</summary>
    internal static (int code, string stdout, string stderr) RunWith(string host, IReadOnlyDictionary<string, string> environment, params string[] args)
    {
        var psi = new ProcessStartInfo(host) { RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var (name, value) in environment) psi.Environment[name] = value;
        psi.ArgumentList.Add(Dll);
        foreach (var a in args) psi.ArgumentList.Add(a);
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(TimeSpan.FromMinutes(4))) { p.Kill(true); throw new TimeoutException($"gpu-worker {string.Join(' ', args)} did not finish"); }
        return (p.ExitCode, stdout.Result, stderr.Result);
    }

    [Fact]
    public void GenerateFromAnHfFolderPrintsTheReferenceGreedyIdsAsJson()
    {
        var golden = Path.Combine(AppContext.BaseDirectory, "Goldens");
        using var expected = SafeTensors.Open(Path.Combine(golden, "hf-tiny-expected.safetensors"));
        var prompt = expected.Read("greedy_prompt").data<long>().ToArray();
        var want = expected.Read("greedy_continuation").data<long>().ToArray();
        var (code, stdout, stderr) = Run("generate", "--model", Path.Combine(golden, "hf-tiny"), "--prompt-ids", string.Join(",", prompt),
                                         "--max-new-tokens", want.Length.ToString(), "--greedy", "--json", "--device", "cpu");
        Assert.True(code == 0, stderr);
        using var json = JsonDocument.Parse(stdout);
        Assert.Equal(want, json.RootElement.GetProperty("generated_ids").EnumerateArray().Select(e => e.GetInt64()));
    }

    [Fact]
    public void TrainThenGenerateWorksEndToEndFromTheCommandLine()
    {
        var dir = Directory.CreateTempSubdirectory("cli-train-").FullName;
        try
        {
            var (code, stdout, stderr) = Run("train", "--steps", "12", "--warmup", "2", "--seq-len", "32", "--global-batch", "8", "--micro-batch", "4",
                                             "--vocab-size", "300", "--eval-every", "6", "--log-every", "4", "--checkpoint-every", "6",
                                             "--out", dir, "--peak-gflops", "100", "--device", "cpu");
            Assert.True(code == 0, stderr + stdout);
            Assert.Contains("step 12/12", stdout);
            Assert.Contains("MFU is measured against 100.0 GFLOP/s fp32, set by --peak-gflops", stdout);
            Assert.Contains("of 100.0 GFLOP/s option", stdout);
            Assert.Contains("validation loss", stdout);
            foreach (var f in new[] { "config.json", "model.safetensors", "tokenizer.json", "generation_config.json" })
                Assert.True(File.Exists(Path.Combine(dir, "model", f)), $"model/{f} is missing");
            Assert.True(File.Exists(Path.Combine(dir, "checkpoints", "standalone", "00000012", "manifest.json"))); // committed in the sharded format

            var gen = Run("generate", "--model", Path.Combine(dir, "model"), "--prompt", "And God said", "--max-new-tokens", "8", "--greedy", "--json");
            Assert.True(gen.code == 0, gen.stderr);
            using var json = JsonDocument.Parse(gen.stdout);
            Assert.True(json.RootElement.GetProperty("generated_ids").GetArrayLength() > 0);

            // Running again resumes from the last checkpoint instead of starting over.
            var again = Run("train", "--steps", "14", "--warmup", "2", "--seq-len", "32", "--global-batch", "8", "--micro-batch", "4",
                            "--vocab-size", "300", "--eval-every", "0", "--log-every", "1", "--out", dir, "--peak-gflops", "100", "--device", "cpu");
            Assert.True(again.code == 0, again.stderr + again.stdout);
            Assert.Contains("resumed from", again.stdout);
            Assert.DoesNotContain("step 1/14", again.stdout);
            Assert.Contains("step 13/14", again.stdout);
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public void ABadOptionIsRefusedWithItsNameAndExitCode2()
    {
        var (code, _, stderr) = Run("train", "--stepz", "5");
        Assert.Equal(2, code);
        Assert.Contains("--stepz", stderr);
        var bad = Run("train", "--global-batch", "10", "--micro-batch", "4");
        Assert.Equal(2, bad.code);
        Assert.Contains("global_batch (10) must be a multiple of micro_batch", bad.stderr);
    }

    /// <summary>
    /// With every GPU hidden (CUDA_VISIBLE_DEVICES empty) any machine is a CPU machine to the worker: auto picks cpu and the
    /// tcp backend. The driver and NCCL lines report what this machine has, and are checked against that.
    /// </summary>
    [Fact]
    public void CheckWithNoVisibleGpuReportsTheMachineAsReadyForCpuAndTheTcpBackend()
    {
        var hidden = new Dictionary<string, string> { ["CUDA_VISIBLE_DEVICES"] = "" };
        var (code, stdout, stderr) = RunWith("dotnet", hidden, "check");
        Assert.True(code == 0, stderr + stdout);
        Assert.Contains("runtime      .NET 10", stdout);
        Assert.Matches(@"libtorch     TorchSharp 0\.107\.0 on /\S+/libtorch_cpu\.so\n", stdout.ReplaceLineEndings("\n"));
        bool driver = System.Runtime.InteropServices.NativeLibrary.TryLoad("libcuda.so.1", out var d);
        if (driver) System.Runtime.InteropServices.NativeLibrary.Free(d);
        Assert.Contains(driver ? "CUDA driver  libcuda.so.1 at " : "CUDA driver  libcuda.so.1 not found", stdout);
        Assert.Contains("CUDA         not available to libtorch", stdout);
        Assert.Contains("device       cpu (asked: auto)", stdout);
        Assert.Contains("collectives  tcp", stdout);
        Assert.Matches(@"MFU peak +\d+\.\d [GT]FLOP/s fp32, (calibrated \d{4}-\d\d-\d\d on .+ \(\d+ cores|set by Worker__PeakGflops)", stdout);
        bool nccl = System.Runtime.InteropServices.NativeLibrary.TryLoad("libnccl.so.2", out var n);
        if (nccl) System.Runtime.InteropServices.NativeLibrary.Free(n);
        if (nccl) Assert.Matches(@"NCCL         \d+\.\d+\.\d+ from ", stdout); // a system NCCL: its version and path
        else Assert.Contains("NCCL         not loaded: libnccl.so.2 could not be loaded: install NCCL 2.10.0 or newer (Debian/Ubuntu: libnccl2)", stdout);
        Assert.EndsWith("ok: this machine can train on cpu with the tcp backend", stdout.TrimEnd());

        var cuda = RunWith("dotnet", hidden, "check", "--device", "cuda");
        Assert.Equal(2, cuda.code);
        Assert.Contains("device 'cuda' was asked for, but CUDA is not available", cuda.stderr);
        var typo = Run("check", "--devcie", "cpu");
        Assert.Equal(2, typo.code);
        Assert.Contains("--devcie", typo.stderr);
    }
}
