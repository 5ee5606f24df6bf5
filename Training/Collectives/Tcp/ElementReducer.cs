// The arithmetic of the ring: acc = op(acc, incoming) and acc /= n over raw element buffers, one dtype at a time.
using System.Numerics;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Collectives.Tcp;

/// <summary>
/// Element-wise reduction of a received chunk into the local one. bfloat16 travels as bfloat16 and is reduced in fp32
/// (each hop widens both operands, combines, and rounds to nearest even), as NCCL does.
/// </summary>
internal static unsafe class ElementReducer
{
    public static void Check(ScalarType dtype, ReduceOp op)
    {
        if (dtype is not (ScalarType.Float32 or ScalarType.Float64 or ScalarType.BFloat16 or ScalarType.Int64))
            throw new ArgumentException($"the tcp collective supports float32, float64, bfloat16 and int64 tensors, not {dtype}");
        if (op == ReduceOp.Avg && dtype == ScalarType.Int64)
            throw new ArgumentException("ReduceOp.Avg is not defined for int64 tensors (it would truncate); use Sum and divide");
    }

    public static void Combine(ScalarType dtype, ReduceOp op, byte* acc, byte* incoming, int count)
    {
        bool max = op == ReduceOp.Max;
        switch (dtype)
        {
            case ScalarType.Float32: Combine(new Span<float>(acc, count), new ReadOnlySpan<float>(incoming, count), max); break;
            case ScalarType.Float64: Combine(new Span<double>(acc, count), new ReadOnlySpan<double>(incoming, count), max); break;
            case ScalarType.Int64: Combine(new Span<long>(acc, count), new ReadOnlySpan<long>(incoming, count), max); break;
            case ScalarType.BFloat16:
                var a = new Span<ushort>(acc, count);
                var b = new ReadOnlySpan<ushort>(incoming, count);
                for (int i = 0; i < count; i++)
                {
                    float x = FromBf16(a[i]), y = FromBf16(b[i]);
                    a[i] = ToBf16(max ? MathF.Max(x, y) : x + y);
                }
                break;
            default: throw new ArgumentException($"unsupported dtype {dtype}");
        }
    }

    /// <summary>Divides every element by <paramref name="divisor"/> (the Avg of a sum).</summary>
    public static void Divide(ScalarType dtype, byte* acc, int count, int divisor)
    {
        switch (dtype)
        {
            case ScalarType.Float32:
                var f = new Span<float>(acc, count);
                for (int i = 0; i < f.Length; i++) f[i] /= divisor;
                break;
            case ScalarType.Float64:
                var d = new Span<double>(acc, count);
                for (int i = 0; i < d.Length; i++) d[i] /= divisor;
                break;
            case ScalarType.BFloat16:
                var h = new Span<ushort>(acc, count);
                for (int i = 0; i < h.Length; i++) h[i] = ToBf16(FromBf16(h[i]) / divisor);
                break;
            default: throw new ArgumentException($"cannot average dtype {dtype}");
        }
    }

    static void Combine<T>(Span<T> acc, ReadOnlySpan<T> incoming, bool max) where T : unmanaged, INumber<T>
    {
        int i = 0;
        if (Vector.IsHardwareAccelerated)
            for (; i <= acc.Length - Vector<T>.Count; i += Vector<T>.Count)
            {
                var a = new Vector<T>(acc[i..]);
                var b = new Vector<T>(incoming[i..]);
                (max ? Vector.Max(a, b) : a + b).CopyTo(acc[i..]);
            }
        for (; i < acc.Length; i++) acc[i] = max ? T.Max(acc[i], incoming[i]) : acc[i] + incoming[i];
    }

    public static float FromBf16(ushort bits) => BitConverter.Int32BitsToSingle(bits << 16);

    public static ushort ToBf16(float value)
    {
        int bits = BitConverter.SingleToInt32Bits(value);
        if (float.IsNaN(value)) return 0x7FC0;
        bits += 0x7FFF + ((bits >> 16) & 1); // round to nearest, ties to even
        return (ushort)(bits >> 16);
    }
}
