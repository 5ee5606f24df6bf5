// An open safetensors file: its validated header, and reads of whole tensors or row ranges by positioned I/O.
using System.Buffers.Binary;
using System.Text;
using System.Text.Json;
using Microsoft.Win32.SafeHandles;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.IO;

/// <summary>
/// A safetensors file opened by <see cref="SafeTensors.Open"/>. Only the header is read up front;
/// each <see cref="Read"/> reads just that tensor's bytes, so a reader that needs a few tensors (or a
/// few rows, when resharding) of a large checkpoint pays only for those.
/// </summary>
public sealed class SafeTensorsFile : IDisposable
{
    private readonly FileStream _stream;
    private readonly long _dataStart; // file offset of data offset 0: 8 + header length
    private readonly Dictionary<string, SafeTensorInfo> _byName;

    public string Path { get; }

    public IReadOnlyDictionary<string, string> Metadata { get; }

    /// <summary>Header entries in file (offset) order.</summary>
    public IReadOnlyList<SafeTensorInfo> Tensors { get; }

    private SafeTensorsFile(string path, FileStream stream, long dataStart, Dictionary<string, string> metadata, List<SafeTensorInfo> tensors)
    {
        Path = path;
        _stream = stream;
        _dataStart = dataStart;
        Metadata = metadata;
        Tensors = tensors;
        _byName = tensors.ToDictionary(t => t.Name, StringComparer.Ordinal);
    }

    public bool Contains(string name) => _byName.ContainsKey(name);

    /// <summary>The header entry for <paramref name="name"/>; <see cref="KeyNotFoundException"/> naming the file if absent.</summary>
    public SafeTensorInfo Info(string name) =>
        _byName.TryGetValue(name, out var info)
            ? info
            : throw new KeyNotFoundException($"Tensor '{name}' is not in {Path} ({_byName.Count} tensors).");

    /// <summary>Reads a whole tensor into a new CPU tensor, owned by the caller.</summary>
    public Tensor Read(string name)
    {
        var info = Info(name);
        return ReadInto(info, info.Shape, info.Begin);
    }

    /// <summary>
    /// Reads rows [<paramref name="start"/>, <paramref name="start"/> + <paramref name="count"/>) along
    /// dim 0 without touching the others' bytes: rows are contiguous in a row-major file.
    /// </summary>
    public Tensor ReadRows(string name, long start, long count)
    {
        var info = Info(name);
        if (info.Shape.Length == 0)
            throw new ArgumentException($"Tensor '{name}' in {Path} is a scalar; it has no rows to slice.", nameof(name));
        long rows = info.Shape[0];
        if (start < 0 || count < 0 || start > rows - count)
        {
            throw new ArgumentOutOfRangeException(nameof(start),
                $"Rows [{start}, {start + count}) are outside tensor '{name}' in {Path}, which has {rows} rows.");
        }
        long rowBytes = rows == 0 ? 0 : info.ByteLength / rows;
        long[] shape = [count, .. info.Shape.AsSpan(1)];
        return ReadInto(info, shape, info.Begin + start * rowBytes);
    }

    public void Dispose() => _stream.Dispose();

    private Tensor ReadInto(SafeTensorInfo info, long[] shape, long dataOffset)
    {
        var tensor = empty(shape, info.ScalarType);
        try
        {
            // RandomAccess reads at an explicit offset (pread), so concurrent reads of one file need no lock.
            SafeFileHandle handle = _stream.SafeFileHandle;
            long fileOffset = _dataStart + dataOffset;
            TensorBytes.ForEachChunk(tensor, chunk =>
            {
                while (!chunk.IsEmpty)
                {
                    int n = RandomAccess.Read(handle, chunk, fileOffset);
                    if (n == 0)
                    {
                        throw new InvalidDataException(
                            $"{Path} ended at byte {fileOffset} while reading tensor '{info.Name}'; the file was truncated after it was opened.");
                    }
                    chunk = chunk[n..];
                    fileOffset += n;
                }
            });
            return tensor;
        }
        catch
        {
            tensor.Dispose();
            throw;
        }
    }

    // ---- Header parsing and validation ----

    internal static SafeTensorsFile OpenFile(string path)
    {
        var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, bufferSize: 0, FileOptions.RandomAccess);
        try
        {
            long length = stream.Length;
            if (length < 8)
                throw Bad(path, $"the file is {length} bytes; expected at least the 8-byte header length");

            Span<byte> prefix = stackalloc byte[8];
            stream.ReadExactly(prefix);
            ulong headerLength = BinaryPrimitives.ReadUInt64LittleEndian(prefix);
            if (headerLength > (ulong)(length - 8))
                throw Bad(path, $"the header length is {headerLength} bytes but only {length - 8} bytes follow it");
            if (headerLength > SafeTensors.MaxHeaderBytes)
                throw Bad(path, $"the header length is {headerLength} bytes; expected at most {SafeTensors.MaxHeaderBytes}");

            byte[] header = new byte[headerLength];
            stream.ReadExactly(header);
            long dataStart = 8 + (long)headerLength;
            var (metadata, tensors) = ParseHeader(path, header, dataLength: length - dataStart);
            return new SafeTensorsFile(path, stream, dataStart, metadata, tensors);
        }
        catch
        {
            stream.Dispose();
            throw;
        }
    }

    private static (Dictionary<string, string>, List<SafeTensorInfo>) ParseHeader(string path, byte[] header, long dataLength)
    {
        JsonDocument doc;
        try
        {
            // Strict UTF-8 first: JsonDocument would otherwise accept some invalid sequences inside strings.
            _ = new UTF8Encoding(false, throwOnInvalidBytes: true).GetCharCount(header);
            doc = JsonDocument.Parse(header);
        }
        catch (Exception e) when (e is JsonException or DecoderFallbackException)
        {
            throw Bad(path, $"the header is not valid UTF-8 JSON ({e.Message})");
        }

        using (doc)
        {
            if (doc.RootElement.ValueKind != JsonValueKind.Object)
                throw Bad(path, $"the header is a JSON {doc.RootElement.ValueKind}; expected an object of tensor entries");

            var metadata = new Dictionary<string, string>(StringComparer.Ordinal);
            var tensors = new List<SafeTensorInfo>();
            var names = new HashSet<string>(StringComparer.Ordinal);
            foreach (var property in doc.RootElement.EnumerateObject())
            {
                if (!names.Add(property.Name))
                    throw Bad(path, $"the header names '{property.Name}' twice");
                if (property.Name == "__metadata__")
                    ParseMetadata(path, property.Value, metadata);
                else
                    tensors.Add(ParseEntry(path, property.Name, property.Value));
            }

            ValidateLayout(path, tensors, dataLength);
            return (metadata, tensors);
        }
    }

    private static void ParseMetadata(string path, JsonElement value, Dictionary<string, string> into)
    {
        if (value.ValueKind != JsonValueKind.Object)
            throw Bad(path, $"\"__metadata__\" is a JSON {value.ValueKind}; expected an object of strings");
        foreach (var p in value.EnumerateObject())
        {
            if (p.Value.ValueKind != JsonValueKind.String)
                throw Bad(path, $"metadata '{p.Name}' is a JSON {p.Value.ValueKind}; expected a string");
            into[p.Name] = p.Value.GetString()!;
        }
    }

    private static SafeTensorInfo ParseEntry(string path, string name, JsonElement entry)
    {
        if (entry.ValueKind != JsonValueKind.Object)
            throw Bad(path, $"tensor '{name}' is a JSON {entry.ValueKind}; expected {{\"dtype\", \"shape\", \"data_offsets\"}}");

        if (!entry.TryGetProperty("dtype", out var dtypeElement) || dtypeElement.ValueKind != JsonValueKind.String)
            throw Bad(path, $"tensor '{name}' has no string \"dtype\"");
        string dtype = dtypeElement.GetString()!;
        if (!SafeTensorDtype.TryParse(dtype, out _, out int itemSize))
            throw Bad(path, $"tensor '{name}' has unknown dtype '{dtype}'; expected one of {SafeTensorDtype.KnownNames}");

        long[] shape = ReadNonNegativeArray(path, name, entry, "shape", expectedLength: null);
        long[] offsets = ReadNonNegativeArray(path, name, entry, "data_offsets", expectedLength: 2);
        long begin = offsets[0], end = offsets[1];
        if (end < begin)
            throw Bad(path, $"tensor '{name}' has data_offsets [{begin}, {end}], which end before they begin");

        long bytes;
        try
        {
            bytes = itemSize;
            foreach (long d in shape) bytes = checked(bytes * d);
        }
        catch (OverflowException)
        {
            throw Bad(path, $"tensor '{name}' has shape [{string.Join(", ", shape)}], whose byte size overflows");
        }
        if (end - begin != bytes)
        {
            throw Bad(path,
                $"tensor '{name}' is {dtype} [{string.Join(", ", shape)}], which is {bytes} bytes, but its data_offsets [{begin}, {end}] span {end - begin}");
        }
        return new SafeTensorInfo(name, dtype, shape, begin, end);
    }

    private static long[] ReadNonNegativeArray(string path, string name, JsonElement entry, string field, int? expectedLength)
    {
        if (!entry.TryGetProperty(field, out var array) || array.ValueKind != JsonValueKind.Array)
            throw Bad(path, $"tensor '{name}' has no \"{field}\" array");
        int n = array.GetArrayLength();
        if (expectedLength is int expected && n != expected)
            throw Bad(path, $"tensor '{name}' has {n} \"{field}\" values; expected {expected}");
        var values = new long[n];
        int i = 0;
        foreach (var item in array.EnumerateArray())
        {
            if (item.ValueKind != JsonValueKind.Number || !item.TryGetInt64(out long v) || v < 0)
                throw Bad(path, $"tensor '{name}' has \"{field}\" value {item.GetRawText()}; expected a non-negative integer");
            values[i++] = v;
        }
        return values;
    }

    /// <summary>
    /// Sorts entries by offset and checks they tile the data section exactly: each begins where the
    /// previous ends (no overlap, no gap) and the last ends at the end of the file.
    /// </summary>
    private static void ValidateLayout(string path, List<SafeTensorInfo> tensors, long dataLength)
    {
        // Ties (several empty tensors at one offset) keep a stable order by name.
        tensors.Sort((a, b) => a.Begin != b.Begin ? a.Begin.CompareTo(b.Begin)
            : a.End != b.End ? a.End.CompareTo(b.End) : string.CompareOrdinal(a.Name, b.Name));

        foreach (var t in tensors)
        {
            if (t.End > dataLength)
            {
                throw Bad(path,
                    $"tensor '{t.Name}' has data_offsets [{t.Begin}, {t.End}] but the data section is only {dataLength} bytes (the file is truncated or the offsets are out of range)");
            }
        }

        long expectedBegin = 0;
        SafeTensorInfo? previous = null;
        foreach (var t in tensors)
        {
            if (t.Begin < expectedBegin)
            {
                throw Bad(path,
                    $"tensor '{t.Name}' at [{t.Begin}, {t.End}] overlaps tensor '{previous!.Name}' at [{previous.Begin}, {previous.End}]");
            }
            if (t.Begin > expectedBegin)
            {
                throw Bad(path,
                    $"tensor '{t.Name}' begins at data offset {t.Begin}; expected {expectedBegin} (tensors must be packed without gaps)");
            }
            expectedBegin = t.End;
            previous = t;
        }
        if (expectedBegin != dataLength)
        {
            throw Bad(path,
                $"the data section is {dataLength} bytes but the tensors cover {expectedBegin}; expected them to end exactly at the end of the file");
        }
    }

    private static InvalidDataException Bad(string path, string what) => new($"{path} is not a valid safetensors file: {what}.");
}
