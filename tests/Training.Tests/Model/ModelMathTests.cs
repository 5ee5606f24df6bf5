// Module math of the DeepSeek-V3 model checked against independent computations (float64, finite differences, naive loops).
using DeepSeekCluster.Training.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Tests.Model;

public class ModelMathTests
{
    static DeepSeekConfig TestConfig(bool interleave = true, bool yarn = true) => DeepSeekConfig.Tiny(vocabSize: 97) with
    {
        HiddenSize = 32, IntermediateSize = 48, MoeIntermediateSize = 16, NumHiddenLayers = 2, NumAttentionHeads = 2,
        NumKeyValueHeads = 2, KvLoraRank = 12, QLoraRank = 20, QkNopeHeadDim = 8, QkRopeHeadDim = 8, VHeadDim = 6,
        NRoutedExperts = 8, NGroup = 4, TopkGroup = 2, NumExpertsPerTok = 3, RoutedScalingFactor = 2.5,
        RopeInterleave = interleave,
        RopeScaling = yarn ? new RopeScaling { RopeType = "yarn", Factor = 4, OriginalMaxPositionEmbeddings = 64, Mscale = 1, MscaleAllDim = 1 } : null,
    };

    static DeepSeekForCausalLM NewModel(DeepSeekConfig config, int seed = 1)
    {
        manual_seed(seed);
        var model = new DeepSeekForCausalLM(config).InitializeWeights();
        model.to(ScalarType.Float64);
        using var noGrad = no_grad();
        foreach (var (name, p) in model.named_parameters())
            if (!name.EndsWith("norm.weight")) p.normal_(0, 0.3); // large enough that every path matters numerically
        return model;
    }

    [Fact]
    public void ModelsBuiltFromSeedsOnSeveralThreadsAtOnceEachGetTheirSeedsWeights()
    {
        var config = TestConfig();
        var expected = new Dictionary<long, Dictionary<string, Tensor>>();
        foreach (long seed in new long[] { 5, 6 })
        {
            manual_seed(seed);
            expected[seed] = new DeepSeekForCausalLM(config).InitializeWeights().named_parameters().ToDictionary(p => p.name, p => (Tensor)p.parameter);
        }
        // Eight builds at once, two seeds: without the lock their draws from torch's one generator interleave.
        var built = Enumerable.Range(0, 8).AsParallel().WithDegreeOfParallelism(8)
            .Select(i => (Seed: 5L + i % 2, Model: DeepSeekForCausalLM.FromSeed(config, 5L + i % 2))).ToList();
        foreach (var (seed, model) in built)
            foreach (var (name, p) in model.named_parameters())
                Assert.True(p.eq(expected[seed][name]).all().item<bool>(), $"seed {seed}, {name}: differs from manual_seed's model");
        Assert.Contains(expected[5], kv => !kv.Value.eq(expected[6][kv.Key]).all().item<bool>());
    }

    /// <summary>Central differences on a few coordinates against autograd, for a scalar projection of the output.</summary>
    static void GradCheck(Func<Tensor, Tensor> f, Tensor x, int coords = 12, double eps = 1e-6, double tol = 1e-6)
    {
        var input = x.detach().clone().requires_grad_(true);
        using var projection = randn_like(f(x.detach()), dtype: ScalarType.Float64);
        var loss = (f(input) * projection).sum();
        loss.backward();
        var analytic = input.grad!.detach().clone().reshape(-1);
        var flat = x.detach().clone().reshape(-1);
        var rng = new Random(7);
        using var noGrad = no_grad();
        for (int c = 0; c < coords; c++)
        {
            long i = rng.NextInt64(flat.shape[0]);
            double orig = flat[i].item<double>();
            flat[i] = orig + eps;
            double plus = (f(flat.reshape(x.shape)) * projection).sum().item<double>();
            flat[i] = orig - eps;
            double minus = (f(flat.reshape(x.shape)) * projection).sum().item<double>();
            flat[i] = orig;
            double numeric = (plus - minus) / (2 * eps);
            double a = analytic[i].item<double>();
            Assert.True(Math.Abs(numeric - a) <= tol * Math.Max(1, Math.Abs(numeric)), $"coordinate {i}: finite difference {numeric}, autograd {a}");
        }
    }

    [Fact]
    public void MlaGradientsMatchFiniteDifferences()
    {
        using var model = NewModel(TestConfig());
        var attn = model.model.layers[0].self_attn;
        using var x = randn(2, 5, 32, ScalarType.Float64);
        GradCheck(t => attn.forward(t), x);
    }

    [Fact]
    public void MoeGradientsMatchFiniteDifferences()
    {
        using var model = NewModel(TestConfig());
        var moe = model.model.layers[1].Moe!;
        using var x = randn(2, 5, 32, ScalarType.Float64);
        GradCheck(t => moe.forward(t), x);
    }

    [Fact]
    public void RopeScoresDependOnlyOnPositionDifference()
    {
        foreach (var interleave in new[] { true, false })
        {
            var rotary = new RotaryEmbedding(TestConfig(interleave));
            using var q = randn(1, 1, 1, 8, ScalarType.Float64);
            using var k = randn(1, 1, 1, 8, ScalarType.Float64);
            double Score(long qPos, long kPos)
            {
                var (cq, sq) = rotary.CosSin(qPos, 1, ScalarType.Float64, CPU);
                var (ck, sk) = rotary.CosSin(kPos, 1, ScalarType.Float64, CPU);
                return (rotary.Apply(q, cq, sq) * rotary.Apply(k, ck, sk)).sum().item<double>();
            }
            double reference = Score(7, 3);
            Assert.Equal(reference, Score(104, 100), 9);
            Assert.Equal(reference, Score(4, 0), 9);
            Assert.NotEqual(reference, Score(8, 3), 6); // and it does depend on the difference
        }
    }

    [Fact]
    public void CachedDecodingEqualsFullRecomputation()
    {
        using var model = NewModel(TestConfig());
        model.eval();
        using var ids = randint(0, 97, [2, 9], ScalarType.Int64);
        using var full = model.Forward(ids).Logits_BTV;
        using var cache = model.NewCache();
        var prefill = model.Forward(ids.narrow(1, 0, 4), cache).Logits_BTV;
        Assert.True(allclose(prefill, full.narrow(1, 0, 4), 1e-9, 1e-9));
        for (int t = 4; t < 9; t++)
        {
            var step = model.Forward(ids.narrow(1, t, 1), cache).Logits_BTV;
            Assert.True(allclose(step, full.narrow(1, t, 1), 1e-9, 1e-9), $"position {t} differs");
        }
        // The cache holds the latent and the rope key, not per-head keys and values.
        Assert.Equal(12 + 8, cache.ElementsPerTokenPerLayer);
        Assert.Equal(9, cache.Length);
    }

    [Fact]
    public void MoeOutputEqualsNaiveLoopOverTokensAndChosenExperts()
    {
        using var model = NewModel(TestConfig());
        var moe = model.model.layers[1].Moe!;
        using var x = randn(3, 4, 32, ScalarType.Float64);
        using var y = moe.forward(x).reshape(-1, 32);
        var route = moe.gate.Route(x.reshape(-1, 32));
        var flat = x.reshape(-1, 32);
        for (int n = 0; n < flat.shape[0]; n++)
        {
            var xn = flat[n].unsqueeze(0);
            var expected = moe.shared_experts!.forward(xn);
            for (int j = 0; j < 3; j++)
            {
                int e = (int)route.Indices_NK[n, j].item<long>();
                expected = expected + moe.experts[e].forward(xn) * route.Weights_NK[n, j].item<double>();
            }
            Assert.True(allclose(expected.squeeze(0), y[n], 1e-10, 1e-10), $"token {n} differs");
        }
    }

    /// <summary>The router's choice recomputed in plain double arithmetic from its weight and bias.</summary>
    static (HashSet<int> allowedGroups, double[] scores) IndependentRouting(double[] x, double[,] w, double[] bias, int groups, int topkGroup)
    {
        int e = w.GetLength(0), per = e / groups;
        var scores = new double[e];
        for (int i = 0; i < e; i++)
        {
            double dot = 0;
            for (int d = 0; d < x.Length; d++) dot += x[d] * w[i, d];
            scores[i] = 1 / (1 + Math.Exp(-dot));
        }
        var groupScore = Enumerable.Range(0, groups)
            .Select(g => Enumerable.Range(g * per, per).Select(i => scores[i] + bias[i]).OrderDescending().Take(2).Sum()).ToArray();
        var allowed = Enumerable.Range(0, groups).OrderByDescending(g => groupScore[g]).Take(topkGroup).ToHashSet();
        return (allowed, scores);
    }

    [Fact]
    public void GroupLimitedRoutingNeverPicksOutsideTheTopGroups()
    {
        using var model = NewModel(TestConfig());
        var gate = model.model.layers[1].Moe!.gate;
        using (no_grad()) gate.e_score_correction_bias.copy_(tensor(new float[] { -2, -2, 0.1f, -0.3f, -1.5f, -1.7f, 0.2f, 0 }));
        using var x = randn(64, 32, ScalarType.Float64);
        var route = gate.Route(x);
        var w = new double[8, 32];
        var wData = gate.weight.data<double>().ToArray();
        for (int i = 0; i < 8; i++) for (int d = 0; d < 32; d++) w[i, d] = wData[i * 32 + d];
        var bias = gate.e_score_correction_bias.to_type(ScalarType.Float64).data<double>().ToArray();
        for (int n = 0; n < 64; n++)
        {
            var (allowed, _) = IndependentRouting(x[n].data<double>().ToArray(), w, bias, 4, 2);
            for (int j = 0; j < 3; j++)
            {
                int expert = (int)route.Indices_NK[n, j].item<long>();
                Assert.Contains(expert / 2, allowed);
            }
        }
    }

    [Fact]
    public void CorrectionBiasChangesWhichExpertsAreChosenButNotTheGateWeights()
    {
        using var model = NewModel(TestConfig() with { NormTopkProb = false });
        var gate = model.model.layers[1].Moe!.gate;
        using var x = randn(64, 32, ScalarType.Float64);
        var before = gate.Route(x);
        using (no_grad()) gate.e_score_correction_bias.copy_(tensor(new float[] { 3, 0, 0, 0, 0, 0, 0, 0 }));
        var after = gate.Route(x);
        // Expert 0 is now chosen for every token...
        Assert.True(after.Indices_NK.eq(0).any(1).all().item<bool>());
        Assert.False(before.Indices_NK.eq(0).any(1).all().item<bool>());
        // ...but its weight is the unbiased sigmoid score times the scaling factor.
        var expected = before.Scores_NE.gather(1, after.Indices_NK) * 2.5;
        Assert.True(allclose(after.Weights_NK, expected, 1e-12, 1e-12));
    }

    [Fact]
    public void BiasUpdatesMoveASkewedLoadTowardBalance()
    {
        using var model = NewModel(TestConfig() with { NGroup = 1, TopkGroup = 1 });
        var moe = model.model.layers[1].Moe!;
        using (no_grad()) moe.gate.weight.add_(tensor(new double[] { 3, 2, 0, 0, 0, 0, 0, 0 }).unsqueeze(1) * 0.3); // skew toward experts 0 and 1
        using var x = randn(256, 32, ScalarType.Float64).abs();
        double Imbalance()
        {
            moe.forward(x.unsqueeze(0)).Dispose();
            var load = moe.LastLoad;
            return (double)load.Max() / load.Average();
        }
        double start = Imbalance();
        for (int step = 0; step < 100; step++) { Imbalance(); moe.gate.UpdateBias(moe.LastLoad, 0.02); }
        double end = Imbalance();
        Assert.True(start > 1.8, $"the test needs a skewed start, got max/mean {start:F2}");
        Assert.True(end < 1.6 && end < start / 1.5, $"load imbalance went from {start:F2} to {end:F2}");
    }

    [Fact]
    public void AnExpertThatReceivesNoTokenGetsAZeroGradientNotNaN()
    {
        using var model = NewModel(TestConfig() with { NGroup = 1, TopkGroup = 1 });
        model.to(ScalarType.Float32);
        var moe = model.model.layers[1].Moe!;
        using (no_grad()) moe.gate.e_score_correction_bias.copy_(tensor(new float[] { 0, 0, 0, 0, 0, -100, 0, 0 })); // expert 5 is never chosen
        using var x = randn(1, 6, 32);
        moe.forward(x).sum().backward();
        Assert.Equal(0, moe.LastLoad[5]);
        foreach (var (name, p) in moe.experts[5].named_parameters())
        {
            Assert.NotNull(p.grad);
            Assert.Equal(0.0, p.grad!.abs().sum().item<float>());
        }
        foreach (var (name, p) in moe.named_parameters())
            Assert.False(p.grad is not null && p.grad.isnan().any().item<bool>(), $"{name} has a NaN gradient");
    }

    [Fact]
    public void SequenceAuxLossMatchesItsClosedForm()
    {
        var config = TestConfig() with { AuxLossAlpha = 0.1, NGroup = 1, TopkGroup = 1 };
        using var model = NewModel(config);
        var moe = model.model.layers[1].Moe!;
        moe.train();
        using var x = randn(2, 5, 32, ScalarType.Float64);
        var (_, aux) = moe.Forward(x);
        var route = moe.gate.Route(x.reshape(-1, 32));
        double expected = 0;
        for (int b = 0; b < 2; b++)
        {
            for (int e = 0; e < 8; e++)
            {
                double f = 0, p = 0;
                for (int t = 0; t < 5; t++)
                {
                    int n = b * 5 + t;
                    for (int j = 0; j < 3; j++) if (route.Indices_NK[n, j].item<long>() == e) f += 1;
                    p += route.Scores_NE[n, e].item<double>() / route.Scores_NE[n].sum().item<double>();
                }
                expected += (8.0 / (3 * 5)) * f * (p / 5);
            }
        }
        expected = 0.1 * expected / 2;
        Assert.Equal(expected, aux!.item<double>(), 10);
    }
}
