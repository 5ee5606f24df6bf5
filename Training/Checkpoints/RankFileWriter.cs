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
        if (chunkBytes < 1) throw new ArgumentOutOfRangeException(nameof(chunkBytes), $"chunk hashes need chunks of at least 1 byte, not {chunkBytes}");
        SafeTensors.EnsureLittleEndian();
        string full = Path.GetFullPath(path);
        Directory.CreateDirectory(Path.GetDirectoryName(full)!);
        string temp = Path.Combine(Path.GetDirectoryName(full)!, $".{Path.GetFileName(full)}.{Guid.NewGuid():N}.tmp");

        var ordered = tensors
            .Select(kv => (kv.Key, kv.Value, Info: SafeTensorDtype.Of(kv.Value.dtype, kv.Key)))
            .OrderByDescending(e => e.Info.Rank).ThenBy(e => e.Key, StringComparer.Ordinal).ToList();
        var plan = new List<SafeTensors.PlannedTensor>(ordered.Count);
        long offset = 0;
        foreach (var (name, t, info) in ordered)
        {
            long bytes = checked(t.numel() * info.ItemSize);
            plan.Add(new SafeTensors.PlannedTensor(name, t, info.Name, t.shape, offset, offset + bytes));
            offset += bytes;
        }
        byte[] header = SafeTensors.EncodeHeader(plan, new Dictionary<string, string> { ["format"] = "pt" });

        using var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        using var chunks = chunkBytes is { } c ? new ChunkHasher(c, chunkAlgorithm) : null;
        try
        {
            long size;
            using (var stream = new FileStream(temp, FileMode.CreateNew, FileAccess.Write, FileShare.None, bufferSize: 0))
            {
                // XXH128 runs at memory speed, so the chunk hashes ride along on this thread: only the whole-file SHA-256
                // (what the store verifies at commit) costs the save real CPU.
                void Put(ReadOnlySpan<byte> bytes) { hash.AppendData(bytes); chunks?.Append(bytes); stream.Write(bytes); }
                void PutTensorBytes(Span<byte> bytes) => Put(bytes);
                Span<byte> prefix = stackalloc byte[8];
                BinaryPrimitives.WriteUInt64LittleEndian(prefix, (ulong)header.Length);
                Put(prefix);
                Put(header);
                using (no_grad())
                {
                    foreach (var entry in plan)
                    {
                        var source = entry.Tensor;
                        using var copy = source.device_type != DeviceType.CPU || !source.is_contiguous() ? source.cpu().contiguous() : null;
                        TensorBytes.ForEachChunk(copy ?? source, PutTensorBytes);
                    }
                }
                size = stream.Position;
                if (size != 8 + header.Length + offset)
                    throw new InvalidOperationException($"wrote {size} bytes to {temp}, the header promised {8 + header.Length + offset}");
                stream.Flush(flushToDisk: true);
            }
            File.Move(temp, full, overwrite: true);
            return new ManifestFile(Path.GetFileName(full), size, Convert.ToHexStringLower(hash.GetHashAndReset()))
            {
                ChunkBytes = chunkBytes,
                ChunkXxh128 = chunkAlgorithm == ChunkHashAlgorithm.Xxh128 ? chunks?.Finish() : null,
                ChunkSha256 = chunkAlgorithm == ChunkHashAlgorithm.Sha256 ? chunks?.Finish() : null,
            };
        }
        catch
        {
            try { File.Delete(temp); } catch (IOException) { }
            throw;
        }
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
