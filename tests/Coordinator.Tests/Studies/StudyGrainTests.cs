// The study grain on a real (in-process) Orleans silo with file storage: trials are ordinary jobs on the workers, ASHA
// stops a trial at its rung and its worker goes to the next trial, and a silo restart loses no trial, draw or rung result.
using System.Text.Json.Nodes;
using DeepSeekCluster.Contracts.Grains;
using DeepSeekCluster.Coordinator.Studies;
using Microsoft.Extensions.DependencyInjection;
using Orleans.Storage;

namespace DeepSeekCluster.Coordinator.Tests.Studies;

public class StudyGrainTests
{
    static StudySpec Spec() => new()
    {
        Job = TestSpecs.Tiny(1, 1, steps: 8),
        Space = [new SearchDimension { Path = "schedule.peakLr", Kind = "logUniform", Low = 1e-4, High = 1e-2 }],
        Budget = new StudyBudget { Trials = 3 }, Concurrency = 2,
        Sampler = new SamplerSpec { Kind = "random", Seed = 5 },
        Scheduler = new SchedulerSpec { Kind = "asha", GracePeriod = 2, ReductionFactor = 2 }, // rungs at steps 2 and 4
    };

    internal static async Task<JobStatus> RunningAsync(GrainCluster c, string jobId) =>
        await TestSpecs.EventuallyAsync(() => c.Job(jobId).GetStatusAsync(), s => s.State == JobState.Running, $"job {jobId} running");

    /// <summary>What a trial's rank 0 reports: the step, and the validation loss at it.</summary>
    internal static async Task ValidateAsync(GrainCluster c, string jobId, long step, double validation)
    {
        var job = await RunningAsync(c, jobId);
        await c.Job(jobId).ReportStepAsync(job.Generation, new StepReport { Step = step, Loss = validation + 1, HasValidation = true, ValidationLoss = validation });
    }

    [Fact]
    public async Task AshaStopsTheWorseTrialAtItsRungHandsItsWorkerOnAndASiloRestartLosesNothing()
    {
        string folder = TestSpecs.TempFolder();
        StudyStatus before;
        await using (var c = await GrainCluster.StartAsync(folder))
        {
            await c.Worker("w1").RegisterAsync(TestSpecs.Worker("w1"), null);
            await c.Worker("w2").RegisterAsync(TestSpecs.Worker("w2"), null);
            var study = c.Grains.GetGrain<IStudyGrain>("lr");
            var created = await study.CreateAsync(SyntheticStudies.Json(Spec()));
            Assert.Equal(["lr-t000", "lr-t001"], created.Trials.Select(t => t.JobId));
            var trialJob = (await c.Job("lr-t000").GetStatusAsync()).Spec!;
            Assert.Equal((8, 2), (trialJob.Steps, trialJob.EvalInterval)); // validation at every rung
            Assert.Equal(double.Parse(created.Trials[0].Parameters["schedule.peakLr"], System.Globalization.CultureInfo.InvariantCulture), trialJob.Schedule.PeakLr, 1e-3 * trialJob.Schedule.PeakLr);

            await ValidateAsync(c, "lr-t000", 2, 5.0);
            await study.WakeAsync();
            await ValidateAsync(c, "lr-t001", 2, 6.0); // worse than the only earlier result at rung 0: stopped
            await study.WakeAsync();
            var s = await study.GetStatusAsync();
            Assert.Equal([TrialState.Running, TrialState.Pruned, TrialState.Running], s.Trials.Select(t => t.State));
            Assert.Equal(0, s.Trials[1].StoppedAtRung);
            Assert.Equal(JobState.Stopped, (await c.Job("lr-t001").GetStatusAsync()).State);
            // The stopped trial's worker trains the third trial.
            var third = await RunningAsync(c, "lr-t002");
            var first = await c.Job("lr-t000").GetStatusAsync();
            Assert.NotEqual(first.Workers.Single().WorkerId, third.Workers.Single().WorkerId);
            // The cut-off a third arrival at rung 0 must meet: the median of 5 and 6 (η 2).
            Assert.Equal(new RungStatus(0, 2, 2, 5.5, 1), s.Rungs[0]);
            before = s;
        }

        await using (var c = await GrainCluster.StartAsync(folder))
        {
            var study = c.Grains.GetGrain<IStudyGrain>("lr");
            var after = await study.GetStatusAsync();
            Assert.Equal(before.Trials.Select(t => (t.JobId, t.State, t.Parameters["schedule.peakLr"], t.StoppedAtRung)),
                         after.Trials.Select(t => (t.JobId, t.State, t.Parameters["schedule.peakLr"], t.StoppedAtRung)));
            Assert.Equal(before.Rungs, after.Rungs);

            // The study goes on where it was: trial 2 is cut at rung 0 (7 > the median of 5 and 6), trial 0 trains to the end.
            await ValidateAsync(c, "lr-t002", 2, 7.0);
            await ValidateAsync(c, "lr-t000", 4, 4.0);
            var gen = (await c.Job("lr-t000").GetStatusAsync()).Generation;
            await c.Job("lr-t000").ReportStepAsync(gen, new StepReport { Step = 8, Loss = 4, HasValidation = true, ValidationLoss = 3.5 });
            await c.Job("lr-t000").CheckpointCommittedAsync(new CommittedCheckpoint(8, gen, 1, 100));
            var done = await TestSpecs.EventuallyAsync(study.GetStatusAsync, x => x.State == StudyState.Completed, "the study completed");
            Assert.Equal([TrialState.Completed, TrialState.Pruned, TrialState.Pruned], done.Trials.Select(t => t.State));
            Assert.Equal(("lr-t000", 3.5, 8L), (done.Best!.JobId, done.Best.Metric!.Value, done.Best.CheckpointStep!.Value));
            Assert.Equal((1, 4L, 1, 0), (done.Rungs[1].Rung, done.Rungs[1].Step, done.Rungs[1].Results, done.Rungs[1].Stopped));
        }
    }

    /// <summary>
    /// A submitted study's base job is read as strictly as a submitted job: DeepSpeed's "zero_stage" is refused naming its
    /// path, not dropped. A study already stored is re-read leniently: a field its spec has that the job spec no longer has
    /// (a field a later version dropped) leaves it loading, showing its trials and launching the next from its base job.
    /// </summary>
    [Fact]
    public async Task ASubmittedBaseJobWithAFieldTheJobSpecDoesNotHaveIsRefusedButAStoredStudyWithOneStillLoads()
    {
        string folder = TestSpecs.TempFolder();
        var spec = Spec() with { Budget = new StudyBudget { Trials = 2 }, Concurrency = 1, Scheduler = new SchedulerSpec { Kind = "fifo" } };
        await using (var c = await GrainCluster.StartAsync(folder))
        {
            await c.Worker("w1").RegisterAsync(TestSpecs.Worker("w1"), null);
            var withUnknown = JsonNode.Parse(SyntheticStudies.Json(spec))!;
            withUnknown["job"]!["parallel"]!["zero_stage"] = 2;
            var refused = await Assert.ThrowsAsync<JobSpecInvalidException>(() => c.Grains.GetGrain<IStudyGrain>("strict").CreateAsync(withUnknown.ToJsonString()));
            var problem = Assert.Single(refused.Problems);
            Assert.True(problem.Message.Contains("'zero_stage'") && problem.Message.Contains("$.job.parallel.zero_stage"), problem.Message);
            Assert.Null((await c.Grains.GetGrain<IStudyGrain>("strict").GetStatusAsync()).Trials.FirstOrDefault()); // nothing was created

            var created = await c.Grains.GetGrain<IStudyGrain>("stored").CreateAsync(SyntheticStudies.Json(spec));
            Assert.Equal(["stored-t000"], created.Trials.Select(t => t.JobId));
        }

        await using (var c = await GrainCluster.StartAsync(folder))
        {
            // The stored state, as a Coordinator that knew a "zero_stage" field would have written it; the grain is not
            // active yet (no study wake-up runs in this cluster), so it reads this when first called.
            var study = c.Grains.GetGrain<IStudyGrain>("stored");
            var storage = c.SiloServices.GetRequiredKeyedService<IGrainStorage>("Default");
            var state = new GrainState<StudyGrainState>(new StudyGrainState());
            await storage.ReadStateAsync("study", study.GetGrainId(), state);
            var stored = JsonNode.Parse(state.State!.SpecJson!)!;
            stored["job"]!["parallel"]!["zero_stage"] = 2;
            state.State!.SpecJson = stored.ToJsonString();
            await storage.WriteStateAsync("study", study.GetGrainId(), state);

            var loaded = await study.GetStatusAsync();
            Assert.Contains("zero_stage", loaded.SpecJson);
            Assert.True(loaded.Trials.Single().Parameters.ContainsKey("schedule.peakLr"));
            var job = await RunningAsync(c, "stored-t000");
            await c.Job("stored-t000").ReportStepAsync(job.Generation, new StepReport { Step = 8, Loss = 4, HasValidation = true, ValidationLoss = 3.5 });
            await c.Job("stored-t000").CheckpointCommittedAsync(new CommittedCheckpoint(8, job.Generation, 1, 100));
            await study.WakeAsync();
            var next = await TestSpecs.EventuallyAsync(study.GetStatusAsync, s => s.Trials.Length == 2, "the second trial launched");
            Assert.Equal(TrialState.Completed, next.Trials[0].State);
            Assert.Equal(8, (await c.Job("stored-t001").GetStatusAsync()).Spec!.Steps); // a trial of the stored base job
        }
    }
}
