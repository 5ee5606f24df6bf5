// The per-chunk hashes of checkpoint files: XXH128 for what writers record now, SHA-256 for manifests written before it.
using System.IO.Hashing;
using System.Security.Cryptography;

namespace DeepSeekCluster.Training.Checkpoints;

/// <summary>An incremental hash whose result is lower-case hex; reset by <see cref="FinishHex"/> for the next chunk.</summary>
public interface IChunkHash : IDisposable
{
    void Append(ReadOnlySpan<byte> bytes);
    string FinishHex();
}

public static class ChunkHash
{
    public static IChunkHash Create(ChunkHashAlgorithm algorithm) => algorithm switch
    {
        ChunkHashAlgorithm.Xxh128 => new Xxh128(),
        ChunkHashAlgorithm.Sha256 => new Sha256(),
        _ => throw new ArgumentOutOfRangeException(nameof(algorithm), algorithm, "expected Xxh128 or Sha256"),
    };

    /// <summary>XXH128 of <paramref name="bytes"/> as lower-case hex of the canonical (big-endian) 16 bytes.</summary>
    public static string Xxh128Hex(ReadOnlySpan<byte> bytes) => Convert.ToHexStringLower(XxHash128.Hash(bytes));

    sealed class Xxh128 : IChunkHash
    {
        readonly XxHash128 hash = new();
        public void Append(ReadOnlySpan<byte> bytes) => hash.Append(bytes);
        public string FinishHex() => Convert.ToHexStringLower(hash.GetHashAndReset());
        public void Dispose() { }
    }

    sealed class Sha256 : IChunkHash
    {
        readonly IncrementalHash hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        public void Append(ReadOnlySpan<byte> bytes) => hash.AppendData(bytes);
        public string FinishHex() => Convert.ToHexStringLower(hash.GetHashAndReset());
        public void Dispose() => hash.Dispose();
    }
}

/// <summary>Hashes of consecutive <c>chunkBytes</c>-byte ranges of a byte stream appended in order, the last range shorter.</summary>
public sealed class ChunkHasher(long chunkBytes, ChunkHashAlgorithm algorithm = ChunkHashAlgorithm.Xxh128) : IDisposable
{
    readonly IChunkHash current = ChunkHash.Create(algorithm);
    readonly List<string> done = [];
    long filled;

    public long ChunkBytes => chunkBytes;
    /// <summary>Chunks closed so far.</summary>
    public IReadOnlyList<string> Done => done;

    public void Append(ReadOnlySpan<byte> bytes)
    {
        while (!bytes.IsEmpty)
        {
            int n = (int)Math.Min(bytes.Length, chunkBytes - filled);
            current.Append(bytes[..n]);
            bytes = bytes[n..];
            if ((filled += n) == chunkBytes) Close();
        }
    }

    public IReadOnlyList<string> Finish()
    {
        if (filled > 0) Close();
        return done;
    }

    void Close()
    {
        done.Add(current.FinishHex());
        filled = 0;
    }

    public void Dispose() => current.Dispose();
}
