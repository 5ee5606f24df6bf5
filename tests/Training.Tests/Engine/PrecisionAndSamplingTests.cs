// bf16 mixed precision keeps fp32 masters and still learns; sampling options behave as their definitions say.
using DeepSeekCluster.Training.Data;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Tests.Engine;

public class PrecisionAndSamplingTests
{
    static DeepSeekConfig Micro => DeepSeekConfig.Tiny(64) with
    {
        HiddenSize = 32, IntermediateSize = 64, MoeIntermediateSize = 16, NumHiddenLayers = 2, NumAttentionHeads = 2,
        KvLoraRank = 16, QLoraRank = 16, QkNopeHeadDim = 8, QkRopeHeadDim = 8, VHeadDim = 8,
    };

    /// <summary>A learnable stream: token t+1 = (t * 5 + 3) mod 64, so a model can drive the loss far down.</summary>
    static TokenDataset Pattern(int seqLen)
    {
        var tokens = new int[(seqLen + 1) * 200];
        for (int i = 1; i < tokens.Length; i++) tokens[i] = (tokens[i - 1] * 5 + 3) % 64;
        return new TokenDataset(tokens, seqLen);
    }

    [Fact]
    public void Bf16TrainingKeepsFp32MasterWeightsAndLearns()
    {
        manual_seed(5);
        using var model = new DeepSeekForCausalLM(Micro).InitializeWeights();
        model.to(ScalarType.BFloat16);
        var options = new TrainingOptions { SeqLen = 16, GlobalBatch = 8, MicroBatch = 8, Steps = 60, Lr = 5e-3, WarmupSteps = 5, Precision = "bf16" };
        using var trainer = new Trainer(model, Pattern(16), null, options, CPU, 1e11);
        Assert.All(trainer.Optimizer.Slots, s =>
        {
            Assert.Equal(ScalarType.BFloat16, s.Param.dtype);
            Assert.Equal(ScalarType.Float32, s.Master!.dtype);
            Assert.Equal(ScalarType.Float32, s.ExpAvg.dtype);
        });
        double first = trainer.TrainStep().Loss, last = 0;
        while (trainer.Step < options.Steps) last = trainer.TrainStep().Loss;
        Assert.True(last < first * 0.5, $"bf16 loss went from {first:F3} to {last:F3}");
        // The bf16 weights are the rounded fp32 masters.
        var slot = trainer.Optimizer.Slots[0];
        Assert.True(slot.Param.to_type(ScalarType.Float32).eq(slot.Master!.to_type(ScalarType.BFloat16).to_type(ScalarType.Float32)).all().item<bool>());
    }

    [Fact]
    public void SamplingIsReproducibleBySeedAndATinyTopPIsGreedy()
    {
        manual_seed(9);
        using var model = new DeepSeekForCausalLM(Micro).InitializeWeights();
        int[] prompt = [1, 2, 3];
        var greedy = TextGenerator.Generate(model, prompt, new SamplingOptions { MaxNewTokens = 12 });
        var nucleus = TextGenerator.Generate(model, prompt, new SamplingOptions { MaxNewTokens = 12, Temperature = 1.0, TopP = 1e-6, Seed = 3 });
        Assert.Equal(greedy, nucleus); // only the most likely token survives p -> 0
        var a = TextGenerator.Generate(model, prompt, new SamplingOptions { MaxNewTokens = 12, Temperature = 1.5, Seed = 4 });
        var b = TextGenerator.Generate(model, prompt, new SamplingOptions { MaxNewTokens = 12, Temperature = 1.5, Seed = 4 });
        var c = TextGenerator.Generate(model, prompt, new SamplingOptions { MaxNewTokens = 12, Temperature = 1.5, Seed = 5 });
        Assert.Equal(a, b);
        Assert.NotEqual(a, c);
        Assert.NotEqual(greedy, a);
    }

    [Fact]
    public void GenerationStopsAtTheEosTokenAndRefusesAnEmptyPrompt()
    {
        manual_seed(9);
        using var model = new DeepSeekForCausalLM(Micro).InitializeWeights();
        var free = TextGenerator.Generate(model, [1, 2, 3], new SamplingOptions { MaxNewTokens = 8 });
        var stopped = TextGenerator.Generate(model, [1, 2, 3], new SamplingOptions { MaxNewTokens = 8, EosTokenId = free[2] });
        Assert.Equal(free.TakeWhile(t => t != free[2]), stopped);
        Assert.Throws<ArgumentException>(() => TextGenerator.Generate(model, [], new SamplingOptions()));
    }
}
