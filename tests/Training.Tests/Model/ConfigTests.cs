// Presets, parameter counts against the published model sizes, and config.json reading.
using DeepSeekCluster.Training.Model;

namespace DeepSeekCluster.Training.Tests.Model;

public class ConfigTests
{
    [Fact]
    public void TheParameterCountOfTheTinyPresetEqualsTheModulesOwnCount()
    {
        var config = DeepSeekConfig.Tiny();
        using var model = new DeepSeekForCausalLM(config);
        long all = model.parameters().Sum(p => p.numel());
        Assert.Equal(config.ParameterCount() + config.MtpParameterCount(), all);
    }

    [Fact]
    public void DeepSeekV3HasItsPublished671BParametersWith37BActive()
    {
        var v3 = DeepSeekConfig.DeepSeekV3_671B();
        Assert.InRange(v3.ParameterCount() / 1e9, 670.5, 672.0);           // "671B total"
        Assert.InRange(v3.ParameterCount(activeOnly: true) / 1e9, 36.5, 38.0); // "37B activated"
        // HF's folder is 685B: the main model plus a 14B MTP module that stores its own embedding and head copy.
        double mtpWithCopies = (v3.MtpParameterCount() + 2L * v3.VocabSize * v3.HiddenSize) / 1e9;
        Assert.InRange(v3.ParameterCount() / 1e9 + mtpWithCopies, 684, 686);
    }

    [Fact]
    public void DeepSeekV2LiteHasItsPublished15Point7BParameters()
    {
        var lite = DeepSeekConfig.DeepSeekV2Lite();
        Assert.InRange(lite.ParameterCount() / 1e9, 15.6, 15.8);
        Assert.InRange(lite.ParameterCount(activeOnly: true) / 1e9, 2.6, 2.8); // 2.4B without the embedding
    }

    [Fact]
    public void TheV2LiteShapedPresetIsTheDeepestThatLeavesAQuarterOf80GBForActivations()
    {
        var preset = DeepSeekConfig.Preset("v2-lite-80gb");
        var lite = DeepSeekConfig.DeepSeekV2Lite();
        Assert.Equal((lite.HiddenSize, lite.KvLoraRank, lite.QkNopeHeadDim, lite.QkRopeHeadDim, lite.VHeadDim),
            (preset.HiddenSize, preset.KvLoraRank, preset.QkNopeHeadDim, preset.QkRopeHeadDim, preset.VHeadDim));
        Assert.Equal((64, 1408, 2, 6), (preset.NRoutedExperts, preset.MoeIntermediateSize, preset.NSharedExperts, preset.NumExpertsPerTok));
        Assert.Empty(preset.Problems());

        const double budget = 0.75 * 80e9;
        double StateBytes(DeepSeekConfig c) => (double)(c.ParameterCount() + c.MtpParameterCount()) * DeepSeekConfig.Bf16AdamWStateBytesPerParameter;
        Assert.InRange(StateBytes(preset), 0, budget);
        Assert.True(StateBytes(preset with { NumHiddenLayers = preset.NumHiddenLayers + 1 }) > budget, "a deeper model would still fit");
        Assert.InRange(preset.ParameterCount() / 1e9, 1.6, 1.75);
    }

    [Fact]
    public void ConfigJsonReadsBothRopeSpellingsAndRejectsBadValuesByKey()
    {
        var modern = DeepSeekConfig.FromJson("""{"model_type":"deepseek_v3","rope_parameters":{"rope_type":"yarn","rope_theta":50000.0,"factor":8.0,"original_max_position_embeddings":4096,"mscale":1.0,"mscale_all_dim":1.0}}""");
        Assert.Equal(50000.0, modern.RopeTheta);
        Assert.True(modern.RopeScaling!.IsYarn);
        Assert.Equal(8.0, modern.RopeScaling.Factor);
        var classic = DeepSeekConfig.FromJson("""{"rope_theta":10000,"rope_scaling":{"type":"yarn","factor":40}}""");
        Assert.True(classic.RopeScaling!.IsYarn);

        var bad = DeepSeekConfig.Tiny() with { NRoutedExperts = 9, TopkGroup = 9 };
        var e = Assert.Throws<InvalidDataException>(() => bad.Validated());
        Assert.Contains("n_routed_experts (9) must be divisible by n_group (4)", e.Message);
        Assert.Contains("topk_group (9) must be <= n_group (4)", e.Message);
        Assert.Throws<InvalidDataException>(() => DeepSeekConfig.FromJson("""{"model_type":"llama"}"""));
        Assert.Throws<InvalidDataException>(() => DeepSeekConfig.FromJson("""{"hidden_size":"wide"}"""));
    }

    [Fact]
    public void ConfigJsonRoundTripsWithHfKeys()
    {
        var json = DeepSeekConfig.DeepSeekV3_671B().ToJson();
        Assert.Contains("\"num_experts_per_tok\": 8", json);
        using var tiny = new DeepSeekForCausalLM(DeepSeekConfig.Tiny());
        Assert.Contains(tiny.HfStateDict(), kv => kv.Key == "model.layers.1.mlp.gate.e_score_correction_bias");
        var v3 = DeepSeekConfig.DeepSeekV3_671B();
        var back = DeepSeekConfig.FromJson(json);
        Assert.Equal(v3.Architectures, back.Architectures);
        Assert.Equal(v3, back with { Architectures = v3.Architectures }); // records compare arrays by reference
    }
}
