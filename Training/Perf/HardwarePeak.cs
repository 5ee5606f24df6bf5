// The denominator of MFU: a device's peak FLOP/s at a precision, and where that number came from. Not a benchmark.
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Perf;

/// <summary>Where a <see cref="HardwarePeak"/> came from, from the most to the least trustworthy.</summary>
public enum PeakSource
{
    /// <summary>Set by the person running it (an option or environment variable).</summary>
    Option,
    /// <summary>The vendor's dense (no sparsity) datasheet figure for this GPU and precision (<see cref="DeclaredPeaks"/>).</summary>
    Declared,
    /// <summary>Measured once per machine with all cores and cached (<see cref="CpuPeakCalibration"/>).</summary>
    Calibrated,
    /// <summary>Measured at start on a GPU the table does not know: a floor of the true peak, so MFU may read high.</summary>
    Measured,
    /// <summary>A number handed to the trainer by its caller (tests, benches) with no statement of where it came from.</summary>
    Given,
}

/// <summary>
/// A device's peak FLOP/s at <paramref name="Precision"/> ("fp32", "bf16", ...) and the sentence saying where it came from
/// (<paramref name="Description"/>: "declared: NVIDIA H100 80GB HBM3 bf16", "calibrated 2026-12-06 on AMD EPYC 7763 (2
/// cores)", "set by Worker__PeakGflops"). <paramref name="Hardware"/> names the physical device ("cpu:host", "cuda:GPU-uuid"):
/// members that share one count its peak once in a cluster's figure. A peak of 0 means none is known: MFU reads 0.
/// </summary>
public sealed record HardwarePeak(double FlopsPerSecond, string Precision, PeakSource Source, string Description, string Hardware = "")
{
    /// <summary>
    /// A bare number from the caller (tests and benches pass one): MFU against it is only as good as the number. A Trainer
    /// constructed with a double gets this.
    /// </summary>
    public static implicit operator HardwarePeak(double flopsPerSecond) => Given(flopsPerSecond);

    public static HardwarePeak Given(double flopsPerSecond, string precision = "fp32") =>
        double.IsFinite(flopsPerSecond) && flopsPerSecond >= 0
            ? new(flopsPerSecond, precision, PeakSource.Given, "given by the caller")
            : throw new ArgumentOutOfRangeException(nameof(flopsPerSecond), flopsPerSecond, "a peak must be a finite number of FLOP/s, 0 or more");

    /// <summary>"67.0 TFLOP/s fp32, declared: NVIDIA H100 80GB HBM3 fp32": what a log line says about the denominator.</summary>
    public override string ToString() => $"{Format(FlopsPerSecond)} {Precision}, {Description}";

    /// <summary>The short tag step lines carry: "of 67.0 TFLOP/s declared".</summary>
    public string Tag => $"of {Format(FlopsPerSecond)} {Source.ToString().ToLowerInvariant()}";

    /// <summary>The achieved rate against this peak; see <see cref="MfuReading"/> for the cap.</summary>
    public MfuReading Mfu(double achievedFlopsPerSecond) => MfuReading.Of(achievedFlopsPerSecond, FlopsPerSecond);

    public static string Format(double flopsPerSecond) => flopsPerSecond switch
    {
        >= 1e12 => $"{flopsPerSecond / 1e12:F1} TFLOP/s",
        _ => $"{flopsPerSecond / 1e9:F1} GFLOP/s",
    };

    /// <summary>The precision name of a compute dtype, as the table and the cache file spell it.</summary>
    public static string PrecisionOf(ScalarType dtype) => dtype switch
    {
        ScalarType.Float32 => "fp32",
        ScalarType.BFloat16 => "bf16",
        ScalarType.Float16 => "fp16",
        ScalarType.Float64 => "fp64",
        _ => throw new ArgumentOutOfRangeException(nameof(dtype), dtype, "no peak is defined for this dtype (expected fp32, bf16, fp16 or fp64)"),
    };

    /// <summary>
    /// The peak MFU is measured against on <paramref name="device"/> at <paramref name="dtype"/>: the explicit setting
    /// when there is one; on CUDA the declared peak of the GPU (measured, and labelled so, for a GPU the table does not
    /// know or a MIG slice); on a CPU the machine's cached calibration (made once, under a lock, when there is none),
    /// scaled to the torch threads this process uses. <paramref name="log"/> hears which peak, and any warning.
    /// </summary>
    public static HardwarePeak For(Device device, ScalarType dtype, PeakSettings settings, Action<string>? log = null)
    {
        var peak = Find(device, dtype, settings, log);
        log?.Invoke($"MFU is measured against {peak}");
        return peak;
    }

    static HardwarePeak Find(Device device, ScalarType dtype, PeakSettings settings, Action<string>? log)
    {
        ArgumentNullException.ThrowIfNull(device);
        ArgumentNullException.ThrowIfNull(settings);
        string precision = PrecisionOf(dtype);
        string hardware = device.type == DeviceType.CUDA ? CudaDevice.Identity(device) : $"cpu:{Environment.MachineName}";
        if (settings.PeakFlops is double set)
            return new(set, precision, PeakSource.Option, $"set by {settings.OptionName}", hardware);
        if (device.type == DeviceType.CUDA)
        {
            var name = CudaDevice.Name(device);
            if (name is not null && DeclaredPeaks.Lookup(name, precision) is double declared)
                return new(declared, precision, PeakSource.Declared, $"declared: {name} {precision}", hardware);
            var measured = MatmulPeak.Measure(device, dtype, MatmulPeak.SizeFor(device), TimeSpan.FromSeconds(1));
            log?.Invoke($"peak: {name ?? "this GPU"} has no declared {precision} peak in DeclaredPeaks; measured {measured} instead " +
                           $"(a floor of the true peak: set {settings.OptionName} to the datasheet's dense figure)");
            return new(measured.FlopsPerSecond, precision, PeakSource.Measured,
                       $"measured at start on {name ?? device.ToString()} (no declared {precision} peak)", hardware);
        }
        var calibration = CpuPeakCalibration.LoadOrCalibrate(dtype, settings.CacheDirectory, log);
        int threads = Math.Min(torch.get_num_threads(), calibration.Cores);
        double share = calibration.FlopsPerSecond * threads / calibration.Cores;
        string threadsNote = threads == calibration.Cores ? "" : $", {threads} of its {calibration.Cores} cores";
        return new(share, precision, PeakSource.Calibrated, calibration.Describe() + threadsNote, hardware);
    }
}

/// <summary>
/// MFU of one reading: <see cref="Ratio"/> is capped at 1 because a utilization above the peak is impossible; a
/// <see cref="Raw"/> above 1 means the peak is too low (a calibration made under load, a wrong option), and every
/// output that shows a capped value says so (<see cref="Capped"/>) rather than hiding it.
/// </summary>
public readonly record struct MfuReading(double Ratio, double Raw)
{
    public bool Capped => Raw > 1;

    public static MfuReading Of(double achievedFlopsPerSecond, double peakFlopsPerSecond)
    {
        double raw = peakFlopsPerSecond > 0 && double.IsFinite(achievedFlopsPerSecond) ? achievedFlopsPerSecond / peakFlopsPerSecond : 0;
        return new(Math.Min(raw, 1), raw);
    }

    /// <summary>The warning a capped reading carries, for a log or a step line.</summary>
    public string Warning(HardwarePeak peak) =>
        $"achieved {Raw:F2}× the peak ({peak}): the peak looks too low, MFU shown as 100%";
}
