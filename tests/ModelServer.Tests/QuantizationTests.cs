// Weight-only int8/int4 rounding checked against a plain loop over the same numbers.
using DeepSeekCluster.ModelServer.Engine;
using DeepSeekCluster.ModelServer.Quantization;
using DeepSeekCluster.ModelServer.Routing;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.IO;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace DeepSeekCluster.ModelServer.Tests;

public class QuantizationTests
{
    /// <summary>The rounding written out per element: symmetric scale = max|w| / qmax over each row (int8) or group (int4).</summary>
    static float[] Reference(float[] w, int rows, int cols, int group, int qmax)
    {
        var result = new float[w.Length];
        for (int r = 0; r < rows; r++)
            for (int g0 = 0; g0 < cols; g0 += group)
            {
                int g1 = Math.Min(cols, g0 + group);
                float max = 0;
                for (int c = g0; c < g1; c++) max = Math.Max(max, Math.Abs(w[r * cols + c]));
                float scale = Math.Max(max / qmax, 1e-12f);
                for (int c = g0; c < g1; c++)
                    result[r * cols + c] = Math.Clamp(MathF.Round(w[r * cols + c] / scale, MidpointRounding.ToEven), -qmax, qmax) * scale;
            }
        return result;
    }

    [Theory]
    [InlineData(WeightFormat.Int8, 300, 127)]          // per output row
    [InlineData(WeightFormat.Int4, 128, 7)]            // groups of 128 inputs; 300 = 128 + 128 + 44
    public void RoundingMatchesThePlainLoopAndTheSizesAreThoseOfTheIntegerFormat(WeightFormat format, int group, int qmax)
    {
        manual_seed(3);
        var model = nn.Sequential(("a", nn.Linear(300, 5, hasBias: false)), ("b", nn.Linear(5, 7, hasBias: false)));
        var before = model.named_modules().Where(m => m.module is Linear).Select(m => (m.name, ((Linear)m.module).weight!.detach().clone())).ToList();
        var report = WeightQuantizer.Quantize(model, format);

        Assert.Equal(2, report.Tensors);
        Assert.Equal((300 * 5 + 5 * 7) * 4, report.Fp32Bytes);
        long expectedBytes = format == WeightFormat.Int8
            ? 300 * 5 + 4 * 5 + 5 * 7 + 4 * 7
            : (300 * 5 + 1) / 2 + 4 * 5 * 3 + (5 * 7 + 1) / 2 + 4 * 7 * 1;
        Assert.Equal(expectedBytes, report.QuantizedBytes);
        foreach (var (name, original) in before)
        {
            var w = original.data<float>().ToArray();
            int rows = (int)original.shape[0], cols = (int)original.shape[1];
            var want = Reference(w, rows, cols, group, qmax);
            var got = ((Linear)model.named_modules().Single(m => m.name == name).module).weight!.data<float>().ToArray();
            for (int i = 0; i < w.Length; i++) Assert.Equal(want[i], got[i], 6);
        }
    }

    [Theory]
    [InlineData(WeightFormat.Int8)]
    [InlineData(WeightFormat.Int4)]
    public async Task IntegerLayersExpandedPerLayerGenerateWhatTheRoundedModelGenerates(WeightFormat format)
    {
        var dir = ModelFolders.Get(1);
        int[] prompt = [5, 9, 17, 33, 2, 40];
        int[] want;
        using (var rounded = HfModelFolder.Load(dir).Model)
        {
            WeightQuantizer.Quantize(rounded, format); // every Linear rounded in place, computed in float32
            want = TextGenerator.Generate(rounded, prompt, new SamplingOptions { MaxNewTokens = 16 });
        }
        using var served = ServedModel.Load("q", dir, format, new EngineOptions { MaxBatch = 2, BlockSize = 4 }, metrics: null);
        var request = new GenerationRequest(prompt, 16, new SamplingOptions(), -1, null, CancellationToken.None);
        Assert.True(served.Engine.TryEnqueue(request));
        var got = new List<int>();
        await foreach (var ev in request.Events.Reader.ReadAllAsync())
            if (ev is TokenEvent t) got.Add(t.Token);
        Assert.Equal(want, got);

        // Held: codes + scales of the decoder layers and lm_head, instead of their float32 weights.
        var report = served.Quantization!;
        double ratio = (double)report.QuantizedBytes / report.Fp32Bytes;
        // int4 stores whole groups of 128: this model's rows of 16–64 inputs are padded, so it saves less than 1/8 here.
        Assert.InRange(ratio, format == WeightFormat.Int8 ? 0.25 : 0.125, format == WeightFormat.Int8 ? 0.30 : 0.35);
    }

    [Fact]
    public async Task Bf16ServedModelGeneratesWhatTheBf16ModelGeneratesAlone()
    {
        var dir = ModelFolders.Get(1);
        int[] prompt = [5, 9, 17, 33, 2, 40];
        int[] want;
        float largestWeight;
        using (var half = HfModelFolder.Load(dir).Model)
        {
            largestWeight = half.parameters().Max(p => p.abs().max().item<float>());
            half.to(ScalarType.BFloat16);
            want = TextGenerator.Generate(half, prompt, new SamplingOptions { MaxNewTokens = 16 });
        }
        using var served = ServedModel.Load("b", dir, WeightFormat.Bf16, new EngineOptions { MaxBatch = 2, BlockSize = 4 }, metrics: null);
        var config = ModelFolders.Config(ServerFixture.Tokenizer(dir).VocabSize);
        // The latent cache is bfloat16 too: 2 bytes per cached number.
        Assert.Equal((long)config.NumHiddenLayers * 4 * (config.KvLoraRank + config.QkRopeHeadDim) * 2, served.Engine.Pool.BytesPerBlock);
        var request = new GenerationRequest(prompt, 16, new SamplingOptions(), -1, null, CancellationToken.None);
        Assert.True(served.Engine.TryEnqueue(request));
        var got = new List<int>();
        await foreach (var ev in request.Events.Reader.ReadAllAsync())
            if (ev is TokenEvent t) got.Add(t.Token);
        Assert.Equal(want, got);

        var report = served.Quantization!;
        Assert.Equal(0.5, (double)report.QuantizedBytes / report.Fp32Bytes);
        // bfloat16 keeps 8 significant bits: a rounding error of at most 2^-8 of the largest weight, and not none.
        Assert.InRange(report.MaxAbsError, 1e-9, largestWeight / 256);
    }

    [Fact]
    public void AnUnknownFormatNamesTheKeyAndTheChoices() =>
        Assert.Equal("Serving:Models:0:Quantization must be fp32, bf16, int8 or int4, got 'int3'",
            Assert.Throws<ArgumentException>(() => WeightQuantizer.Parse("int3", "Serving:Models:0:Quantization")).Message);
}
