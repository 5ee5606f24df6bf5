// The exact sum's one-pass CPU kernels and its lone-term shortcut against torch's op chain (the reference): the same
// words and the same mean bits on random data with edge values, in float32, bfloat16 and float64.
using DeepSeekCluster.Training.Engine;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Tests.Engine;

public class ExactWordKernelTests
{
    // 70,001 elements: more than one parallel block of the kernels (2^16) and a tail that is no whole vector; 13 and 8: a
    // buffer that is only a tail, and one that is exactly a vector.
    static readonly long[] Sizes = [70_001, 13, 8];

    static readonly double TwoTo64 = Math.Pow(2, 64);

    /// <summary>
    /// Gradient values over 40 orders of magnitude and both signs, with the cases the words make special: ±0, values
    /// below 2^-40 that the scaling by 2^64 rounds (halfway cases included, which go to even), subnormal floats, the
    /// 2^-41 and 2^-40 boundaries, and magnitudes close to the bound.
    /// </summary>
    static double[] Values(int seed, long n)
    {
        var rng = new Random(seed);
        double[] special =
        [
            0.0, -0.0, 0.5 / TwoTo64, -0.5 / TwoTo64, 1.5 / TwoTo64, -1.5 / TwoTo64, 2.5 / TwoTo64, -2.5 / TwoTo64, 3.5 / TwoTo64,
            0.3 / TwoTo64, -0.3 / TwoTo64, 1e-40, -1e-42, Math.Pow(2, -41), -Math.Pow(2, -41), Math.Pow(2, -40), Math.Pow(2, -40) * 1.75,
            ExactGradientSum.Bound * 0.99, -ExactGradientSum.Bound * 0.75, 1, -1, 1e-30, 123456.789,
        ];
        var v = new double[n];
        for (long i = 0; i < n; i++)
            v[i] = rng.Next(8) == 0
                ? special[rng.Next(special.Length)]
                : (rng.Next(2) == 0 ? 1 : -1) * Math.Pow(10, rng.NextDouble() * 40 - 35) * (1 + rng.NextDouble()); // 1e-35 .. 2e5
        return v;
    }

    static Tensor AsDtype(double[] values, ScalarType dtype) => tensor(values, dtype: ScalarType.Float64).to_type(dtype);

    static bool SameBits(Tensor a, Tensor b)
    {
        if (a.dtype != b.dtype || !a.shape.SequenceEqual(b.shape)) return false;
        // Compare the bit patterns: equal() would call -0 and +0 the same.
        var (x, y) = (a.contiguous(), b.contiguous());
        return x.bytes.SequenceEqual(y.bytes);
    }

    static string FirstDifference(Tensor a, Tensor b)
    {
        var (x, y) = (a.to_type(ScalarType.Float64).data<double>().ToArray(), b.to_type(ScalarType.Float64).data<double>().ToArray());
        for (int i = 0; i < x.Length; i++)
            if (BitConverter.DoubleToInt64Bits(x[i]) != BitConverter.DoubleToInt64Bits(y[i])) return $"element {i}: {x[i]:R} against {y[i]:R}";
        return "(no element differs as float64)";
    }

    sealed class FlatSum : IDisposable
    {
        public readonly Tensor[] Buffers;
        public readonly ExactGradientSum Sum;

        public FlatSum(ScalarType dtype, bool native, long? chunk = null)
        {
            Buffers = [.. Sizes.Select(n => zeros(n, dtype: dtype))];
            Sum = ExactGradientSum.OverFlatBuffers(() => Buffers, chunk);
            Sum.NativeCpu = native;
            Sum.Clear();
        }

        public void Load(double[][] term)
        {
            for (int b = 0; b < Buffers.Length; b++) Buffers[b].copy_(AsDtype(term[b], Buffers[b].dtype));
        }

        public void Dispose()
        {
            Sum.Dispose();
            foreach (var b in Buffers) b.Dispose();
        }
    }

    static double[][] Term(int seed) => [.. Sizes.Select((n, b) => Values(seed * 10 + b, n))];

    [Theory]
    [InlineData(ScalarType.Float32)]
    [InlineData(ScalarType.BFloat16)]
    [InlineData(ScalarType.Float64)]
    public void TheOnePassKernelsGiveTorchsWordsAndMeanBits(ScalarType dtype)
    {
        using var torchPath = new FlatSum(dtype, native: false, chunk: 1000); // the reference, in chunks crossing buffers' ends
        using var native = new FlatSum(dtype, native: true);
        const int terms = 5;
        for (int t = 0; t < terms; t++)
        {
            var term = Term(t + 1);
            torchPath.Load(term);
            native.Load(term);
            torchPath.Sum.AddAndClearGradients();
            native.Sum.AddAndClearGradients();
            Assert.All(native.Buffers, b => Assert.Equal(0, b.count_nonzero().item<long>()));
            Assert.True(SameBits(torchPath.Sum.High, native.Sum.High), $"{dtype}: the high words differ after term {t + 1}");
            Assert.True(SameBits(torchPath.Sum.Low, native.Sum.Low), $"{dtype}: the low words differ after term {t + 1}");
            Assert.Equal(torchPath.Sum.Worst.item<double>(), native.Sum.Worst.item<double>());
        }
        foreach (long count in new long[] { terms, 3, 1 })
        {
            torchPath.Sum.WriteMean(count);
            native.Sum.WriteMean(count);
            for (int b = 0; b < Sizes.Length; b++)
                Assert.True(SameBits(torchPath.Buffers[b], native.Buffers[b]),
                    $"{dtype} buffer {b}, mean over {count}: {FirstDifference(torchPath.Buffers[b], native.Buffers[b])} (torch, native)");
        }
    }

    /// <summary>
    /// Summed words the random terms rarely give: high words up to 2^62 (their conversion to double rounds), low sums up
    /// to 2^60 (the carry), negative sums, and for bfloat16 means a hair above a rounding midpoint, which a conversion
    /// straight from double rounds up and torch's (through float32) rounds to even.
    /// </summary>
    [Theory]
    [InlineData(ScalarType.Float32)]
    [InlineData(ScalarType.BFloat16)]
    [InlineData(ScalarType.Float64)]
    public void TheMeanOfAnyWordsHasTorchsBits(ScalarType dtype)
    {
        using var torchPath = new FlatSum(dtype, native: false);
        using var native = new FlatSum(dtype, native: true);
        long n = Sizes.Sum();
        var rng = new Random(17);
        var high = new long[n];
        var low = new long[n];
        for (long i = 0; i < n; i++)
        {
            int bits = rng.Next(64);
            high[i] = rng.NextInt64(-(1L << Math.Min(bits, 62)), 1L << Math.Min(bits, 62));
            low[i] = rng.NextInt64(0, 1L << rng.Next(1, 61));
        }
        // (1 + 2^-8)·2^-10 is halfway between two bfloat16s; + 2^-40 is not, but float32 cannot tell the difference.
        double midpoint = (1 + Math.Pow(2, -8)) * Math.Pow(2, -10);
        for (int i = 0; i < 50; i++)
        {
            double q = (midpoint + (i % 2 == 0 ? 1 : -1) * Math.Pow(2, -40) * (1 + i / 2)) * TwoTo64 * (i % 3 == 0 ? -1 : 1);
            high[i] = (long)Math.Floor(q / Math.Pow(2, 40));
            low[i] = (long)(q - high[i] * Math.Pow(2, 40));
        }
        foreach (var s in new[] { torchPath, native })
        {
            s.Sum.High.copy_(tensor(high));
            s.Sum.Low.copy_(tensor(low));
        }
        foreach (long count in new long[] { 1, 3, 6 })
        {
            torchPath.Sum.WriteMean(count);
            native.Sum.WriteMean(count);
            for (int b = 0; b < Sizes.Length; b++)
                Assert.True(SameBits(torchPath.Buffers[b], native.Buffers[b]),
                    $"{dtype} buffer {b}, mean over {count}: {FirstDifference(torchPath.Buffers[b], native.Buffers[b])} (torch, native)");
        }
    }

    [Theory]
    [InlineData(ScalarType.Float32)]
    [InlineData(ScalarType.BFloat16)]
    [InlineData(ScalarType.Float64)]
    public void ANonFiniteOrTooLargeElementPoisonsTheNativeMeanAsTorchsAndTheLoneOne(ScalarType dtype)
    {
        foreach (double bad in new[] { double.NaN, double.PositiveInfinity, double.NegativeInfinity, ExactGradientSum.Bound * 2 })
        {
            var term = Term(3);
            term[0][70_000] = bad; // in the tail, after the vectors
            term[2][3] = bad;
            foreach (bool lone in new[] { false, true })
            {
                using var torchPath = new FlatSum(dtype, native: false);
                using var native = new FlatSum(dtype, native: true);
                foreach (var s in new[] { torchPath, native })
                {
                    s.Load(term);
                    if (lone) s.Sum.AddOnlyTerm();
                    else s.Sum.AddAndClearGradients();
                    s.Sum.WriteMean(1);
                    Assert.All(s.Buffers, b => Assert.True(b.isnan().all().item<bool>(), $"{dtype}: a gradient of {bad} left a finite mean (native {s.Sum.NativeCpu}, lone {lone})"));
                }
            }
        }
    }

    /// <summary>
    /// The step's only term left in place (AddOnlyTerm) and turned into its mean there, natively and by torch's ops,
    /// against adding it to the words and writing their mean: the same bits, −0 and the rounding of tiny values included.
    /// </summary>
    [Theory]
    [InlineData(ScalarType.Float32)]
    [InlineData(ScalarType.BFloat16)]
    [InlineData(ScalarType.Float64)]
    public void ALoneTermsMeanHasTheBitsOfTheSummedWordsMean(ScalarType dtype)
    {
        foreach (long count in new long[] { 1, 3 })
        {
            var term = Term(5);
            using var reference = new FlatSum(dtype, native: false);
            reference.Load(term);
            reference.Sum.AddAndClearGradients();
            reference.Sum.WriteMean(count);
            foreach (bool native in new[] { true, false })
            {
                using var lone = new FlatSum(dtype, native);
                lone.Load(term);
                lone.Sum.AddOnlyTerm();
                Assert.Equal(1, lone.Sum.Terms);
                lone.Sum.WriteMean(count);
                for (int b = 0; b < Sizes.Length; b++)
                    Assert.True(SameBits(reference.Buffers[b], lone.Buffers[b]),
                        $"{dtype} buffer {b}, lone term over {count} (native {native}): {FirstDifference(reference.Buffers[b], lone.Buffers[b])} (words, lone)");
                Assert.Equal(reference.Sum.Worst.item<double>(), lone.Sum.Worst.item<double>());
            }
        }
        // The −0 case the sum exists to normalise, checked by value as well as against the reference.
        using var zero = new FlatSum(dtype, native: true);
        zero.Buffers[2].copy_(AsDtype([-0.0, -0.3 / TwoTo64, 0, 0, 0, 0, 0, 0], dtype));
        zero.Sum.AddOnlyTerm();
        zero.Sum.WriteMean(1);
        Assert.False(zero.Buffers[2].to_type(ScalarType.Float64).signbit().any().item<bool>(), "a −0 gradient's mean must be +0, as its words' is");
    }

    [Fact]
    public void ALoneTermOverParametersEqualsTheSummedWordsAndAMissingGradientIsZero()
    {
        var term = Term(9);
        Tensor[] NewParameters() => [zeros(Sizes[0]), zeros(Sizes[1]), zeros(2, 4)];
        var reference = NewParameters();
        var lone = NewParameters();
        foreach (var ps in new[] { reference, lone })
        {
            ps[0].grad = tensor(term[0], dtype: ScalarType.Float64).to_type(ScalarType.Float32);
            ps[1].grad = tensor(term[1], dtype: ScalarType.Float64).to_type(ScalarType.Float32);
        }
        using (var sum = new ExactGradientSum(reference))
        {
            sum.Clear();
            sum.AddAndClearGradients();
            sum.WriteMean(1);
        }
        using (var sum = new ExactGradientSum(lone))
        {
            sum.Clear();
            sum.AddOnlyTerm();
            Assert.Throws<InvalidOperationException>(() => sum.AddAndClearGradients()); // only means only
            sum.WriteMean(1);
        }
        for (int p = 0; p < 3; p++) Assert.True(SameBits(reference[p].grad!, lone[p].grad!), $"parameter {p}: {FirstDifference(reference[p].grad!, lone[p].grad!)}");
        Assert.Equal(0, lone[2].grad!.count_nonzero().item<long>());
    }

    [Fact]
    public void AnOnlyTermCannotFollowOtherTerms()
    {
        using var s = new FlatSum(ScalarType.Float32, native: true);
        s.Load(Term(2));
        s.Sum.AddAndClearGradients();
        Assert.Throws<InvalidOperationException>(() => s.Sum.AddOnlyTerm());
        s.Sum.Clear(); // a new step: allowed again
        s.Sum.AddOnlyTerm();
    }
}
