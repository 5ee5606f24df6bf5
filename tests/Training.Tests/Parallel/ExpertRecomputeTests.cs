// Activation recompute with expert parallelism: a recomputed MoE layer runs its dispatch and combine again in backward
// (every rank recomputes the same layers, so the exchanges pair up), and the job trains as without recompute.
using Xunit.Abstractions;
using EpTests = DeepSeekCluster.Training.Tests.Parallel.ExpertParallelTrainingTests;

namespace DeepSeekCluster.Training.Tests.Parallel;

public sealed class ExpertRecomputeTests(ITestOutputHelper output)
{
    // The plain dp 2 x ep 2 job each recompute mode is compared with (itself bitwise the single process: ExpertParallelTrainingTests).
    static readonly Lazy<ExpertZeroTrainingTests.Held[]> Plain = new(() => ExpertZeroTrainingTests.Run(2, 2, 0));

    /// <summary>
    /// Full recompute over dp 2 x ep 2 (and with ZeRO-2) is bit for bit the plain job: losses, MTP loss, clipped norm,
    /// expert loads, every weight, both moments, routing biases. Selective recompute is within 1e-9 relative (a recomputed
    /// norm returns its input gradient as one sum: another addition order, docs/parallelism.md).
    /// </summary>
    [Theory]
    [InlineData("full", 0)]
    [InlineData("selective", 0)]
    [InlineData("full", 2)]
    public void RecomputeInAnExpertParallelJobTrainsAsWithout(string recompute, int zero)
    {
        double tolerance = recompute == "full" ? 0 : 1e-9;
        var plain = Plain.Value;
        var ranks = ExpertZeroTrainingTests.Run(2, 2, zero, recompute: recompute);
        double worst = 0;
        void Near(double expected, double got, string what)
        {
            double diff = Math.Abs(expected - got), scale = Math.Max(Math.Abs(expected), 1e-300);
            if (tolerance == 0) Assert.True(expected.Equals(got), $"{what}: {got:R}, without recompute {expected:R}");
            else Assert.True(diff <= tolerance * Math.Max(Math.Abs(expected), 1e-3), $"{what}: {got:R}, without recompute {expected:R} (relative {diff / scale:E2})");
            if (expected != 0) worst = Math.Max(worst, diff / scale);
        }
        for (int r = 0; r < 2; r++)
        {
            for (int s = 0; s < EpTests.Options.Steps; s++)
            {
                var (a, b) = (plain[r].Steps[s], ranks[r].Steps[s]);
                output.WriteLine($"rank {r} step {s + 1}: loss {b.Loss:R} (plain {a.Loss:R}), norm {b.GradNorm:R} (plain {a.GradNorm:R})");
                Assert.True(a.GradNorm > EpTests.Options.ClipNorm, $"step {s + 1}: the clip should be active");
                Near(a.Loss, b.Loss, $"rank {r} step {s + 1} loss");
                Near(a.MtpLoss!.Value, b.MtpLoss!.Value, $"rank {r} step {s + 1} MTP loss");
                Near(a.GradNorm, b.GradNorm, $"rank {r} step {s + 1} clipped norm");
                Assert.Equal(a.ExpertLoad.Select(l => string.Join(",", l)), b.ExpertLoad.Select(l => string.Join(",", l)));
            }
            Assert.Equal(plain[r].Weights.Keys.Order(), ranks[r].Weights.Keys.Order());
            foreach (var (name, values) in plain[r].Weights)
                for (int i = 0; i < values.Length; i++) Near(values[i], ranks[r].Weights[name][i], $"rank {r} weight '{name}'[{i}]");
            foreach (var (name, (start, rowSize, values)) in plain[r].Moments)
            {
                // Without ZeRO a rank holds every row; with it, its rows of the same moment.
                var (gotStart, _, got) = ranks[r].Moments[name];
                int offset = (int)((gotStart - start) * rowSize);
                for (int i = 0; i < got.Length; i++) Near(values[offset + i], got[i], $"rank {r} moment '{name}'[{offset + i}]");
            }
        }
        output.WriteLine($"{recompute}, zero {zero}: largest relative difference from the plain job {worst:E2}");
    }
}
