// ggml's tensor encodings F32, F16, Q8_0 and Q4_0, byte for byte as ggml's reference quantizers write them (and back).
using System.Buffers.Binary;

namespace DeepSeekCluster.Training.Export;

/// <summary>
/// Block formats (32 values per block): Q8_0 = fp16 scale d + 32 int8, value = d * q;
/// Q4_0 = fp16 scale d + 16 bytes of 4-bit q (element j in the low nibble of byte j, element j+16 in its high nibble),
/// value = d * (q - 8). The rounding follows ggml's quantize_row_*_ref so a file matches what llama-quantize writes.
/// </summary>
public static class GgmlQuant
{
    public const int BlockSize = 32;
    const int Q8Bytes = 2 + BlockSize;
    const int Q4Bytes = 2 + BlockSize / 2;

    public static ulong ByteSize(GgmlType type, ulong elements) => type switch
    {
        GgmlType.F32 => elements * 4,
        GgmlType.F16 => elements * 2,
        GgmlType.Q8_0 => elements / BlockSize * Q8Bytes,
        GgmlType.Q4_0 => elements / BlockSize * Q4Bytes,
        _ => throw new ArgumentOutOfRangeException(nameof(type), type, "no ggml encoding for this type"),
    };

    public static byte[] Encode(GgmlType type, ReadOnlySpan<float> x)
    {
        var bytes = new byte[ByteSize(type, (ulong)x.Length)];
        var span = bytes.AsSpan();
        switch (type)
        {
            case GgmlType.F32:
                for (int i = 0; i < x.Length; i++) BinaryPrimitives.WriteSingleLittleEndian(span[(4 * i)..], x[i]);
                break;
            case GgmlType.F16:
                for (int i = 0; i < x.Length; i++) BinaryPrimitives.WriteHalfLittleEndian(span[(2 * i)..], (Half)x[i]);
                break;
            case GgmlType.Q8_0:
                for (int b = 0; b < x.Length / BlockSize; b++) EncodeQ8Block(x.Slice(b * BlockSize, BlockSize), span.Slice(b * Q8Bytes, Q8Bytes));
                break;
            case GgmlType.Q4_0:
                for (int b = 0; b < x.Length / BlockSize; b++) EncodeQ4Block(x.Slice(b * BlockSize, BlockSize), span.Slice(b * Q4Bytes, Q4Bytes));
                break;
        }
        return bytes;
    }

    static void EncodeQ8Block(ReadOnlySpan<float> x, Span<byte> block)
    {
        float amax = 0;
        foreach (var v in x) amax = MathF.Max(amax, MathF.Abs(v));
        float d = amax / 127f;
        float id = d != 0 ? 1f / d : 0f;
        BinaryPrimitives.WriteHalfLittleEndian(block, (Half)d);
        for (int j = 0; j < BlockSize; j++) block[2 + j] = (byte)(sbyte)MathF.Round(x[j] * id, MidpointRounding.AwayFromZero);
    }

    static void EncodeQ4Block(ReadOnlySpan<float> x, Span<byte> block)
    {
        // The scale maps the value of largest magnitude, sign included, to -8: the one code with no positive twin.
        float amax = 0, max = 0;
        foreach (var v in x)
            if (MathF.Abs(v) > amax) { amax = MathF.Abs(v); max = v; }
        float d = max / -8f;
        float id = d != 0 ? 1f / d : 0f;
        BinaryPrimitives.WriteHalfLittleEndian(block, (Half)d);
        for (int j = 0; j < BlockSize / 2; j++)
        {
            int lo = Math.Min(15, (int)(x[j] * id + 8.5f));
            int hi = Math.Min(15, (int)(x[j + BlockSize / 2] * id + 8.5f));
            block[2 + j] = (byte)(lo | (hi << 4));
        }
    }

    /// <summary>The float32 values a reader of this encoding sees (the inverse of Encode, up to its rounding).</summary>
    public static float[] Decode(GgmlType type, ReadOnlySpan<byte> bytes, int elements)
    {
        var x = new float[elements];
        switch (type)
        {
            case GgmlType.F32:
                for (int i = 0; i < elements; i++) x[i] = BinaryPrimitives.ReadSingleLittleEndian(bytes[(4 * i)..]);
                break;
            case GgmlType.F16:
                for (int i = 0; i < elements; i++) x[i] = (float)BinaryPrimitives.ReadHalfLittleEndian(bytes[(2 * i)..]);
                break;
            case GgmlType.Q8_0:
                for (int b = 0; b < elements / BlockSize; b++)
                {
                    var block = bytes.Slice(b * Q8Bytes, Q8Bytes);
                    float d = (float)BinaryPrimitives.ReadHalfLittleEndian(block);
                    for (int j = 0; j < BlockSize; j++) x[b * BlockSize + j] = d * (sbyte)block[2 + j];
                }
                break;
            case GgmlType.Q4_0:
                for (int b = 0; b < elements / BlockSize; b++)
                {
                    var block = bytes.Slice(b * Q4Bytes, Q4Bytes);
                    float d = (float)BinaryPrimitives.ReadHalfLittleEndian(block);
                    for (int j = 0; j < BlockSize / 2; j++)
                    {
                        x[b * BlockSize + j] = d * ((block[2 + j] & 0x0F) - 8);
                        x[b * BlockSize + j + BlockSize / 2] = d * ((block[2 + j] >> 4) - 8);
                    }
                }
                break;
            default: throw new ArgumentOutOfRangeException(nameof(type), type, "no ggml encoding for this type");
        }
        return x;
    }
}
