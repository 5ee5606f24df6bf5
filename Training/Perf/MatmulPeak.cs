// Measures the dense-matmul throughput this machine actually reaches, the denominator for an
// honest MFU on hardware without a published peak (CPUs, shared GPUs). Not an MFU calculator.
using System.Diagnostics;
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Perf;

/// <summary>What <see cref="MatmulPeak.Measure"/> saw.</summary>
/// <param name="Threads">torch.get_num_threads() during the run: CPU results scale with it.</param>
public sealed record MatmulPeakResult(
    string Device, ScalarType DType, int Size, long Matmuls, TimeSpan Elapsed, double FlopsPerSecond, int Threads)
{
    public override string ToString() =>
        $"{FlopsPerSecond / 1e9:F1} GFLOP/s ({DType}, {Size}×{Size} matmul ×{Matmuls} in {Elapsed.TotalSeconds:F2} s on {Device}, {Threads} torch threads)";
}

public static class MatmulPeak
{
    private const int WarmupMatmuls = 3; // first calls pay for allocation, thread-pool start and (CUDA) kernel selection

    /// <summary>
    /// The matrix size that finds <paramref name="device"/>'s peak: <paramref name="cpuSize"/> on a CPU, 8192 on a GPU,
    /// where smaller products leave most of the chip idle. On an H200, bf16 products of 1024 reached 196 TFLOP/s and
    /// products of 8192 796 TFLOP/s: an MFU against the smaller peak would read four times too high.
    /// </summary>
    public static int SizeFor(Device device, int cpuSize = 1024) => device.type == DeviceType.CUDA ? 8192 : cpuSize;

    /// <summary>
    /// Times back-to-back <paramref name="size"/>² × <paramref name="size"/>² matmuls on
    /// <paramref name="device"/> until <paramref name="budget"/> (default 2 s) has passed, and
    /// counts 2·n³ FLOP for each.
    /// </summary>
    public static MatmulPeakResult Measure(Device device, ScalarType dtype, int size = 1024, TimeSpan? budget = null)
    {
        ArgumentNullException.ThrowIfNull(device);
        if (size < 1)
            throw new ArgumentOutOfRangeException(nameof(size), size, "The matrix size must be at least 1.");
        TimeSpan limit = budget ?? TimeSpan.FromSeconds(2);
        if (limit <= TimeSpan.Zero)
            throw new ArgumentOutOfRangeException(nameof(budget), limit, "The time budget must be positive.");

        using var scope = torch.NewDisposeScope();
        using var noGrad = torch.no_grad();
        var a = torch.randn(size, size, dtype: dtype, device: device);
        var b = torch.randn(size, size, dtype: dtype, device: device);

        for (int i = 0; i < WarmupMatmuls; i++)
            torch.matmul(a, b).Dispose();
        Synchronize(device);

        // Matmuls are queued in rounds and the clock read after each round's synchronize, so GPU
        // work is timed, not just its launch.
        long matmuls = 0;
        int perRound = 1;
        var clock = Stopwatch.StartNew();
        while (clock.Elapsed < limit)
        {
            for (int i = 0; i < perRound; i++)
                torch.matmul(a, b).Dispose();
            Synchronize(device);
            matmuls += perRound;
            perRound = Math.Min(perRound * 2, 64);
        }
        clock.Stop();

        double flops = 2.0 * size * size * (double)size * matmuls;
        return new MatmulPeakResult(device.ToString(), dtype, size, matmuls, clock.Elapsed,
            flops / clock.Elapsed.TotalSeconds, torch.get_num_threads());
    }

    private static void Synchronize(Device device)
    {
        if (device.type == DeviceType.CUDA)
            torch.cuda.synchronize(device);
    }
}
