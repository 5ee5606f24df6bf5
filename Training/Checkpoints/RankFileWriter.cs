// Writes one rank's safetensors file and hashes its bytes on the way out, so the SHA-256 costs no second read.
using System.Buffers.Binary;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Security.Cryptography;
using DeepSeekCluster.Training.IO;
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Checkpoints;

/// <summary>
/// The same bytes <see cref="SafeTensors.Save"/> would write for these tensors (same header, same order), written to a
/// temporary file, fsynced and renamed into place; returns the file's size and SHA-256, and with
/// <paramref name="chunkBytes"/> the XXH128 of each chunk of the file too (see <see cref="ManifestFile.ChunkXxh128"/>).
/// </summary>
internal static class RankFileWriter
{
    public static ManifestFile Write(string path, IReadOnlyList<KeyValuePair<string, Tensor>> tensors, long? chunkBytes = null,
        ChunkHashAlgorithm chunkAlgorithm = ChunkHashAlgorithm.Xxh128)
    {
        using var writing = new RankFileWriting(path, tensors, chunkBytes, chunkAlgorithm);
        while (writing.WriteNext()) { }
        return writing.Finish();
    }
}

/// <summary>
/// One rank file (<see cref="RankFileWriter"/>'s bytes) written a piece at a time: the header, then at most 64 MiB of one
/// tensor per <see cref="WriteNext"/>, each hashed on its way out. Between two pieces the write may change threads (one
/// at a time): the async saver's SCHED_IDLE thread hands what is left to a thread at normal priority when someone waits
/// for the save. Disposed unfinished, it deletes its temporary file.
/// </summary>
internal sealed class RankFileWriting : IDisposable
{
    /// <summary>Most bytes of one tensor a piece writes: the unit of hand-over between threads.</summary>
    const long PieceBytes = 64L << 20;

    readonly string full, temp;
    readonly List<SafeTensors.PlannedTensor> plan;
    readonly byte[] header;
    readonly long dataBytes;
    readonly long? chunkBytes;
    readonly ChunkHashAlgorithm chunkAlgorithm;
    readonly IncrementalHash hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
    readonly ChunkHasher? chunks;
    readonly FileStream stream;
    int entry = -1;       // the tensor being written; -1: the header is next
    long element;         // its next element
    Tensor? converted;    // its CPU-contiguous copy, when it was not CPU-contiguous itself
    bool renamed;

    public RankFileWriting(string path, IReadOnlyList<KeyValuePair<string, Tensor>> tensors, long? chunkBytes, ChunkHashAlgorithm chunkAlgorithm)
    {
        if (chunkBytes < 1) throw new ArgumentOutOfRangeException(nameof(chunkBytes), $"chunk hashes need chunks of at least 1 byte, not {chunkBytes}");
        SafeTensors.EnsureLittleEndian();
        full = Path.GetFullPath(path);
        Directory.CreateDirectory(Path.GetDirectoryName(full)!);
        temp = Path.Combine(Path.GetDirectoryName(full)!, $".{Path.GetFileName(full)}.{Guid.NewGuid():N}.tmp");

        var ordered = tensors
            .Select(kv => (kv.Key, kv.Value, Info: SafeTensorDtype.Of(kv.Value.dtype, kv.Key)))
            .OrderByDescending(e => e.Info.Rank).ThenBy(e => e.Key, StringComparer.Ordinal).ToList();
        plan = new List<SafeTensors.PlannedTensor>(ordered.Count);
        foreach (var (name, t, info) in ordered)
        {
            long bytes = checked(t.numel() * info.ItemSize);
            plan.Add(new SafeTensors.PlannedTensor(name, t, info.Name, t.shape, dataBytes, dataBytes + bytes));
            dataBytes += bytes;
        }
        header = SafeTensors.EncodeHeader(plan, new Dictionary<string, string> { ["format"] = "pt" });
        this.chunkBytes = chunkBytes;
        this.chunkAlgorithm = chunkAlgorithm;
        chunks = chunkBytes is { } c ? new ChunkHasher(c, chunkAlgorithm) : null;
        stream = new FileStream(temp, FileMode.CreateNew, FileAccess.Write, FileShare.None, bufferSize: 0);
    }

    // XXH128 runs at memory speed, so the chunk hashes ride along on the writing thread: only the whole-file SHA-256
    // (what the store verifies at commit) costs the save real CPU.
    void Put(ReadOnlySpan<byte> bytes) { hash.AppendData(bytes); chunks?.Append(bytes); stream.Write(bytes); }

    /// <summary>Writes the next piece; false when every byte is written (then <see cref="Finish"/>).</summary>
    public bool WriteNext()
    {
        if (entry < 0)
        {
            Span<byte> prefix = stackalloc byte[8];
            BinaryPrimitives.WriteUInt64LittleEndian(prefix, (ulong)header.Length);
            Put(prefix);
            Put(header);
            entry = 0;
            return true;
        }
        using var noGrad = no_grad();
        for (; entry < plan.Count; entry++, element = 0)
        {
            var source = plan[entry].Tensor;
            if (element == 0 && converted is null && (source.device_type != DeviceType.CPU || !source.is_contiguous()))
                converted = source.cpu().contiguous();
            var t = converted ?? source;
            long n = t.numel();
            if (element < n)
            {
                long count = Math.Min(Math.Max(1, PieceBytes / t.ElementSize), n - element);
                if (count == n) Put(t.bytes);
                else
                {
                    using var flat = t.view(-1); // shares storage; a narrow of it starts at the right byte
                    using var part = flat.narrow(0, element, count);
                    Put(part.bytes);
                }
                element += count;
                if (element < n) return true;
            }
            converted?.Dispose();
            converted = null;
            if (element > 0) { entry++; element = 0; return true; }
        }
        return false;
    }

    /// <summary>Checks the size, fsyncs, renames the file into place; the file's manifest entry.</summary>
    public ManifestFile Finish()
    {
        if (entry < plan.Count) throw new InvalidOperationException($"{temp} is finished with {plan.Count - Math.Max(0, entry)} tensors not yet written");
        long size = stream.Position;
        if (size != 8 + header.Length + dataBytes)
            throw new InvalidOperationException($"wrote {size} bytes to {temp}, the header promised {8 + header.Length + dataBytes}");
        stream.Flush(flushToDisk: true);
        stream.Dispose();
        File.Move(temp, full, overwrite: true);
        renamed = true;
        return new ManifestFile(Path.GetFileName(full), size, Convert.ToHexStringLower(hash.GetHashAndReset()))
        {
            ChunkBytes = chunkBytes,
            ChunkXxh128 = chunkAlgorithm == ChunkHashAlgorithm.Xxh128 ? chunks?.Finish() : null,
            ChunkSha256 = chunkAlgorithm == ChunkHashAlgorithm.Sha256 ? chunks?.Finish() : null,
        };
    }

    public void Dispose()
    {
        converted?.Dispose();
        stream.Dispose();
        hash.Dispose();
        chunks?.Dispose();
        if (!renamed)
            try { File.Delete(temp); } catch (IOException) { }
    }
}

/// <summary>
/// Spans over native (tensor) memory carried across threads as an address: the memory is not the GC's, so it does not
/// move, and the owner keeps the tensor alive until every user is done.
/// </summary>
internal static unsafe class NativeSpan
{
    public static (nint Address, int Length) Of(Span<byte> bytes) => ((nint)Unsafe.AsPointer(ref MemoryMarshal.GetReference(bytes)), bytes.Length);
    public static Span<byte> At(nint address, int length) => new((void*)address, length);
}
