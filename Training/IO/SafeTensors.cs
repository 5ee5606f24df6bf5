// Writes safetensors files tensor by tensor and opens them for reading; the folder-level HF layout is HfWeights.
using System.Buffers;
using System.Buffers.Binary;
using System.Text.Encodings.Web;
using System.Text.Json;
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.IO;

/// <summary>
/// The safetensors format: an 8-byte little-endian header length N, N bytes of UTF-8 JSON
/// (name → {dtype, shape, data_offsets}, plus an optional "__metadata__" of strings), then the
/// tensors' little-endian row-major bytes packed without gaps.
/// </summary>
public static class SafeTensors
{
    /// <summary>The reference library refuses headers above 100 MB; so do we, so a corrupt length cannot ask for gigabytes.</summary>
    internal const long MaxHeaderBytes = 100_000_000;

    /// <summary>
    /// Writes <paramref name="tensors"/> to <paramref name="path"/>. Bytes go to a temporary file in
    /// the same folder, one tensor at a time (a non-CPU or non-contiguous tensor is copied alone),
    /// and the file is renamed over <paramref name="path"/> only when complete, so a failed save
    /// leaves any existing file untouched.
    /// </summary>
    public static void Save(
        string path,
        IEnumerable<KeyValuePair<string, Tensor>> tensors,
        IReadOnlyDictionary<string, string>? metadata = null)
    {
        ArgumentNullException.ThrowIfNull(path);
        ArgumentNullException.ThrowIfNull(tensors);
        EnsureLittleEndian();

        string full = Path.GetFullPath(path);
        string dir = Path.GetDirectoryName(full)!;
        // Same folder, so the final rename stays on one file system and is atomic.
        string temp = Path.Combine(dir, $".{Path.GetFileName(full)}.{Guid.NewGuid():N}.tmp");
        try
        {
            using (var stream = new FileStream(temp, FileMode.CreateNew, FileAccess.Write, FileShare.None, bufferSize: 1 << 20))
            {
                var plan = Plan(tensors);
                byte[] header = EncodeHeader(plan, metadata);
                Span<byte> prefix = stackalloc byte[8];
                BinaryPrimitives.WriteUInt64LittleEndian(prefix, (ulong)header.Length);
                stream.Write(prefix);
                stream.Write(header);

                using (no_grad())
                {
                    foreach (var entry in plan) WriteData(stream, entry);
                }

                long expected = 8 + header.Length + (plan.Count == 0 ? 0 : plan[^1].End);
                if (stream.Position != expected)
                {
                    throw new InvalidOperationException(
                        $"Wrote {stream.Position} bytes to {temp} but the header promised {expected}; a tensor changed during the save.");
                }
                stream.Flush(flushToDisk: true); // the rename must not publish a file whose bytes are still in the page cache only
            }
            File.Move(temp, full, overwrite: true);
        }
        catch
        {
            TryDelete(temp);
            throw;
        }
    }

    /// <summary>Opens <paramref name="path"/> and validates its header; no tensor data is read until asked for.</summary>
    public static SafeTensorsFile Open(string path)
    {
        ArgumentNullException.ThrowIfNull(path);
        EnsureLittleEndian();
        return SafeTensorsFile.OpenFile(path);
    }

    // ---- Writing ----

    internal sealed record PlannedTensor(string Name, Tensor Tensor, string Dtype, long[] Shape, long Begin, long End);

    /// <summary>Header entries in the reference library's order: descending dtype alignment, then name.</summary>
    private static List<PlannedTensor> Plan(IEnumerable<KeyValuePair<string, Tensor>> tensors)
    {
        var items = new List<(string Name, Tensor Tensor, string Dtype, int ItemSize, int Rank)>();
        var seen = new HashSet<string>(StringComparer.Ordinal);
        foreach (var (name, tensor) in tensors)
        {
            ArgumentNullException.ThrowIfNull(name, "tensor name");
            ArgumentNullException.ThrowIfNull(tensor, $"tensor '{name}'");
            if (name == "__metadata__") throw new ArgumentException("'__metadata__' is reserved by the format and cannot name a tensor.");
            if (!seen.Add(name)) throw new ArgumentException($"Tensor name '{name}' appears twice.");
            var (dtype, itemSize, rank) = SafeTensorDtype.Of(tensor.dtype, name);
            items.Add((name, tensor, dtype, itemSize, rank));
        }
        items.Sort((a, b) => a.Rank != b.Rank ? b.Rank.CompareTo(a.Rank) : string.CompareOrdinal(a.Name, b.Name));

        var plan = new List<PlannedTensor>(items.Count);
        long offset = 0;
        foreach (var (name, tensor, dtype, itemSize, _) in items)
        {
            long[] shape = tensor.shape;
            long bytes = checked(tensor.numel() * itemSize);
            plan.Add(new PlannedTensor(name, tensor, dtype, shape, offset, offset + bytes));
            offset += bytes;
        }
        return plan;
    }

    /// <summary>Compact JSON, "__metadata__" first, padded with spaces to a multiple of 8 so the data starts aligned.</summary>
    internal static byte[] EncodeHeader(IReadOnlyList<PlannedTensor> plan, IReadOnlyDictionary<string, string>? metadata)
    {
        var buffer = new ArrayBufferWriter<byte>();
        // The reference writer escapes only what JSON requires; the relaxed encoder is the closest match.
        using (var json = new Utf8JsonWriter(buffer, new JsonWriterOptions { Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping }))
        {
            json.WriteStartObject();
            if (metadata is { Count: > 0 })
            {
                json.WriteStartObject("__metadata__");
                foreach (var (key, value) in metadata.OrderBy(kv => kv.Key, StringComparer.Ordinal))
                {
                    json.WriteString(key, value ?? throw new ArgumentException($"Metadata value for '{key}' is null."));
                }
                json.WriteEndObject();
            }
            foreach (var t in plan)
            {
                json.WriteStartObject(t.Name);
                json.WriteString("dtype", t.Dtype);
                json.WriteStartArray("shape");
                foreach (long d in t.Shape) json.WriteNumberValue(d);
                json.WriteEndArray();
                json.WriteStartArray("data_offsets");
                json.WriteNumberValue(t.Begin);
                json.WriteNumberValue(t.End);
                json.WriteEndArray();
                json.WriteEndObject();
            }
            json.WriteEndObject();
        }
        int padded = (buffer.WrittenCount + 7) / 8 * 8;
        byte[] header = new byte[padded];
        buffer.WrittenSpan.CopyTo(header);
        header.AsSpan(buffer.WrittenCount).Fill((byte)' ');
        return header;
    }

    private static void WriteData(FileStream stream, PlannedTensor entry)
    {
        Tensor source = entry.Tensor;
        Tensor? copy = null;
        try
        {
            if (source.device_type != DeviceType.CPU) source = copy = source.to(CPU);
            if (!source.is_contiguous())
            {
                var contiguous = source.contiguous();
                copy?.Dispose();
                source = copy = contiguous;
            }
            long before = stream.Position;
            TensorBytes.ForEachChunk(source, chunk => stream.Write(chunk));
            if (stream.Position - before != entry.End - entry.Begin)
            {
                throw new InvalidOperationException(
                    $"Tensor '{entry.Name}' produced {stream.Position - before} bytes, expected {entry.End - entry.Begin}.");
            }
        }
        finally
        {
            copy?.Dispose();
        }
    }

    private static void TryDelete(string path)
    {
        try { File.Delete(path); }
        catch (IOException) { } // the original exception matters more than a leftover temp file
        catch (UnauthorizedAccessException) { }
    }

    internal static void EnsureLittleEndian()
    {
        // Tensor bytes are copied as they lie in memory; the format is little-endian.
        if (!BitConverter.IsLittleEndian) throw new PlatformNotSupportedException("safetensors I/O needs a little-endian machine.");
    }
}
