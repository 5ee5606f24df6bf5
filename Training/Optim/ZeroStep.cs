// ZeRO-1/2's half of an optimizer step: reduce-scatter the exact gradient words, the global norm from every shard, and the all-gather of the updated rows.
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Parallel;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Optim;

/// <summary>
/// The communication of a step whose AdamW is sharded over the data-parallel replicas (ZeRO stage 1 or 2). Each replica
/// ends the backward with its micro-batches' gradient words (<see cref="ExactGradientSum"/>, laid out shard-major);
/// <see cref="ReduceScatter"/> leaves each replica the exact sum of its own rows' words, the replica writes its rows'
/// mean, <see cref="ClipGradNorm"/> takes the norm over every shard, the replica's AdamW updates its rows, and
/// <see cref="AllGatherParameters"/> hands every replica every updated row. Every exchange moves at most
/// <see cref="BucketBytes"/> per call (per rank), so the transient buffers stay bounded whatever the model's size.
/// </summary>
public sealed class ZeroStep
{
    public ICollective Collective { get; }
    public ZeroShards Shards { get; }
    /// <summary>The shard this replica updates: its rank in the data-parallel group.</summary>
    public int Shard => Collective.Rank;
    public long BucketBytes { get; }
    /// <summary>The data-parallel layout the shards were made for.</summary>
    public ParallelLayout Layout { get; }

    public ZeroStep(ICollective collective, ZeroShards shards, long bucketBytes = 25L << 20, ParallelLayout? layout = null)
    {
        if (collective.WorldSize != shards.Shards)
            throw new ArgumentException($"the collective has {collective.WorldSize} ranks and the ZeRO partition {shards.Shards} shards: expected one shard per data-parallel rank");
        if (bucketBytes < sizeof(long)) throw new ArgumentOutOfRangeException(nameof(bucketBytes), bucketBytes, "a bucket must hold at least one element");
        Collective = collective;
        Shards = shards;
        BucketBytes = bucketBytes;
        Layout = layout ?? new ParallelLayout(shards.Shards, 1, [new StageLayers(0, 1)]);
    }

    /// <summary>
    /// Sums the words of every shard over the ranks, leaving this rank's region of <paramref name="sum"/>'s buffers with
    /// the exact totals of its rows (the other regions are then stale), and the largest gradient magnitude on every rank.
    /// </summary>
    public void ReduceScatter(ExactGradientSum sum)
    {
        if (sum.Shards is not { } shards || shards.TotalWords != Shards.TotalWords)
            throw new ArgumentException("the gradient words are not laid out in this step's ZeRO shards", nameof(sum));
        using var noGrad = no_grad();
        if (sum.ShardOnly)
        {
            // ZeRO-2 reduce-scattered every micro-batch's words already (ScatterWords).
            Collective.AllReduce(sum.Worst, ReduceOp.Max);
            return;
        }
        long s = Shards.ShardWords, width = Math.Max(1, BucketBytes / sizeof(long) / Shards.Shards);
        foreach (var words in new[] { sum.High, sum.Low })
        {
            using var grid = words.view(Shards.Shards, s);
            for (long c = 0; c < s; c += width)
            {
                long k = Math.Min(width, s - c);
                // A copy: NCCL takes contiguous buffers only, and the output is a region of the input's buffer.
                using var columns = grid.narrow(1, c, k);
                using var input = empty([Shards.Shards, k], dtype: ScalarType.Int64, device: words.device);
                input.copy_(columns);
                using var output = words.narrow(0, Shard * s + c, k);
                Collective.ReduceScatter(input, output, ReduceOp.Sum);
            }
        }
        Collective.AllReduce(sum.Worst, ReduceOp.Max);
    }

    /// <summary>ZeRO-2's exchange of one window of a micro-batch's words (<see cref="ExactGradientSum"/>'s scatter).</summary>
    public void ScatterWords(Tensor input, Tensor output) => Collective.ReduceScatter(input, output, ReduceOp.Sum);

    /// <summary>The exact gradient sum a step of stage <paramref name="zero"/> accumulates into: every shard's words (1), or only this rank's (2).</summary>
    /// <remarks>ZeRO-2's windows are a bucket wide (every shard's part of a window together), like every other exchange here.</remarks>
    public ExactGradientSum NewGradientSum(IReadOnlyList<Tensor> parameters, int zero) =>
        zero >= 2 ? new ExactGradientSum(parameters, Math.Min(ExactGradientSum.ChunkElements, BucketBytes / sizeof(long)), Shards, Shard, ScatterWords)
                  : new ExactGradientSum(parameters, ExactGradientSum.ChunkElements, Shards);

    /// <summary>
    /// The L2 norm of the whole gradient, from each rank's rows, and the clip of this rank's rows to
    /// <paramref name="maxNorm"/> (≤ 0: no clipping). Each row's sum of squares is taken by the rank that holds it and
    /// the rows' sums are added in one fixed order (parameter, then row), so the norm is the same bits whatever the
    /// number of shards: every row is a contribution of one rank and zero from the others, and x + 0 is exact.
    /// </summary>
    public double ClipGradNorm(AdamW optimizer, double maxNorm)
    {
        double norm = Math.Sqrt(SumOfSquares(optimizer));
        if (maxNorm > 0 && norm > maxNorm) ScaleGradients(optimizer, maxNorm / (norm + 1e-6)); // AdamW.ClipGradNorm's scale
        return norm;
    }

    /// <summary>
    /// The sum of squares of the gradient of every parameter of this partition, from each rank's rows, added in the fixed
    /// order of <see cref="ClipGradNorm"/> (the same bits whatever the number of shards). A pipeline stage's share of the
    /// global norm, which the stages then add along the pipeline.
    /// </summary>
    public double SumOfSquares(AdamW optimizer)
    {
        using var noGrad = no_grad();
        var slots = optimizer.Slots;
        var rowOffsets = new long[slots.Count + 1];
        for (int i = 0; i < slots.Count; i++) rowOffsets[i + 1] = rowOffsets[i] + (slots[i].Param.dim() == 0 ? 1 : slots[i].Param.shape[0]);
        using var rows = zeros(rowOffsets[^1], dtype: ScalarType.Float64, device: Collective.Device);
        for (int i = 0; i < slots.Count; i++)
        {
            var slot = slots[i];
            if (slot.Empty || slot.Param.grad is not { } grad) continue;
            using var scope = NewDisposeScope();
            var squares = AdamW.RowSquares(slot.Own(grad)).to(Collective.Device);
            rows.narrow(0, rowOffsets[i] + slot.RowStart, squares.shape[0]).copy_(squares);
        }
        Collective.AllReduce(rows, ReduceOp.Sum);
        double sumSq = 0;
        foreach (var x in rows.cpu().data<double>()) sumSq += x;
        return sumSq;
    }

    /// <summary>Multiplies this rank's rows of every gradient by <paramref name="scale"/> (the clip; the other rows are not this rank's to update).</summary>
    public static void ScaleGradients(AdamW optimizer, double scale)
    {
        using var noGrad = no_grad();
        foreach (var slot in optimizer.Slots)
            if (!slot.Empty && slot.Param.grad is { } g) { using var own = slot.Own(g); own.mul_(scale); }
    }

    /// <summary>Gives every rank every shard's updated rows of every parameter (in the parameters' own dtype: bf16 when training in bf16).</summary>
    public void AllGatherParameters(AdamW optimizer) => AllGatherParameters(optimizer.Slots);

    /// <summary>
    /// <see cref="AllGatherParameters(AdamW)"/> for <paramref name="slots"/>, the parameters this partition was made for
    /// (under expert parallelism the replicated ones and the experts are two partitions over two groups).
    /// </summary>
    public void AllGatherParameters(IReadOnlyList<AdamW.Slot> slots)
    {
        using var noGrad = no_grad();
        if (slots.Count != Shards.Shapes.Count) throw new ArgumentException($"the optimizer has {slots.Count} slots and the ZeRO partition {Shards.Shapes.Count} parameters");
        var dtype = slots[0].Param.dtype;
        if (slots.Any(s => s.Param.dtype != dtype))
            throw new InvalidOperationException($"ZeRO gathers parameters of one dtype; these have {string.Join(", ", slots.Select(s => s.Param.dtype).Distinct())}");
        AllGatherRows(Collective, Shards, Shard, [.. slots.Select(s => s.Param)], BucketBytes);
    }

    /// <summary>
    /// Every shard's rows of <paramref name="tensors"/> (one dtype, laid out by <paramref name="shards"/>) to every rank of
    /// <paramref name="collective"/>, at most <paramref name="bucketBytes"/> per call: rank <paramref name="shard"/>
    /// sends its rows and writes every other shard's into place. ZeRO-1/2 after the update, ZeRO-3 before each use.
    /// </summary>
    public static void AllGatherRows(ICollective collective, ZeroShards shards, int shard, IReadOnlyList<Tensor> tensors, long bucketBytes)
    {
        using var noGrad = no_grad();
        var flats = tensors.Select(t => t.detach().view(-1)).ToArray();
        try
        {
            var dtype = tensors[0].dtype;
            long s = shards.ShardWords, width = Math.Max(1, bucketBytes / tensors[0].ElementSize / shards.Shards);
            using var input = zeros(Math.Min(width, s), dtype: dtype, device: collective.Device);
            using var output = zeros(Math.Min(width, s) * shards.Shards, dtype: dtype, device: collective.Device);
            for (long c = 0; c < s; c += width)
            {
                long k = Math.Min(width, s - c);
                using var scope = NewDisposeScope();
                var inWindow = input.narrow(0, 0, k);
                var outWindow = output.narrow(0, 0, k * shards.Shards);
                foreach (var (piece, from, length, at) in shards.Window(shard, c, k))
                    inWindow.narrow(0, at, length).copy_(flats[piece.Param].narrow(0, piece.Element + from, length));
                collective.AllGather(inWindow, outWindow);
                for (int d = 0; d < shards.Shards; d++)
                {
                    if (d == shard) continue;
                    foreach (var (piece, from, length, at) in shards.Window(d, c, k))
                        flats[piece.Param].narrow(0, piece.Element + from, length).copy_(outWindow.narrow(0, d * k + at, length));
                }
            }
        }
        finally
        {
            foreach (var f in flats) f.Dispose();
        }
    }
}
