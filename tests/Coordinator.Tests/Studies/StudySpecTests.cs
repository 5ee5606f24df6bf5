// The study spec: problems named by field path, search paths that must exist, trials that are the base job with values written in.
using DeepSeekCluster.Contracts.Grains;
using DeepSeekCluster.Coordinator.Studies;

namespace DeepSeekCluster.Coordinator.Tests.Studies;

public class StudySpecTests
{
    [Fact]
    public void EveryProblemIsNamedByItsField()
    {
        var bad = SyntheticStudies.Spec("grid", 1, "asha") with
        {
            Space = [new SearchDimension { Path = "schedule.peakLR", Kind = "logUniform", Low = 0, High = 1 }, new SearchDimension { Path = "seed", Kind = "choice" }],
            Metric = "accuracy", Mode = "up", Concurrency = 0, Budget = new StudyBudget { Trials = 0 },
            Scheduler = new SchedulerSpec { Kind = "asha", GracePeriod = 100, ReductionFactor = 1 },
        };
        var fields = bad.Validate().Select(p => p.Field).ToHashSet();
        string[] expected = ["space[0].path", "space[0].low", "space[1].values", "metric", "mode", "concurrency", "budget.trials", "sampler.kind",
            "scheduler.gracePeriod", "scheduler.reductionFactor"];
        Assert.Empty(expected.Except(fields));
        Assert.Contains("job", (SyntheticStudies.Spec("random", 1) with { Job = null }).Validate().Select(p => p.Field));
        Assert.Contains("job.steps", (SyntheticStudies.Spec("random", 1) with { Job = TestSpecs.Tiny() with { Steps = 0 } }).Validate().Select(p => p.Field));
    }

    [Fact]
    public void ATrialIsTheBaseJobWithItsValuesAtTheirPaths()
    {
        var spec = SyntheticStudies.Spec("grid", 1, "asha") with
        {
            Space = [
                new SearchDimension { Path = "schedule.kind", Kind = "grid", Values = [Json("\"cosine\""), Json("\"wsd\"")] },
                new SearchDimension { Path = "guard.maxRollbacks", Kind = "choice", Values = [Json("1"), Json("5")] },
            ],
        };
        Assert.Empty(spec.Validate());
        Assert.Equal(4, StudySamplers.GridSize(spec.Space));
        Assert.Equal([1.0, 0.0], StudySamplers.Propose(spec, 2, [])!);
        Assert.Null(StudySamplers.Propose(spec, 4, []));
        var job = spec.TrialJob([1, 1], "s-t001");
        Assert.Equal(("wsd", 5, "s-t001"), (job.Schedule.Kind, job.Guard.MaxRollbacks, job.Name));
        Assert.Equal((90, 10), (job.Steps, job.EvalInterval)); // asha: the rungs' steps are validation steps
        Assert.Equal(spec.Job!.Schedule.PeakLr, job.Schedule.PeakLr); // what the space does not name stays
        Assert.Empty(job.Validate());

        var numeric = SyntheticStudies.Spec("random", 1).TrialJob([2e-3, 0.05], "s-t000");
        Assert.Equal((2e-3, 0.05), (numeric.Schedule.PeakLr, numeric.WeightDecay));
    }

    static System.Text.Json.JsonElement Json(string text) => System.Text.Json.JsonDocument.Parse(text).RootElement.Clone();
}
