// The ONNX export run in ONNX Runtime 1.32.0: the same logits as our forward pass, routing included, for one and two sequences.
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Export.Onnx;
using Microsoft.ML.OnnxRuntime;
using Microsoft.ML.OnnxRuntime.Tensors;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Tests.Export;

public sealed class OnnxExportTests(ExportModelFixture fx, ITestOutputHelper output) : IClassFixture<ExportModelFixture>
{
    [Fact]
    public void OnnxRuntimeGivesOurLogitsForABatchOfTwoSequences()
    {
        var path = Path.Combine(fx.Root, "model.onnx");
        OnnxExporter.Write(fx.Model, path);
        var first = fx.Tokenizer.Encode("In the beginning God created the heaven and the earth.").Take(12).ToArray();
        var second = fx.Tokenizer.Encode("And God said, Let there be light: and there was light.").Take(12).ToArray();
        Assert.Equal(12, first.Length);
        Assert.Equal(12, second.Length);
        var ids = first.Concat(second).Select(t => (long)t).ToArray();

        float[] ours;
        using (var scope = NewDisposeScope())
        using (no_grad())
            ours = fx.Model.Forward(tensor(ids).view(2, 12)).Logits_BTV.contiguous().data<float>().ToArray();

        using var session = new InferenceSession(path);
        using var results = session.Run([NamedOnnxValue.CreateFromTensor("input_ids", new DenseTensor<long>(ids, [2, 12]))]);
        var theirs = results.Single(r => r.Name == "logits").AsTensor<float>();
        Assert.Equal([2, 12, fx.Model.Config.VocabSize], theirs.Dimensions.ToArray());
        var flat = theirs.ToArray();
        double maxDiff = 0, maxAbs = 0;
        for (int i = 0; i < ours.Length; i++)
        {
            maxDiff = Math.Max(maxDiff, Math.Abs(ours[i] - flat[i]));
            maxAbs = Math.Max(maxAbs, Math.Abs(ours[i]));
        }
        output.WriteLine($"ONNX Runtime logits: max |ours - ORT| = {maxDiff:G3}, max |logit| = {maxAbs:G3}");
        // Both fp32; the only differences are summation orders (every expert on every token in ONNX, grouped tokens in ours).
        Assert.True(maxDiff < 1e-5, $"ONNX Runtime logits differ from ours by up to {maxDiff:G3}; allowed 1e-5 (measured 1e-6)");
    }

    [Fact]
    public void TheDecodeStepGraphWithTheLatentCacheGivesOurGreedyTokensAndLogits()
    {
        var path = Path.Combine(fx.Root, "decode.onnx");
        OnnxExporter.Write(fx.Model, path, withCache: true);
        var config = fx.Model.Config;
        var prompt = fx.Tokenizer.Encode("In the beginning God created the heaven").ToArray();
        var ours = TextGenerator.Generate(fx.Model, prompt, new SamplingOptions { MaxNewTokens = 16 });

        using var session = new InferenceSession(path);
        var past = Enumerable.Range(0, config.NumHiddenLayers)
            .SelectMany(i => new[] { ($"latent.{i}", config.KvLoraRank), ($"krope.{i}", config.QkRopeHeadDim) })
            .ToDictionary(p => p.Item1, p => new DenseTensor<float>(new float[0], [1, 0, p.Item2]));
        var feed = prompt.Select(t => (long)t).ToArray();
        var theirs = new List<int>();
        float[] lastLogits = [];
        for (int step = 0; step < 16; step++)
        {
            var inputs = new List<NamedOnnxValue> { NamedOnnxValue.CreateFromTensor("input_ids", new DenseTensor<long>(feed, [1, feed.Length])) };
            inputs.AddRange(past.Select(kv => NamedOnnxValue.CreateFromTensor("past_" + kv.Key, kv.Value)));
            using var results = session.Run(inputs);
            var logits = results.Single(r => r.Name == "logits").AsTensor<float>().ToArray();
            lastLogits = logits[^config.VocabSize..];
            foreach (var key in past.Keys.ToList())
            {
                var present = results.Single(r => r.Name == "present_" + key).AsTensor<float>();
                past[key] = new DenseTensor<float>(present.ToArray(), present.Dimensions.ToArray());
            }
            int next = LlamaCpp.ArgMax(lastLogits);
            theirs.Add(next);
            feed = [next];
        }
        Assert.Equal(ours, theirs);
        Assert.Equal(prompt.Length + 15, past["latent.0"].Dimensions[1]);

        // The last step's logits against our whole-sequence forward (no cache) at that position.
        var sequence = prompt.Concat(theirs.Take(15)).Select(t => (long)t).ToArray();
        float[] reference;
        using (var scope = NewDisposeScope())
        using (no_grad())
            reference = fx.Model.Forward(tensor(sequence).unsqueeze(0)).Logits_BTV[0, -1].contiguous().data<float>().ToArray();
        double maxDiff = reference.Zip(lastLogits, (a, b) => Math.Abs(a - b)).Max();
        output.WriteLine($"decode step {prompt.Length + 15}: max |ours - ORT| = {maxDiff:G3}");
        Assert.True(maxDiff < 1e-5, $"the decode step's logits differ from ours by up to {maxDiff:G3}; allowed 1e-5");
    }
}
