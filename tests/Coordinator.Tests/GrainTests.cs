// The job state machine, generation fencing and persistence, on an in-process Orleans cluster.
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.Coordinator.Tests;

public class GrainTests
{
    [Fact]
    public async Task AJobFormsRescalesWhenAWorkerLeavesAndCompletes()
    {
        await using var c = await GrainCluster.StartAsync(TestSpecs.TempFolder());
        var job = c.Job("walk");
        var status = await job.SubmitAsync(TestSpecs.Tiny(minWorkers: 2, maxWorkers: 2, steps: 2));
        Assert.Equal(JobState.Forming, status.State);

        await c.Worker("w1").RegisterAsync(TestSpecs.Worker("w1"), null);
        long w2 = await c.Worker("w2").RegisterAsync(TestSpecs.Worker("w2"), null);
        status = await TestSpecs.EventuallyAsync(job.GetStatusAsync, s => s.State == JobState.Running, "formation");
        Assert.Equal(1, status.Generation);
        Assert.Equal(["w1", "w2"], status.Workers.OrderBy(w => w.Rank).Select(w => w.WorkerId));
        var a1 = (await c.Worker("w1").GetAsync()).Assignment!;
        Assert.Equal((1L, 2, 2), (a1.Generation, a1.World, a1.DpSize)); // 8 sequences over dp 2

        await c.Worker("w2").DisconnectedAsync(w2, "killed", LeaveKind.Lost);
        status = await TestSpecs.EventuallyAsync(job.GetStatusAsync, s => s.State == JobState.Rescaling, "rescaling after a worker left");

        await c.Worker("w3").RegisterAsync(TestSpecs.Worker("w3"), null);
        status = await TestSpecs.EventuallyAsync(job.GetStatusAsync, s => s.State == JobState.Running && s.Generation == 2, "re-formation");
        Assert.Contains(status.Workers, w => w.WorkerId == "w3");

        var stale = await Assert.ThrowsAsync<StaleGenerationException>(() => job.ReportStepAsync(1, new StepReport { Step = 1, Loss = 9 }));
        Assert.Equal((1L, 2L), (stale.Reported, stale.Current));
        await Assert.ThrowsAsync<StaleGenerationException>(() => c.Worker("w1").HeartbeatAsync(1, new WorkerMetrics()));

        await job.ReportStepAsync(2, new StepReport { Step = 1, Loss = 9 });
        await job.ReportStepAsync(2, new StepReport { Step = 2, Loss = 8 });
        Assert.Equal(JobState.Running, (await job.GetStatusAsync()).State); // trained, but the final checkpoint is not committed yet
        await job.CheckpointCommittedAsync(new CommittedCheckpoint(2, 2, 2, 100));
        status = await job.GetStatusAsync();
        Assert.Equal(JobState.Completed, status.State);
        Assert.Equal([9.0, 8.0], status.Loss.Select(p => p.Loss));
        await TestSpecs.EventuallyAsync(() => c.Worker("w1").GetAsync(), w => w.Assignment is null, "release after completion");
    }

    [Fact]
    public async Task TheValidationCurveHasOnePointPerValidatedStepDropsRedoneStepsAndTakesTheFinalPassAfterCompletion()
    {
        await using var c = await GrainCluster.StartAsync(TestSpecs.TempFolder());
        var job = c.Job("curve");
        await job.SubmitAsync(TestSpecs.Tiny(minWorkers: 1, maxWorkers: 1, steps: 4) with { EvalInterval = 1 });
        long v1 = await c.Worker("v1").RegisterAsync(TestSpecs.Worker("v1"), null);
        await TestSpecs.EventuallyAsync(job.GetStatusAsync, s => s.State == JobState.Running, "formation");
        await job.ReportResumedAsync(1, new ResumedReport { Step = 0, Source = "start" });
        await job.ReportStepAsync(1, new StepReport { Step = 1, Loss = 9 });
        await job.ReportStepAsync(1, new StepReport { Step = 2, Loss = 8, HasValidation = true, ValidationLoss = 5.5 });
        await job.ReportStepAsync(1, new StepReport { Rank = 1, Step = 2, Loss = 8, HasValidation = true, ValidationLoss = 5.5 }); // another rank, same pass
        await job.ReportStepAsync(1, new StepReport { Step = 3, Loss = 7, HasValidation = true, ValidationLoss = 5.2 });
        Assert.Equal([new ValidationPoint(2, 5.5), new ValidationPoint(3, 5.2)], (await job.GetStatusAsync()).ValidationLoss);

        // The worker dies; the next generation resumes from step 2, so step 3 and its validation are redone.
        await c.Worker("v1").DisconnectedAsync(v1, "killed", LeaveKind.Lost);
        await c.Worker("v2").RegisterAsync(TestSpecs.Worker("v2"), null);
        await TestSpecs.EventuallyAsync(job.GetStatusAsync, s => s.State == JobState.Running && s.Generation == 2, "re-formation");
        await job.ReportResumedAsync(2, new ResumedReport { Step = 2, Source = "checkpoint" });
        Assert.Equal([new ValidationPoint(2, 5.5)], (await job.GetStatusAsync()).ValidationLoss);
        await job.ReportStepAsync(2, new StepReport { Step = 3, Loss = 7, HasValidation = true, ValidationLoss = 5.1 });
        await job.ReportStepAsync(2, new StepReport { Step = 4, Loss = 6 });
        await job.CheckpointCommittedAsync(new CommittedCheckpoint(4, 2, 1, 100));
        Assert.Equal(JobState.Completed, (await job.GetStatusAsync()).State);

        // The pass after the last step reports once the final commit already completed the job.
        await job.ReportStepAsync(2, new StepReport { Step = 4, Loss = 6, HasValidation = true, ValidationLoss = 5.0 });
        var status = await job.GetStatusAsync();
        Assert.Equal([new ValidationPoint(2, 5.5), new ValidationPoint(3, 5.1), new ValidationPoint(4, 5.0)], status.ValidationLoss);
        Assert.Equal([9.0, 8.0, 7.0, 6.0], status.Loss.Select(p => p.Loss));
    }

    [Fact]
    public async Task AWorkerWithoutHeartbeatsLeavesItsJob()
    {
        await using var c = await GrainCluster.StartAsync(TestSpecs.TempFolder(), heartbeatTimeout: TimeSpan.FromSeconds(1.5)); // long enough to form first on a loaded machine
        var job = c.Job("quiet");
        await job.SubmitAsync(TestSpecs.Tiny(minWorkers: 1, maxWorkers: 1));
        await c.Worker("q1").RegisterAsync(TestSpecs.Worker("q1"), null);
        // Formed (generation 1), then, with no heartbeat at all, the worker times out and the job re-forms.
        var status = await TestSpecs.EventuallyAsync(job.GetStatusAsync, s => s.State == JobState.Rescaling && s.Generation == 1, "rescaling after silence", seconds: 30);
        Assert.Contains(status.Events, e => e.Message.Contains("no heartbeat"));
        Assert.False((await c.Worker("q1").GetAsync()).Online);
    }

    [Fact]
    public async Task StateSurvivesASiloRestartWithFileStorage()
    {
        string folder = TestSpecs.TempFolder();
        await using (var c = await GrainCluster.StartAsync(folder)) await RunToStepOneAsync(c);
        await using (var c = await GrainCluster.StartAsync(folder)) await AssertStepOneSurvivedAsync(c);
    }

    [Fact]
    public async Task StateSurvivesASiloRestartWithRedisStorage()
    {
        using var redis = await RedisServer.StartAsync();
        await using (var c = await GrainCluster.StartAsync("", redis.ConnectionString)) await RunToStepOneAsync(c);
        await using (var c = await GrainCluster.StartAsync("", redis.ConnectionString)) await AssertStepOneSurvivedAsync(c);
    }

    static async Task RunToStepOneAsync(GrainCluster c)
    {
        await c.Job("durable").SubmitAsync(DurableSpec);
        await c.Worker("d1").RegisterAsync(TestSpecs.Worker("d1"), null);
        await TestSpecs.EventuallyAsync(c.Job("durable").GetStatusAsync, s => s.State == JobState.Running, "formation");
        await c.Job("durable").ReportStepAsync(1, new StepReport { Step = 1, Loss = 7.5 });
        await c.Job("durable").ReportCheckpointAsync(1, new CheckpointReport { Rank = 0, Step = 1, File = "r0.safetensors", SizeBytes = 10, Sha256 = "ab" });
    }

    // Values equal to their type's default where the field's initializer is not (minLr 3e-5, keepLast 3): the grain
    // state's JSON once dropped them, and the restarted job trained with the initializers.
    static readonly JobSpec DurableSpec = TestSpecs.Tiny(minWorkers: 1, maxWorkers: 1, steps: 10) with
    {
        Schedule = new LrSchedule { WarmupSteps = 1, MinLr = 0 }, KeepLast = 0,
    };

    static async Task AssertStepOneSurvivedAsync(GrainCluster c)
    {
        var s = await c.Job("durable").GetStatusAsync();
        Assert.Equal(JobSpecJson.Serialize(DurableSpec with { Name = "durable" }), JobSpecJson.Serialize(s.Spec!));
        Assert.Equal((JobState.Running, 1L, 1L), (s.State, s.Generation, s.Step));
        Assert.Equal(7.5, Assert.Single(s.Loss).Loss);
        Assert.True(Assert.Single(s.Checkpoints).Complete);
        Assert.Equal("d1", Assert.Single(s.Workers).WorkerId);
        Assert.Equal(1, (await c.Worker("d1").GetAsync()).Assignment!.Generation);
    }
}
