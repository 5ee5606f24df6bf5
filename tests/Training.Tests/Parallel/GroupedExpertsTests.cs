// The grouped expert path (one bmm per projection over padded per-expert slices) against the per-expert path it replaces:
// a MoE layer's output and every gradient, and the trainer's losses, norms, weights and AdamW moments over 3 steps in
// float64 (one process and ep 2), with uneven loads, a starved expert and top-2 routing; a bf16 layer within a tolerance.
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Parallel;
using TorchSharp;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Tests.Parallel;

public sealed class GroupedExpertsTests(ITestOutputHelper output)
{
    static readonly TrainingOptions Options = ExpertParallelTrainingTests.Options;
    const int Starved = ExpertParallelTrainingTests.Starved;

    // The bmm kernels sum a dot product's terms in their own order, as the per-expert GEMMs do in theirs: in float64 the
    // two paths agree to a few units in the last place per matmul, which 3 AdamW steps (whose first update is lr·sign(g))
    // keep far below this bound. A path that dropped, misplaced or mixed up rows or experts differs by ~1e-3 or more.
    const double Float64Tolerance = 1e-10;

    /// <summary>One MoE layer of the micro model in float64 (top-2 of 8, expert <see cref="Starved"/> never chosen), and its input.</summary>
    static (DeepSeekMoe Moe, Tensor X) Layer(ScalarType dtype)
    {
        manual_seed(7);
        var config = MicroModel.Config(64);
        var moe = new DeepSeekMoe(config);
        using (no_grad())
        {
            foreach (var (_, p) in moe.named_parameters()) p.normal_(0, 0.2);
            moe.gate.e_score_correction_bias[Starved] = tensor(-1e3f);
            moe.gate.e_score_correction_bias[2] = tensor(0.5f); // a hot expert: the loads are far from even
        }
        moe.to(dtype);
        return (moe, randn(3, 16, config.HiddenSize).to_type(dtype));
    }

    static (Tensor Output, Dictionary<string, Tensor> Grads, long[] Load) ForwardBackward(DeepSeekMoe moe, Tensor x, ExpertKernel kernel)
    {
        moe.Kernel = kernel;
        moe.zero_grad();
        var input = x.detach().requires_grad_(true);
        var y = moe.forward(input);
        // A loss that weighs every output element differently, so a misplaced row changes every gradient.
        using var w = linspace(-1, 1, y.numel(), dtype: y.dtype).view(y.shape);
        (y * w).sum().backward();
        var grads = moe.named_parameters().ToDictionary(p => p.name, p => p.parameter.grad!.detach().clone());
        grads["input"] = input.grad!.detach().clone();
        return (y.detach(), grads, moe.LastLoad);
    }

    static double MaxDiff(Tensor a, Tensor b) => (a.to_type(ScalarType.Float64) - b.to_type(ScalarType.Float64)).abs().max().item<double>();

    [Fact]
    public void AGroupedLayerEqualsThePerExpertLayerInFloat64WithUnevenLoadsAndAStarvedExpert()
    {
        var (moe, x) = Layer(ScalarType.Float64);
        using var _ = moe;
        moe.train();
        var plain = ForwardBackward(moe, x, ExpertKernel.PerExpert);
        var grouped = ForwardBackward(moe, x, ExpertKernel.Grouped);
        output.WriteLine($"load {string.Join(",", grouped.Load)}");
        Assert.Equal(plain.Load, grouped.Load);
        Assert.Equal(0, grouped.Load[Starved]);
        Assert.True(grouped.Load.Max() >= 2 * grouped.Load.Where(l => l > 0).Min(), $"the loads should be uneven: {string.Join(",", grouped.Load)}");

        double worst = MaxDiff(plain.Output, grouped.Output);
        output.WriteLine($"output: largest difference {worst:E2}");
        Assert.True(worst <= Float64Tolerance, $"output differs by {worst:E2}");
        Assert.Equal(plain.Grads.Keys.Order(), grouped.Grads.Keys.Order());
        Assert.Contains(plain.Grads.Keys, n => n.StartsWith($"experts.{Starved}.", StringComparison.Ordinal));
        foreach (var (name, g) in plain.Grads)
        {
            double d = MaxDiff(g, grouped.Grads[name]);
            output.WriteLine($"{name}: largest difference {d:E2} (largest gradient {g.abs().max().item<double>():E2})");
            Assert.True(d <= Float64Tolerance, $"gradient of '{name}' differs by {d:E2}");
            if (!name.StartsWith("experts.", StringComparison.Ordinal)) continue;
            if (grouped.Load[int.Parse(name.Split('.')[1])] == 0)
                Assert.True(grouped.Grads[name].eq(0).all().item<bool>(), $"'{name}': an expert no token reaches gets an exactly zero gradient");
            else Assert.True(g.abs().max().item<double>() > 1e-3, $"'{name}' should have a gradient to compare");
        }
    }

    /// <summary>
    /// The kernel alone on given loads (5 experts, one with no rows, one with most of them) in float64, against each expert's
    /// SwiGluMlp on its slice: with the automatic bucket, one chunk per expert (the largest load), and chunks of 7 and 1
    /// rows (a heavy expert's weights repeated over many batch entries, its gradient their sum).
    /// </summary>
    [Theory]
    [InlineData(0L)]
    [InlineData(23L)]
    [InlineData(7L)]
    [InlineData(1L)]
    public void TheGroupedKernelEqualsEachExpertOnItsSliceForEveryBucketSize(long bucket)
    {
        long[] counts = [3, 0, 23, 5, 9];
        manual_seed(11);
        var experts = counts.Select(_ => new SwiGluMlp(12, 10)).ToList();
        foreach (var e in experts) e.to(ScalarType.Float64);
        var x = randn(counts.Sum(), 12, dtype: ScalarType.Float64);
        var w = randn(counts.Sum(), 12, dtype: ScalarType.Float64);
        if (bucket == 0) Assert.Equal(23, GroupedExperts.BucketRows(counts)); // chunks below 32 rows are never chosen: the largest load

        (Tensor Y, List<Tensor> Grads) Pass(Func<Tensor, Tensor> run)
        {
            foreach (var e in experts) e.zero_grad();
            var input = x.detach().requires_grad_(true);
            var y = run(input);
            (y * w).sum().backward();
            return (y.detach(), [input.grad!, .. experts.SelectMany(e => e.parameters().Select(p => p.grad!))]);
        }
        var plain = Pass(input =>
        {
            long at = 0;
            return cat([.. experts.Select((e, g) => { var y = e.forward(input.narrow(0, at, counts[g])); at += counts[g]; return y; })], 0);
        });
        var grouped = Pass(input => GroupedExperts.Run(input, counts, [.. experts.Select(e => (Tensor)e.gate_proj.weight!)],
            [.. experts.Select(e => (Tensor)e.up_proj.weight!)], [.. experts.Select(e => (Tensor)e.down_proj.weight!)], bucketRows: bucket == 0 ? null : bucket));
        output.WriteLine($"bucket {(bucket == 0 ? $"auto ({GroupedExperts.BucketRows(counts)})" : bucket)}: {GroupedExperts.PaddedRows(counts, bucket == 0 ? GroupedExperts.BucketRows(counts) : bucket)} padded rows for {counts.Sum()}");
        Assert.True(MaxDiff(plain.Y, grouped.Y) <= Float64Tolerance, $"output differs by {MaxDiff(plain.Y, grouped.Y):E2}");
        foreach (var (p, q) in plain.Grads.Zip(grouped.Grads)) Assert.True(MaxDiff(p, q) <= Float64Tolerance, $"a gradient differs by {MaxDiff(p, q):E2}");
        foreach (var p in experts[1].parameters()) Assert.True(p.grad!.eq(0).all().item<bool>(), "the expert with no rows gets an exactly zero gradient");
        foreach (var e in experts) e.Dispose();
    }

    /// <summary>Loads measured on tiny (balanced at init; max/mean 2.3 after a few steps of bias updates): the bucket keeps padding within a quarter.</summary>
    /// <summary>
    /// "auto" is the CUDA default that no CPU run takes: grouped on a GPU, per-expert on the CPU; the explicit modes ignore
    /// the device (so the CPU tests of the grouped kernel run what auto picks on a GPU), and a bad mode is named.
    /// </summary>
    [Fact]
    public void AutoRunsTheGroupedKernelOnCudaAndThePerExpertChainsOnTheCpu()
    {
        Assert.Equal(ExpertKernel.Grouped, GroupedExperts.Parse("auto", DeviceType.CUDA));
        Assert.Equal(ExpertKernel.PerExpert, GroupedExperts.Parse("auto", DeviceType.CPU));
        foreach (var device in new[] { DeviceType.CPU, DeviceType.CUDA })
        {
            Assert.Equal(ExpertKernel.Grouped, GroupedExperts.Parse("grouped", device));
            Assert.Equal(ExpertKernel.PerExpert, GroupedExperts.Parse("per-expert", device));
        }
        Assert.Contains("'batched'", Assert.Throws<ArgumentException>(() => GroupedExperts.Parse("batched", DeviceType.CUDA)).Message);
    }

    [Fact]
    public void TheBucketIsTheLargestLoadWhenThatPadsLittleAndSmallerChunksOtherwise()
    {
        long[] even = [503, 504, 514, 500, 482, 549, 531, 513], skewed = [117, 547, 546, 413, 144, 474, 1160, 695];
        Assert.Equal(549, GroupedExperts.BucketRows(even));
        Assert.Equal(8 * 549, GroupedExperts.PaddedRows(even, 549));
        long bucket = GroupedExperts.BucketRows(skewed);
        Assert.Equal(296, bucket); // 1160 pads 4096 rows to 9280, 580 to 5800, 296 to 17 chunks = 5032
        Assert.True(GroupedExperts.PaddedRows(skewed, bucket) * 4 <= skewed.Sum() * 5);
        Assert.Equal(1, GroupedExperts.BucketRows([0, 0, 0]));
    }

    /// <summary>The grouped chunk follows the per-expert windows' rule too: the bucket rule's rows rounded up to the layer's row bucket.</summary>
    [Fact]
    public void TheChunkRowsAreTheBucketRoundedUpToTheLayersRowBucket()
    {
        long[] even = [503, 504, 514, 500, 482, 549, 531, 513], skewed = [117, 547, 546, 413, 144, 474, 1160, 695];
        Assert.Equal(549, GroupedExperts.ChunkRows(even, 1));
        Assert.Equal(576, GroupedExperts.ChunkRows(even, 64));
        Assert.Equal(320, GroupedExperts.ChunkRows(skewed, 64));
        Assert.Equal(64, GroupedExperts.ChunkRows([0, 0, 0], 64));
        Assert.Throws<ArgumentOutOfRangeException>(() => GroupedExperts.ChunkRows(even, 0));
    }

    [Fact]
    public void AGroupedLayerEqualsThePerExpertLayerInBf16WithinTheStatedTolerance()
    {
        var (reference, x64) = Layer(ScalarType.Float64);
        var (moe, x) = Layer(ScalarType.BFloat16);
        using var a = reference; using var b = moe;
        reference.train(); moe.train();
        var exact = ForwardBackward(reference, x64, ExpertKernel.PerExpert);
        var plain = ForwardBackward(moe, x, ExpertKernel.PerExpert);
        var grouped = ForwardBackward(moe, x, ExpertKernel.Grouped);
        Assert.Equal(plain.Load, grouped.Load);
        // bf16 keeps 8 significant bits (relative step 2^-8 = 0.4%); each path rounds its products and sums once per
        // matmul output, in its own order. Bound: the grouped path's error against float64 is at most 2x the per-expert
        // path's plus 1% of the tensor's largest value (routing near a tie could send a token elsewhere; the loads are checked equal).
        foreach (var (name, g) in exact.Grads.Prepend(KeyValuePair.Create("output", exact.Output)))
        {
            var (p, q) = name == "output" ? (plain.Output, grouped.Output) : (plain.Grads[name], grouped.Grads[name]);
            double scale = g.abs().max().item<double>(), ep = MaxDiff(g, p), eg = MaxDiff(g, q);
            output.WriteLine($"{name}: per-expert error {ep:E2}, grouped {eg:E2}, largest value {scale:E2}");
            Assert.True(eg <= 2 * ep + 0.01 * scale, $"'{name}': the grouped bf16 path is {eg:E2} from float64, the per-expert path {ep:E2}");
        }
    }

    /// <summary>Every weight and moment of <paramref name="got"/> within <see cref="Float64Tolerance"/> of <paramref name="want"/>; the largest difference.</summary>
    static double AssertClose(ExpertParallelTrainingTests.Held want, ExpertParallelTrainingTests.Held got, string where)
    {
        double worst = 0;
        foreach (var (kind, w, g) in new[] { ("weight", want.Weights, got.Weights), ("moment", want.Moments, got.Moments) })
            foreach (var (name, values) in g)
            {
                var expected = w[name];
                double d = expected.Zip(values).Max(x => Math.Abs(x.First - x.Second));
                worst = Math.Max(worst, d);
                Assert.True(d <= Float64Tolerance, $"{kind} '{name}' {where} differs from the per-expert single process by {d:E2}");
            }
        return worst;
    }

    [Fact]
    public void GroupedTrainingEqualsPerExpertTrainingInOneProcessAndWithEp2()
    {
        var single = ExpertParallelTrainingTests.Single.Value; // per-expert (the CPU default), one process
        ExpertParallelTrainingTests.Held grouped;
        using (var model = ExpertParallelTrainingTests.NewModel())
        using (var trainer = new Trainer(model, ExpertParallelTrainingTests.Data.Value.Train, null, Options with { Experts = "grouped" }, CPU, peakFlops: 1e11))
        {
            Assert.All(model.MoeLayers(), m => Assert.Equal(ExpertKernel.Grouped, m.Kernel));
            var steps = Enumerable.Range(0, (int)Options.Steps).Select(_ => trainer.TrainStep()).ToList();
            grouped = ExpertParallelTrainingTests.Capture(model, trainer.Optimizer) with { Steps = steps };
        }
        var ranks = ExpertParallelTrainingTests.RunEp(2, 2, experts: "grouped");

        foreach (var (held, where) in ranks.Select((r, i) => (r, $"on ep 2 rank {i}")).Prepend((grouped, "in one process")))
        {
            for (int s = 0; s < Options.Steps; s++)
            {
                var (one, m) = (single.Steps[s], held.Steps[s]);
                output.WriteLine($"{where} step {s + 1}: loss {m.Loss:R} (per-expert {one.Loss:R}), norm {m.GradNorm:R} (per-expert {one.GradNorm:R})");
                Assert.Equal(one.ExpertLoad.Select(l => string.Join(",", l)), m.ExpertLoad.Select(l => string.Join(",", l)));
                Assert.All(m.ExpertLoad, l => Assert.Equal(0, l[Starved]));
                Assert.True(Math.Abs(one.Loss - m.Loss) <= Float64Tolerance, $"{where} step {s + 1}: loss {m.Loss:R}, per-expert {one.Loss:R}");
                Assert.Equal(one.MtpLoss.HasValue, m.MtpLoss.HasValue);
                Assert.True(Math.Abs((one.MtpLoss ?? 0) - (m.MtpLoss ?? 0)) <= Float64Tolerance, $"{where} step {s + 1}: MTP loss {m.MtpLoss:R}, per-expert {one.MtpLoss:R}");
                Assert.True(Math.Abs(one.GradNorm - m.GradNorm) <= Float64Tolerance, $"{where} step {s + 1}: norm {m.GradNorm:R}, per-expert {one.GradNorm:R}");
            }
            output.WriteLine($"{where}: largest weight or moment difference {AssertClose(single, held, where):E2}");
            // The starved expert's gradient was a defined zero in every step: its moments stay exactly zero.
            foreach (var (name, values) in held.Moments.Where(kv => kv.Key.Contains($".mlp.experts.{Starved}.", StringComparison.Ordinal)))
                Assert.All(values, v => Assert.Equal(0.0, v));
        }
        Assert.Equal(single.Weights.Count, grouped.Weights.Count);
        Assert.Equal(single.Weights.Count(kv => ExpertParallel.IsExpertParameter(kv.Key)), ranks.Sum(r => r.Weights.Count(kv => ExpertParallel.IsExpertParameter(kv.Key))));
    }
}
