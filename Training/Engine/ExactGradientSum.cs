// Exact, order-independent sums of micro-batch gradients and losses (fixed point in int64 words); not a reducer itself.
using DeepSeekCluster.Training.Parallel;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Engine;

/// <summary>
/// The sum of a step's micro-batch gradients in 128-bit fixed point, so that the sum is exact and therefore the same in
/// any order and over any number of ranks: a job that goes from 2 workers to 1 and back trains bit for bit as one that
/// never changed (docs/decisions.md, "Training is bitwise identical at any world size").
/// <para>
/// Each gradient element x is rounded once to a multiple of 2^-<see cref="FractionBits"/> (every float32 of magnitude
/// 2^-40 or more is such a multiple already, so nothing but values below about 1e-12 is rounded) and kept as two int64
/// words, q = hi·2^<see cref="LowBits"/> + lo with 0 ≤ lo &lt; 2^LowBits. Integer sums are exact and associative; the
/// words of up to 2^<see cref="MaxTermsLog2"/> micro-batches fit an int64 as long as |x| &lt; <see cref="Bound"/>.
/// An element beyond it, or NaN/Inf, poisons its parameter's result with NaN (the norm then says so), as a float sum would.
/// </para>
/// Both words of every parameter live in two flat buffers (<see cref="High"/>, <see cref="Low"/>) that a reducer
/// all-reduces in place with an int64 Sum, in buckets of views: no copies in or out. Memory: 16 bytes per parameter
/// for the words, plus a float64 scratch of at most <see cref="ChunkElements"/> elements (or the largest parameter).
/// <para>
/// With <see cref="Shards"/> (ZeRO), the words are laid out shard-major (<see cref="ZeroShards"/>) so that a reduce-scatter
/// hands each replica the summed words of its own rows, and <see cref="WriteShardMean"/> writes only those rows' gradients.
/// The words are integers either way: the sum, and every gradient element, are the same bits as without shards.
/// </para>
/// </summary>
public sealed partial class ExactGradientSum : IDisposable
{
    public const int FractionBits = 64, LowBits = 40, MaxTermsLog2 = 20;
    /// <summary>The largest gradient element magnitude the words can sum 2^20 times without overflow: 2^19.</summary>
    public static readonly double Bound = Math.Pow(2, 63 - MaxTermsLog2 - (FractionBits - LowBits));

    static readonly double Scale = Math.Pow(2, FractionBits), LowScale = Math.Pow(2, LowBits);

    readonly Tensor[] parameters;
    readonly long[] offsets;
    readonly (int First, int End)[] chunks; // runs of parameters of at most ChunkElements (or one larger parameter)
    readonly Tensor scratch; // (C,) float64: one chunk of one micro-batch's gradients, flat
    readonly Tensor worst;   // () float64: the largest |x| (or NaN) of any gradient element this step

    /// <summary>hi words of every parameter, flat in parameter order (int64), or shard-major with <see cref="Shards"/>.</summary>
    public Tensor High { get; }
    /// <summary>lo words of every parameter, laid out as <see cref="High"/> (int64), each term in [0, 2^LowBits).</summary>
    public Tensor Low { get; }
    /// <summary>The largest gradient magnitude of the step (NaN if any was NaN); a reducer all-reduces it with Max (exact).</summary>
    public Tensor Worst => worst;
    /// <summary>Micro-batches added on this rank since <see cref="Clear"/>.</summary>
    public int Terms { get; private set; }

    /// <summary>Elements converted at once by default: bounds the float64 scratch (32 MB) and the temporaries beside it.</summary>
    public const long ChunkElements = 1L << 22;

    /// <param name="chunkElements">Elements converted at once (a parameter larger than that is converted whole).</param>
    /// <summary>The ZeRO partition the words are laid out in (shard-major), or null: parameter order.</summary>
    public ZeroShards? Shards { get; }

    /// <param name="chunkElements">Elements converted at once (a parameter larger than that is converted whole).</param>
    public ExactGradientSum(IReadOnlyList<Tensor> parameters, long chunkElements = ChunkElements) : this(parameters, chunkElements, null) { }

    /// <summary>
    /// ZeRO-2: only shard <see cref="OwnShard"/>'s words are kept (<see cref="High"/> and <see cref="Low"/> hold its region
    /// alone), and each micro-batch's words are reduce-scattered into them at once, a window of columns at a time.
    /// </summary>
    public bool ShardOnly => scatter is not null;
    public int OwnShard { get; } = -1;
    readonly Action<Tensor, Tensor>? scatter;
    readonly long window;

    /// <param name="chunkElements">Elements converted at once (a parameter larger than that is converted whole).</param>
    /// <param name="shards">Lays the words out shard-major for a reduce-scatter (its shapes must be the parameters').</param>
    /// <param name="ownShard">With <paramref name="scatter"/>: the shard whose words this rank keeps.</param>
    /// <param name="scatter">
    /// ZeRO-2's exchange: reduce-scatters (int64 Sum) a window of every shard's words, shard-major (input), into this
    /// rank's part of the window (output). Null: every word is kept and summed over ranks later.
    /// </param>
    public ExactGradientSum(IReadOnlyList<Tensor> parameters, long chunkElements, ZeroShards? shards, int ownShard = -1, Action<Tensor, Tensor>? scatter = null)
    {
        if (scatter is not null && (shards is null || ownShard < 0 || ownShard >= shards.Shards))
            throw new ArgumentException($"keeping one shard's words needs the ZeRO partition and a shard in [0, {shards?.Shards ?? 0}), got {ownShard}", nameof(ownShard));
        this.scatter = scatter;
        OwnShard = ownShard;
        if (parameters.Count == 0) throw new ArgumentException("no parameters to sum gradients of", nameof(parameters));
        if (shards is not null && (shards.Shapes.Count != parameters.Count || !shards.Shapes.Select((s, i) => s.SequenceEqual(parameters[i].shape)).All(x => x)))
            throw new ArgumentException($"the ZeRO partition was made for {shards.Shapes.Count} other shapes than these {parameters.Count} parameters", nameof(shards));
        Shards = shards;
        this.parameters = [.. parameters];
        offsets = new long[parameters.Count + 1];
        for (int i = 0; i < parameters.Count; i++) offsets[i + 1] = offsets[i] + parameters[i].numel();
        var device = parameters[0].device;
        long words = scatter is not null ? shards!.ShardWords : shards?.TotalWords ?? offsets[^1];
        High = zeros(words, dtype: ScalarType.Int64, device: device).DetachFromDisposeScope();
        Low = zeros(words, dtype: ScalarType.Int64, device: device).DetachFromDisposeScope();
        var runs = new List<(int, int)>();
        for (int first = 0; first < parameters.Count;)
        {
            int end = first + 1;
            while (end < parameters.Count && offsets[end + 1] - offsets[first] <= chunkElements) end++;
            runs.Add((first, end));
            first = end;
        }
        chunks = [.. runs];
        long largest = chunks.Max(c => offsets[c.End] - offsets[c.First]);
        if (scatter is not null)
        {
            window = Math.Clamp(chunkElements / shards!.Shards, 1, shards.ShardWords);
            largest = window * shards.Shards;
        }
        scratch = zeros(largest, dtype: ScalarType.Float64, device: device).DetachFromDisposeScope();
        worst = zeros(1, dtype: ScalarType.Float64, device: device).DetachFromDisposeScope();
    }

    /// <summary>Empties the sum and zeroes every existing <c>.grad</c>: the start of a step.</summary>
    public void Clear()
    {
        using var noGrad = no_grad();
        High.zero_();
        Low.zero_();
        worst.zero_();
        if (flat is not null) foreach (var buffer in FlatBuffers()) buffer.zero_();
        foreach (var p in parameters) p.grad?.zero_();
        Terms = 0;
        lone = false;
    }

    /// <summary>
    /// Adds the current <c>.grad</c> of every parameter (none counts as zero) and zeroes it for the next micro-batch's
    /// backward, which then accumulates into zeros: 0 + g is g exactly.
    /// </summary>
    public void AddAndClearGradients() => AddAndClearGradients(0);

    /// <summary>
    /// Like <see cref="AddAndClearGradients()"/>, when the parameters before <paramref name="firstParam"/> hold zero
    /// gradients: chunks of those alone are skipped (adding zero words changes nothing), the rest are added as usual.
    /// Expert parallelism's extra terms carry only expert gradients, and the experts come last.
    /// </summary>
    public void AddAndClearGradients(int firstParam)
    {
        if (Terms >= 1 << MaxTermsLog2) throw new InvalidOperationException($"more than 2^{MaxTermsLog2} micro-batches in one exact sum");
        if (lone) throw new InvalidOperationException("the step's only term was added already (AddOnlyTerm)");
        using var noGrad = no_grad();
        if (ShardOnly) { ScatterGradients(); Terms++; return; }
        if (flat is not null) { AddFlat(); Terms++; return; }
        foreach (var (first, end) in chunks)
        {
            if (end <= firstParam) continue;
            using var scope = NewDisposeScope();
            long start = offsets[first], n = offsets[end] - start;
            var x = scratch.narrow(0, 0, n);
            for (int i = first; i < end; i++)
            {
                var range = x.narrow(0, offsets[i] - start, offsets[i + 1] - offsets[i]);
                if (parameters[i].grad is { } g) { range.copy_(g.reshape(-1)); g.zero_(); }
                else range.zero_();
            }
            var (hiWords, loWords) = ToWords(x);
            if (Shards is null)
            {
                High.narrow(0, start, n).add_(hiWords);
                Low.narrow(0, start, n).add_(loWords);
            }
            else
                for (int i = first; i < end; i++)
                    foreach (var piece in Shards.PiecesOf(i))
                    {
                        if (piece.Count == 0) continue;
                        long at = offsets[i] - start + piece.Element;
                        High.narrow(0, piece.Word, piece.Count).add_(hiWords.narrow(0, at, piece.Count));
                        Low.narrow(0, piece.Word, piece.Count).add_(loWords.narrow(0, at, piece.Count));
                    }
        }
        Terms++;
    }

    /// <summary>
    /// Counts a micro-batch whose gradients were added by someone else a part at a time (ZeRO-3 reduce-scatters each
    /// layer's during the backward into <see cref="High"/> and <see cref="Low"/>, LayerGradientScatter).
    /// </summary>
    internal void CountTerm()
    {
        if (Terms >= 1 << MaxTermsLog2) throw new InvalidOperationException($"more than 2^{MaxTermsLog2} micro-batches in one exact sum");
        Terms++;
    }

    /// <summary>The two words of each element of <paramref name="x"/> (overwritten), and the running largest magnitude.</summary>
    /// <remarks>Internal for ZeRO-3's per-layer scatter (Parallel/LayerGradientScatter.cs), which converts a layer at a time.</remarks>
    internal (Tensor Hi, Tensor Lo) ToWords(Tensor x)
    {
        // max and -min in two reads, no |x| temporary; NaN propagates through both and through maximum.
        worst.copy_(maximum(worst, maximum(x.max(), x.min().neg()).unsqueeze(0)));
        var q = x.mul_(Scale).round_();                                   // exact scaling by 2^64, then the one rounding
        var hi = q.div(LowScale, rounding_mode: RoundingMode.floor);      // exact: q has at most 53 significant bits
        var lo = q.add_(hi, alpha: -LowScale);                            // the low 40 bits, in [0, 2^40): exact, FMA or not
        // A NaN, an infinity or an element past the bound converts to some int64 here; WriteMean poisons the step then.
        return (hi.to_type(ScalarType.Int64), lo.to_type(ScalarType.Int64));
    }

    /// <summary>
    /// ZeRO-2: one micro-batch's words, window by window: columns [c, c+w) of every shard's region are converted from
    /// the gradients (shard-major, as a reduce-scatter wants them), reduce-scattered, and this shard's part is added to
    /// its words. The transient buffers hold one window of every shard, never the whole model's words.
    /// </summary>
    void ScatterGradients()
    {
        var shards = Shards!;
        int dp = shards.Shards;
        var flats = parameters.Select(p => p.grad?.reshape(-1)).ToArray();
        try
        {
            for (long c = 0; c < shards.ShardWords; c += window)
            {
                using var scope = NewDisposeScope();
                long k = Math.Min(window, shards.ShardWords - c);
                var x = scratch.narrow(0, 0, dp * k);
                shards.FillWindow(x, flats, c, k);
                var (hi, lo) = ToWords(x);
                var own = empty(k, dtype: ScalarType.Int64, device: hi.device);
                scatter!(hi, own);
                High.narrow(0, c, k).add_(own);
                scatter(lo, own);
                Low.narrow(0, c, k).add_(own);
            }
        }
        finally
        {
            foreach (var f in flats) f?.Dispose();
        }
        foreach (var p in parameters) p.grad?.zero_();
    }

    /// <summary>
    /// Sets every parameter's <c>.grad</c> to the summed gradient divided by <paramref name="count"/> (the mean over the
    /// step's micro-batches of all ranks), in the parameter's dtype: one rounding from the exact sum. A step whose
    /// largest element reached <see cref="Bound"/> or was not finite gets NaN gradients, as a float sum would give.
    /// </summary>
    public void WriteMean(long count)
    {
        if (Shards is not null) throw new InvalidOperationException("the words are laid out in ZeRO shards: write one shard's mean with WriteShardMean");
        using var noGrad = no_grad();
        if (lone) { WriteLoneMean(count); return; }
        bool poisoned = !(worst.cpu().item<double>() < Bound);
        if (flat is not null) { WriteFlatMean(count, poisoned); return; }
        foreach (var (first, end) in chunks)
        {
            using var scope = NewDisposeScope();
            long start = offsets[first], n = offsets[end] - start;
            var high = High.narrow(0, start, n);
            var low = Low.narrow(0, start, n);
            var carry = low.div(1L << LowBits, rounding_mode: RoundingMode.floor); // lo sums are ≥ 0
            var hi = (high + carry).to_type(ScalarType.Float64);
            var lo = (low - carry * (1L << LowBits)).to_type(ScalarType.Float64); // canonical: [0, 2^40)
            var mean = hi.mul_(LowScale).add_(lo).div_(Scale).div_(count);
            if (poisoned) mean.fill_(double.NaN);
            for (int i = first; i < end; i++)
            {
                var p = parameters[i];
                var value = mean.narrow(0, offsets[i] - start, offsets[i + 1] - offsets[i]).view(p.shape);
                if (p.grad is { } g) g.copy_(value);
                else p.grad = value.to_type(p.dtype).clone().DetachFromDisposeScope();
            }
        }
    }

    /// <summary>
    /// Like <see cref="WriteMean"/>, for the rows of ZeRO shard <paramref name="shard"/> only (the words a reduce-scatter
    /// left summed in its region): those rows of every <c>.grad</c> get the mean, one rounding from the exact sum; the
    /// other rows are left as they are and are not read by the sharded update.
    /// </summary>
    public void WriteShardMean(long count, int shard)
    {
        var shards = Shards ?? throw new InvalidOperationException("the words are in parameter order: use WriteMean");
        using var noGrad = no_grad();
        bool poisoned = !(worst.cpu().item<double>() < Bound);
        if (ShardOnly && shard != OwnShard) throw new ArgumentException($"this sum keeps the words of shard {OwnShard} only, not of shard {shard}", nameof(shard));
        long region = ShardOnly ? shard * shards.ShardWords : 0; // where High[0] sits in the shard-major layout
        foreach (var piece in shards.ShardPieces(shard))
        {
            var p = parameters[piece.Param];
            if (p.grad is null) p.grad = zeros_like(p).DetachFromDisposeScope();
            if (piece.Count == 0) continue;
            using var scope = NewDisposeScope();
            var high = High.narrow(0, piece.Word - region, piece.Count);
            var low = Low.narrow(0, piece.Word - region, piece.Count);
            var rows = p.grad!.view(-1).narrow(0, piece.Element, piece.Count);
            if (NativeCpu && ExactWordKernels.Supports(rows)) { ExactWordKernels.WriteMean(high, low, rows, count, poisoned); continue; }
            var carry = low.div(1L << LowBits, rounding_mode: RoundingMode.floor);
            var hi = (high + carry).to_type(ScalarType.Float64);
            var lo = (low - carry * (1L << LowBits)).to_type(ScalarType.Float64);
            var mean = hi.mul_(LowScale).add_(lo).div_(Scale).div_(count);
            if (poisoned) mean.fill_(double.NaN);
            rows.copy_(mean);
        }
    }

    public void Dispose()
    {
        High.Dispose();
        Low.Dispose();
        scratch.Dispose();
        worst.Dispose();
        if (work is not null) foreach (var w in work) w.Dispose();
    }
}

/// <summary>
/// An exact sum of doubles (losses) in fixed point at 2^-40 (every float32 loss of magnitude 2^-16 or more is a multiple
/// of it), kept as one Int128 and exchanged as int64 words, so a step's loss is the same whatever ranks its micro-batches
/// ran on. A term that is not finite or not below 2^20 poisons the sum: it reads NaN.
/// </summary>
public struct ExactScalarSum
{
    const int FractionBits = 40, LowBits = 32;
    static readonly double Scale = Math.Pow(2, FractionBits), Limit = Math.Pow(2, 20);

    Int128 total;
    long poisoned;

    public void Add(double value)
    {
        if (!(Math.Abs(value) < Limit)) { poisoned++; return; }
        total += (Int128)Math.Round(value * Scale);
    }

    public readonly double Value => poisoned > 0 ? double.NaN : (double)total / Scale;

    /// <summary>
    /// Three int64 words whose sums over ranks <see cref="FromWords"/> reads back exactly: the high part (|total| &lt; 2^80
    /// for up to 2^20 terms, so below 2^48), the low 32 bits, and the count of poisoned terms.
    /// </summary>
    public readonly long[] Words => [(long)(total >> LowBits), (long)(total & uint.MaxValue), poisoned];

    public static ExactScalarSum FromWords(ReadOnlySpan<long> words) =>
        new() { total = ((Int128)words[0] << LowBits) + words[1], poisoned = words[2] };
}
