// The exact gradient sum over the optimizer's flat gradient buffers: words converted from and means written into them
// in large chunks, through buffers kept across steps, with no per-parameter copy in or out.
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Engine;

public sealed partial class ExactGradientSum
{
    readonly Func<IReadOnlyList<Tensor>>? flat;  // the gradient buffers, whose elements the words follow back to back
    readonly long[]? flatSizes;
    readonly long flatChunk;
    readonly Tensor[]? work; // two float64 and two int64 chunks: the conversion's temporaries, allocated once

    /// <summary>
    /// Elements converted at once over flat buffers: 2^20 on a CPU (8 MiB of float64; the temporaries, allocated once,
    /// never fault in fresh pages as the per-parameter path's 32 MiB ones, fresh from mmap each chunk, do), 2^24 on a
    /// GPU. Smaller CPU chunks keep the passes in cache but multiply the calls: at 2^16 a loaded machine (load 35) made
    /// the add 4× slower than the per-parameter path, each of ~13,000 two-thread calls waiting for a descheduled thread.
    /// </summary>
    public static long DefaultFlatChunk(Device device) => device.type == TorchSharp.DeviceType.CPU ? 1L << 20 : 1L << 24;

    /// <summary>Whether the words follow flat gradient buffers (<see cref="OverFlatBuffers"/>) rather than parameters.</summary>
    public bool OverFlat => flat is not null;

    /// <summary>
    /// A sum whose words follow the elements of <paramref name="buffers"/> back to back: the flat gradient buffers every
    /// parameter's <c>.grad</c> is a view of (AdamW.AdoptGradients). Each micro-batch's words are converted from them and
    /// they are zeroed, and the mean is written into them, chunk by chunk, with no copy per parameter. The words are the
    /// same integers as <see cref="ExactGradientSum(IReadOnlyList{Tensor}, long)"/>'s, element for element, in another
    /// order; every operation on them is elementwise (the largest magnitude is a max), so the mean has the same bits.
    /// <paramref name="buffers"/> is called before every read or write: the optimizer re-attaches a gradient that
    /// something replaced since (its values move into the buffer). It must return the same buffers every time.
    /// </summary>
    public static ExactGradientSum OverFlatBuffers(Func<IReadOnlyList<Tensor>> buffers, long? chunkElements = null) => new(buffers, chunkElements);

    ExactGradientSum(Func<IReadOnlyList<Tensor>> buffers, long? chunkElements)
    {
        var first = buffers();
        if (first.Count == 0) throw new ArgumentException("no gradient buffers to sum", nameof(buffers));
        foreach (var b in first)
            if (b.dim() != 1 || !b.is_contiguous() || !b.is_floating_point() || b.device.ToString() != first[0].device.ToString())
                throw new ArgumentException($"gradient buffers must be flat, contiguous, floating point and on one device; got [{string.Join(", ", b.shape)}] {b.dtype} on {b.device}", nameof(buffers));
        var device = first[0].device;
        flatChunk = chunkElements ?? DefaultFlatChunk(device);
        if (flatChunk < 1) throw new ArgumentOutOfRangeException(nameof(chunkElements), flatChunk, "a chunk must hold at least one element");
        flat = buffers;
        flatSizes = [.. first.Select(b => b.numel())];
        parameters = [];
        offsets = [0];
        chunks = [];
        High = zeros(flatSizes.Sum(), dtype: ScalarType.Int64, device: device).DetachFromDisposeScope();
        Low = zeros(flatSizes.Sum(), dtype: ScalarType.Int64, device: device).DetachFromDisposeScope();
        long w = Math.Min(flatChunk, flatSizes.Max());
        work = [.. new[] { ScalarType.Float64, ScalarType.Float64, ScalarType.Int64, ScalarType.Int64 }.Select(t => empty(w, dtype: t, device: device).DetachFromDisposeScope())];
        scratch = empty(0, dtype: ScalarType.Float64, device: device).DetachFromDisposeScope();
        worst = zeros(1, dtype: ScalarType.Float64, device: device).DetachFromDisposeScope();
    }

    IReadOnlyList<Tensor> FlatBuffers()
    {
        var buffers = flat!();
        if (buffers.Count != flatSizes!.Length || buffers.Select(b => b.numel()).Where((n, i) => n != flatSizes[i]).Any())
            throw new InvalidOperationException($"the gradient buffers changed: {buffers.Count} of [{string.Join(", ", buffers.Select(b => b.numel()))}] elements, the sum was made for [{string.Join(", ", flatSizes)}]");
        return buffers;
    }

    /// <summary>The chunks of every buffer: the buffer's elements [c, +k) and where their words start.</summary>
    IEnumerable<(Tensor Buffer, long C, long K, long Word)> FlatChunks(IReadOnlyList<Tensor> buffers, long? chunk = null)
    {
        long at = 0, size = chunk ?? flatChunk;
        foreach (var b in buffers)
        {
            long n = b.numel();
            for (long c = 0; c < n; c += size) yield return (b, c, Math.Min(size, n - c), at + c);
            at += n;
        }
    }

    /// <summary>
    /// Elements per call of the one-pass CPU kernels: they allocate nothing, so only a span's 2 GiB (the int64 words)
    /// bounds it; each call splits its elements over torch's threads.
    /// </summary>
    const long NativeChunk = 1L << 24;

    /// <summary>Whether the one-pass CPU kernels (<see cref="NativeCpu"/>) take every flat buffer.</summary>
    bool NativeFlat(IReadOnlyList<Tensor> buffers) => NativeCpu && buffers.All(ExactWordKernels.Supports);

    /// <summary><see cref="ToWords"/>'s arithmetic, in place in the work buffers: the same kernels, so the same words.</summary>
    void AddFlat()
    {
        var buffers = FlatBuffers();
        if (NativeFlat(buffers))
        {
            double seen = 0;
            foreach (var (buffer, c, k, word) in FlatChunks(buffers, NativeChunk))
            {
                using var scope = NewDisposeScope();
                seen = Math.Max(seen, ExactWordKernels.AddAndZero(buffer.narrow(0, c, k), High.narrow(0, word, k), Low.narrow(0, word, k)));
            }
            worst.fill_(Math.Max(worst.item<double>(), seen)); // Math.Max propagates NaN, as torch's maximum
            return;
        }
        var (x64, hi64, hiWords, loWords) = (work![0], work[1], work[2], work[3]);
        foreach (var (buffer, c, k, word) in FlatChunks(buffers))
        {
            using var scope = NewDisposeScope();
            var grads = buffer.narrow(0, c, k);
            var x = x64.narrow(0, 0, k).copy_(grads);
            grads.zero_(); // the next backward accumulates into zeros: 0 + g is g exactly
            worst.copy_(maximum(worst, maximum(x.max(), x.min().neg()).unsqueeze(0)));
            var q = x.mul_(Scale).round_();
            var hi = hi64.narrow(0, 0, k).copy_(q).div_(LowScale, rounding_mode: RoundingMode.floor);
            var lo = q.add_(hi, alpha: -LowScale);
            High.narrow(0, word, k).add_(hiWords.narrow(0, 0, k).copy_(hi));
            Low.narrow(0, word, k).add_(loWords.narrow(0, 0, k).copy_(lo));
        }
    }

    /// <summary><see cref="WriteMean"/>'s arithmetic over the flat words, written into the gradient buffers in their dtype.</summary>
    void WriteFlatMean(long count, bool poisoned)
    {
        var buffers = FlatBuffers();
        if (NativeFlat(buffers))
        {
            foreach (var (buffer, c, k, word) in FlatChunks(buffers, NativeChunk))
            {
                using var scope = NewDisposeScope();
                ExactWordKernels.WriteMean(High.narrow(0, word, k), Low.narrow(0, word, k), buffer.narrow(0, c, k), count, poisoned);
            }
            return;
        }
        var (lo64, hi64, carryWords, loWords) = (work![0], work[1], work[2], work[3]);
        foreach (var (buffer, c, k, word) in FlatChunks(buffers))
        {
            using var scope = NewDisposeScope();
            var high = High.narrow(0, word, k);
            var low = Low.narrow(0, word, k);
            var carry = carryWords.narrow(0, 0, k).copy_(low).div_(1L << LowBits, rounding_mode: RoundingMode.floor); // lo sums are ≥ 0
            var lo = loWords.narrow(0, 0, k).copy_(carry).mul_(-(1L << LowBits)).add_(low); // low − carry·2^40: the same integer
            var hi = hi64.narrow(0, 0, k).copy_(carry.add_(high));
            var mean = hi.mul_(LowScale).add_(lo64.narrow(0, 0, k).copy_(lo)).div_(Scale).div_(count);
            if (poisoned) mean.fill_(double.NaN);
            buffer.narrow(0, c, k).copy_(mean);
        }
    }
}
