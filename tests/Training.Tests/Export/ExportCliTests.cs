// gpu-worker export as a user runs it: a real process, its output, exit code and the folder it leaves.
using DeepSeekCluster.Training.Export;
using DeepSeekCluster.Training.Tests.Engine;

namespace DeepSeekCluster.Training.Tests.Export;

public sealed class ExportCliTests(ExportModelFixture fx) : IClassFixture<ExportModelFixture>
{
    static (int code, string stdout, string stderr) Run(params string[] args) =>
        GpuWorkerCliTests.RunWith("dotnet", new Dictionary<string, string>(), ["export", .. args]);

    [Fact]
    public void ExportingAnHfFolderToGgufWritesAVerifiedExport()
    {
        var outDir = Path.Combine(fx.Root, "cli-q4");
        var (code, stdout, stderr) = Run("--model", fx.ModelDir, "--format", "gguf-q4_0", "--out", outDir);
        Assert.True(code == 0, stderr);
        Assert.Contains("as gguf-q4_0", stdout);
        var manifest = ModelExport.Verify(outDir);
        Assert.Equal("model.gguf", Assert.Single(manifest.Files).Path);
    }

    [Fact]
    public void AnUnknownFormatOrAMissingSourceFailsWithAMessageAndNoFolder()
    {
        var outDir = Path.Combine(fx.Root, "cli-bad");
        var (code, _, stderr) = Run("--model", fx.ModelDir, "--format", "onnx-int4", "--out", outDir);
        Assert.NotEqual(0, code);
        Assert.Contains("unknown export format 'onnx-int4'", stderr);

        (code, _, stderr) = Run("--model", Path.Combine(fx.Root, "no-such-model"), "--format", "hf", "--out", outDir);
        Assert.NotEqual(0, code);
        Assert.Contains("no-such-model", stderr);
        Assert.False(Directory.Exists(outDir));
    }
}
