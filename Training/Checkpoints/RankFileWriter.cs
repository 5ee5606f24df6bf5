// Writes one rank's safetensors file and hashes its bytes on the way out, so the SHA-256 costs no second read.
using System.Buffers.Binary;
using System.Security.Cryptography;
using DeepSeekCluster.Training.IO;
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Checkpoints;

/// <summary>
/// The same bytes <see cref="SafeTensors.Save"/> would write for these tensors (same header, same order), written to a
/// temporary file, fsynced and renamed into place; returns the file's size and SHA-256.
/// </summary>
internal static class RankFileWriter
{
    public static ManifestFile Write(string path, IReadOnlyList<KeyValuePair<string, Tensor>> tensors)
    {
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
        try
        {
            long size;
            using (var stream = new FileStream(temp, FileMode.CreateNew, FileAccess.Write, FileShare.None, bufferSize: 0))
            {
                void Put(ReadOnlySpan<byte> bytes) { hash.AppendData(bytes); stream.Write(bytes); }
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
                        TensorBytes.ForEachChunk(copy ?? source, chunk => Put(chunk));
                    }
                }
                size = stream.Position;
                if (size != 8 + header.Length + offset)
                    throw new InvalidOperationException($"wrote {size} bytes to {temp}, the header promised {8 + header.Length + offset}");
                stream.Flush(flushToDisk: true);
            }
            File.Move(temp, full, overwrite: true);
            return new ManifestFile(Path.GetFileName(full), size, Convert.ToHexStringLower(hash.GetHashAndReset()));
        }
        catch
        {
            try { File.Delete(temp); } catch (IOException) { }
            throw;
        }
    }
}
