// Reads the header of a safetensors blob with two ranged reads, to locate one tensor's bytes; it never reads tensor data.
using System.Buffers.Binary;
using System.Text.Json;
using Grpc.Core;

namespace DeepSeekCluster.CheckpointStore.Services;

/// <summary>One tensor's place in a file: its data lies at [<see cref="Begin"/>, <see cref="End"/>) counted from the file's start.</summary>
internal sealed record TensorLocation(string Dtype, long[] Shape, long Begin, long End);

internal static class SafeTensorsHeader
{
    private const long MaxHeaderBytes = 100_000_000; // the reference library's limit: a corrupt length cannot ask for gigabytes

    /// <summary>The location of <paramref name="tensor"/>, or null if the file does not hold it.</summary>
    public static async Task<TensorLocation?> FindAsync(
        Func<long, Memory<byte>, Task> read, string fileName, long fileSize, string tensor)
    {
        if (fileSize < 8) throw Bad(fileName, $"it is {fileSize} bytes, shorter than the 8-byte header length");
        byte[] prefix = new byte[8];
        await read(0, prefix);
        ulong headerLength = BinaryPrimitives.ReadUInt64LittleEndian(prefix);
        if (headerLength > MaxHeaderBytes || headerLength > (ulong)(fileSize - 8))
            throw Bad(fileName, $"its header length {headerLength} exceeds the file ({fileSize} bytes) or {MaxHeaderBytes} bytes");
        byte[] header = new byte[headerLength];
        await read(8, header);
        long dataStart = 8 + (long)headerLength;

        JsonDocument doc;
        try { doc = JsonDocument.Parse(header); }
        catch (JsonException e) { throw Bad(fileName, $"its header is not JSON ({e.Message})"); }
        using (doc)
        {
            if (doc.RootElement.ValueKind != JsonValueKind.Object || !doc.RootElement.TryGetProperty(tensor, out var entry) || tensor == "__metadata__")
                return null;
            try
            {
                string dtype = entry.GetProperty("dtype").GetString() ?? throw new InvalidOperationException("null dtype");
                long[] shape = entry.GetProperty("shape").EnumerateArray().Select(e => e.GetInt64()).ToArray();
                long[] offsets = entry.GetProperty("data_offsets").EnumerateArray().Select(e => e.GetInt64()).ToArray();
                if (offsets.Length != 2 || offsets[0] < 0 || offsets[1] < offsets[0] || dataStart + offsets[1] > fileSize)
                    throw Bad(fileName, $"tensor '{tensor}' has data_offsets [{string.Join(", ", offsets)}] outside the {fileSize - dataStart}-byte data section");
                return new TensorLocation(dtype, shape, dataStart + offsets[0], dataStart + offsets[1]);
            }
            catch (Exception e) when (e is KeyNotFoundException or InvalidOperationException or FormatException)
            {
                throw Bad(fileName, $"tensor '{tensor}' has a malformed entry ({e.Message})");
            }
        }
    }

    private static RpcException Bad(string fileName, string what) =>
        new(new Status(StatusCode.DataLoss, $"{fileName} is not a valid safetensors file: {what}."));
}
