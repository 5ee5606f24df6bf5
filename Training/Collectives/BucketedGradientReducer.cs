// Data-parallel sums of a step's exact gradient words, in ~25 MB buckets of views into the flat buffers, and its statistics.
using DeepSeekCluster.Training.Engine;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Collectives;

/// <summary>
/// Sums <see cref="ExactGradientSum"/>'s two flat int64 buffers over the ranks of a collective, bucket by bucket: each
/// bucket is a view of about <see cref="BucketBytes"/> (25 MB by default, as PyTorch DDP: big enough that per-call
/// latency vanishes, small enough that a ring's chunks stay in cache), all-reduced in place with Sum. Integer sums are
/// exact, so every rank ends with the same words whatever the ring's order.
/// </summary>
public sealed class BucketedGradientReducer : IGradientReducer
{
    public ICollective Collective { get; }
    public long BucketBytes { get; }

    public BucketedGradientReducer(ICollective collective, long bucketBytes = 25L << 20)
    {
        if (bucketBytes < sizeof(long)) throw new ArgumentOutOfRangeException(nameof(bucketBytes), bucketBytes, "a bucket must hold at least one int64");
        Collective = collective;
        BucketBytes = bucketBytes;
    }

    public void SumGradients(ExactGradientSum sum)
    {
        if (Collective.WorldSize == 1) return;
        using var noGrad = no_grad();
        long perBucket = BucketBytes / sizeof(long);
        foreach (var words in new[] { sum.High, sum.Low })
            for (long start = 0, n = words.numel(); start < n; start += perBucket)
            {
                using var bucket = words.narrow(0, start, Math.Min(perBucket, n - start));
                Collective.AllReduce(bucket, ReduceOp.Sum);
            }
        Collective.AllReduce(sum.Worst, ReduceOp.Max);
    }

    public void SumWords(long[] words)
    {
        if (Collective.WorldSize == 1 || words.Length == 0) return;
        using var scope = NewDisposeScope();
        var t = tensor(words).to(Collective.Device);
        Collective.AllReduce(t, ReduceOp.Sum);
        t.cpu().data<long>().CopyTo(words);
    }
}
