// The wire form of a device's peak for the step report (proto DevicePeak); the Coordinator sums these into the job's MFU.
using DeepSeekCluster.Training.Perf;
using DevicePeak = DeepSeekCluster.Contracts.Control.DevicePeak;

namespace DeepSeekCluster.GpuWorker.Cluster;

public static class PeakMessage
{
    /// <summary>Null when the trainer has no peak: the report then carries none and the job shows no MFU for the rank.</summary>
    public static DevicePeak? From(HardwarePeak? peak) => peak is null ? null : new DevicePeak
    {
        Flops = peak.FlopsPerSecond, Precision = peak.Precision, Source = peak.Source.ToString().ToLowerInvariant(),
        Description = peak.Description, Hardware = peak.Hardware,
    };
}
