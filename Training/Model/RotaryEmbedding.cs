// Rotary position embedding for MLA's decoupled rope part: default or YaRN frequencies (HF modeling_rope_utils).
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Model;

/// <summary>
/// Inverse frequencies and the attention factor for a rope dimension d = qk_rope_head_dim.
/// Shapes: cos/sin (T, d) with the frequencies repeated as cat(freqs, freqs), HF's layout.
/// </summary>
public sealed class RotaryEmbedding
{
    public double[] InvFreq { get; }           // (d/2)
    public double AttentionFactor { get; }     // multiplies cos and sin (YaRN "mscale" on the rotated part)
    public int Dim { get; }
    readonly bool interleave;

    public RotaryEmbedding(DeepSeekConfig config)
    {
        Dim = config.QkRopeHeadDim;
        interleave = config.RopeInterleave;
        (InvFreq, AttentionFactor) = Frequencies(config);
    }

    static double YarnMscale(double scale, double mscale) => scale <= 1 ? 1.0 : 0.1 * mscale * Math.Log(scale) + 1.0;

    /// <summary>The softmax scale of MLA: qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN.</summary>
    public static double SoftmaxScale(DeepSeekConfig config)
    {
        double scale = Math.Pow(config.QkHeadDim, -0.5);
        if (config.RopeScaling is { IsYarn: true } rs && rs.MscaleAllDim is double all && all != 0)
        {
            double m = YarnMscale(rs.Factor, all);
            scale *= m * m;
        }
        return scale;
    }

    static (double[] invFreq, double attentionFactor) Frequencies(DeepSeekConfig config)
    {
        int d = config.QkRopeHeadDim;
        double theta = config.RopeTheta;
        var extrapolation = new double[d / 2];
        for (int i = 0; i < d / 2; i++)
            extrapolation[i] = 1.0 / Math.Pow(theta, 2.0 * i / d);
        if (config.RopeScaling is not { IsYarn: true } rs) return (extrapolation, 1.0);

        double factor = rs.Factor;
        double attentionFactor = rs.AttentionFactor
            ?? (rs.Mscale is double ms && ms != 0 && rs.MscaleAllDim is double msa && msa != 0
                ? YarnMscale(factor, ms) / YarnMscale(factor, msa)
                : YarnMscale(factor, 1.0));
        double betaFast = rs.BetaFast is double bf && bf != 0 ? bf : 32;
        double betaSlow = rs.BetaSlow is double bs && bs != 0 ? bs : 1;
        int originalMax = rs.OriginalMaxPositionEmbeddings ?? config.MaxPositionEmbeddings;

        // Dimensions that rotate fewer than beta_slow times over the original context are interpolated,
        // more than beta_fast times extrapolated, with a linear ramp between.
        double CorrectionDim(double rotations) => d * Math.Log(originalMax / (rotations * 2 * Math.PI)) / (2 * Math.Log(theta));
        double low = CorrectionDim(betaFast), high = CorrectionDim(betaSlow);
        if (rs.Truncate ?? true) { low = Math.Floor(low); high = Math.Ceiling(high); }
        low = Math.Max(low, 0); high = Math.Min(high, d - 1);
        if (low == high) high += 0.001;

        var inv = new double[d / 2];
        for (int i = 0; i < d / 2; i++)
        {
            // HF computes these in float32; the ramp is exact either way for integer low/high.
            double ramp = Math.Clamp((i - low) / (high - low), 0, 1);
            double extrapolationWeight = 1 - ramp;
            double interpolated = extrapolation[i] / factor;
            inv[i] = interpolated * (1 - extrapolationWeight) + extrapolation[i] * extrapolationWeight;
        }
        return (inv, attentionFactor);
    }

    /// <summary>cos and sin for absolute positions [start, start+T): (T, d) each, in the given dtype.</summary>
    public (Tensor cos, Tensor sin) CosSin(long start, long length, ScalarType dtype, Device device)
    {
        using var scope = NewDisposeScope();
        // Angles in float64 then cast: positions up to 160k times frequencies lose digits in float32.
        var pos_T = arange(start, start + length, dtype: ScalarType.Float64);
        var inv_F = tensor(InvFreq, dtype: ScalarType.Float64);
        var freqs_TF = outer(pos_T, inv_F);
        var emb_Td = cat([freqs_TF, freqs_TF], -1);
        var cos = (emb_Td.cos() * AttentionFactor).to(dtype, device);
        var sin = (emb_Td.sin() * AttentionFactor).to(dtype, device);
        return (cos.MoveToOuterDisposeScope(), sin.MoveToOuterDisposeScope());
    }

    /// <summary>cos and sin for rows that start at different positions: row b covers [starts[b], starts[b]+T); (B, 1, T, d) each.</summary>
    public (Tensor cos, Tensor sin) CosSin(IReadOnlyList<long> starts, long length, ScalarType dtype, Device device)
    {
        using var scope = NewDisposeScope();
        var positions = new double[starts.Count * length];
        for (int b = 0; b < starts.Count; b++)
            for (long t = 0; t < length; t++) positions[b * length + t] = starts[b] + t;
        var pos_N = tensor(positions, dtype: ScalarType.Float64);
        var inv_F = tensor(InvFreq, dtype: ScalarType.Float64);
        var freqs_NF = outer(pos_N, inv_F);
        var emb_Nd = cat([freqs_NF, freqs_NF], -1).view(starts.Count, 1, length, Dim);
        var cos = (emb_Nd.cos() * AttentionFactor).to(dtype, device);
        var sin = (emb_Nd.sin() * AttentionFactor).to(dtype, device);
        return (cos.MoveToOuterDisposeScope(), sin.MoveToOuterDisposeScope());
    }

    /// <summary>
    /// Rotates x (..., T, d). With rope_interleave the stored layout pairs dimensions (2i, 2i+1); HF first
    /// de-interleaves them to (i, i + d/2) and then applies the rotate-half form, which we do the same way.
    /// </summary>
    public Tensor Apply(Tensor x, Tensor cos_Td, Tensor sin_Td)
    {
        using var scope = NewDisposeScope();
        if (interleave)
        {
            var shape = x.shape;
            var pairs = x.reshape([.. shape[..^1], Dim / 2, 2]);
            x = pairs.transpose(-1, -2).reshape(shape);
        }
        var x1 = x[TensorIndex.Ellipsis, TensorIndex.Slice(0, Dim / 2)];
        var x2 = x[TensorIndex.Ellipsis, TensorIndex.Slice(Dim / 2, null)];
        var rotated = cat([-x2, x1], -1);
        return (x * cos_Td + rotated * sin_Td).MoveToOuterDisposeScope();
    }
}
