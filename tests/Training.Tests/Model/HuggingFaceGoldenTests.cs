// Our model against goldens from an independent float64 port of HF's DeepseekV3ForCausalLM (tests/reference/).
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.IO;
using DeepSeekCluster.Training.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Tests.Model;

public class HuggingFaceGoldenTests
{
    static string Golden(string name) => Path.Combine(AppContext.BaseDirectory, "Goldens", name);

    static Dictionary<string, Tensor> Expected(string file)
    {
        using var f = SafeTensors.Open(Golden(file));
        return f.Tensors.ToDictionary(t => t.Name, t => f.Read(t.Name));
    }

    static bool Same(Tensor a, Tensor b) => a.shape.SequenceEqual(b.shape) && a.eq(b).all().item<bool>();

    static DeepSeekForCausalLM LoadFloat64(string folder)
    {
        var loaded = HfModelFolder.Load(Golden(folder), dtype: ScalarType.Float64);
        loaded.Model.eval();
        foreach (var moe in loaded.Model.MoeLayers()) moe.RecordRouting = true;
        return loaded.Model;
    }

    [Fact]
    public void AnHfFolderLoadsAndGivesTheReferenceLogits()
    {
        using var model = LoadFloat64("hf-tiny");
        var expected = Expected("hf-tiny-expected.safetensors");
        using var output = model.Forward(expected["input_ids"], withMtp: true).Logits_BTV;
        var diff = (output - expected["logits"]).abs().max().item<double>();
        Assert.True(diff < 1e-9, $"logits differ from the reference by {diff}");
    }

    [Fact]
    public void MtpLogitsMatchTheReference()
    {
        using var model = LoadFloat64("hf-tiny");
        var expected = Expected("hf-tiny-expected.safetensors");
        var output = model.Forward(expected["input_ids"], withMtp: true);
        Assert.Single(output.MtpLogits);
        var diff = (output.MtpLogits[0] - expected["mtp_logits"]).abs().max().item<double>();
        Assert.True(diff < 1e-9, $"MTP logits differ from the reference by {diff}");
    }

    [Fact]
    public void RoutingMatchesTheReferenceIncludingTheBiasAndGroupMask()
    {
        using var model = LoadFloat64("hf-tiny");
        var expected = Expected("hf-tiny-expected.safetensors");
        model.Forward(expected["input_ids"], withMtp: true);
        var layers = model.model.layers.Select(l => l.Moe).Concat(model.mtp.Select(m => m.block.Moe)).ToList();
        for (int l = 0; l < layers.Count; l++)
        {
            if (layers[l] is not { } moe) continue;
            var (sorted, order) = moe.LastRoute!.Indices_NK.sort(-1);
            Assert.True(Same(sorted, expected[$"layer{l}.topk_indices"]), $"layer {l} chose other experts");
            var weights = moe.LastRoute.Weights_NK.gather(1, order);
            Assert.True(allclose(weights, expected[$"layer{l}.topk_weights"], 1e-12, 1e-12), $"layer {l} gate weights differ");
        }
    }

    [Fact]
    public void YarnCosSinMatchTheReference()
    {
        using var model = LoadFloat64("hf-tiny");
        var expected = Expected("hf-tiny-expected.safetensors");
        var (cos, sin) = model.Rotary.CosSin(0, 12, ScalarType.Float64, CPU);
        Assert.True(allclose(cos, expected["rope.cos"], 1e-7, 1e-7));
        Assert.True(allclose(sin, expected["rope.sin"], 1e-7, 1e-7));
    }

    [Fact]
    public void GreedyContinuationMatchesTheReferenceWithAndWithoutTheCache()
    {
        using var model = LoadFloat64("hf-tiny");
        var expected = Expected("hf-tiny-expected.safetensors");
        var prompt = expected["greedy_prompt"][0].data<long>().Select(x => (int)x).ToArray();
        var want = expected["greedy_continuation"][0].data<long>().Select(x => (int)x).ToArray();
        Assert.Equal(want, TextGenerator.Generate(model, prompt, new SamplingOptions { MaxNewTokens = want.Length }));
        Assert.Equal(want, TextGenerator.Generate(model, prompt, new SamplingOptions { MaxNewTokens = want.Length, NoCache = true }));
    }

    [Fact]
    public void ThePlainVariantWithRopeParametersAndNoQLoraMatchesTheReference()
    {
        using var model = LoadFloat64("hf-tiny-plain");
        Assert.Null(model.Config.QLoraRank);
        Assert.False(model.Config.RopeInterleave);
        Assert.Null(model.Config.RopeScaling);
        var expected = Expected("hf-tiny-plain-expected.safetensors");
        using var logits = model.forward(expected["input_ids"]);
        var diff = (logits - expected["logits"]).abs().max().item<double>();
        Assert.True(diff < 1e-9, $"logits differ from the reference by {diff}");
    }

    [Fact]
    public void SavingAndReloadingAFolderKeepsTheWeightsAndTheLogits()
    {
        using var model = LoadFloat64("hf-tiny");
        model.to(ScalarType.Float32);
        var dir = Directory.CreateTempSubdirectory("hf-roundtrip-").FullName;
        try
        {
            HfModelFolder.Save(dir, model, tokenizer: null, maxShardBytes: 100_000); // forces several shards
            Assert.True(File.Exists(Path.Combine(dir, "model.safetensors.index.json")));
            using var reloaded = HfModelFolder.Load(dir).Model;
            var a = model.HfStateDict().ToDictionary(kv => kv.Key, kv => kv.Value);
            foreach (var (name, t) in reloaded.HfStateDict())
                Assert.True(Same(t, a[name]), $"{name} changed in the round trip");
            // The MTP layer travels as model.layers.3 with its own copies of the embedding and head, like V3's checkpoint.
            using var index = System.Text.Json.JsonDocument.Parse(File.ReadAllText(Path.Combine(dir, "model.safetensors.index.json")));
            Assert.True(index.RootElement.GetProperty("weight_map").TryGetProperty("model.layers.3.eh_proj.weight", out _));
            Assert.True(index.RootElement.GetProperty("weight_map").TryGetProperty("model.layers.3.shared_head.head.weight", out _));
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public void AFolderWithAWrongShapeIsRejectedWithTheTensorNamed()
    {
        var dir = Directory.CreateTempSubdirectory("hf-bad-").FullName;
        try
        {
            foreach (var f in Directory.GetFiles(Golden("hf-tiny"))) File.Copy(f, Path.Combine(dir, Path.GetFileName(f)));
            var config = File.ReadAllText(Path.Combine(dir, "config.json")).Replace("\"kv_lora_rank\": 32", "\"kv_lora_rank\": 16");
            File.WriteAllText(Path.Combine(dir, "config.json"), config);
            var e = Assert.Throws<InvalidDataException>(() => HfModelFolder.Load(dir));
            Assert.Contains("self_attn.kv_", e.Message);
            Assert.Contains("has shape", e.Message);
        }
        finally { Directory.Delete(dir, true); }
    }
}
