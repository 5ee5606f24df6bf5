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
