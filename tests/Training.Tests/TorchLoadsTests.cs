using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Tests;

public class TorchLoadsTests
{
    [Fact]
    public void ATensorOpRunsFromACleanBuild()
    {
        // Fails with "GLIBCXX_3.4.32 not found" when the build did not patch libLibTorchSharp.so.
        using var a = tensor(new float[] { 1, 2, 3, 4 }).reshape(2, 2);
        using var p = a.matmul(a);
        Assert.Equal(new float[] { 7, 10, 15, 22 }, p.data<float>().ToArray());
    }
}
