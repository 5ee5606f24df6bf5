using DeepSeekCluster.Training.Perf;
using TorchSharp;

namespace DeepSeekCluster.Training.Tests.Perf;

public class MatmulPeakTests
{
    [Fact]
    public void TheCpuFp32PeakIsMeasuredAsAPositiveRate()
    {
        // A sanity check only: the speed of a shared CI machine is not asserted.
        var result = MatmulPeak.Measure(torch.CPU, torch.ScalarType.Float32, size: 128, budget: TimeSpan.FromMilliseconds(200));

        Assert.True(result.Matmuls >= 1);
        Assert.True(result.Elapsed >= TimeSpan.FromMilliseconds(200));
        Assert.True(double.IsFinite(result.FlopsPerSecond) && result.FlopsPerSecond > 0, result.ToString());
        Assert.Equal(2.0 * 128 * 128 * 128 * result.Matmuls / result.Elapsed.TotalSeconds, result.FlopsPerSecond, 1e-6 * result.FlopsPerSecond);
        Assert.True(result.Threads >= 1);
        Assert.Equal(torch.ScalarType.Float32, result.DType);
    }
}
