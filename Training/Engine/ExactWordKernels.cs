// The exact gradient sum's per-element arithmetic as single passes over CPU memory; not for GPU tensors (those keep torch's ops).
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Engine;

/// <summary>
/// What <see cref="ExactGradientSum"/>'s chain of torch ops does to each element (a dozen float64 and int64 passes over
/// memory), done in one pass that reads the gradient once and the two words once: the same IEEE operations in the
/// same order (scale by 2^64, round half to even, floor by 2^40, the int64 wrap-around adds; for the mean the carry,
/// two conversions to double, one add, two divisions, and the conversion to the buffer's dtype through float32 as
/// torch's does), so the same words and the same bits (ExactWordKernelTests pins them to the torch path).
/// <para>
/// Gradients are float32, bfloat16 or float64 (<see cref="Supports"/>). Only a NaN, an infinity or an element past
/// <see cref="ExactGradientSum.Bound"/> may convert to other words than torch's (its conversion gives INT64_MIN, .NET's
/// saturates); such a step's mean is NaN everywhere on either path, so nothing observable differs.
/// </para>
/// </summary>
static class ExactWordKernels
{
    const double Scale = 18446744073709551616.0;      // 2^64
    const double LowScale = 1099511627776.0;          // 2^40
    const double InvLowScale = 1.0 / 1099511627776.0; // 2^-40, exact
    const int LowBits = ExactGradientSum.LowBits;
    const int Block = 1 << 16; // elements per parallel work item: big enough to amortise a task, small enough to balance

    public static bool Supports(Tensor t) =>
        t.device.type == TorchSharp.DeviceType.CPU && t.is_contiguous() &&
        t.dtype is ScalarType.Float32 or ScalarType.BFloat16 or ScalarType.Float64;

    // ---- Add: gradient -> words, gradient zeroed ----

    /// <summary>
    /// Adds each element's two words to <paramref name="high"/> and <paramref name="low"/> and zeroes the element; returns
    /// the largest magnitude seen (NaN if any element was NaN), as torch's max and -min give it.
    /// </summary>
    public static double AddAndZero(Tensor grads, Tensor high, Tensor low)
    {
        long n = grads.numel();
        if (high.numel() != n || low.numel() != n) throw new ArgumentException($"words for {high.numel()} elements, gradients of {n}");
        var (g, hi, lo) = (Address(grads), Address(high), Address(low));
        var dtype = grads.dtype;
        return ParallelBlocks(n, (start, count) => dtype switch
        {
            ScalarType.Float32 => AddFloat(Span<float>(g, start, count), Span<long>(hi, start, count), Span<long>(lo, start, count)),
            ScalarType.BFloat16 => AddBFloat16(Span<ushort>(g, start, count), Span<long>(hi, start, count), Span<long>(lo, start, count)),
            _ => AddDouble(Span<double>(g, start, count), Span<long>(hi, start, count), Span<long>(lo, start, count)),
        });
    }

    static double AddFloat(Span<float> x, Span<long> high, Span<long> low)
    {
        int i = 0;
        var worst = Vector256<int>.Zero;
        for (; i + 8 <= x.Length; i += 8)
        {
            var v = Vector256.Create<float>(x.Slice(i, 8));
            worst = Vector256.Max(worst, v.AsInt32() & Vector256.Create(0x7FFFFFFF));
            AddWords(Vector256.WidenLower(v), high.Slice(i, 4), low.Slice(i, 4));
            AddWords(Vector256.WidenUpper(v), high.Slice(i + 4, 4), low.Slice(i + 4, 4));
        }
        int bits = MaxLane(worst);
        for (; i < x.Length; i++)
        {
            bits = Math.Max(bits, BitConverter.SingleToInt32Bits(x[i]) & 0x7FFFFFFF);
            AddWord(x[i], ref high[i], ref low[i]);
        }
        x.Clear();
        return MagnitudeOfFloatBits(bits);
    }

    static double AddBFloat16(Span<ushort> x, Span<long> high, Span<long> low)
    {
        int i = 0;
        var worst = Vector256<int>.Zero;
        for (; i + 16 <= x.Length; i += 16)
        {
            var u = Vector256.Create<ushort>(x.Slice(i, 16));
            var a = (Vector256.WidenLower(u) << 16).AsSingle(); // a bfloat16 is the top half of the float32 with its bits
            var b = (Vector256.WidenUpper(u) << 16).AsSingle();
            worst = Vector256.Max(Vector256.Max(worst, a.AsInt32() & Vector256.Create(0x7FFFFFFF)), b.AsInt32() & Vector256.Create(0x7FFFFFFF));
            AddWords(Vector256.WidenLower(a), high.Slice(i, 4), low.Slice(i, 4));
            AddWords(Vector256.WidenUpper(a), high.Slice(i + 4, 4), low.Slice(i + 4, 4));
            AddWords(Vector256.WidenLower(b), high.Slice(i + 8, 4), low.Slice(i + 8, 4));
            AddWords(Vector256.WidenUpper(b), high.Slice(i + 12, 4), low.Slice(i + 12, 4));
        }
        int bits = MaxLane(worst);
        for (; i < x.Length; i++)
        {
            float f = BFloat16ToFloat(x[i]);
            bits = Math.Max(bits, BitConverter.SingleToInt32Bits(f) & 0x7FFFFFFF);
            AddWord(f, ref high[i], ref low[i]);
        }
        x.Clear();
        return MagnitudeOfFloatBits(bits);
    }

    static double AddDouble(Span<double> x, Span<long> high, Span<long> low)
    {
        int i = 0;
        var worst = Vector256<long>.Zero;
        for (; i + 4 <= x.Length; i += 4)
        {
            var v = Vector256.Create<double>(x.Slice(i, 4));
            worst = Vector256.Max(worst, v.AsInt64() & Vector256.Create(long.MaxValue));
            AddWords(v, high.Slice(i, 4), low.Slice(i, 4));
        }
        long bits = Math.Max(Math.Max(worst[0], worst[1]), Math.Max(worst[2], worst[3]));
        for (; i < x.Length; i++)
        {
            bits = Math.Max(bits, BitConverter.DoubleToInt64Bits(x[i]) & long.MaxValue);
            AddWord(x[i], ref high[i], ref low[i]);
        }
        x.Clear();
        return BitConverter.Int64BitsToDouble(bits); // |x| as bits orders as |x|, NaN above infinity: a NaN comes back NaN
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    static void AddWords(Vector256<double> x, Span<long> high, Span<long> low)
    {
        var q = Vector256.Round(x * Vector256.Create(Scale));            // exact scaling, then the one rounding (half to even)
        var hi = Vector256.Floor(q * Vector256.Create(InvLowScale));     // exact: a power-of-two scaling of an integer
        var lo = q - hi * Vector256.Create(LowScale);                    // in [0, 2^40): exact, as torch's q + (-2^40)·hi
        (Vector256.Create<long>(high) + Vector256.ConvertToInt64(hi)).CopyTo(high);
        (Vector256.Create<long>(low) + Vector256.ConvertToInt64(lo)).CopyTo(low);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    static void AddWord(double x, ref long high, ref long low)
    {
        double q = Math.Round(x * Scale);
        double hi = Math.Floor(q * InvLowScale);
        high += (long)hi;
        low += (long)(q - hi * LowScale);
    }

    // ---- Mean: words -> gradient ----

    /// <summary>
    /// Writes (hi·2^40 + lo)/2^64/<paramref name="count"/> of each element's summed words into <paramref name="grads"/>
    /// in its dtype, or NaN everywhere when <paramref name="poisoned"/>.
    /// </summary>
    public static void WriteMean(Tensor high, Tensor low, Tensor grads, long count, bool poisoned)
    {
        long n = grads.numel();
        if (high.numel() != n || low.numel() != n) throw new ArgumentException($"words for {high.numel()} elements, gradients of {n}");
        if (poisoned) { grads.fill_(double.NaN); return; }
        var (g, hi, lo) = (Address(grads), Address(high), Address(low));
        var dtype = grads.dtype;
        double divisor = count;
        ParallelBlocks(n, (start, k) =>
        {
            var h = Span<long>(hi, start, k);
            var l = Span<long>(lo, start, k);
            switch (dtype)
            {
                case ScalarType.Float32: MeanFloat(h, l, Span<float>(g, start, k), divisor); break;
                case ScalarType.BFloat16: MeanBFloat16(h, l, Span<ushort>(g, start, k), divisor); break;
                default: MeanDouble(h, l, Span<double>(g, start, k), divisor); break;
            }
            return 0;
        });
    }

    static void MeanFloat(Span<long> high, Span<long> low, Span<float> mean, double count)
    {
        int i = 0;
        for (; i + 8 <= mean.Length; i += 8)
            Vector256.Narrow(Mean(high.Slice(i, 4), low.Slice(i, 4), count), Mean(high.Slice(i + 4, 4), low.Slice(i + 4, 4), count)).CopyTo(mean.Slice(i, 8));
        for (; i < mean.Length; i++) mean[i] = (float)Mean(high[i], low[i], count);
    }

    static void MeanBFloat16(Span<long> high, Span<long> low, Span<ushort> mean, double count)
    {
        int i = 0;
        for (; i + 16 <= mean.Length; i += 16)
        {
            var a = Vector256.Narrow(Mean(high.Slice(i, 4), low.Slice(i, 4), count), Mean(high.Slice(i + 4, 4), low.Slice(i + 4, 4), count));
            var b = Vector256.Narrow(Mean(high.Slice(i + 8, 4), low.Slice(i + 8, 4), count), Mean(high.Slice(i + 12, 4), low.Slice(i + 12, 4), count));
            Vector256.Narrow(FloatToBFloat16(a), FloatToBFloat16(b)).CopyTo(mean.Slice(i, 16));
        }
        for (; i < mean.Length; i++) mean[i] = FloatToBFloat16((float)Mean(high[i], low[i], count));
    }

    static void MeanDouble(Span<long> high, Span<long> low, Span<double> mean, double count)
    {
        int i = 0;
        for (; i + 4 <= mean.Length; i += 4) Mean(high.Slice(i, 4), low.Slice(i, 4), count).CopyTo(mean.Slice(i, 4));
        for (; i < mean.Length; i++) mean[i] = Mean(high[i], low[i], count);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    static Vector256<double> Mean(Span<long> high, Span<long> low, double count)
    {
        var l = Vector256.Create<long>(low);
        var carry = Vector256.ShiftRightArithmetic(l, LowBits);          // floor(lo / 2^40): the lo sums are ≥ 0
        var hi = Vector256.ConvertToDouble(Vector256.Create<long>(high) + carry);
        var lo = Vector256.ConvertToDouble(l - (carry << LowBits));      // canonical: [0, 2^40)
        return (hi * Vector256.Create(LowScale) + lo) / Vector256.Create(Scale) / Vector256.Create(count); // no FMA: torch's mul, then add
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    static double Mean(long high, long low, double count)
    {
        long carry = low >> LowBits;
        double hi = high + carry, lo = low - (carry << LowBits);
        double scaled = hi * LowScale;
        return (scaled + lo) / Scale / count;
    }

    // ---- A lone term: the mean of one micro-batch, in place ----

    /// <summary>
    /// What adding <paramref name="grads"/> as the only term and writing the mean over <paramref name="count"/> would
    /// leave in it, written in place: round(x·2^64)/2^64/count (a rounded −0 becomes +0, as its int64 words do); returns
    /// the largest magnitude, as <see cref="AddAndZero"/>. The caller poisons the result if that is not below the bound.
    /// </summary>
    public static double LoneMean(Tensor grads, long count)
    {
        var g = Address(grads);
        var dtype = grads.dtype;
        double divisor = count;
        return ParallelBlocks(grads.numel(), (start, k) => dtype switch
        {
            ScalarType.Float32 => LoneFloat(Span<float>(g, start, k), divisor),
            ScalarType.BFloat16 => LoneBFloat16(Span<ushort>(g, start, k), divisor),
            _ => LoneDouble(Span<double>(g, start, k), divisor),
        });
    }

    static double LoneFloat(Span<float> x, double count)
    {
        int i = 0;
        var worst = Vector256<int>.Zero;
        for (; i + 8 <= x.Length; i += 8)
        {
            var v = Vector256.Create<float>(x.Slice(i, 8));
            worst = Vector256.Max(worst, v.AsInt32() & Vector256.Create(0x7FFFFFFF));
            Vector256.Narrow(Lone(Vector256.WidenLower(v), count), Lone(Vector256.WidenUpper(v), count)).CopyTo(x.Slice(i, 8));
        }
        int bits = MaxLane(worst);
        for (; i < x.Length; i++)
        {
            bits = Math.Max(bits, BitConverter.SingleToInt32Bits(x[i]) & 0x7FFFFFFF);
            x[i] = (float)Lone(x[i], count);
        }
        return MagnitudeOfFloatBits(bits);
    }

    static double LoneBFloat16(Span<ushort> x, double count)
    {
        int i = 0;
        var worst = Vector256<int>.Zero;
        for (; i + 16 <= x.Length; i += 16)
        {
            var u = Vector256.Create<ushort>(x.Slice(i, 16));
            var a = (Vector256.WidenLower(u) << 16).AsSingle();
            var b = (Vector256.WidenUpper(u) << 16).AsSingle();
            worst = Vector256.Max(Vector256.Max(worst, a.AsInt32() & Vector256.Create(0x7FFFFFFF)), b.AsInt32() & Vector256.Create(0x7FFFFFFF));
            var ma = Vector256.Narrow(Lone(Vector256.WidenLower(a), count), Lone(Vector256.WidenUpper(a), count));
            var mb = Vector256.Narrow(Lone(Vector256.WidenLower(b), count), Lone(Vector256.WidenUpper(b), count));
            Vector256.Narrow(FloatToBFloat16(ma), FloatToBFloat16(mb)).CopyTo(x.Slice(i, 16));
        }
        int bits = MaxLane(worst);
        for (; i < x.Length; i++)
        {
            float f = BFloat16ToFloat(x[i]);
            bits = Math.Max(bits, BitConverter.SingleToInt32Bits(f) & 0x7FFFFFFF);
            x[i] = FloatToBFloat16((float)Lone(f, count));
        }
        return MagnitudeOfFloatBits(bits);
    }

    static double LoneDouble(Span<double> x, double count)
    {
        int i = 0;
        var worst = Vector256<long>.Zero;
        for (; i + 4 <= x.Length; i += 4)
        {
            var v = Vector256.Create<double>(x.Slice(i, 4));
            worst = Vector256.Max(worst, v.AsInt64() & Vector256.Create(long.MaxValue));
            Lone(v, count).CopyTo(x.Slice(i, 4));
        }
        long bits = Math.Max(Math.Max(worst[0], worst[1]), Math.Max(worst[2], worst[3]));
        for (; i < x.Length; i++)
        {
            bits = Math.Max(bits, BitConverter.DoubleToInt64Bits(x[i]) & long.MaxValue);
            x[i] = Lone(x[i], count);
        }
        return BitConverter.Int64BitsToDouble(bits);
    }

    // q + 0: the words of a −0 (or of a negative element that rounds to 0) are 0, whose mean is +0.
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    static Vector256<double> Lone(Vector256<double> x, double count) =>
        (Vector256.Round(x * Vector256.Create(Scale)) + Vector256<double>.Zero) / Vector256.Create(Scale) / Vector256.Create(count);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    static double Lone(double x, double count) => (Math.Round(x * Scale) + 0.0) / Scale / count;

    // ---- Conversions and plumbing ----

    static float BFloat16ToFloat(ushort b) => BitConverter.Int32BitsToSingle(b << 16);

    /// <summary>torch's float → bfloat16: round to nearest even; a NaN becomes the quiet NaN 0x7FC0.</summary>
    static ushort FloatToBFloat16(float f)
    {
        if (float.IsNaN(f)) return 0x7FC0;
        uint u = BitConverter.SingleToUInt32Bits(f);
        return (ushort)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
    }

    /// <summary><see cref="FloatToBFloat16(float)"/> on eight lanes, each result in the low half of its 32 bits.</summary>
    static Vector256<uint> FloatToBFloat16(Vector256<float> f)
    {
        var u = f.AsUInt32();
        var rounded = (u + Vector256.Create(0x7FFFu) + ((u >> 16) & Vector256.Create(1u))) >> 16;
        return Vector256.ConditionalSelect(Vector256.Equals(f, f).AsUInt32(), rounded, Vector256.Create(0x7FC0u));
    }

    static int MaxLane(Vector256<int> v)
    {
        int m = 0;
        for (int j = 0; j < Vector256<int>.Count; j++) m = Math.Max(m, v[j]);
        return m;
    }

    /// <summary>The magnitude whose float32 bits (sign cleared) are <paramref name="bits"/>: NaN patterns order above infinity.</summary>
    static double MagnitudeOfFloatBits(int bits) => BitConverter.Int32BitsToSingle(bits);

    static unsafe nint Address(Tensor t)
    {
        if (!(Supports(t) || t.dtype == ScalarType.Int64 && t.device.type == TorchSharp.DeviceType.CPU && t.is_contiguous()))
            throw new ArgumentException($"a contiguous CPU tensor of float32, bfloat16 or float64 (gradients) or int64 (words) was expected, got {t.dtype} on {t.device}");
        return t.numel() == 0 ? 0 : (nint)Unsafe.AsPointer(ref MemoryMarshal.GetReference(t.bytes));
    }

    static unsafe Span<T> Span<T>(nint address, long start, long count) where T : unmanaged =>
        new((void*)(address + (nint)(start * sizeof(T))), checked((int)count));

    /// <summary>
    /// Runs <paramref name="body"/> over blocks of [0, n) on as many threads as torch uses (its own ops would) and
    /// returns the NaN-propagating maximum of what the blocks returned.
    /// </summary>
    static double ParallelBlocks(long n, Func<long, long, double> body)
    {
        long blocks = (n + Block - 1) / Block;
        if (blocks <= 1) return n == 0 ? 0 : body(0, n);
        var results = new double[blocks];
        System.Threading.Tasks.Parallel.For(0, blocks, new ParallelOptions { MaxDegreeOfParallelism = Math.Max(1, get_num_threads()) },
            b => results[b] = body(b * Block, Math.Min(Block, n - b * Block)));
        double worst = 0;
        foreach (var r in results) worst = Math.Max(worst, r); // Math.Max propagates NaN
        return worst;
    }
}
