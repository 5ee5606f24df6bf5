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
    public void EvalIntervalAndSamplePromptDefaultAndAreChecked()
    {
        // As the worker reads a spec: absent fields take their defaults.
        var read = JobSpecJson.Deserialize("""{"modelPreset": "tiny", "dataset": "d", "globalBatch": 8, "microBatch": 2, "seqLen": 16, "steps": 2}""", "the test spec");
        Assert.Equal((0, "In the beginning"), (read.EvalInterval, read.SamplePrompt));
        Assert.Empty((TestSpecs.Tiny() with { EvalInterval = 5, SamplePrompt = "Line one\nline two" }).Validate());
        Assert.Equal("evalInterval", Assert.Single((TestSpecs.Tiny() with { EvalInterval = -1 }).Validate()).Field);
        Assert.Equal("samplePrompt", Assert.Single((TestSpecs.Tiny() with { SamplePrompt = new string('a', JobSpec.MaxSamplePromptLength + 1) }).Validate()).Field);
        Assert.Equal("samplePrompt", Assert.Single((TestSpecs.Tiny() with { SamplePrompt = "bell\u0007" }).Validate()).Field);
        var e = Assert.Throws<InvalidDataException>(() => JobSpecJson.Deserialize("{not json", "assignment of job j"));
        Assert.Contains("assignment of job j", e.Message);
    }

    [Fact]
    public void EpMustDivideThePresetsOrTheConfigsRoutedExpertsAtSubmission()
    {
        // tiny has 8 routed experts: ep 3 fits dp 3 but not the experts, which the first generation would find out.
        var three = TestSpecs.Tiny(minWorkers: 3, maxWorkers: 3) with { GlobalBatch = 6, MicroBatch = 2, Parallel = new ParallelPlan { Ep = 3 } };
        var problem = Assert.Single(three.Validate());
        Assert.Equal("parallel.ep", problem.Field);
        Assert.Contains("3 must divide the model's 8 routed experts (preset tiny)", problem.Message);
        Assert.Empty((three with { MinWorkers = 4, MaxWorkers = 4, GlobalBatch = 8, Parallel = new ParallelPlan { Ep = 4 } }).Validate());
        var config = three with { ModelPreset = null, ModelConfigJson = """{"n_routed_experts": 10}""" };
        Assert.Contains("n_routed_experts of modelConfigJson", Assert.Single(config.Validate(), p => p.Field == "parallel.ep").Message);
        Assert.DoesNotContain((config with { ModelConfigJson = """{"n_routed_experts": 9}""" }).Validate(), p => p.Field == "parallel.ep");
    }

    [Fact]
    public void AWorldThatCannotFormIsRefusedNamingEveryConditionWithItsNumbers()
    {
        // 4 workers, ep 4: dp must divide the step's 2 micro-batches and be a multiple of 4; no dp in 1..4 is both.
        var spec = TestSpecs.Tiny(minWorkers: 1, maxWorkers: 4) with { GlobalBatch = 16, MicroBatch = 8, Parallel = new ParallelPlan { Ep = 4 } };
        var problem = Assert.Single(spec.Validate());
        Assert.Equal("parallel", problem.Field);
        Assert.Equal("no world fits: a world is dp x pp (1) workers, between minWorkers and maxWorkers (1..4), where dp divides the 2 micro-batches " +
                     "of a step (globalBatch 16 / microBatch 8) and dp is a multiple of ep (4)", problem.Message);
    }

    [Fact]
    public void EveryOptimizerKnobIsCheckedAndNamedByItsField()
    {
        var bad = TestSpecs.Tiny() with
        {
            WeightDecay = -0.1, ClipNorm = double.NaN, MtpWeight = -1, BiasUpdateSpeed = 1, Beta1 = 1, Beta2 = -0.5, Epsilon = 0,
            Schedule = TestSpecs.Tiny().Schedule with { DecayFraction = 1.5 },
            Guard = new StepGuardSpec { Window = 2, MinHistory = 1, Threshold = 0, SnapshotEvery = 0, LrFactor = 2, MaxRollbacks = -1, MaxSkips = 0, Warmup = -1 },
        };
        var problems = bad.Validate();
        string[] expected = ["weightDecay", "clipNorm", "mtpWeight", "biasUpdateSpeed", "beta1", "beta2", "epsilon", "schedule.decayFraction",
            "guard.window", "guard.minHistory", "guard.threshold", "guard.snapshotEvery", "guard.lrFactor", "guard.maxRollbacks", "guard.maxSkips", "guard.warmup"];
        Assert.Equal(expected.Order(), problems.Select(p => p.Field).Order());
        Assert.Contains("-0.1 must be in [0, 1)", problems.Single(p => p.Field == "weightDecay").Message);

        // As a user writes it: absent knobs take the trainer's defaults, present ones are read by their JSON names.
        var read = JobSpecJson.Deserialize("""
            {"modelPreset": "tiny", "dataset": "d", "globalBatch": 8, "microBatch": 2, "seqLen": 16, "steps": 20,
             "weightDecay": 0.01, "beta2": 0.999, "schedule": {"kind": "wsd", "decayFraction": 0.3}, "guard": {"lrFactor": 0.5}}
            """, "the test spec");
        Assert.Empty(read.Validate());
        Assert.Equal((0.01, 0.999, 0.9, 1e-8, 0.3, 0.5, 50), (read.WeightDecay, read.Beta2, read.Beta1, read.Epsilon, read.Schedule.DecayFraction, read.Guard.LrFactor, read.Guard.Window));
        // A wsd decay that would start inside the warmup is refused here, not on the worker.
        var late = read with { Schedule = read.Schedule with { WarmupSteps = 15, DecayFraction = 0.5 } };
        Assert.Contains("start inside the warmup", Assert.Single(late.Validate()).Message);
    }

    [Theory]
    [InlineData("1f1b", true)]
    [InlineData("gpipe", true)]
    [InlineData("interleaved", false)]
    [InlineData("1F1B", false)] // the worker's option is exact, so the spec is too
    [InlineData("", false)]
    public void ThePipelineScheduleIsOneTheStagesKnow(string schedule, bool valid)
    {
        var spec = TestSpecs.Tiny() with { Parallel = new ParallelPlan { Pp = 1, Schedule = schedule } };
        var problems = spec.Validate().Where(p => p.Field == "parallel.schedule").ToList();
        if (valid) Assert.Empty(problems);
        else Assert.Contains($"'{schedule}' must be one of 1f1b, gpipe", Assert.Single(problems).Message);
    }

    [Fact]
    public void AnAbsentScheduleIs1F1BAndTheJsonFieldIsParallelSchedule()
    {
        // As POST /jobs and SubmitJob read a spec.
        JobSpec Read(string parallel) => System.Text.Json.JsonSerializer.Deserialize<JobSpec>(
            $$"""{"modelPreset": "tiny", "dataset": "d", "parallel": {{parallel}}, "globalBatch": 8, "microBatch": 2, "seqLen": 16, "steps": 2}""",
            JobSpecJson.Options)!;
        Assert.Equal("1f1b", Read("""{"dp": 1, "pp": 2}""").Parallel.Schedule);
        Assert.Equal("gpipe", Read("""{"dp": 1, "pp": 2, "schedule": "gpipe"}""").Parallel.Schedule);
        var bad = Read("""{"dp": 1, "pp": 2, "schedule": "zb-v"}""");
        Assert.Equal("parallel.schedule", Assert.Single(bad.Validate()).Field);
    }

    [Fact]
    public void DataParallelWidthDividesTheGlobalBatchInWholeMicroBatches()
    {
        var spec = TestSpecs.Tiny(minWorkers: 1, maxWorkers: 8) with { GlobalBatch = 12, MicroBatch = 2 }; // 6 micro-batches
        Assert.Equal(3, spec.ChooseDataParallel(5));
        Assert.Equal(6, spec.ChooseDataParallel(8));
        Assert.Null((spec with { MinWorkers = 4 }).ChooseDataParallel(3));
    }

    [Fact]
    public void KeepLastAndEvalIntervalDefaultToThreeAndZeroAndRefuseNegativesNamingTheField()
    {
        var read = System.Text.Json.JsonSerializer.Deserialize<JobSpec>(
            """{"modelPreset": "tiny", "dataset": "d", "globalBatch": 8, "microBatch": 2, "seqLen": 16, "steps": 2}""", JobSpecJson.Options)!;
        Assert.Equal((3, 0), (read.KeepLast, read.EvalInterval));
        var set = System.Text.Json.JsonSerializer.Deserialize<JobSpec>(
            """{"modelPreset": "tiny", "dataset": "d", "globalBatch": 8, "microBatch": 2, "seqLen": 16, "steps": 2, "keepLast": 0, "evalInterval": 50}""", JobSpecJson.Options)!;
        Assert.Equal((0, 50), (set.KeepLast, set.EvalInterval));
        Assert.Empty(set.Validate());

        var problems = (TestSpecs.Tiny() with { KeepLast = -1, EvalInterval = -5 }).Validate();
        Assert.Contains("-1 must be 0 (keep every checkpoint)", Assert.Single(problems, p => p.Field == "keepLast").Message);
        Assert.Contains("-5 must be 0 (validate only at the end)", Assert.Single(problems, p => p.Field == "evalInterval").Message);
    }
}
