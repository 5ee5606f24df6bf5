// Causal softmax attention for MLA, where queries and keys are wider than values (qk_nope + qk_rope against v_head_dim).
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Model;

// Shape legend: B batch, H heads, T queries (the new tokens), S keys (cached + new), Q query/key width, V value width.

/// <summary>
/// How a layer computes attention without a cache: <see cref="CausalAttention.Fused"/>, <see cref="CausalAttention.Explicit"/>
/// (written out), or Auto, which picks by device, dtype and length (<see cref="CausalAttention.PrefersWrittenOut"/>).
/// </summary>
public enum AttentionKernel { Auto, Fused, WrittenOut }

public static class CausalAttention
{
    /// <summary>
    /// The longest key sequence whose bf16 attention Auto writes out on a CPU. Measured (bench precision-parts, one
    /// thread's CPU seconds, forward + backward): libtorch's CPU flash kernel takes 2.3–2.4× its fp32 time in a bf16
    /// backward at 128 keys (tiny 16 × 4 heads, q/k 48, v 32: 0.028 s against the written-out 0.012 s) and 0.083 against
    /// 0.051 s at 256 (small 8 × 8 heads, q/k 96); at 512 (tiny 4 × 4) and 1024 (small 2 × 8) the fused kernel wins
    /// (0.045 against 0.064 s, 0.195 against 0.43 s). In fp32 the two are even at 128 and fused wins at 256: fp32 keeps it.
    /// </summary>
    public const long WrittenOutMaxKeys = 256;

    /// <summary>
    /// Whether <see cref="AttentionKernel.Auto"/> writes attention over <paramref name="keys"/> keys out for queries like
    /// <paramref name="q_BHTQ"/>: bf16 on a CPU up to <see cref="WrittenOutMaxKeys"/> keys. The written-out form is HF's
    /// eager attention (bf16 matmuls with fp32 accumulation, the softmax in fp32); it keeps the (T, S) probabilities for
    /// the backward, 6 bytes each per head, which at these lengths is a few MiB a layer.
    /// </summary>
    public static bool PrefersWrittenOut(Tensor q_BHTQ, long keys) => PrefersWrittenOut(q_BHTQ.device_type, q_BHTQ.dtype, keys);

    /// <summary>The same decision from the queries' device and dtype alone: the memory planner predicts the form a layer will run by it.</summary>
    public static bool PrefersWrittenOut(TorchSharp.DeviceType device, ScalarType dtype, long keys) =>
        device == TorchSharp.DeviceType.CPU && dtype == ScalarType.BFloat16 && keys <= WrittenOutMaxKeys;

    /// <summary>Sets every attention layer of <paramref name="model"/> (main and MTP) to <paramref name="kernel"/>.</summary>
    public static void Apply(DeepSeekForCausalLM model, AttentionKernel kernel)
    {
        foreach (var (_, module) in model.named_modules())
            if (module is MultiHeadLatentAttention attention) attention.Kernel = kernel;
    }

    /// <summary>
    /// Through scaled_dot_product_attention, so libtorch picks its fused kernels (flash or memory-efficient on CUDA, the
    /// flash kernel on CPU) instead of materialising the (T, S) scores. Query i sits at absolute position past + i and sees
    /// keys 0..past + i; or, given <paramref name="visible_B1TS"/> (rows of different lengths in one batch, as a server's
    /// decode batch holds), exactly the keys it marks true.
    /// </summary>
    public static Tensor Fused(Tensor q_BHTQ, Tensor k_BHSQ, Tensor v_BHSV, long past, double scale, Tensor? visible_B1TS = null)
    {
        using var scope = NewDisposeScope();
        long T = q_BHTQ.shape[2], S = k_BHSQ.shape[2];
        // The binding has no scale argument and scales by 1/sqrt(Q); MLA's scale differs under YaRN (mscale²), so the
        // difference is folded into the query, which costs one elementwise pass over it.
        double queryFactor = scale * Math.Sqrt(q_BHTQ.shape[^1]);
        if (Math.Abs(queryFactor - 1.0) > 1e-12) q_BHTQ = q_BHTQ * queryFactor;
        // libtorch's fused kernels want values as wide as queries; zero columns add nothing to the output and are cut off.
        long V = v_BHSV.shape[^1], Q = q_BHTQ.shape[^1];
        if (V < Q) v_BHSV = nn.functional.pad(v_BHSV, [0, Q - V]);
        Tensor out_BHTV;
        if (visible_B1TS is not null)
            out_BHTV = nn.functional.scaled_dot_product_attention(q_BHTQ, k_BHSQ, v_BHSV, visible_B1TS);
        else if (T == 1 || past == 0)
            out_BHTV = nn.functional.scaled_dot_product_attention(q_BHTQ, k_BHSQ, v_BHSV, is_casual: T > 1);
        else
        {
            // Prefill onto a cache: libtorch's is_causal aligns the mask top-left, ours is bottom-right (true = may attend).
            var allowed_TS = ones(T, S, ScalarType.Bool, q_BHTQ.device).tril(past);
            out_BHTV = nn.functional.scaled_dot_product_attention(q_BHTQ, k_BHSQ, v_BHSV, allowed_TS);
        }
        if (V < Q) out_BHTV = out_BHTV.narrow(-1, 0, V);
        return out_BHTV.MoveToOuterDisposeScope();
    }

    /// <summary>
    /// The same attention written out (scores, mask, softmax in at least float32 as HF's eager attention does, values):
    /// the reference the fused path is checked against.
    /// </summary>
    public static Tensor Explicit(Tensor q_BHTQ, Tensor k_BHSQ, Tensor v_BHSV, long past, double scale, Tensor? visible_B1TS = null)
    {
        using var scope = NewDisposeScope();
        long T = q_BHTQ.shape[2], S = k_BHSQ.shape[2];
        var scores_BHTS = matmul(q_BHTQ, k_BHSQ.transpose(-1, -2)) * scale;
        if (visible_B1TS is not null)
            scores_BHTS = scores_BHTS.masked_fill(visible_B1TS.logical_not(), double.NegativeInfinity);
        else if (T > 1)
        {
            var mask_TS = ones(T, S, ScalarType.Bool, q_BHTQ.device).triu(past + 1);
            scores_BHTS = scores_BHTS.masked_fill(mask_TS, double.NegativeInfinity);
        }
        var probs = scores_BHTS.dtype is ScalarType.BFloat16 or ScalarType.Float16
            ? scores_BHTS.softmax(-1, ScalarType.Float32).to_type(scores_BHTS.dtype)
            : scores_BHTS.softmax(-1);
        return matmul(probs, v_BHSV).MoveToOuterDisposeScope();
    }
}
