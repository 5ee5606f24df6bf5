// A CPU's matmul peak, measured once per machine with all cores and cached in a file, so a worker that starts while
// others train reads the calibration instead of measuring a lower peak. Not a per-run measurement.
using System.Globalization;
using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Perf;

/// <summary>One calibration as its cache file holds it.</summary>
/// <param name="LoadAverage">The 1-minute load average when it began: above a few tenths per core the peak is likely low.</param>
public sealed record CpuCalibration(
    string CpuModel, int Cores, string Precision, double FlopsPerSecond, DateTimeOffset CalibratedAt, double LoadAverage,
    int MatrixSize, double Seconds)
{
    public string Describe() =>
        $"calibrated {CalibratedAt.UtcDateTime.ToString("yyyy-MM-dd", CultureInfo.InvariantCulture)} on {CpuModel} ({Cores} cores" +
        (LoadAverage > 0.5 * Cores ? string.Create(CultureInfo.InvariantCulture, $", load {LoadAverage:F1} then") : "") + ")";
}

public static class CpuPeakCalibration
{
    const int MatrixSize = 1024;
    static readonly TimeSpan DefaultBudget = TimeSpan.FromSeconds(2);
    /// <summary>Long enough for another process's calibration (seconds) on a loaded machine.</summary>
    static readonly TimeSpan LockWait = TimeSpan.FromMinutes(2);
    static readonly JsonSerializerOptions Json = new(JsonSerializerDefaults.Web) { WriteIndented = true };

    /// <summary>The cache file of this machine's CPU at <paramref name="precision"/> in <paramref name="directory"/>.</summary>
    public static string CachePath(string directory, string precision)
    {
        var key = Convert.ToHexStringLower(SHA256.HashData(Encoding.UTF8.GetBytes($"{CpuModel()}|{Environment.ProcessorCount}")))[..12];
        return Path.Combine(directory, $"peak-{key}-{precision}.json");
    }

    /// <summary>
    /// The cached calibration of this CPU at <paramref name="dtype"/>, made now when there is none. Processes that start
    /// together take a lock file beside the cache, so one measures (with the machine to itself as far as this project
    /// goes) and the others read its result. A cache file that does not parse or does not describe this machine is moved
    /// aside to *.corrupt and recalibrated, with a warning on <paramref name="log"/>: a worker should not fail to start
    /// over a file it can rebuild.
    /// </summary>
    public static CpuCalibration LoadOrCalibrate(ScalarType dtype, string? directory = null, Action<string>? log = null, TimeSpan? budget = null)
    {
        string precision = HardwarePeak.PrecisionOf(dtype);
        directory ??= WritableDefault(log);
        Directory.CreateDirectory(directory);
        string path = CachePath(directory, precision);
        if (TryRead(path, precision, out var cached, out _) && !WorthRetrying(cached!)) return cached!;

        using var held = Lock(path + ".lock");
        // Another process may have calibrated while this one waited for the lock.
        if (TryRead(path, precision, out cached, out string? problem) && !WorthRetrying(cached!)) return cached!;
        if (problem is not null)
        {
            File.Move(path, path + ".corrupt", overwrite: true);
            log?.Invoke($"warning: the peak cache {path} {problem}; moved it to {path}.corrupt and calibrating again");
        }
        var calibration = Calibrate(dtype, budget ?? DefaultBudget);
        if (cached is not null)
        {
            // Load only ever lowers a measured throughput, so the higher of two calibrations is the better peak.
            log?.Invoke($"peak: the cached calibration was made under load {cached.LoadAverage:F1}, now {calibration.LoadAverage:F1}: measured " +
                        $"{HardwarePeak.Format(calibration.FlopsPerSecond)} against the cached {HardwarePeak.Format(cached.FlopsPerSecond)}");
            if (calibration.FlopsPerSecond <= cached.FlopsPerSecond) calibration = cached with { LoadAverage = Math.Min(cached.LoadAverage, calibration.LoadAverage) };
        }
        string temp = $"{path}.{Environment.ProcessId}.tmp";
        File.WriteAllText(temp, JsonSerializer.Serialize(calibration, Json));
        File.Move(temp, path, overwrite: true); // readers never see half a file
        log?.Invoke($"peak: {calibration.Describe()}: {HardwarePeak.Format(calibration.FlopsPerSecond)} {precision} with {calibration.Cores} threads, cached in {path}" +
                       (calibration.LoadAverage > 0.5 * calibration.Cores
                           ? $" (warning: the machine was busy, load {calibration.LoadAverage:F1}: the peak may be low and MFU high; delete the file to calibrate again when idle, or set {PeakSettings.EnvironmentKey})"
                           : ""));
        return calibration;
    }

    /// <summary>
    /// The user's cache folder, or the temporary folder where that is not writable (a Kubernetes pod with a read-only
    /// root filesystem has an emptyDir on /tmp): the calibration then lasts as long as the pod.
    /// </summary>
    static string WritableDefault(Action<string>? log)
    {
        string preferred = PeakSettings.DefaultCacheDirectory();
        try
        {
            Directory.CreateDirectory(preferred);
            return preferred;
        }
        catch (Exception e) when (e is UnauthorizedAccessException or IOException)
        {
            string temp = Path.Combine(Path.GetTempPath(), "deepseekcluster");
            log?.Invoke($"peak: {preferred} is not writable ({e.Message}); the calibration is cached in {temp} instead");
            return temp;
        }
    }

    /// <summary>
    /// A calibration made on a busy machine (load above half a task per core) is made again when the machine is
    /// now at most half as loaded: a worker starting on a quieter machine improves the cache instead of inheriting a
    /// low peak for good. The result keeps the higher figure and the lower load, so this converges and stops.
    /// </summary>
    static bool WorthRetrying(CpuCalibration cached) =>
        cached.LoadAverage > 0.5 * cached.Cores && LoadAverage() < cached.LoadAverage / 2;

    /// <summary>Times matmuls with every core: the whole machine's peak, whatever this process's own thread setting.</summary>
    static CpuCalibration Calibrate(ScalarType dtype, TimeSpan budget)
    {
        double load = LoadAverage();
        int cores = Environment.ProcessorCount;
        int threads = torch.get_num_threads();
        torch.set_num_threads(cores);
        try
        {
            var result = MatmulPeak.Measure(CPU, dtype, MatrixSize, budget);
            return new CpuCalibration(CpuModel(), cores, HardwarePeak.PrecisionOf(dtype), result.FlopsPerSecond, DateTimeOffset.UtcNow, load,
                                      MatrixSize, result.Elapsed.TotalSeconds);
        }
        finally { torch.set_num_threads(threads); }
    }

    static bool TryRead(string path, string precision, out CpuCalibration? calibration, out string? problem)
    {
        calibration = null;
        problem = null;
        if (!File.Exists(path)) return false;
        try { calibration = JsonSerializer.Deserialize<CpuCalibration>(File.ReadAllText(path), Json); }
        catch (JsonException e) { problem = $"is not a calibration ({e.Message})"; return false; }
        if (calibration is null || calibration.CpuModel is null) problem = "is empty";
        else if (!(calibration.FlopsPerSecond > 0 && double.IsFinite(calibration.FlopsPerSecond))) problem = $"holds a peak of {calibration.FlopsPerSecond} FLOP/s";
        else if (calibration.Precision != precision) problem = $"is for {calibration.Precision}, not {precision}";
        else if (calibration.CpuModel != CpuModel() || calibration.Cores != Environment.ProcessorCount)
            problem = $"describes {calibration.CpuModel} with {calibration.Cores} cores, not this {CpuModel()} with {Environment.ProcessorCount}";
        if (problem is null) return true;
        calibration = null;
        return false;
    }

    /// <summary>
    /// An exclusive lock file (FileShare.None is an flock on Linux, released by the kernel if its holder dies). .NET has
    /// no blocking open, so a waiter retries every 50 ms: this is waiting for a lock, not for a service to come up.
    /// </summary>
    static FileStream Lock(string path)
    {
        var deadline = DateTime.UtcNow + LockWait;
        while (true)
        {
            try { return new FileStream(path, FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.None); }
            catch (IOException) when (DateTime.UtcNow < deadline) { Thread.Sleep(50); }
            catch (IOException e) { throw new TimeoutException($"the peak calibration lock {path} was held for more than {LockWait.TotalMinutes:0} minutes", e); }
        }
    }

    /// <summary>The CPU's model name ("AMD EPYC 7763 64-Core Processor") from /proc/cpuinfo; the architecture elsewhere.</summary>
    public static string CpuModel()
    {
        const string cpuinfo = "/proc/cpuinfo";
        if (File.Exists(cpuinfo))
            foreach (var line in File.ReadLines(cpuinfo))
                if (line.StartsWith("model name", StringComparison.Ordinal) && line.IndexOf(':') is int colon and > 0)
                    return line[(colon + 1)..].Trim();
        return $"{System.Runtime.InteropServices.RuntimeInformation.ProcessArchitecture} CPU";
    }

    /// <summary>The 1-minute load average (Linux); 0 where /proc/loadavg is absent.</summary>
    public static double LoadAverage()
    {
        const string loadavg = "/proc/loadavg";
        if (!File.Exists(loadavg)) return 0;
        var first = File.ReadAllText(loadavg).Split(' ', 2)[0];
        return double.TryParse(first, NumberStyles.Float, CultureInfo.InvariantCulture, out double v) ? v : 0;
    }
}
