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
