// Data-parallel gradient averaging: gradients flattened into ~25 MB buckets, one all-reduce per bucket.
using DeepSeekCluster.Training.Engine;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Collectives;

/// <summary>
/// Averages gradients over the ranks of a collective. Consecutive gradients of one dtype are packed into flat buckets
/// of about <see cref="BucketBytes"/> (25 MB by default, as PyTorch DDP: big enough that per-call latency vanishes,
/// small enough not to double the gradients' memory); each bucket is all-reduced with Avg and copied back. Buckets are
/// kept between steps and rebuilt only when the gradients' shapes change. A gradient larger than a bucket gets its own.
/// </summary>
public sealed class BucketedGradientReducer : IGradientReducer, IDisposable
{
    public ICollective Collective { get; }
    public long BucketBytes { get; }

    sealed record Bucket(Tensor Flat, int First, int Count, long[] Offsets);

    readonly List<Bucket> buckets = new();
    string layout = "";

    public BucketedGradientReducer(ICollective collective, long bucketBytes = 25L << 20)
    {
        if (bucketBytes <= 0) throw new ArgumentOutOfRangeException(nameof(bucketBytes), bucketBytes, "bucket size must be positive");
        Collective = collective;
        BucketBytes = bucketBytes;
    }

    public void AverageGradients(IReadOnlyList<Tensor> parameters)
    {
        if (Collective.WorldSize == 1) return;
        using var noGrad = no_grad();
        Plan(parameters);
        foreach (var b in buckets)
        {
            using var scope = NewDisposeScope();
            for (int i = 0; i < b.Count; i++)
            {
                var g = parameters[b.First + i];
                b.Flat.narrow(0, b.Offsets[i], g.numel()).copy_(g.reshape(-1));
            }
            Collective.AllReduce(b.Flat, ReduceOp.Avg);
            for (int i = 0; i < b.Count; i++)
            {
                var g = parameters[b.First + i];
                g.copy_(b.Flat.narrow(0, b.Offsets[i], g.numel()).view(g.shape));
            }
        }
    }

    public void SumLoads(long[] loads)
    {
        if (Collective.WorldSize == 1 || loads.Length == 0) return;
        using var scope = NewDisposeScope();
        var t = tensor(loads).to(Collective.Device);
        Collective.AllReduce(t, ReduceOp.Sum);
        t.cpu().data<long>().CopyTo(loads);
    }

    void Plan(IReadOnlyList<Tensor> gradients)
    {
        string now = string.Join(",", gradients.Select(g => $"{g.dtype}:{g.numel()}"));
        if (now == layout) return;
        DisposeBuckets();
        layout = now;
        int first = 0;
        while (first < gradients.Count)
        {
            var dtype = gradients[first].dtype;
            long bytes = 0, elements = 0;
            var offsets = new List<long>();
            int i = first;
            for (; i < gradients.Count && gradients[i].dtype == dtype; i++)
            {
                long n = gradients[i].numel();
                long size = n * gradients[i].ElementSize;
                if (offsets.Count > 0 && bytes + size > BucketBytes) break;
                offsets.Add(elements);
                elements += n;
                bytes += size;
            }
            var flat = zeros(elements, dtype: dtype, device: Collective.Device).DetachFromDisposeScope();
            buckets.Add(new Bucket(flat, first, i - first, offsets.ToArray()));
            first = i;
        }
    }

    void DisposeBuckets()
    {
        foreach (var b in buckets) b.Flat.Dispose();
        buckets.Clear();
    }

    public void Dispose() => DisposeBuckets();
}
