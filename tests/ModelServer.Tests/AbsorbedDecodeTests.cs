// MLA's absorbed decode (attention in latent space) against the expanded form and against a plain full forward.
using DeepSeekCluster.ModelServer.Engine;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.IO;
using DeepSeekCluster.Training.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.ModelServer.Tests;

public class AbsorbedDecodeTests
{
    static void SetAbsorbed(DeepSeekForCausalLM model, bool on)
    {
        foreach (var layer in model.model.layers) layer.self_attn.AbsorbedDecode = on;
    }

    [Fact]
    public void AbsorbedDecodeEqualsTheExpandedFormAndTheFullForwardInFloat64()
    {
        using var noGrad = no_grad();
        using var model = HfModelFolder.Load(ModelFolders.Get(3)).Model;
        model.to(ScalarType.Float64);
        model.eval();
        var config = model.Config;
        // Three requests of different lengths in blocks of 4, so rows are padded, masked and span several blocks.
        var random = new Random(5);
        var sequences = new[] { 3, 9, 14 }.Select(n => Enumerable.Range(0, n).Select(_ => (long)random.Next(3, config.VocabSize)).ToArray()).ToArray();
        using var pool = new LatentBlockPool(config.NumHiddenLayers, 16, 4, config.KvLoraRank, config.QkRopeHeadDim, ScalarType.Float64, CPU);
        var blocks = sequences.Select(_ => pool.TryAllocate(5)!).ToList();
        // The prompts without their last token go into the cache; the last tokens are one decode step for all rows.
        for (int b = 0; b < sequences.Length; b++)
        {
            long n = sequences[b].Length - 1;
            using var prefill = new PagedBatch(pool, [blocks[b]], [0], n, CPU);
            model.Forward(tensor(sequences[b].Take((int)n).ToArray()).view(1, n), prefill).Logits_BTV.Dispose();
        }
        var past = sequences.Select(s => (long)s.Length - 1).ToArray();
        var last = tensor(sequences.Select(s => s[^1]).ToArray()).view(-1, 1);

        Tensor Step(bool absorbed)
        {
            SetAbsorbed(model, absorbed);
            using var step = new PagedBatch(pool, blocks, past, 1, CPU);
            return model.Forward(last, step).Logits_BTV.select(1, 0);
        }
        var absorbed_BV = Step(true);
        var expanded_BV = Step(false);
        double vsExpanded = (absorbed_BV - expanded_BV).abs().max().item<double>();
        Assert.True(vsExpanded < 1e-10, $"absorbed vs expanded decode: max |Δlogit| = {vsExpanded:G3}");

        // Independent of any cache: the training forward over each whole sequence, its last position.
        SetAbsorbed(model, true);
        for (int b = 0; b < sequences.Length; b++)
        {
            var full_V = model.Forward(tensor(sequences[b]).view(1, -1)).Logits_BTV[0, -1];
            double vsFull = (absorbed_BV[b] - full_V).abs().max().item<double>();
            Assert.True(vsFull < 1e-10, $"row {b}: absorbed decode vs full forward: max |Δlogit| = {vsFull:G3}");
        }
        // The logits are not trivially equal: they differ between rows and are far from zero.
        Assert.True((absorbed_BV[0] - absorbed_BV[1]).abs().max().item<double>() > 1e-3);
    }

    [Fact]
    public void TheServersMoeForwardEqualsTheTrainingLayer()
    {
        using var noGrad = no_grad();
        var dir = ModelFolders.Get(2);
        using var model = HfModelFolder.Load(dir).Model;
        model.eval();
        var training = model.model.layers.First(l => l.Moe is not null).Moe!;
        manual_seed(4);
        // One token chooses K = 2 of 4 experts, so two get none (skipped by the server, run on empty slices in training);
        // sixteen rows keep every expert busy.
        var one_BTD = randn(1, 1, model.Config.HiddenSize);
        var many_BTD = randn(16, 1, model.Config.HiddenSize);
        var wantOne = training.Forward(one_BTD).output;
        Assert.Contains(0L, training.LastLoad);
        var wantMany = training.Forward(many_BTD).output;
        Assert.DoesNotContain(0L, training.LastLoad);

        // Per expert (as for int8/int4 weights, which a layer hook rewrites): the same calls in the same order, bit for bit.
        model.model.BeforeLayer = _ => { };
        using (new DisposableList(Engine.InferenceMoe.Install(model)))
        {
            var layer = model.model.layers.First(l => l.mlp is Engine.InferenceMoe);
            Assert.True(layer.mlp.forward(one_BTD).equal(wantOne).all().item<bool>(), "one token: the per-expert MoE forward differs from DeepSeekMoe.Forward");
            Assert.True(layer.mlp.forward(many_BTD).equal(wantMany).all().item<bool>(), "sixteen tokens: the per-expert MoE forward differs from DeepSeekMoe.Forward");
        }

        // Float weights: every expert busy runs as batched matmuls over stacked weights, equal to float32 rounding.
        using var stackedModel = HfModelFolder.Load(dir).Model;
        stackedModel.eval();
        using var installed = new DisposableList(Engine.InferenceMoe.Install(stackedModel));
        var stacked = stackedModel.model.layers.First(l => l.mlp is Engine.InferenceMoe).mlp;
        double worst = (stacked.forward(many_BTD) - wantMany).abs().max().item<float>();
        Assert.True(worst < 1e-5 * wantMany.abs().max().item<float>(), $"stacked experts: max |Δ| = {worst:G3}");
        Assert.True(stacked.forward(one_BTD).allclose(wantOne, rtol: 1e-5, atol: 1e-6), "one token on stacked weights");
    }

    sealed class DisposableList(List<Engine.InferenceMoe> items) : IDisposable
    {
        public void Dispose() { foreach (var m in items) m.Dispose(); }
    }

    [Fact]
    public async Task TheEngineDecodesAbsorbedAndGreedyTokensEqualTheExpandedEngine()
    {
        var dir = ModelFolders.Get(1);
        var random = new Random(11);
        var loadedA = HfModelFolder.Load(dir);
        var prompts = Enumerable.Range(0, 4).Select(_ => Enumerable.Range(0, 1 + random.Next(12)).Select(_ => random.Next(3, loadedA.Model.Config.VocabSize)).ToArray()).ToArray();
        var greedy = new SamplingOptions { MaxNewTokens = 16 };

        async Task<int[][]> Run(DeepSeekForCausalLM model, bool absorbed)
        {
            using var engine = new InferenceEngine(model, new EngineOptions { MaxBatch = 4, BlockSize = 4, AbsorbedDecode = absorbed }, "v1");
            Assert.All(model.model.layers, l => Assert.Equal(absorbed, l.self_attn.AbsorbedDecode));
            var requests = prompts.Select(p => new GenerationRequest(p, 16, greedy, -1, null, CancellationToken.None)).ToArray();
            foreach (var r in requests) Assert.True(engine.TryEnqueue(r));
            return await Task.WhenAll(requests.Select(async r =>
            {
                var tokens = new List<int>();
                await foreach (var ev in r.Events.Reader.ReadAllAsync())
                    if (ev is TokenEvent t) tokens.Add(t.Token);
                    else if (ev is FailedEvent f) throw new InvalidOperationException("generation failed", f.Error);
                return tokens.ToArray();
            }));
        }
        var absorbed = await Run(loadedA.Model, true);
        var expanded = await Run(HfModelFolder.Load(dir).Model, false);
        for (int i = 0; i < prompts.Length; i++)
        {
            Assert.Equal(16, absorbed[i].Length);
            Assert.Equal(expanded[i], absorbed[i]);
        }
    }
}
