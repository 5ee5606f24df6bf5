// The fused attention (scaled_dot_product_attention) against the written-out softmax attention it replaced.
using DeepSeekCluster.Training.Model;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Tests.Model;

public class CausalAttentionTests
{
    // MLA's shapes: queries and keys wider than values; a YaRN-like scale that is not 1/sqrt(Q).
    const int B = 2, H = 3, Q = 12, V = 5;
    const double Scale = 0.41;

    static (Tensor q, Tensor k, Tensor v) Inputs(long t, long s, ScalarType dtype, int seed)
    {
        manual_seed(seed);
        return (randn(B, H, t, Q, dtype).requires_grad_(true), randn(B, H, s, Q, dtype).requires_grad_(true),
            randn(B, H, s, V, dtype).requires_grad_(true));
    }

    [Theory]
    [InlineData(7, 7)]   // training: every query a new token, no cache
    [InlineData(3, 10)]  // prefill of 3 tokens onto 7 cached ones: the mask is aligned bottom-right
    [InlineData(1, 9)]   // one decode step sees every key
    public void FusedEqualsExplicitInValueAndGradientsInFloat64(long t, long s)
    {
        var (q, k, v) = Inputs(t, s, ScalarType.Float64, seed: 11);
        var fused = CausalAttention.Fused(q, k, v, s - t, Scale);
        var reference = CausalAttention.Explicit(q, k, v, s - t, Scale);
        Assert.True(fused.allclose(reference, rtol: 0, atol: 1e-12), $"max |diff| {(fused - reference).abs().max().item<double>():E3}");

        var projection = randn_like(reference);
        var fusedGrads = autograd.grad([(fused * projection).sum()], [q, k, v]);
        var referenceGrads = autograd.grad([(reference * projection).sum()], [q, k, v]);
        for (int i = 0; i < 3; i++)
            Assert.True(fusedGrads[i].allclose(referenceGrads[i], rtol: 0, atol: 1e-11), $"gradient {"qkv"[i]} differs");
    }

    [Fact]
    public void TheLastQueryOfAPrefillSeesTheWholeCacheAndTheFirstSeesOnlyUpToItsPosition()
    {
        // Independent of both paths: a key after query i's position must not change query i's output.
        var (q, k, v) = Inputs(3, 10, ScalarType.Float64, seed: 5);
        using var noGrad = no_grad();
        var before = CausalAttention.Fused(q, k, v, past: 7, Scale);
        var vChanged = v.clone();
        vChanged[.., .., 9, ..] += 100.0; // key 9 is the last query's own position only
        var after = CausalAttention.Fused(q, k, vChanged, past: 7, Scale);
        Assert.True(after[.., .., ..2, ..].allclose(before[.., .., ..2, ..], rtol: 0, atol: 0), "queries 0 and 1 (positions 7, 8) saw key 9");
        Assert.False(after[.., .., 2, ..].allclose(before[.., .., 2, ..]), "query 2 (position 9) did not see key 9");
    }

    [Fact]
    public void APerRowMaskGivesEachRowWhatItGetsAloneWithItsOwnKeys()
    {
        // Row 0 holds 4 keys, row 1 holds 7 (padded to S = 7): one decode query each, as a server batches two requests.
        var (q, k, v) = Inputs(1, 7, ScalarType.Float64, seed: 9);
        using var noGrad = no_grad();
        var visible_B1TS = ones(B, 1, 1, 7, ScalarType.Bool);
        visible_B1TS[0, .., .., 4..] = false;
        var batched = CausalAttention.Fused(q, k, v, 6, Scale, visible_B1TS);
        Assert.True(batched.allclose(CausalAttention.Explicit(q, k, v, 6, Scale, visible_B1TS), rtol: 0, atol: 1e-12));
        var row0 = CausalAttention.Explicit(q[..1], k[..1, .., ..4], v[..1, .., ..4], 3, Scale);
        var row1 = CausalAttention.Explicit(q[1..], k[1..], v[1..], 6, Scale);
        Assert.True(batched[..1].allclose(row0, rtol: 0, atol: 1e-12), "the short row saw its padding");
        Assert.True(batched[1..].allclose(row1, rtol: 0, atol: 1e-12));
    }

    [Fact]
    public void FusedInBFloat16StaysWithinItsRoundingOfTheFloat64Result()
    {
        var (q, k, v) = Inputs(16, 16, ScalarType.Float64, seed: 3);
        using var noGrad = no_grad();
        var reference = CausalAttention.Explicit(q, k, v, 0, Scale);
        var bf16 = CausalAttention.Fused(q.to_type(ScalarType.BFloat16), k.to_type(ScalarType.BFloat16), v.to_type(ScalarType.BFloat16), 0, Scale);
        // Inputs rounded to 8 bits of mantissa (relative 2^-9 each) through a softmax of |scores| up to ~10: a few 1e-2 absolute.
        double worst = (bf16.to_type(ScalarType.Float64) - reference).abs().max().item<double>();
        Assert.InRange(worst, 0, 0.05);
    }

    [Fact]
    public void WrittenOutInBFloat16IsAsNearTheFloat64ResultAsTheFusedKernelInValueAndGradients()
    {
        // Tiny's training shapes (4 heads, q/k 48, v 32, 128 tokens), the attention Auto writes out in bf16 on a CPU.
        manual_seed(17);
        var inputs = new[] { randn(2, 4, 128, 48, ScalarType.Float64), randn(2, 4, 128, 48, ScalarType.Float64), randn(2, 4, 128, 32, ScalarType.Float64) };
        var projection = randn(2, 4, 128, 32, ScalarType.Float64);
        const double scale = 0.144; // 1/sqrt(48)
        Tensor[] Run(ScalarType dtype, bool fused)
        {
            var t = inputs.Select(x => x.to_type(dtype).requires_grad_(true)).ToArray();
            var o = fused ? CausalAttention.Fused(t[0], t[1], t[2], 0, scale) : CausalAttention.Explicit(t[0], t[1], t[2], 0, scale);
            var g = autograd.grad([(o * projection.to_type(dtype)).sum()], t);
            return [.. new[] { o }.Concat(g).Select(x => x.detach().to_type(ScalarType.Float64))];
        }
        var exact = Run(ScalarType.Float64, fused: true);
        var fusedBf16 = Run(ScalarType.BFloat16, fused: true);
        var writtenOut = Run(ScalarType.BFloat16, fused: false);
        for (int i = 0; i < exact.Length; i++)
        {
            double norm = exact[i].norm().item<double>();
            double fusedError = (fusedBf16[i] - exact[i]).norm().item<double>() / norm, writtenOutError = (writtenOut[i] - exact[i]).norm().item<double>() / norm;
            // bf16 keeps 8 bits (2^-9 relative per rounding): both a few 1e-3 from the float64 numbers; the written-out form
            // rounds the scores to bf16 before the softmax (HF's eager attention), the flash kernel keeps them in fp32.
            Assert.True(fusedError < 0.02 && writtenOutError < 0.02 && writtenOutError < 2 * fusedError,
                $"{new[] { "output", "dq", "dk", "dv" }[i]}: relative error fused {fusedError:E2}, written out {writtenOutError:E2}");
        }
    }

    [Fact]
    public void AutoWritesOutOnlyBFloat16AttentionOnTheCpuUpTo256Keys()
    {
        using var bf16 = zeros(1, 1, 4, 8, ScalarType.BFloat16);
        using var fp32 = zeros(1, 1, 4, 8);
        Assert.True(CausalAttention.PrefersWrittenOut(bf16, 256));
        Assert.False(CausalAttention.PrefersWrittenOut(bf16, 257));
        Assert.False(CausalAttention.PrefersWrittenOut(fp32, 16));
        Assert.False(CausalAttention.PrefersWrittenOut(zeros(1, 1, 4, 8, ScalarType.Float64), 16));
    }
}

public class CausalAttentionThreadTests
{
    /// <summary>
    /// Training is bit-identical at any world size only if a micro-batch's gradients do not depend on how many torch
    /// threads the process that computes them has (workers on one machine split its cores).
    /// </summary>
    [Theory]
    [InlineData(true, ScalarType.Float32)]
    [InlineData(false, ScalarType.Float32)]
    [InlineData(true, ScalarType.BFloat16)]
    [InlineData(false, ScalarType.BFloat16)] // what Auto runs in bf16 on a CPU
    public void AttentionGradientsAreTheSameBitsWithOneOrTwoThreads(bool fused, ScalarType dtype)
    {
        int before = TorchSharp.torch.get_num_threads();
        try
        {
            Tensor[] Run(int threads)
            {
                TorchSharp.torch.set_num_threads(threads);
                manual_seed(3);
                var q = randn(4, 8, 64, 48).to_type(dtype).requires_grad_(true);
                var k = randn(4, 8, 64, 48).to_type(dtype).requires_grad_(true);
                var v = randn(4, 8, 64, 32).to_type(dtype).requires_grad_(true);
                var o = fused ? CausalAttention.Fused(q, k, v, 0, 0.2) : CausalAttention.Explicit(q, k, v, 0, 0.2);
                var g = autograd.grad([(o * o).sum()], [q, k, v]);
                return [o.detach(), .. g];
            }
            var one = Run(1);
            var two = Run(2);
            for (int i = 0; i < one.Length; i++)
                Assert.True(one[i].eq(two[i]).all().item<bool>(), $"{(fused ? "fused" : "explicit")}: tensor {i} differs between 1 and 2 threads (max {(one[i] - two[i]).abs().max().to_type(ScalarType.Float32).item<float>():E2})");
        }
        finally { TorchSharp.torch.set_num_threads(before); }
    }
}
