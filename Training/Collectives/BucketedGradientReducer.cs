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

    public void ReduceStatistics(IReadOnlyList<long[]> loads, double[] means)
    {
        int n = loads.Sum(l => l.Length) + means.Length;
        if (Collective.WorldSize == 1 || n == 0) return;
        // One float64 all-reduce for all of it: a load count is exact in a double far beyond any step's token count, and
        // a ring sum leaves the same bits on every rank, so the replicas' biases and reported losses stay identical.
        var packed = new double[n];
        int i = 0;
        foreach (var l in loads) foreach (var x in l) packed[i++] = x;
        means.CopyTo(packed, i);
        using var scope = NewDisposeScope();
        var t = tensor(packed).to(Collective.Device);
        Collective.AllReduce(t, ReduceOp.Sum);
        var summed = t.cpu().data<double>().ToArray();
        i = 0;
        foreach (var l in loads) for (int e = 0; e < l.Length; e++) l[e] = (long)Math.Round(summed[i++]);
        for (int m = 0; m < means.Length; m++) means[m] = summed[i++] / Collective.WorldSize;
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
