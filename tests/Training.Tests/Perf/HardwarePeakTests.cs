using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Perf;
using TorchSharp;

namespace DeepSeekCluster.Training.Tests.Perf;

public sealed class HardwarePeakTests : IDisposable
{
    readonly string cache = Directory.CreateTempSubdirectory("peak-cache-").FullName;
    static readonly TimeSpan Quick = TimeSpan.FromMilliseconds(150);

    public void Dispose() => Directory.Delete(cache, recursive: true);

    // ---- The declared table, by the names the driver reports (nvidia-smi --query-gpu=name) ----

    [Theory]
    [InlineData("NVIDIA H100 80GB HBM3", "bf16", 989.4)]
    [InlineData("NVIDIA H100 80GB HBM3", "fp32", 67)]
    [InlineData("NVIDIA H100 80GB HBM3", "tf32", 494.7)]
    [InlineData("NVIDIA H100 PCIe", "bf16", 756)]
    [InlineData("NVIDIA H100 PCIe", "fp32", 51)]
    [InlineData("NVIDIA H100 NVL", "bf16", 835.5)]
    [InlineData("NVIDIA H200", "bf16", 989.4)]
    [InlineData("NVIDIA H200", "fp32", 67)]
    [InlineData("NVIDIA H200 NVL", "bf16", 835.5)]
    [InlineData("NVIDIA GH200 480GB", "bf16", 989.4)]
    [InlineData("NVIDIA A100-SXM4-80GB", "bf16", 312)]
    [InlineData("NVIDIA A100-SXM4-40GB", "fp32", 19.5)]
    [InlineData("NVIDIA A100-PCIE-40GB", "fp16", 312)]
    [InlineData("NVIDIA A100 80GB PCIe", "tf32", 156)]
    [InlineData("NVIDIA L40S", "bf16", 362.05)]
    [InlineData("NVIDIA L40", "bf16", 181)]
    [InlineData("NVIDIA L4", "fp32", 30.3)]
    [InlineData("NVIDIA B200", "bf16", 2250)]
    [InlineData("NVIDIA GB200", "bf16", 2500)]
    public void TheDeclaredDensePeakIsFoundByTheDriversName(string name, string precision, double teraflops)
    {
        Assert.Equal(teraflops * 1e12, DeclaredPeaks.Lookup(name, precision)!.Value, 1e-9 * teraflops * 1e12);
    }

    [Theory]
    [InlineData("NVIDIA H100 80GB HBM3 MIG 1g.10gb", "bf16")] // a slice: its share is not the chip's peak
    [InlineData("NVIDIA A10G", "bf16")]
    [InlineData("Tesla V100-SXM2-16GB", "fp32")]
    [InlineData("NVIDIA GeForce GTX 1080", "fp32")]
    [InlineData("NVIDIA H100 80GB HBM3", "fp64")]
    public void AnUnknownGpuOrPrecisionHasNoDeclaredPeak(string name, string precision)
    {
        Assert.Null(DeclaredPeaks.Lookup(name, precision));
    }

    // ---- The CPU calibration cache ----

    [Fact]
    public void TheCalibrationIsWrittenOnceAndReadAfterwards()
    {
        var log = new List<string>();
        var first = CpuPeakCalibration.LoadOrCalibrate(torch.ScalarType.Float32, cache, log.Add, Quick);
        string path = CpuPeakCalibration.CachePath(cache, "fp32");
        Assert.True(File.Exists(path), path);
        Assert.Single(log, l => l.Contains("cached in", StringComparison.Ordinal));
        Assert.True(first.FlopsPerSecond > 0);
        Assert.Equal(Environment.ProcessorCount, first.Cores);
        Assert.Equal(CpuPeakCalibration.CpuModel(), first.CpuModel);
        Assert.True(first.LoadAverage >= 0);

        var second = CpuPeakCalibration.LoadOrCalibrate(torch.ScalarType.Float32, cache, log.Add, Quick);
        Assert.Equal(first, second); // the same date and value: read, not measured again
        Assert.Single(log, l => l.Contains("cached in", StringComparison.Ordinal));
    }

    [Fact]
    public async Task WorkersStartingTogetherMeasureOnceAndShareTheResult()
    {
        var log = new System.Collections.Concurrent.ConcurrentQueue<string>();
        var results = await Task.WhenAll(Enumerable.Range(0, 3)
            .Select(_ => Task.Run(() => CpuPeakCalibration.LoadOrCalibrate(torch.ScalarType.Float32, cache, log.Enqueue, Quick))));
        Assert.Single(log, l => l.Contains("cached in", StringComparison.Ordinal));
        Assert.All(results, r => Assert.Equal(results[0], r));
    }

    [Fact]
    public void ACorruptCacheIsMovedAsideAndRecalibratedWithAWarning()
    {
        string path = CpuPeakCalibration.CachePath(cache, "fp32");
        File.WriteAllText(path, "{ not json");
        var log = new List<string>();

        var calibration = CpuPeakCalibration.LoadOrCalibrate(torch.ScalarType.Float32, cache, log.Add, Quick);

        Assert.True(calibration.FlopsPerSecond > 0);
        Assert.Contains(log, l => l.StartsWith("warning:", StringComparison.Ordinal) && l.Contains(path, StringComparison.Ordinal) && l.Contains("is not a calibration", StringComparison.Ordinal));
        Assert.Equal("{ not json", File.ReadAllText(path + ".corrupt"));
        Assert.Equal(calibration, CpuPeakCalibration.LoadOrCalibrate(torch.ScalarType.Float32, cache, log.Add, Quick));
    }

    [Fact]
    public void ACacheOfAnotherMachineIsNotTrusted()
    {
        var log = new List<string>();
        var own = CpuPeakCalibration.LoadOrCalibrate(torch.ScalarType.Float32, cache, log.Add, Quick);
        string path = CpuPeakCalibration.CachePath(cache, "fp32");
        File.WriteAllText(path, File.ReadAllText(path).Replace($"\"cores\": {own.Cores}", $"\"cores\": {own.Cores + 64}", StringComparison.Ordinal));

        var again = CpuPeakCalibration.LoadOrCalibrate(torch.ScalarType.Float32, cache, log.Add, Quick);

        Assert.Equal(own.Cores, again.Cores);
        Assert.Contains(log, l => l.Contains($"{own.Cores + 64} cores", StringComparison.Ordinal));
    }

    [Fact]
    public void ACalibrationMadeUnderHeavyLoadIsMadeAgainWhenTheMachineIsQuieterAndKeepsTheHigherPeak()
    {
        string path = CpuPeakCalibration.CachePath(cache, "fp32");
        var busy = new CpuCalibration(CpuPeakCalibration.CpuModel(), Environment.ProcessorCount, "fp32", 1.0, DateTimeOffset.UtcNow.AddDays(-1),
                                      LoadAverage: 1e6, MatrixSize: 1024, Seconds: 2);
        File.WriteAllText(path, System.Text.Json.JsonSerializer.Serialize(busy, System.Text.Json.JsonSerializerOptions.Web));
        var log = new List<string>();

        var better = CpuPeakCalibration.LoadOrCalibrate(torch.ScalarType.Float32, cache, log.Add, Quick);

        Assert.True(better.FlopsPerSecond > 1.0, $"{better.FlopsPerSecond}");
        Assert.True(better.LoadAverage < 1e6);
        Assert.Contains(log, l => l.Contains("was made under load 1000000.0", StringComparison.Ordinal));

        // A cached figure higher than any measurement here stays: a quieter machine never lowers the peak.
        var high = better with { FlopsPerSecond = 1e18, LoadAverage = 1e6 };
        File.WriteAllText(path, System.Text.Json.JsonSerializer.Serialize(high, System.Text.Json.JsonSerializerOptions.Web));
        var kept = CpuPeakCalibration.LoadOrCalibrate(torch.ScalarType.Float32, cache, log.Add, Quick);
        Assert.Equal(1e18, kept.FlopsPerSecond);
        Assert.True(kept.LoadAverage < 1e6);
    }

    [Fact]
    public void AnUnwritableCacheFolderFallsBackToTheTemporaryFolder()
    {
        // As a pod with a read-only root filesystem: the cache folder cannot be made (here its parent is a file).
        string blocker = Path.Combine(cache, "not-a-folder");
        File.WriteAllText(blocker, "");
        string? xdg = Environment.GetEnvironmentVariable("XDG_CACHE_HOME"), tmp = Environment.GetEnvironmentVariable("TMPDIR");
        Environment.SetEnvironmentVariable("XDG_CACHE_HOME", blocker);
        Environment.SetEnvironmentVariable("TMPDIR", cache);
        try
        {
            var log = new List<string>();
            CpuPeakCalibration.LoadOrCalibrate(torch.ScalarType.Float32, directory: null, log.Add, Quick);

            Assert.Contains(log, l => l.Contains("is not writable", StringComparison.Ordinal));
            Assert.True(File.Exists(CpuPeakCalibration.CachePath(Path.Combine(Path.GetTempPath(), "deepseekcluster"), "fp32")));
        }
        finally
        {
            Environment.SetEnvironmentVariable("XDG_CACHE_HOME", xdg);
            Environment.SetEnvironmentVariable("TMPDIR", tmp);
        }
    }

    [Fact]
    public void OnACpuThePeakIsTheCachedCalibrationAndSaysSo()
    {
        var calibration = CpuPeakCalibration.LoadOrCalibrate(torch.ScalarType.Float32, cache, null, Quick);
        var log = new List<string>();

        var peak = HardwarePeak.For(torch.CPU, torch.ScalarType.Float32, new PeakSettings(CacheDirectory: cache), log.Add);

        int threads = Math.Min(torch.get_num_threads(), calibration.Cores);
        Assert.Equal(calibration.FlopsPerSecond * threads / calibration.Cores, peak.FlopsPerSecond, 1e-6 * peak.FlopsPerSecond);
        Assert.Equal(PeakSource.Calibrated, peak.Source);
        Assert.Equal("fp32", peak.Precision);
        Assert.StartsWith($"calibrated {calibration.CalibratedAt.UtcDateTime:yyyy-MM-dd} on {calibration.CpuModel} ({calibration.Cores} cores", peak.Description);
        Assert.Equal($"cpu:{Environment.MachineName}", peak.Hardware);
        Assert.Equal($"MFU is measured against {peak}", Assert.Single(log));
    }

    [Fact]
    public void AnExplicitPeakWinsOverTheCacheAndNamesItsOption()
    {
        CpuPeakCalibration.LoadOrCalibrate(torch.ScalarType.Float32, cache, null, Quick);

        var peak = HardwarePeak.For(torch.CPU, torch.ScalarType.Float32, PeakSettings.FromGflops(123, "--peak-gflops", cache));

        Assert.Equal(123e9, peak.FlopsPerSecond);
        Assert.Equal(PeakSource.Option, peak.Source);
        Assert.Equal("set by --peak-gflops", peak.Description);
    }

    [Fact]
    public void AnExplicitPeakIsUsedWithoutCalibrating()
    {
        HardwarePeak.For(torch.CPU, torch.ScalarType.BFloat16, PeakSettings.FromGflops(50, "--peak-gflops", cache));

        Assert.Empty(Directory.GetFiles(cache, "*.json"));
    }

    [Theory]
    [InlineData("abc", "is not a number")]
    [InlineData("0", "must be a positive number")]
    [InlineData("-5", "must be a positive number")]
    public void ABadPeakVariableIsRefusedNamingIt(string value, string expected)
    {
        var e = Assert.Throws<ArgumentException>(() => PeakSettings.FromEnvironment(k => k == PeakSettings.EnvironmentKey ? value : null));
        Assert.Contains(PeakSettings.EnvironmentKey, e.Message);
        Assert.Contains(expected, e.Message);
    }

    [Fact]
    public void ThePeakVariableIsReadInGflops()
    {
        var settings = PeakSettings.FromEnvironment(k => k == PeakSettings.EnvironmentKey ? "250.5" : null);
        Assert.Equal(250.5e9, settings.PeakFlops);
        Assert.Null(PeakSettings.FromEnvironment(_ => null).PeakFlops);
    }

    // ---- The cap ----

    [Fact]
    public void MfuIsNeverAboveOneAndACappedReadingSaysThePeakLooksTooLow()
    {
        var tooLow = new HardwarePeak(1e9, "fp32", PeakSource.Calibrated, "calibrated 2026-12-06 on a busy machine (2 cores)");

        var reading = tooLow.Mfu(1.5e9);

        Assert.Equal(1.0, reading.Ratio);
        Assert.Equal(1.5, reading.Raw, 12);
        Assert.True(reading.Capped);
        Assert.Contains("the peak looks too low", reading.Warning(tooLow));
        Assert.False(tooLow.Mfu(0.5e9).Capped);
        Assert.Equal(0.5, tooLow.Mfu(0.5e9).Ratio, 12);
        Assert.Equal(0, HardwarePeak.Given(0).Mfu(1e9).Ratio);
    }

    [Fact]
    public void AStepLineWithACappedMfuShowsOneHundredPercentAndWhy()
    {
        var peak = new HardwarePeak(1e9, "fp32", PeakSource.Calibrated, "calibrated 2026-12-06 on a busy machine (2 cores)");
        var m = new StepMetrics(3, 3.0, null, null, 1e-3, 0.5, 1000, peak.Mfu(2e9).Ratio, new StepTimes(0, 0, 0, 0, 0), [])
        {
            AchievedFlops = 2e9, Peak = peak,
        };
        var output = new StringWriter();
        var progress = new ConsoleProgress(output, live: false);

        progress.Step(m, 10, 1, logEvery: 1);
        progress.Step(m with { Step = 4 }, 10, 1, logEvery: 1);

        var lines = output.ToString().Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.Single(lines, l => l.StartsWith("warning: achieved 2.00× the peak", StringComparison.Ordinal));
        Assert.Contains("MFU 100.0% of 1.0 GFLOP/s calibrated (capped: 2.00× the peak, which looks too low)", lines[1]);
        Assert.Equal(2, lines.Count(l => l.StartsWith("step ", StringComparison.Ordinal)));
    }

    [Fact]
    public void ATrainerGivenABareNumberCallsItsPeakGiven()
    {
        HardwarePeak peak = 2e11;
        Assert.Equal(PeakSource.Given, peak.Source);
        Assert.Equal("of 200.0 GFLOP/s given", peak.Tag);
    }
}

public class TrainerMfuTests
{
    [Fact]
    public void ATrainerAgainstATooLowPeakReportsOneHundredPercentAndTheRawFigure()
    {
        var tokens = Enumerable.Range(0, 4000).Select(i => i * 7 % 97).ToArray();
        var data = new Training.Data.TokenDataset(tokens, 16);
        var options = new TrainingOptions { SeqLen = 16, GlobalBatch = 4, MicroBatch = 2, Steps = 2, WarmupSteps = 0 };
        var config = Training.Model.DeepSeekConfig.Tiny(97) with
        {
            HiddenSize = 32, IntermediateSize = 64, MoeIntermediateSize = 16, NumHiddenLayers = 2, NumAttentionHeads = 2,
            KvLoraRank = 8, QLoraRank = 16, QkNopeHeadDim = 8, QkRopeHeadDim = 8, VHeadDim = 8,
        };
        torch.manual_seed(1);
        using var model = new Training.Model.DeepSeekForCausalLM(config).InitializeWeights();
        var tooLow = new HardwarePeak(1.0, "fp32", PeakSource.Option, "set by a test"); // 1 FLOP/s: any step is above it
        using var trainer = new Trainer(model, data, null, options, torch.CPU, tooLow);

        var m = trainer.TrainStep();

        Assert.Equal(1.0, m.Mfu);
        Assert.Same(tooLow, m.Peak);
        Assert.True(m.AchievedFlops > 1, $"{m.AchievedFlops}");
        Assert.Equal(m.AchievedFlops, m.Utilization.Raw, 1e-9 * m.AchievedFlops);
        Assert.True(m.Utilization.Capped);
        Assert.Equal(1.0, trainer.Peak.FlopsPerSecond);
    }
}
