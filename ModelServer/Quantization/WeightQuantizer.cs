// Weight-only int8 (per output channel) and int4 (groups of 128 along the input) rounding of the model's matmul weights.
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace DeepSeekCluster.ModelServer.Quantization;

public enum WeightFormat { Fp32, Int8, Int4 }

/// <param name="Tensors">Linear weights quantized.</param>
/// <param name="Fp32Bytes">Their size as float32.</param>
/// <param name="QuantizedBytes">Their size as integers plus one float32 scale per channel or group.</param>
/// <param name="MaxAbsError">Largest |w - dequantized w| over all of them.</param>
public sealed record QuantizationReport(WeightFormat Format, int Tensors, long Fp32Bytes, long QuantizedBytes, double MaxAbsError);

/// <summary>
/// Symmetric rounding: int8 with scale max|w_row| / 127 per output row; int4 with scale max|w_group| / 7 per group of
/// <see cref="Int4Group"/> inputs of a row (the last group of a row may be shorter). Every nn.Linear of the decoder
/// and the output head is quantized; embeddings, norms and the MoE router's gate stay float (the router's top-k is
/// where small changes flip discrete choices). The model keeps computing in its float dtype on the rounded values:
/// TorchSharp 0.107 exposes no weight-only integer matmul, so this gives the quality of int8/int4 serving and the
/// size of its stored weights, not yet its runtime memory (docs/serving.md, "Quantization").
/// </summary>
public static class WeightQuantizer
{
    public const int Int4Group = 128;

    public static WeightFormat Parse(string? text, string key) => text?.Trim().ToLowerInvariant() switch
    {
        null or "" or "fp32" or "none" => WeightFormat.Fp32,
        "int8" => WeightFormat.Int8,
        "int4" => WeightFormat.Int4,
        _ => throw new ArgumentException($"{key} must be fp32, int8 or int4, got '{text}'"),
    };

    public static QuantizationReport Quantize(nn.Module model, WeightFormat format)
    {
        if (format == WeightFormat.Fp32) throw new ArgumentException("fp32 is not a quantized format");
        int count = 0;
        long fp32 = 0, quantized = 0;
        double maxError = 0;
        using var noGrad = no_grad();
        foreach (var (name, module) in model.named_modules())
        {
            if (module is not Linear linear || name.StartsWith("mtp.", StringComparison.Ordinal)) continue;
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
        var w = w_OI.to_type(ScalarType.Float32);
        var scale_O1 = (w.abs().amax([1L], keepdim: true) / 127.0).clamp_min(1e-12);
        var q = (w / scale_O1).round().clamp(-127, 127);
        return ((q * scale_O1).to_type(w_OI.dtype), w_OI.numel() + 4 * w_OI.shape[0]);
    }

    /// <summary>The dequantized weight and the bytes of packed 4-bit values plus a float32 scale per group.</summary>
    static (Tensor rounded, long bytes) Int4(Tensor w_OI)
    {
        long outputs = w_OI.shape[0], inputs = w_OI.shape[1];
        long groups = (inputs + Int4Group - 1) / Int4Group;
        var w = w_OI.to_type(ScalarType.Float32);
        var padded_OGg = nn.functional.pad(w, [0, groups * Int4Group - inputs]).view(outputs, groups, Int4Group);
        var scale_OG1 = (padded_OGg.abs().amax([2L], keepdim: true) / 7.0).clamp_min(1e-12);
        var q = (padded_OGg / scale_OG1).round().clamp(-7, 7);
        var rounded = (q * scale_OG1).view(outputs, groups * Int4Group).narrow(1, 0, inputs);
        return (rounded.to_type(w_OI.dtype), (w_OI.numel() + 1) / 2 + 4 * outputs * groups);
    }
}
