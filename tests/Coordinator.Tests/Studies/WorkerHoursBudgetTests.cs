// The worker-hours budget of a study on a real (in-process) silo: the time trials hold workers is counted as they run,
// and no trial starts once it is spent.
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.Coordinator.Tests.Studies;

public class WorkerHoursBudgetTests
{
    [Fact]
    public async Task NoTrialStartsOnceTheTrialsHeldWorkersForTheBudgetsWorkerHours()
    {
        await using var c = await GrainCluster.StartAsync(TestSpecs.TempFolder());
        await c.Worker("w1").RegisterAsync(TestSpecs.Worker("w1"), null);
        var spec = new StudySpec
        {
            Job = TestSpecs.Tiny(1, 1, steps: 4),
            Space = [new SearchDimension { Path = "schedule.peakLr", Kind = "logUniform", Low = 1e-4, High = 1e-2 }],
            Budget = new StudyBudget { Trials = 3, WorkerHours = 2.0 / 3600 }, Concurrency = 1,
            Sampler = new SamplerSpec { Kind = "random", Seed = 1 },
        };
        var study = c.Grains.GetGrain<IStudyGrain>("hours");
        Assert.Single((await study.CreateAsync(SyntheticStudies.Json(spec))).Trials);

        // Trial 0's job holds its one worker; the study counts the time at each follow.
        var job = await TestSpecs.EventuallyAsync(c.Job("hours-t000").GetStatusAsync, s => s.State == JobState.Running, "trial 0 running");
        var counted = await TestSpecs.EventuallyAsync(study.GetStatusAsync, s => s.Trials[0].WorkerHours * 3600 >= 2, "two worker-seconds counted");
        Assert.Single(counted.Trials);

        // Trial 0 completes with the budget spent: trial 1 never starts and the study is done.
        await c.Job("hours-t000").ReportStepAsync(job.Generation, new StepReport { Step = 4, Loss = 3 });
        await c.Job("hours-t000").CheckpointCommittedAsync(new CommittedCheckpoint(4, job.Generation, 1, 100));
        var done = await TestSpecs.EventuallyAsync(study.GetStatusAsync, s => s.State == StudyState.Completed, "the study completed");
        Assert.Equal(TrialState.Completed, Assert.Single(done.Trials).State);
        Assert.InRange(done.Trials[0].WorkerHours * 3600, 2, 120);

        var invalid = spec with { Budget = new StudyBudget { WorkerHours = -1 } };
        Assert.Contains(invalid.Validate(), p => p.Field == "budget.workerHours");
    }
}
