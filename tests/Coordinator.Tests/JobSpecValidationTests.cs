using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.Coordinator.Tests;

public class JobSpecValidationTests
{
    [Fact]
    public void AValidSpecHasNoProblems() => Assert.Empty(TestSpecs.Tiny().Validate());

    [Fact]
    public void EveryProblemIsNamedByItsField()
    {
        var spec = new JobSpec
        {
            Name = "bad name!", GlobalBatch = 10, MicroBatch = 3, SeqLen = 0, Steps = 0,
            Schedule = new LrSchedule { Kind = "step", PeakLr = -1 }, CheckpointInterval = -1, MinWorkers = 0, MaxWorkers = -1,
            Parallel = new ParallelPlan { Dp = -1, Pp = 0 },
        };
        var fields = spec.Validate().Select(p => p.Field).ToHashSet();
        string[] expected = ["name", "modelPreset", "dataset", "parallel.dp", "parallel.pp", "microBatch", "seqLen", "steps",
            "schedule.kind", "schedule.peakLr", "schedule.minLr", "checkpointInterval", "minWorkers", "maxWorkers"];
        Assert.Empty(expected.Except(fields));
    }

    [Fact]
    public void DataParallelWidthDividesTheGlobalBatchInWholeMicroBatches()
    {
        var spec = TestSpecs.Tiny(minWorkers: 1, maxWorkers: 8) with { GlobalBatch = 12, MicroBatch = 2 }; // 6 micro-batches
        Assert.Equal(3, spec.ChooseDataParallel(5));
        Assert.Equal(6, spec.ChooseDataParallel(8));
        Assert.Null((spec with { MinWorkers = 4 }).ChooseDataParallel(3));
    }
}
