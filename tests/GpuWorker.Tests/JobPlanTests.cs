// The one mapping from a job spec to the model config and training options the worker trains with.
using DeepSeekCluster.Contracts.Grains;
using DeepSeekCluster.GpuWorker.Cluster;
using DeepSeekCluster.Training.Model;

namespace DeepSeekCluster.GpuWorker.Tests;

public class JobPlanTests
{
    [Fact]
    public void EverySpecFieldTheTrainerUsesReachesTheConfigOrTheOptions()
    {
        var spec = new JobSpec
        {
            ModelPreset = "tiny", Dataset = "d", GlobalBatch = 8, MicroBatch = 2, SeqLen = 32, Steps = 50, Seed = 7,
            CheckpointInterval = 10, EvalInterval = 5, Parallel = new ParallelPlan { Pp = 2, Schedule = "gpipe" },
            Schedule = new LrSchedule { Kind = "wsd", PeakLr = 1e-3, MinLr = 1e-4, WarmupSteps = 4 },
        };
        var (config, options) = JobPlan.Map(spec, vocabSize: 300, eosTokenId: 3);

        Assert.Equal((DeepSeekConfig.Preset("tiny") with { VocabSize = 300, EosTokenId = 3 }).ToJson(), config.ToJson());
        Assert.Equal((32, 8, 2, 50L, 7L), (options.SeqLen, options.GlobalBatch, options.MicroBatch, options.Steps, options.Seed));
        Assert.Equal(("wsd", 1e-3, 4L), (options.Schedule, options.Lr, options.WarmupSteps));
        Assert.Equal(0.1, options.MinLrRatio, 12);
        Assert.Equal((10, 5, "gpipe"), (options.CheckpointEvery, options.EvalEvery, options.PipelineSchedule));
    }

    [Fact]
    public void TheOptimizerKnobsReachTheTrainerAndTheirDefaultsAreTheStandaloneTrainers()
    {
        var spec = new JobSpec
        {
            ModelPreset = "tiny", Dataset = "d", GlobalBatch = 8, MicroBatch = 2, SeqLen = 32, Steps = 50,
            Schedule = new LrSchedule { Kind = "wsd", DecayFraction = 0.4 },
            WeightDecay = 0.05, ClipNorm = 0.5, MtpWeight = 0.1, BiasUpdateSpeed = 0.002, Beta1 = 0.8, Beta2 = 0.99, Epsilon = 1e-6,
        };
        Assert.Empty(spec.Validate());
        var options = JobPlan.Map(spec, 300, 3).Options;
        Assert.Equal((0.05, 0.5, 0.1, 0.002), (options.WeightDecay, options.ClipNorm, options.MtpWeight, options.BiasUpdateSpeed));
        Assert.Equal((0.8, 0.99, 1e-6, 0.4), (options.Beta1, options.Beta2, options.Epsilon, options.DecayFraction));

        // A spec that names none of them trains as the standalone trainer does by default.
        var plain = new JobSpec { ModelPreset = "tiny", Dataset = "d", GlobalBatch = 8, MicroBatch = 2, SeqLen = 32, Steps = 50 };
        var defaults = JobPlan.Map(plain, 300, 3).Options;
        var d = new Training.Engine.TrainingOptions();
        Assert.Equal((d.WeightDecay, d.ClipNorm, d.MtpWeight, d.BiasUpdateSpeed, d.Beta1, d.Beta2, d.Epsilon, d.DecayFraction),
            (defaults.WeightDecay, defaults.ClipNorm, defaults.MtpWeight, defaults.BiasUpdateSpeed, defaults.Beta1, defaults.Beta2, defaults.Epsilon, defaults.DecayFraction));
    }

    [Fact]
    public void AConfigJsonReplacesThePresetAndABadOneIsNamed()
    {
        var tiny = DeepSeekConfig.Preset("tiny");
        var spec = new JobSpec { ModelConfigJson = (tiny with { NumHiddenLayers = 3 }).ToJson(), Dataset = "d", GlobalBatch = 4, MicroBatch = 2, SeqLen = 16, Steps = 2 };
        Assert.Equal(3, JobPlan.Map(spec, 300, 3).Config.NumHiddenLayers);

        var bad = spec with { ModelConfigJson = "{not json" };
        var e = Assert.Throws<InvalidDataException>(() => JobPlan.Map(bad, 300, 3));
        Assert.Contains("modelConfigJson", e.Message);
    }
}

/// <summary>The parallel plan {dp, pp, ep, zero}, precision and recompute: validated as a whole, and mapped onto the trainer.</summary>
public class ParallelPlanSpecTests
{
    static JobSpec Spec(ParallelPlan plan, int minWorkers = 1, int maxWorkers = 4) => new()
    {
        ModelPreset = "tiny", Dataset = "d", GlobalBatch = 16, MicroBatch = 2, SeqLen = 32, Steps = 10,
        Parallel = plan, MinWorkers = minWorkers, MaxWorkers = maxWorkers,
    };

    static IReadOnlyList<SpecProblem> Problems(JobSpec spec, string field) => spec.Validate().Where(p => p.Field == field).ToList();

    [Theory]
    [InlineData(0, "0 must be at least 1")]
    [InlineData(-2, "must be at least 1")]
    public void AnEpBelowOneIsRefusedNamingTheNumber(int ep, string expected) =>
        Assert.Contains(expected, Assert.Single(Problems(Spec(new ParallelPlan { Ep = ep }), "parallel.ep")).Message);

    [Fact]
    public void EpMustDivideDpAndTheNumbersAreNamed()
    {
        var message = Assert.Single(Problems(Spec(new ParallelPlan { Dp = 3, Ep = 2 }), "parallel.ep")).Message;
        Assert.Contains("2 must divide dp (3)", message);
    }

    [Fact]
    public void EpTwoIsAcceptedWithZeroRecomputePipelinesAndEvalTasksAndMappedAndAnEpNotDividingAStagesDpIsRefusedNamingBoth()
    {
        Assert.Empty(Spec(new ParallelPlan { Ep = 2 }).Validate());
        Assert.Empty(Spec(new ParallelPlan { Dp = 4, Ep = 4 }).Validate());
        Assert.Equal(2, JobPlan.Map(Spec(new ParallelPlan { Ep = 2 }), 300, 3).Options.Ep);
        // ep x pp: each stage's replicas form its ep groups (world = dp x pp, ep divides dp).
        Assert.Empty(Spec(new ParallelPlan { Dp = 2, Pp = 2, Ep = 2 }, 2, 4).Validate());
        Assert.Contains("must divide dp (2)", Assert.Single(Problems(Spec(new ParallelPlan { Dp = 2, Pp = 2, Ep = 4 }, 2, 4), "parallel.ep")).Message);
        Assert.Empty(Spec(new ParallelPlan { Dp = 2, Ep = 2, Zero = 2 }).Validate());
        Assert.Empty((Spec(new ParallelPlan { Ep = 2, Zero = 1 }) with { ActivationCheckpointing = "full" }).Validate());
        var options = JobPlan.Map(Spec(new ParallelPlan { Ep = 2, Zero = 1 }) with { ActivationCheckpointing = "selective" }, 300, 3).Options;
        Assert.Equal((2, 1, "selective"), (options.Ep, options.Zero, options.Recompute));
        Assert.Empty((Spec(new ParallelPlan { Ep = 2 }) with { EvalTasks = ["kjv_cloze"] }).Validate()); // each ep group scores a share
    }

    [Theory]
    [InlineData(-1, "must be 0 (replicated), 1")]
    [InlineData(4, "must be 0 (replicated), 1")]
    public void AZeroStageOutsideWhatTrainsIsRefused(int zero, string expected) =>
        Assert.Contains(expected, Assert.Single(Problems(Spec(new ParallelPlan { Zero = zero }), "parallel.zero")).Message);

    /// <summary>Zero 1 to 3 shard each pipeline stage's state over its replicas (with ep too); redundancy with pp as without.</summary>
    [Fact]
    public void ZeroOneToThreePassWithAPipelineAndWhatIsNotBuiltIsRefusedByName()
    {
        Assert.Empty(Spec(new ParallelPlan { Pp = 2, Zero = 1 }, 2, 4).Validate());
        Assert.Empty(Spec(new ParallelPlan { Dp = 2, Pp = 2, Zero = 2 }, 2, 4).Validate());
        Assert.Empty(Spec(new ParallelPlan { Dp = 2, Pp = 2, Ep = 2, Zero = 2 }, 2, 4).Validate());
        // Redundancy inside the stages, as without pp: zero 1 to 3, with or without ep.
        Assert.Empty(Spec(new ParallelPlan { Dp = 2, Pp = 2, Zero = 1, Redundancy = true }, 2, 4).Validate());
        Assert.Empty(Spec(new ParallelPlan { Dp = 2, Pp = 2, Zero = 2, Redundancy = true }, 2, 4).Validate());
        Assert.Empty(Spec(new ParallelPlan { Dp = 2, Pp = 2, Zero = 3, Redundancy = true }, 2, 4).Validate());
        Assert.Empty(Spec(new ParallelPlan { Dp = 2, Pp = 2, Ep = 2, Zero = 1, Redundancy = true }, 2, 4).Validate());
        Assert.Empty(Spec(new ParallelPlan { Dp = 2, Pp = 2, Ep = 2, Redundancy = true }, 2, 4).Validate());
        Assert.Empty(Spec(new ParallelPlan { Dp = 2, Pp = 2, Ep = 2, Zero = 3, Redundancy = true }, 2, 4).Validate());
        Assert.Empty(Spec(new ParallelPlan { Zero = 1 }).Validate());
        Assert.Empty(Spec(new ParallelPlan { Dp = 2, Zero = 2 }).Validate());
        Assert.Empty(Spec(new ParallelPlan { Dp = 2, Zero = 3 }).Validate());
        Assert.Empty(Spec(new ParallelPlan { Ep = 2, Zero = 3 }).Validate());
        Assert.Empty(Spec(new ParallelPlan { Dp = 2, Pp = 2, Zero = 3 }, 2, 4).Validate());
        Assert.Empty(Spec(new ParallelPlan { Pp = 2, Zero = 3 }, 2, 4).Validate());
        Assert.Empty(Spec(new ParallelPlan { Dp = 2, Pp = 2, Ep = 2, Zero = 3 }, 2, 4).Validate());
    }

    [Fact]
    public void PrecisionAndRecomputeAreCheckedAndAutoIsBf16OnlyOnCuda()
    {
        Assert.Contains("'fp8' must be one of auto, fp32, bf16", Assert.Single(Problems(Spec(new()) with { Precision = "fp8" }, "precision")).Message);
        Assert.Contains("'some' must be one of none, full, selective", Assert.Single(Problems(Spec(new()) with { ActivationCheckpointing = "some" }, "activationCheckpointing")).Message);
        Assert.Empty((Spec(new()) with { ActivationCheckpointing = "full" }).Validate());
        Assert.Empty((Spec(new()) with { ActivationCheckpointing = "selective" }).Validate());
        Assert.Equal("selective", JobPlan.Map(Spec(new()) with { ActivationCheckpointing = "selective" }, 300, 3).Options.Recompute);
        var spec = Spec(new ParallelPlan { Zero = 2 });
        Assert.Equal(("bf16", 2), (JobPlan.Map(spec, 300, 3, cuda: true).Options.Precision, JobPlan.Map(spec, 300, 3, cuda: true).Options.Zero));
        Assert.Equal("fp32", JobPlan.Map(spec, 300, 3, cuda: false).Options.Precision);
        Assert.Equal("bf16", JobPlan.Map(spec with { Precision = "bf16" }, 300, 3, cuda: false).Options.Precision);
        Assert.Equal("fp32", JobPlan.Map(spec with { Precision = "fp32" }, 300, 3, cuda: true).Options.Precision);
    }

    [Fact]
    public void TheJsonFieldsAreParallelEpParallelZeroPrecisionAndActivationCheckpointing()
    {
        var read = JobSpecJson.Deserialize(
            """{"modelPreset": "tiny", "dataset": "d", "parallel": {"dp": 2, "ep": 1, "zero": 2}, "precision": "bf16", "activationCheckpointing": "none", "globalBatch": 8, "microBatch": 2, "seqLen": 16, "steps": 2}""",
            "the test spec");
        Assert.Equal((2, 1, 2, "bf16", "none"), (read.Parallel.Dp, read.Parallel.Ep, read.Parallel.Zero, read.Precision, read.ActivationCheckpointing));
        var defaults = JobSpecJson.Deserialize("""{"modelPreset": "tiny", "dataset": "d", "globalBatch": 8, "microBatch": 2, "seqLen": 16, "steps": 2}""", "the test spec");
        Assert.Equal((1, 0, "auto", "none"), (defaults.Parallel.Ep, defaults.Parallel.Zero, defaults.Precision, defaults.ActivationCheckpointing));
    }

    /// <summary>The overlapped all-reduce is plain data parallelism's: with zero, pp or ep it is refused, naming the field and the number.</summary>
    [Fact]
    public void OverlapGradientReductionIsRefusedWhereItDoesNotApplyNamingTheNumbers()
    {
        const string field = "parallel.overlapGradientReduction";
        Assert.Empty(Spec(new ParallelPlan { Dp = 2, OverlapGradientReduction = true }).Validate());
        Assert.Empty(Spec(new ParallelPlan { OverlapGradientReduction = true }).Validate()); // dp from the workers; alone it has nothing to overlap
        Assert.Contains("true with zero 1: only plain data parallelism's all-reduce is overlapped", Assert.Single(Problems(Spec(new ParallelPlan { Dp = 2, Zero = 1, OverlapGradientReduction = true }), field)).Message);
        Assert.Contains("true with zero 3", Assert.Single(Problems(Spec(new ParallelPlan { Dp = 2, Zero = 3, OverlapGradientReduction = true }), field)).Message);
        Assert.Contains("true with pp 2: a pipeline stage's gradient all-reduce is not overlapped, expected false or pp 1",
                        Assert.Single(Problems(Spec(new ParallelPlan { Dp = 2, Pp = 2, OverlapGradientReduction = true }, 2, 4), field)).Message);
        Assert.Contains("true with ep 2: the expert-parallel gradient sums are not overlapped, expected false or ep 1",
                        Assert.Single(Problems(Spec(new ParallelPlan { Dp = 2, Ep = 2, OverlapGradientReduction = true }), field)).Message);
        Assert.Equal(2, Problems(Spec(new ParallelPlan { Dp = 2, Pp = 2, Zero = 2, OverlapGradientReduction = true }, 2, 4), field).Count);
        Assert.False(JobSpecJson.Deserialize("""{"modelPreset": "tiny", "dataset": "d", "globalBatch": 8, "microBatch": 2, "seqLen": 16, "steps": 2}""", "the test spec").Parallel.OverlapGradientReduction);
        Assert.False(JobPlan.Map(Spec(new ParallelPlan { Dp = 2 }), 300, 3).Options.OverlapGradientReduction);
        Assert.True(JobPlan.Map(Spec(new ParallelPlan { Dp = 2, OverlapGradientReduction = true }), 300, 3).Options.OverlapGradientReduction);
    }

    [Fact]
    public void RedundancyNeedsAShardedOptimizerOrEpAndThePlannerCountsTheNeighboursShard()
    {
        Assert.Empty(Spec(new ParallelPlan { Zero = 1, Redundancy = true }).Validate());
        Assert.Empty(Spec(new ParallelPlan { Dp = 4, Zero = 2, Redundancy = true }).Validate());
        Assert.Empty(Spec(new ParallelPlan { Dp = 2, Zero = 3, Redundancy = true }).Validate());
        Assert.Contains("true with zero 0", Assert.Single(Problems(Spec(new ParallelPlan { Redundancy = true }), "parallel.redundancy")).Message);
        Assert.Empty(Spec(new ParallelPlan { Ep = 2, Zero = 1, Redundancy = true }).Validate());
        Assert.Empty(Spec(new ParallelPlan { Dp = 4, Ep = 2, Zero = 2, Redundancy = true }).Validate());
        Assert.Empty(Spec(new ParallelPlan { Ep = 2, Redundancy = true }).Validate()); // zero 0: the expert shards held once are copied
        Assert.Empty(Spec(new ParallelPlan { Dp = 4, Ep = 2, Zero = 3, Redundancy = true }).Validate()); // the experts' ZeRO-3 rows are copied too
        Assert.Empty(Spec(new ParallelPlan { Dp = 2, Pp = 2, Ep = 2, Redundancy = true }, 2, 4).Validate()); // within each stage, as without pp
        // A job whose largest world has one replica has no other rank to keep a copy on: refused, not a flag doing nothing.
        Assert.Equal("true, but the largest world of this job has one replica (dp 1 at maxWorkers 1, pp 1), so no other rank can keep a copy of its state: " +
                     "expected false, or room for dp 2 or more", Assert.Single(Problems(Spec(new ParallelPlan { Zero = 1, Redundancy = true }, 1, 1), "parallel.redundancy")).Message);
        Assert.Single(Problems(Spec(new ParallelPlan { Pp = 2, Zero = 1, Redundancy = true }, 2, 3), "parallel.redundancy")); // 3 workers hold one replica of 2 stages
        Assert.Single(Problems(Spec(new ParallelPlan { Dp = 1, Zero = 1, Redundancy = true }), "parallel.redundancy"));
        Assert.Single(Problems(Spec(new ParallelPlan { Zero = 1, Redundancy = true }) with { GlobalBatch = 2 }, "parallel.redundancy")); // one micro-batch: dp 1 only
        Assert.False(JobSpecJson.Deserialize("""{"modelPreset": "tiny", "dataset": "d", "globalBatch": 8, "microBatch": 2, "seqLen": 16, "steps": 2}""", "the test spec").Parallel.Redundancy);

        // Rank 1 of dp 4 (uneven rows: shards differ by a row) holds its own shard and rank 2's: the two ranks' predictions added.
        var config = DeepSeekConfig.Preset("tiny") with { VocabSize = 301 };
        var layout = DeepSeekCluster.Training.Parallel.ParallelLayout.Even(4, 1, config.NumHiddenLayers).WithShards(1, 1, config.NRoutedExperts);
        var inputs = new DeepSeekCluster.Training.Parallel.MemoryInputs("bf16", "none", 1, 32);
        var own = DeepSeekCluster.Training.Parallel.MemoryPlanner.Predict(config, layout, 1, inputs);
        var next = DeepSeekCluster.Training.Parallel.MemoryPlanner.Predict(config, layout, 2, inputs);
        var redundant = DeepSeekCluster.Training.Parallel.MemoryPlanner.Predict(config, layout, 1, inputs with { Redundancy = true });
        Assert.Equal(own.Optimizer + next.Optimizer, redundant.Optimizer);
        Assert.Equal((own.Parameters, own.Gradients, own.Activations), (redundant.Parameters, redundant.Gradients, redundant.Activations));
        // ZeRO-3: in bf16 the neighbour's parameter rows are its master rows (counted in the optimizer); in fp32 the copy holds them too.
        var zero3 = layout with { Zero = 3 };
        var own3 = DeepSeekCluster.Training.Parallel.MemoryPlanner.Predict(config, zero3, 1, inputs);
        var next3 = DeepSeekCluster.Training.Parallel.MemoryPlanner.Predict(config, zero3, 2, inputs);
        var redundant3 = DeepSeekCluster.Training.Parallel.MemoryPlanner.Predict(config, zero3, 1, inputs with { Redundancy = true });
        Assert.Equal((own3.Optimizer + next3.Optimizer, own3.Parameters), (redundant3.Optimizer, redundant3.Parameters));
        var fp32 = inputs with { Precision = "fp32" };
        var (own32, next32) = (DeepSeekCluster.Training.Parallel.MemoryPlanner.Predict(config, zero3, 1, fp32), DeepSeekCluster.Training.Parallel.MemoryPlanner.Predict(config, zero3, 2, fp32));
        var redundant32 = DeepSeekCluster.Training.Parallel.MemoryPlanner.Predict(config, zero3, 1, fp32 with { Redundancy = true });
        Assert.Equal((own32.Optimizer + next32.Optimizer, own32.Parameters + next32.Parameters), (redundant32.Optimizer, redundant32.Parameters));
        // Replicated (zero 0), there is no shard to copy.
        var replicated = layout with { Zero = 0 };
        Assert.Equal(DeepSeekCluster.Training.Parallel.MemoryPlanner.Predict(config, replicated, 1, inputs).Optimizer,
                     DeepSeekCluster.Training.Parallel.MemoryPlanner.Predict(config, replicated, 1, inputs with { Redundancy = true }).Optimizer);
    }
}
