// How a process is told its peak: an explicit figure (option or environment) and where the CPU calibration is cached.
using System.Globalization;

namespace DeepSeekCluster.Training.Perf;

/// <param name="PeakFlops">An explicit peak in FLOP/s: wins over the table and the calibration; null: look it up.</param>
/// <param name="OptionName">The option or variable that set it, named in the peak's description.</param>
/// <param name="CacheDirectory">Where CPU calibrations are cached; null: the user's cache folder (<see cref="DefaultCacheDirectory"/>).</param>
public sealed record PeakSettings(double? PeakFlops = null, string OptionName = PeakSettings.EnvironmentKey, string? CacheDirectory = null)
{
    /// <summary>The cluster worker's variable: its device's peak in GFLOP/s (the standalone trainer's --peak-gflops).</summary>
    public const string EnvironmentKey = "Worker__PeakGflops";

    /// <summary>Nothing set: the table on a GPU, the cached calibration on a CPU.</summary>
    public static PeakSettings Default { get; } = new();

    /// <summary>A figure in GFLOP/s from <paramref name="optionName"/>; 0 or less is refused with a message naming it.</summary>
    public static PeakSettings FromGflops(double gflops, string optionName, string? cacheDirectory = null) =>
        gflops > 0 && double.IsFinite(gflops)
            ? new(gflops * 1e9, optionName, cacheDirectory)
            : throw new ArgumentException($"{optionName} must be a positive number of GFLOP/s, got {gflops.ToString(CultureInfo.InvariantCulture)}");

    /// <summary>Worker__PeakGflops when set (a clear error when it is not a positive number), otherwise nothing set.</summary>
    public static PeakSettings FromEnvironment(Func<string, string?>? environment = null)
    {
        environment ??= Environment.GetEnvironmentVariable;
        if (environment(EnvironmentKey) is not { Length: > 0 } value) return Default;
        if (!double.TryParse(value, NumberStyles.Float, CultureInfo.InvariantCulture, out double gflops))
            throw new ArgumentException($"{EnvironmentKey}='{value}' is not a number (the device's peak in GFLOP/s)");
        return FromGflops(gflops, EnvironmentKey);
    }

    /// <summary>$XDG_CACHE_HOME/deepseekcluster, else ~/.cache/deepseekcluster: one calibration per machine and user.</summary>
    public static string DefaultCacheDirectory()
    {
        var root = Environment.GetEnvironmentVariable("XDG_CACHE_HOME") is { Length: > 0 } xdg
            ? xdg
            : Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".cache");
        return Path.Combine(root, "deepseekcluster");
    }
}
