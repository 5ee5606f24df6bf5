// Raw-byte access to contiguous CPU tensors in bounded chunks; not a general tensor copy helper.
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.IO;

/// <summary>Receives one chunk of a tensor's storage (a span cannot be a generic argument).</summary>
internal delegate void ByteChunkAction(Span<byte> chunk);

internal static class TensorBytes
{
    // Tensor.bytes is a Span, so it cannot cover more than 2 GiB; big tensors (an embedding of a
    // large vocabulary, an expert stack) are visited as 1-D views of at most this many bytes.
    private const long ChunkBytes = 64L << 20;

    /// <summary>
    /// Calls <paramref name="visit"/> on the tensor's bytes in storage order. The tensor must be
    /// contiguous and on the CPU; writing into the spans writes into the tensor.
    /// </summary>
    public static void ForEachChunk(Tensor t, ByteChunkAction visit)
    {
        long n = t.numel();
        if (n == 0) return;
        long perChunk = Math.Max(1, ChunkBytes / t.ElementSize);
        if (n <= perChunk)
        {
            visit(t.bytes);
            return;
        }
        using var flat = t.view(-1); // shares storage; a narrow of it starts at the right byte
        for (long i = 0; i < n; i += perChunk)
        {
            using var part = flat.narrow(0, i, Math.Min(perChunk, n - i));
            visit(part.bytes);
        }
    }
}
