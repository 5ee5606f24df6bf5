// ExactGradientSum and ExactScalarSum against an independent exact computation (BigInteger) and across groupings.
using System.Numerics;
using DeepSeekCluster.Training.Engine;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Tests.Engine;

public class ExactGradientSumTests
{
    const int MicroBatches = 6;

    /// <summary>Micro-batch gradients of two parameters over 14 orders of magnitude, both signs, and some exact zeros.</summary>
    static float[][][] Gradients(int seed)
    {
        var rng = new Random(seed);
        float Value()
        {
            if (rng.Next(10) == 0) return 0f;
            double magnitude = Math.Pow(10, rng.NextDouble() * 14 - 11); // 1e-11 .. 1e3
            return (float)(rng.Next(2) == 0 ? magnitude : -magnitude);
        }
        return [.. Enumerable.Range(0, MicroBatches).Select(_ => new[]
        {
            Enumerable.Range(0, 37).Select(_ => Value()).ToArray(),
            Enumerable.Range(0, 5).Select(_ => Value()).ToArray(),
        })];
    }

    static Tensor[] Parameters() => [zeros(37), zeros(5)];

    /// <summary>Each "rank" sums its contiguous micro-batches alone; the words are then added as an all-reduce would.</summary>
    static float[][] SumSplit(float[][][] micro, int ranks, long chunkElements = ExactGradientSum.ChunkElements)
    {
        var parameters = Parameters();
        var sums = new List<ExactGradientSum>();
        int per = MicroBatches / ranks;
        for (int r = 0; r < ranks; r++)
        {
            var sum = new ExactGradientSum(parameters, chunkElements);
            sum.Clear();
            for (int m = r * per; m < (r + 1) * per; m++)
            {
                for (int p = 0; p < parameters.Length; p++) parameters[p].grad = tensor(micro[m][p]);
                sum.AddAndClearGradients();
            }
            sums.Add(sum);
        }
        for (int r = 1; r < ranks; r++)
        {
            sums[0].High.add_(sums[r].High);
            sums[0].Low.add_(sums[r].Low);
            sums[r].Dispose();
        }
        sums[0].WriteMean(MicroBatches);
        sums[0].Dispose();
        return [.. parameters.Select(p => p.grad!.data<float>().ToArray())];
    }

    [Fact]
    public void TheMeanIsTheSameBitsInAnyGroupingOfMicroBatchesOverRanks()
    {
        var micro = Gradients(7);
        var one = SumSplit(micro, 1);
        foreach (int ranks in new[] { 2, 3, 6 })
        {
            var split = SumSplit(micro, ranks);
            for (int p = 0; p < one.Length; p++)
                for (int i = 0; i < one[p].Length; i++)
                    Assert.True(BitConverter.SingleToInt32Bits(one[p][i]) == BitConverter.SingleToInt32Bits(split[p][i]),
                        $"parameter {p} element {i}: {split[p][i]:R} over {ranks} ranks, {one[p][i]:R} over 1");
        }
    }

    [Fact]
    public void ConvertingInChunksGivesTheSameBitsAsConvertingAllAtOnce()
    {
        var micro = Gradients(5);
        var whole = SumSplit(micro, 2);
        var chunked = SumSplit(micro, 2, chunkElements: 4); // each parameter alone (37 and 5 elements)
        for (int p = 0; p < whole.Length; p++) Assert.Equal(whole[p], chunked[p]);
    }

    [Fact]
    public void TheMeanIsTheExactSumRoundedOnce()
    {
        var micro = Gradients(11);
        var mean = SumSplit(micro, 2);
        for (int p = 0; p < mean.Length; p++)
            for (int i = 0; i < mean[p].Length; i++)
            {
                // Independent: every float of magnitude ≥ 2^-40 is an integer multiple of 2^-64, so BigInteger sums it exactly.
                var exact = BigInteger.Zero;
                for (int m = 0; m < MicroBatches; m++) exact += new BigInteger(Math.Round(micro[m][p][i] * Math.Pow(2, 64)));
                double reference = (double)exact / Math.Pow(2, 64) / MicroBatches;
                double tolerance = Math.Abs(reference) * 1.2e-7 + 1e-30; // float32 rounding of the result, at most
                Assert.True(Math.Abs(mean[p][i] - reference) <= tolerance,
                    $"parameter {p} element {i}: {mean[p][i]:R}, exact mean {reference:R}");
            }
    }

    [Fact]
    public void ANonFiniteOrTooLargeGradientPoisonsTheMeanWithNaN()
    {
        foreach (float bad in new[] { float.NaN, float.PositiveInfinity, (float)ExactGradientSum.Bound * 2 })
        {
            var parameters = Parameters();
            using var sum = new ExactGradientSum(parameters);
            sum.Clear();
            parameters[0].grad = ones(37);
            parameters[1].grad = full(5, bad);
            sum.AddAndClearGradients();
            sum.WriteMean(1);
            Assert.True(float.IsNaN(parameters[0].grad!.data<float>()[0]), $"a gradient of {bad} left the mean finite");
        }
    }

    /// <summary>
    /// The sum over flat gradient buffers (the optimizer's, every parameter's .grad a view of them) against the sum over
    /// the parameters: the same mean bits per element in float32 and bfloat16, chunks crossing parameters and buffers,
    /// the buffers zeroed after each add, and a NaN poisoning every gradient as before (NaN compared as NaN).
    /// </summary>
    [Theory]
    [InlineData(ScalarType.Float32, 4L)]
    [InlineData(ScalarType.BFloat16, 5L)]
    [InlineData(ScalarType.Float32, null)]
    public void OverFlatBuffersTheMeanHasTheSameBitsAsOverTheParameters(ScalarType dtype, long? chunk)
    {
        var micro = Gradients(13);
        var parameters = Parameters().Select(p => p.to_type(dtype)).ToArray();
        // Two buffers, as two dtypes or devices would give: parameter 0 in one, parameter 1 in the other.
        var buffers = new[] { zeros(37, dtype: dtype), zeros(5, dtype: dtype) };
        using var reference = new ExactGradientSum(parameters);
        using var flat = ExactGradientSum.OverFlatBuffers(() => buffers, chunk);
        Assert.True(flat.OverFlat);
        foreach (bool poison in new[] { false, true })
        {
            reference.Clear();
            flat.Clear();
            for (int m = 0; m < MicroBatches; m++)
            {
                for (int p = 0; p < 2; p++)
                {
                    var g = tensor(micro[m][p]).to_type(dtype);
                    if (poison && m == 3 && p == 1) g[2] = tensor(float.NaN);
                    parameters[p].grad = g.clone();
                    buffers[p].copy_(g);
                }
                reference.AddAndClearGradients();
                flat.AddAndClearGradients();
                Assert.All(buffers, b => Assert.Equal(0, b.count_nonzero().item<long>()));
            }
            reference.WriteMean(MicroBatches);
            flat.WriteMean(MicroBatches);
            for (int p = 0; p < 2; p++)
            {
                var expected = parameters[p].grad!.to_type(ScalarType.Float32).data<float>().ToArray();
                var actual = buffers[p].to_type(ScalarType.Float32).data<float>().ToArray();
                Assert.Equal(poison, float.IsNaN(actual[0]));
                // A poisoned NaN's sign bit depends on whether torch's bf16 conversion ran vectorized (where a chunk ends), in
                // either path: NaN is compared as NaN, every number by its bits.
                for (int i = 0; i < expected.Length; i++)
                    Assert.True(float.IsNaN(expected[i]) ? float.IsNaN(actual[i]) : BitConverter.SingleToInt32Bits(expected[i]) == BitConverter.SingleToInt32Bits(actual[i]),
                        $"{dtype} parameter {p} element {i}: {actual[i]:R} over the flat buffers, {expected[i]:R} over the parameters");
            }
        }
    }

    [Fact]
    public void AMissingGradientCountsAsZero()
    {
        var parameters = Parameters();
        using var sum = new ExactGradientSum(parameters);
        sum.Clear();
        parameters[0].grad = full(37, 3f); // parameter 1 received no gradient (an expert no token chose)
        sum.AddAndClearGradients();
        parameters[0].grad = full(37, 1f);
        sum.AddAndClearGradients();
        sum.WriteMean(2);
        Assert.Equal(2f, parameters[0].grad!.data<float>()[0]);
        Assert.All(parameters[1].grad!.data<float>().ToArray(), v => Assert.Equal(0f, v));
    }

    [Fact]
    public void ScalarSumsAreTheSameInAnyOrderAndSurviveTheWordExchange()
    {
        var rng = new Random(3);
        var values = Enumerable.Range(0, 40).Select(_ => (double)(float)(rng.NextDouble() * 12 - 2)).ToArray();
        var whole = new ExactScalarSum();
        foreach (var v in values) whole.Add(v);
        // Four "ranks" of 10, summed word by word as SumWords would, in reverse order.
        var words = new long[3];
        for (int r = 3; r >= 0; r--)
        {
            var part = new ExactScalarSum();
            foreach (var v in values.Skip(r * 10).Take(10).Reverse()) part.Add(v);
            var w = part.Words;
            for (int i = 0; i < 3; i++) words[i] += w[i];
        }
        double exchanged = ExactScalarSum.FromWords(words).Value;
        Assert.Equal(BitConverter.DoubleToInt64Bits(whole.Value), BitConverter.DoubleToInt64Bits(exchanged));
        Assert.True(Math.Abs(whole.Value - values.Sum()) < 1e-9, $"{whole.Value:R} against the float64 sum {values.Sum():R}");

        var poisoned = new ExactScalarSum();
        poisoned.Add(1);
        poisoned.Add(double.NaN);
        Assert.True(double.IsNaN(ExactScalarSum.FromWords(poisoned.Words).Value));
    }
}
