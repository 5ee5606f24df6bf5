// The AppHost's --ep, --zero, --redundancy, --overlap-reduction, --precision, --recompute and --memory-budget reach the default job's spec, a wrong option is named before anything starts, and idle workers are said.
using DeepSeekCluster.AppHost;

namespace DeepSeekCluster.Observability.Tests;

public class ParallelOptionsTests
{
    static AppHostOptions Parse(params string[] args) => AppHostOptions.Parse(args, "/repo", []);

    [Fact]
    public void TheOptionsMapOntoTheSpecsPlanPrecisionAndRecompute()
    {
        var o = Parse("--workers", "4", "--zero", "2", "--precision", "bf16", "--recompute", "none", "--memory-budget", "1000000");
        var spec = DefaultJob.Spec(o, "d", DateTime.UnixEpoch);
        Assert.Equal((1, 2, "bf16", "none"), (spec.Parallel.Ep, spec.Parallel.Zero, spec.Precision, spec.ActivationCheckpointing));
        Assert.Equal(1000000, o.MemoryBudget);
        var defaults = DefaultJob.Spec(Parse(), "d", DateTime.UnixEpoch);
        Assert.Equal((1, 0, "auto", "none"), (defaults.Parallel.Ep, defaults.Parallel.Zero, defaults.Precision, defaults.ActivationCheckpointing));
    }

    [Fact]
    public void EpTwoReachesTheSpecWithItsEvaluationTasksAndCombinesWithZero()
    {
        var spec = DefaultJob.Spec(Parse("--workers", "4", "--ep", "2", "--precision", "bf16"), "d", DateTime.UnixEpoch);
        Assert.Equal((2, 0, "bf16"), (spec.Parallel.Ep, spec.Parallel.Zero, spec.Precision));
        Assert.Equal(["kjv_nextverse", "kjv_cloze"], spec.EvalTasks); // each ep group scores a share through its MoE exchange
        Assert.Empty(spec.Validate());
        var sharded = DefaultJob.Spec(Parse("--workers", "4", "--ep", "2", "--zero", "1", "--precision", "bf16"), "d", DateTime.UnixEpoch);
        Assert.Equal((2, 1), (sharded.Parallel.Ep, sharded.Parallel.Zero));
        Assert.Empty(sharded.Validate());
        var zero3 = DefaultJob.Spec(Parse("--workers", "4", "--ep", "2", "--zero", "3"), "d", DateTime.UnixEpoch);
        Assert.Equal((2, 3), (zero3.Parallel.Ep, zero3.Parallel.Zero));
        Assert.Empty(zero3.Validate());
    }

    [Fact]
    public void RedundancyReachesTheSpecWithZeroAndIsRefusedWithoutIt()
    {
        var spec = DefaultJob.Spec(Parse("--workers", "4", "--zero", "1", "--redundancy"), "d", DateTime.UnixEpoch);
        Assert.Equal((1, true), (spec.Parallel.Zero, spec.Parallel.Redundancy));
        Assert.Empty(spec.Validate());
        Assert.False(DefaultJob.Spec(Parse("--workers", "4", "--zero", "1"), "d", DateTime.UnixEpoch).Parallel.Redundancy);
        var e = Assert.Throws<ArgumentException>(() => Parse("--workers", "4", "--redundancy"));
        Assert.Contains("--redundancy (parallel.redundancy): true with zero 0", e.Message);
        // One worker is one replica: no rank to keep its copy, unless the job may grow to a second with 'add'.
        var alone = Assert.Throws<ArgumentException>(() => Parse("--workers", "1", "--zero", "1", "--redundancy"));
        Assert.Contains("--redundancy (parallel.redundancy): true, but the largest world of this job has one replica (dp 1 at maxWorkers 1, pp 1)", alone.Message);
        Assert.Empty(DefaultJob.Spec(Parse("--workers", "1", "--max-workers", "2", "--zero", "1", "--redundancy"), "d", DateTime.UnixEpoch).Validate());
        // With ep the expert shards' pieces are copied (any zero, ZeRO-3's parameter rows too), and inside pipeline stages.
        Assert.Empty(DefaultJob.Spec(Parse("--workers", "4", "--ep", "2", "--zero", "1", "--redundancy"), "d", DateTime.UnixEpoch).Validate());
        Assert.Empty(DefaultJob.Spec(Parse("--workers", "4", "--ep", "2", "--redundancy"), "d", DateTime.UnixEpoch).Validate());
        var z3 = DefaultJob.Spec(Parse("--workers", "4", "--ep", "2", "--zero", "3", "--redundancy"), "d", DateTime.UnixEpoch);
        Assert.Equal((2, 3, true), (z3.Parallel.Ep, z3.Parallel.Zero, z3.Parallel.Redundancy));
        Assert.Empty(z3.Validate());
        Assert.Empty(DefaultJob.Spec(Parse("--workers", "4", "--pp", "2", "--zero", "1", "--redundancy"), "d", DateTime.UnixEpoch).Validate());
    }

    [Fact]
    public void OverlapReductionReachesTheSpecAndIsRefusedWithZeroPipelinesOrEp()
    {
        var spec = DefaultJob.Spec(Parse("--workers", "2", "--overlap-reduction"), "d", DateTime.UnixEpoch);
        Assert.True(spec.Parallel.OverlapGradientReduction);
        Assert.Empty(spec.Validate());
        Assert.False(DefaultJob.Spec(Parse("--workers", "2"), "d", DateTime.UnixEpoch).Parallel.OverlapGradientReduction);
        var zero = Assert.Throws<ArgumentException>(() => Parse("--workers", "2", "--zero", "2", "--overlap-reduction"));
        Assert.Contains("--overlap-reduction (parallel.overlapGradientReduction): true with zero 2", zero.Message);
        var pp = Assert.Throws<ArgumentException>(() => Parse("--workers", "4", "--pp", "2", "--overlap-reduction"));
        Assert.Contains("--overlap-reduction (parallel.overlapGradientReduction): true with pp 2", pp.Message);
    }

    [Theory]
    [InlineData("--zero", "5", "--zero (parallel.zero): 5 must be 0")]
    [InlineData("--precision", "fp16", "--precision (precision): 'fp16' must be one of auto, fp32, bf16")]
    [InlineData("--recompute", "all", "--recompute (activationCheckpointing): 'all' must be one of none, full, selective")]
    [InlineData("--ep", "0", "--ep must be at least 1")]
    [InlineData("--memory-budget", "-3", "option --memory-budget: '-3' is not a positive whole number of bytes")]
    [InlineData("--memory-budget", "1X", "option --memory-budget: '1X' is not a positive whole number of bytes")]
    [InlineData("--zero", "-1", "option --zero: '-1' is not a non-negative integer")]
    public void AWrongValueIsRefusedNamingTheOptionAndTheField(string option, string value, string expected)
    {
        var e = Assert.Throws<ArgumentException>(() => Parse("--workers", "4", option, value));
        Assert.Contains(expected, e.Message);
    }

    [Theory]
    [InlineData("--micro-batch", "3", "--micro-batch (microBatch): 3 must divide globalBatch 16")]
    [InlineData("--steps", "0", "--steps (steps): 0 must be at least 1")]
    [InlineData("--preset", "huge", "--preset (modelPreset): unknown preset 'huge'")]
    public void ABatchStepsOrPresetTheSpecRefusesIsNamedBeforeAnyServiceStarts(string option, string value, string expected)
    {
        var e = Assert.Throws<ArgumentException>(() => Parse("--workers", "2", option, value));
        Assert.Contains(expected, e.Message);
    }

    [Fact]
    public void WorkersTheDefaultBatchLeavesIdleAreNamedWithTheMicroBatchThatUsesThemAll()
    {
        // 16 / 8 is 2 micro-batches a step: dp 2 at most, so 2 of 4 workers would train and 2 sit idle unremarked.
        var idle = Parse("--workers", "4", "--ep", "2").IdleWorkers;
        Assert.Equal("--workers 4: the default job trains on 2 of them (dp 2): dp must divide the 2 micro-batches of a step " +
                     "(--global-batch 16 / --micro-batch 8) and be a multiple of --ep 2; the other 2 stay idle (--micro-batch 4 trains on all 4)", idle);
        Assert.Null(Parse("--workers", "4", "--ep", "2", "--micro-batch", "4").IdleWorkers);
        Assert.Null(Parse("--workers", "2").IdleWorkers);
        Assert.Null(Parse("--workers", "4", "--pp", "2").IdleWorkers);
    }

    [Fact]
    public void AnOptionWithoutItsValueIsNamedRatherThanTakingTheNextOption()
    {
        var e = Assert.Throws<ArgumentException>(() => Parse("--ep", "--steps", "4"));
        Assert.Equal("option --ep needs a value", e.Message);
    }

    [Fact]
    public void AnEpThatFitsNoWorldOrNotThePresetsRoutedExpertsIsRefusedBeforeAnythingStarts()
    {
        // tiny has 8 routed experts; 3 workers with 3 micro-batches a step would form dp 3 x ep 3.
        var e = Assert.Throws<ArgumentException>(() => Parse("--workers", "3", "--ep", "3", "--global-batch", "24", "--micro-batch", "8"));
        Assert.Contains("--ep (parallel.ep): 3 must divide the model's 8 routed experts (preset tiny)", e.Message);
        // The default job's 16/8 gives 2 micro-batches a step: no dp both divides them and is a multiple of ep 4.
        var world = Assert.Throws<ArgumentException>(() => Parse("--workers", "4", "--ep", "4"));
        Assert.Contains("--workers/--pp/--ep/--global-batch/--micro-batch (parallel): no world fits", world.Message);
        Assert.Contains("dp is a multiple of ep (4)", world.Message);
    }
}
