// FP8 block-quantized weights (DeepSeek-V3's release, transformers' "fp8" quantization_config) turned back into float32 on
// load: w[i, j] = fp8(q[i, j]) · weight_scale_inv[i / B0, j / B1]. Not a quantizer, and not a loader of anything else.
using System.Text.Json;
using System.Text.Json.Nodes;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.IO;

public static class Fp8BlockDequant
{
    public const string ScaleSuffix = "_scale_inv";

    /// <summary>The value of every e4m3fn bit pattern (OCP FP8: bias 7, no infinities, S.1111.111 is NaN).</summary>
    public static float[] E4M3Values { get; } = Enumerable.Range(0, 256).Select(b => E4M3ToFloat((byte)b)).ToArray();

    /// <summary>
    /// Widens the e4m3fn bits into a float32's: the exponent rebiased from 7 to 127, the 3 mantissa bits moved to the top
    /// of the 23; subnormals (exponent 0) are m/8 · 2^-6, which float32 holds exactly.
    /// </summary>
    static float E4M3ToFloat(byte b)
    {
        uint sign = (uint)(b >> 7) << 31, exponent = (uint)(b >> 3) & 0xF, mantissa = (uint)b & 0x7;
        if (exponent == 0xF && mantissa == 0x7) return float.NaN;
        if (exponent == 0) return (sign != 0 ? -1 : 1) * mantissa * MathF.Pow(2, -9);
        return BitConverter.UInt32BitsToSingle(sign | ((exponent + 120) << 23) | (mantissa << 20));
    }

    /// <summary>
    /// Replaces every F8_E4M3 tensor of <paramref name="weights"/> (read as raw bits) by its float32 value and drops the
    /// scales. <paramref name="dir"/> is the model folder: its config.json's quantization_config gives the block shape
    /// (128 × 128 when absent), its safetensors headers which tensors are FP8.
    /// </summary>
    public static void Apply(Dictionary<string, Tensor> weights, string dir)
    {
        var fp8 = Fp8TensorNames(dir);
        if (fp8.Count == 0) return;
        var (b0, b1) = BlockShape(dir);
        using var lut = tensor(E4M3Values);
        foreach (var (name, file) in fp8)
        {
            var q = weights[name];
            if (!weights.TryGetValue(name + ScaleSuffix, out var scale))
                throw new InvalidDataException($"{file}: FP8 tensor '{name}' has no '{name}{ScaleSuffix}' to dequantize it with");
            if (q.dim() != 2)
                throw new InvalidDataException($"{file}: FP8 tensor '{name}' has {q.dim()} dimensions; block quantization is of 2-D weights");
            long rows = q.shape[0], cols = q.shape[1];
            long[] want = [(rows + b0 - 1) / b0, (cols + b1 - 1) / b1];
            if (!scale.shape.SequenceEqual(want))
                throw new InvalidDataException($"{file}: '{name}{ScaleSuffix}' is [{string.Join(", ", scale.shape)}]; {b0} x {b1} blocks of [{rows}, {cols}] need [{want[0]}, {want[1]}]");
            using var scope = NewDisposeScope();
            var values = lut.index_select(0, q.to_type(ScalarType.Int64).flatten()).reshape(rows, cols);
            var blockScale = scale.to_type(ScalarType.Float32).repeat_interleave(b0, 0).narrow(0, 0, rows).repeat_interleave(b1, 1).narrow(1, 0, cols);
            weights[name] = (values * blockScale).MoveToOuterDisposeScope();
            q.Dispose();
            weights.Remove(name + ScaleSuffix);
            scale.Dispose();
        }
    }

    /// <summary>The F8_E4M3 tensors of the folder's weight files, with the file each lives in.</summary>
    static Dictionary<string, string> Fp8TensorNames(string dir)
    {
        var result = new Dictionary<string, string>(StringComparer.Ordinal);
        string single = Path.Combine(dir, HfWeights.SingleFileName);
        List<string> files = File.Exists(single) ? [single] : [.. Directory.EnumerateFiles(dir, "*.safetensors").Order()];
        foreach (var path in files)
        {
            using var file = SafeTensors.Open(path);
            foreach (var info in file.Tensors.Where(t => t.Dtype == "F8_E4M3")) result[info.Name] = path;
        }
        return result;
    }

    /// <summary>quantization_config.weight_block_size of config.json; 128 × 128 (DeepSeek-V3's) when it names none.</summary>
    static (int, int) BlockShape(string dir)
    {
        var path = Path.Combine(dir, HfModelFolder.ConfigFile);
        if (!File.Exists(path) || JsonNode.Parse(File.ReadAllText(path)) is not JsonObject config || config["quantization_config"] is not JsonObject q) return (128, 128);
        if (q["quant_method"]?.GetValue<string>() is { } method && method != "fp8")
            throw new InvalidDataException($"{path}: quantization_config.quant_method is '{method}'; only 'fp8' block quantization is dequantized on load");
        if (q["fmt"]?.GetValue<string>() is { } fmt && fmt != "e4m3")
            throw new InvalidDataException($"{path}: quantization_config.fmt is '{fmt}'; expected 'e4m3'");
        if (q["weight_block_size"] is not JsonArray { Count: 2 } block) return (128, 128);
        try
        {
            int b0 = block[0]!.GetValue<int>(), b1 = block[1]!.GetValue<int>();
            return b0 > 0 && b1 > 0 ? (b0, b1) : throw new InvalidDataException($"{path}: quantization_config.weight_block_size [{b0}, {b1}] must be positive");
        }
        catch (Exception e) when (e is InvalidOperationException or FormatException or JsonException)
        {
            throw new InvalidDataException($"{path}: quantization_config.weight_block_size must be two integers", e);
        }
    }
}
