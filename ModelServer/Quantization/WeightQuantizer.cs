// Weight-only int8 (per output channel) and int4 (groups of 128 along the input) rounding of the model's matmul weights.
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace DeepSeekCluster.ModelServer.Quantization;

/// <summary>Bf16: every float parameter (and so every activation and the latent cache) in bfloat16, not integer codes.</summary>
public enum WeightFormat { Fp32, Int8, Int4, Bf16 }

/// <param name="Tensors">Linear weights quantized.</param>
/// <param name="Fp32Bytes">Their size as float32.</param>
/// <param name="QuantizedBytes">Their size as integers plus one float32 scale per channel or group.</param>
/// <param name="MaxAbsError">Largest |w - dequantized w| over all of them.</param>
public sealed record QuantizationReport(WeightFormat Format, int Tensors, long Fp32Bytes, long QuantizedBytes, double MaxAbsError);

/// <summary>
/// Symmetric rounding: int8 with scale max|w_row| / 127 per output row; int4 with scale max|w_group| / 7 per group of
/// <see cref="Int4Group"/> inputs of a row (the last group of a row may be shorter). Every nn.Linear of the decoder
/// and the output head is quantized; embeddings, norms and the MoE router's gate stay float (the router's top-k is
/// where small changes flip discrete choices). The model computes in its float dtype on the rounded values (TorchSharp
/// 0.107 exposes no weight-only integer matmul); the server keeps the decoder layers' weights as integers and expands
/// one layer at a time (<see cref="PackedLayerWeights"/>), so the rounding here serves lm_head and measurements.
/// </summary>
public static class WeightQuantizer
{
    public const int Int4Group = 128;

    public static WeightFormat Parse(string? text, string key) => text?.Trim().ToLowerInvariant() switch
    {
        null or "" or "fp32" or "none" => WeightFormat.Fp32,
        "int8" => WeightFormat.Int8,
        "int4" => WeightFormat.Int4,
        "bf16" => WeightFormat.Bf16,
        _ => throw new ArgumentException($"{key} must be fp32, bf16, int8 or int4, got '{text}'"),
    };

    /// <summary>
    /// The whole model in bfloat16 (weights, so activations and the latent cache too; norms and softmax upcast as HF
    /// does): half the bytes a decode step reads, and oneDNN's bf16 matmuls on CPUs with AVX512-BF16.
    /// </summary>
    public static QuantizationReport ToBf16(nn.Module model)
    {
        int count = 0;
        long fp32 = 0;
        double maxError = 0;
        using (no_grad())
            foreach (var (_, p) in model.named_parameters())
            {
                if (!p.is_floating_point()) continue;
                using var scope = NewDisposeScope();
                maxError = Math.Max(maxError, (p.to_type(ScalarType.BFloat16).to_type(p.dtype) - p).abs().max().item<float>());
                count++;
                fp32 += p.numel() * 4;
            }
        model.to(ScalarType.BFloat16);
        return new QuantizationReport(WeightFormat.Bf16, count, fp32, fp32 / 2, maxError);
    }

    /// <summary>Rounds every Linear weight (MTP modules excepted) whose module name <paramref name="include"/> accepts (all by default).</summary>
    public static QuantizationReport Quantize(nn.Module model, WeightFormat format, Func<string, bool>? include = null)
    {
        if (format is not (WeightFormat.Int8 or WeightFormat.Int4)) throw new ArgumentException($"{format} is not an integer format");
        int count = 0;
        long fp32 = 0, quantized = 0;
        double maxError = 0;
        using var noGrad = no_grad();
        foreach (var (name, module) in model.named_modules())
        {
            if (module is not Linear linear || name.StartsWith("mtp.", StringComparison.Ordinal) || include?.Invoke(name) == false) continue;
            var w = linear.weight!;
            using var scope = NewDisposeScope();
            var (rounded, bytes) = format == WeightFormat.Int8 ? Int8(w) : Int4(w);
            maxError = Math.Max(maxError, (rounded - w).abs().max().item<float>());
            w.copy_(rounded);
            count++;
            fp32 += w.numel() * 4;
            quantized += bytes;
        }
        return new QuantizationReport(format, count, fp32, quantized, maxError);
    }

    /// <summary>The dequantized weight and the bytes of int8 values plus a float32 scale per row.</summary>
    static (Tensor rounded, long bytes) Int8(Tensor w_OI)
    {
        var (q_OI, scale_O1) = Int8Codes(w_OI);
        return ((q_OI.to_type(ScalarType.Float32) * scale_O1).to_type(w_OI.dtype), w_OI.numel() + 4 * w_OI.shape[0]);
    }

    /// <summary>The dequantized weight and the bytes of packed 4-bit values plus a float32 scale per group.</summary>
    static (Tensor rounded, long bytes) Int4(Tensor w_OI)
    {
        long outputs = w_OI.shape[0], inputs = w_OI.shape[1];
        var (q_OGg, scale_OG1) = Int4Codes(w_OI);
        return (Int4Values(q_OGg, scale_OG1, inputs).to_type(w_OI.dtype), (w_OI.numel() + 1) / 2 + 4 * outputs * q_OGg.shape[1]);
    }

    /// <summary>int8 codes in [-127, 127] (O, I) and float32 scales (O, 1): w ≈ q * scale.</summary>
    public static (Tensor q_OI, Tensor scale_O1) Int8Codes(Tensor w_OI)
    {
        var w = w_OI.to_type(ScalarType.Float32);
        var scale_O1 = (w.abs().amax([1L], keepdim: true) / 127.0).clamp_min(1e-12);
        return ((w / scale_O1).round().clamp(-127, 127).to_type(ScalarType.Int8), scale_O1);
    }

    /// <summary>int4 codes in [-7, 7] as int8 (O, G, 128), the inputs zero-padded to whole groups, and scales (O, G, 1).</summary>
    public static (Tensor q_OGg, Tensor scale_OG1) Int4Codes(Tensor w_OI)
    {
        long outputs = w_OI.shape[0], inputs = w_OI.shape[1];
        long groups = (inputs + Int4Group - 1) / Int4Group;
        var w = w_OI.to_type(ScalarType.Float32);
        var padded_OGg = nn.functional.pad(w, [0, groups * Int4Group - inputs]).view(outputs, groups, Int4Group);
        var scale_OG1 = (padded_OGg.abs().amax([2L], keepdim: true) / 7.0).clamp_min(1e-12);
        return ((padded_OGg / scale_OG1).round().clamp(-7, 7).to_type(ScalarType.Int8), scale_OG1);
    }

    /// <summary>The float32 weight (O, I) of int4 codes and their scales.</summary>
    public static Tensor Int4Values(Tensor q_OGg, Tensor scale_OG1, long inputs)
    {
        long outputs = q_OGg.shape[0], groups = q_OGg.shape[1];
        return (q_OGg.to_type(ScalarType.Float32) * scale_OG1).view(outputs, groups * Int4Group).narrow(1, 0, inputs);
    }
}
