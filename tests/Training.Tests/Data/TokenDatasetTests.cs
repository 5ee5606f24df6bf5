using DeepSeekCluster.Training.Data;
using TorchSharp;

namespace DeepSeekCluster.Training.Tests.Data;

public class TokenDatasetTests
{
    private const int Eot = 0;

    [Fact]
    public void PackJoinsDocumentsEachFollowedByTheEndOfTextToken()
    {
        // Stream: 1 2 3 EOT 4 5 EOT  (7 tokens) → samples of 3 + 1 tokens at stride 3.
        var data = TokenDataset.Pack([[1, 2, 3], [4, 5]], Eot, seqLen: 3);

        Assert.Equal(7, data.TokenCount);
        Assert.Equal(3, data.SeqLen);
        Assert.Equal(2, data.SampleCount);
        Assert.Equal([1, 2, 3, Eot], data.Sample(0).ToArray());
        Assert.Equal([Eot, 4, 5, Eot], data.Sample(1).ToArray());
    }

    [Fact]
    public void EveryTokenButTheFirstIsATargetExactlyOnce()
    {
        int[] tokens = Enumerable.Range(1, 101).ToArray();
        var data = new TokenDataset(tokens, seqLen: 10);

        var targets = Enumerable.Range(0, (int)data.SampleCount).SelectMany(i => data.Sample(i)[1..].ToArray());

        Assert.Equal(10, data.SampleCount);
        Assert.Equal(tokens[1..], targets);
    }

    [Fact]
    public void BatchIsAnInt64TensorOfTheSamplesInTheGivenOrder()
    {
        var data = TokenDataset.Pack([[1, 2, 3], [4, 5]], Eot, seqLen: 3);

        using var batch = data.Batch([1, 0, 1]);

        Assert.Equal(torch.ScalarType.Int64, batch.dtype);
        Assert.Equal([3L, 4L], batch.shape);
        Assert.Equal([0L, 4, 5, 0, 1, 2, 3, 0, 0, 4, 5, 0], batch.data<long>().ToArray());
    }

    [Fact]
    public void AStreamShorterThanOneSampleHasNoSamples()
    {
        var data = TokenDataset.Pack([[1, 2]], Eot, seqLen: 3);

        Assert.Equal(0, data.SampleCount);
    }

    [Theory]
    [InlineData(-1)]
    [InlineData(2)]
    public void ASampleIndexOutsideTheDatasetIsRefused(long index)
    {
        var data = TokenDataset.Pack([[1, 2, 3], [4, 5]], Eot, seqLen: 3);

        Assert.Throws<ArgumentOutOfRangeException>(() => data.Batch([0, index]));
    }
}
