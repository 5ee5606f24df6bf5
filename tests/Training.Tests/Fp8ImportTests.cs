// Importing pretrained weights: a transformers-style folder with FP8 (e4m3fn) block-quantized weights and their
// weight_scale_inv, dequantized on load and checked against a float64 computation of the same formula; initFrom's copy
// into a model; the errors a broken folder gets.
using System.Text;
using System.Text.Json.Nodes;
using DeepSeekCluster.Training.IO;
using DeepSeekCluster.Training.Model;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Tests;

public sealed class Fp8ImportTests : IDisposable
{
    readonly string dir = Directory.CreateTempSubdirectory("fp8-import-").FullName;
    public void Dispose() => Directory.Delete(dir, recursive: true);

    const int B0 = 8, B1 = 16; // a block shape that leaves ragged edges on the micro model's weights

    static DeepSeekConfig Micro => DeepSeekConfig.Tiny(50) with
    {
        HiddenSize = 40, IntermediateSize = 72, MoeIntermediateSize = 24, NumHiddenLayers = 2, NumAttentionHeads = 2,
        KvLoraRank = 16, QLoraRank = 24, QkNopeHeadDim = 8, QkRopeHeadDim = 8, VHeadDim = 8,
    };

    /// <summary>e4m3fn by its definition (OCP FP8): (-1)^s · 2^(e-7) · (1 + m/8), subnormal 2^-6 · m/8, S.1111.111 NaN.</summary>
    static double E4M3(byte b)
    {
        int s = b >> 7, e = (b >> 3) & 15, m = b & 7;
        if (e == 15 && m == 7) return double.NaN;
        double v = e == 0 ? Math.Pow(2, -6) * m / 8.0 : Math.Pow(2, e - 7) * (1 + m / 8.0);
        return s == 1 ? -v : v;
    }

    [Fact]
    public void TheFp8TableMatchesTheFormatsDefinition()
    {
        for (int b = 0; b < 256; b++)
        {
            double want = E4M3((byte)b);
            float got = Fp8BlockDequant.E4M3Values[b];
            if (double.IsNaN(want)) Assert.True(float.IsNaN(got), $"0x{b:X2}");
            else Assert.Equal(want, got);
        }
        // Values the OCP specification lists: 1, the largest normal 448, the smallest subnormal 2^-9.
        Assert.Equal((1f, 448f, -448f, MathF.Pow(2, -9)), (Fp8BlockDequant.E4M3Values[0x38], Fp8BlockDequant.E4M3Values[0x7E], Fp8BlockDequant.E4M3Values[0xFE], Fp8BlockDequant.E4M3Values[0x01]));
    }

    /// <summary>
    /// Writes the micro model as transformers writes an FP8 checkpoint: its 2-D projection weights as F8_E4M3 bits with
    /// float32 weight_scale_inv blocks, everything else float32; returns each FP8 weight's float64 value.
    /// </summary>
    Dictionary<string, double[,]> WriteFp8Folder(bool dropAScale = false)
    {
        manual_seed(3);
        using var model = new DeepSeekForCausalLM(Micro).InitializeWeights();
        var random = new Random(5);
        var tensors = new List<(string Name, string Dtype, long[] Shape, byte[] Data)>();
        var expected = new Dictionary<string, double[,]>();
        foreach (var (name, t) in model.HfStateDict())
        {
            bool quantized = t.dim() == 2 && name.EndsWith("proj.weight", StringComparison.Ordinal);
            if (!quantized)
            {
                tensors.Add((name, "F32", t.shape, System.Runtime.InteropServices.MemoryMarshal.AsBytes(t.to_type(ScalarType.Float32).contiguous().data<float>().ToArray().AsSpan()).ToArray()));
                continue;
            }
            int rows = (int)t.shape[0], cols = (int)t.shape[1];
            var bits = new byte[rows * cols];
            for (int i = 0; i < bits.Length; i++) do bits[i] = (byte)random.Next(256); while ((bits[i] & 0x7F) == 0x7F); // no NaN
            int sr = (rows + B0 - 1) / B0, sc = (cols + B1 - 1) / B1;
            var scales = new float[sr * sc];
            for (int i = 0; i < scales.Length; i++) scales[i] = (float)(random.NextDouble() * 0.01 + 1e-4);
            var want = new double[rows, cols];
            for (int i = 0; i < rows; i++)
                for (int j = 0; j < cols; j++) want[i, j] = E4M3(bits[i * cols + j]) * scales[i / B0 * sc + j / B1];
            expected[name] = want;
            tensors.Add((name, "F8_E4M3", t.shape, bits));
            if (!(dropAScale && expected.Count == 1))
                tensors.Add((name + "_scale_inv", "F32", [sr, sc], scales.SelectMany(BitConverter.GetBytes).ToArray()));
        }
        var config = JsonNode.Parse(Micro.ToJson())!.AsObject();
        config["quantization_config"] = new JsonObject
        {
            ["quant_method"] = "fp8", ["fmt"] = "e4m3", ["activation_scheme"] = "dynamic", ["weight_block_size"] = new JsonArray(B0, B1),
        };
        File.WriteAllText(Path.Combine(dir, "config.json"), config.ToJsonString());
        WriteSafetensors(Path.Combine(dir, "model.safetensors"), tensors);
        return expected;
    }

    /// <summary>The safetensors layout written by hand (our writer has no FP8): float32 first so every tensor stays aligned.</summary>
    static void WriteSafetensors(string path, List<(string Name, string Dtype, long[] Shape, byte[] Data)> tensors)
    {
        var ordered = tensors.OrderBy(t => t.Dtype == "F8_E4M3" ? 1 : 0).ToList();
        var header = new JsonObject { ["__metadata__"] = new JsonObject { ["format"] = "pt" } };
        long offset = 0;
        foreach (var t in ordered)
        {
            header[t.Name] = new JsonObject { ["dtype"] = t.Dtype, ["shape"] = new JsonArray(t.Shape.Select(d => (JsonNode)d).ToArray()), ["data_offsets"] = new JsonArray(offset, offset + t.Data.Length) };
            offset += t.Data.Length;
        }
        var json = header.ToJsonString();
        json += new string(' ', (8 - Encoding.UTF8.GetByteCount(json) % 8) % 8);
        using var file = File.Create(path);
        file.Write(BitConverter.GetBytes((ulong)Encoding.UTF8.GetByteCount(json)));
        file.Write(Encoding.UTF8.GetBytes(json));
        foreach (var t in ordered) file.Write(t.Data);
    }

    [Fact]
    public void Fp8BlockQuantizedWeightsAreDequantizedOnLoadAsTheFloat64ReferenceComputesThem()
    {
        var expected = WriteFp8Folder();
        Assert.True(expected.Count >= 8, $"only {expected.Count} FP8 weights in the test folder");
        var loaded = HfModelFolder.Load(dir);
        using var model = loaded.Model;
        var own = model.HfStateDict().ToDictionary(kv => kv.Key, kv => kv.Value);
        foreach (var (name, want) in expected)
        {
            var got = own[name].to_type(ScalarType.Float64).data<double>().ToArray();
            int cols = want.GetLength(1);
            for (int i = 0; i < got.Length; i++)
                Assert.True(Math.Abs(got[i] - want[i / cols, i % cols]) <= 1e-7 * Math.Abs(want[i / cols, i % cols]) + 1e-12,
                            $"{name}[{i / cols}, {i % cols}]: {got[i]} != {want[i / cols, i % cols]}");
        }
        // initFrom: the same weights copied into a model built from the job's config.
        using var fresh = new DeepSeekForCausalLM(Micro).InitializeWeights();
        PretrainedWeights.LoadInto(fresh, dir);
        using var ids = tensor(new long[] { 1, 7, 3, 9, 2 }, [1, 5]);
        model.eval(); fresh.eval();
        using (no_grad())
            Assert.True(model.Forward(ids).Logits_BTV.eq(fresh.Forward(ids).Logits_BTV).all().item<bool>(), "initFrom's model differs from the loaded folder's");
    }

    [Fact]
    public void AnFp8WeightWithoutItsScaleAndAMismatchedModelAreRefusedNamingTheFolder()
    {
        WriteFp8Folder(dropAScale: true);
        var e = Assert.Throws<InvalidDataException>(() => HfModelFolder.Load(dir));
        Assert.Contains("model.safetensors: FP8 tensor '", e.Message);
        Assert.Contains("_scale_inv' to dequantize it with", e.Message);

        WriteFp8Folder();
        using var other = new DeepSeekForCausalLM(Micro with { HiddenSize = 48 }).InitializeWeights();
        var mismatch = Assert.Throws<InvalidDataException>(() => PretrainedWeights.LoadInto(other, dir));
        Assert.Contains(dir, mismatch.Message);
        Assert.Contains("the model expects", mismatch.Message);
        Assert.Contains("does not exist", Assert.Throws<DirectoryNotFoundException>(() => PretrainedWeights.LoadInto(other, dir + "-missing")).Message);
    }
}
