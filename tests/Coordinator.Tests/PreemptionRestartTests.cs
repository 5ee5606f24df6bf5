// A Coordinator that restarts while a preempted job's members save its checkpoint: the deadline that releases their
// workers lived in a timer of the job's activation. Nothing here calls the job after the restart (its members stay
// silent, as ranks stuck in a save would); the silo's start wakes it, and the deadline still releases the workers.
using DeepSeekCluster.Contracts.Grains;
using K = DeepSeekCluster.Contracts.Grains.JobEventKinds;

namespace DeepSeekCluster.Coordinator.Tests;

public class PreemptionRestartTests
{
    static JobSpec Spec(int steps, int priority) => TestSpecs.Tiny(minWorkers: 1, maxWorkers: 1, steps: steps) with { Priority = priority };

    [Fact]
    public async Task AfterARestartMidPreemptionTheCheckpointDeadlineStillReleasesTheWorkers()
    {
        string folder = TestSpecs.TempFolder();
        await using (var c = await GrainCluster.StartAsync(folder, options: o => o.PreemptionCheckpointTimeout = TimeSpan.FromHours(1)))
        {
            var low = c.Job("low");
            await low.SubmitAsync(Spec(steps: 6, priority: 0));
            await c.Worker("p1").RegisterAsync(TestSpecs.Worker("p1"), null);
            await TestSpecs.EventuallyAsync(low.GetStatusAsync, s => s.State == JobState.Running, "low formed");
            await low.ReportResumedAsync(1, new ResumedReport { Step = 0, Source = "start" });
            for (long step = 1; step <= 3; step++) await low.ReportStepAsync(1, new StepReport { Step = step, Loss = 9, SampleStart = (step - 1) * 8, SampleCount = 8 });
            await c.Job("high").SubmitAsync(Spec(steps: 2, priority: 5));
            // low's checkpoint-only generation resumes at step 3 and starts its save; within the hour nothing goes.
            await TestSpecs.EventuallyAsync(low.GetStatusAsync, s => s.Events.Any(e => e.Kind == K.Formed && e.Reason == "preemption_checkpoint"), "low's checkpoint-only generation");
            await low.ReportResumedAsync(2, new ResumedReport { Step = 3, Source = "replica", SourceRank = 0 });
            Assert.DoesNotContain((await low.GetStatusAsync()).Events, e => e.Kind == K.Released);
        }
        // Restarted with a bound of 0.2 s (the deadline is the preemption's start plus the bound configured now): past it.
        await using (var c = await GrainCluster.StartAsync(folder, options: o => o.PreemptionCheckpointTimeout = TimeSpan.FromMilliseconds(200)))
        {
            // Only high is asked: it forms once low's deadline has released p1.
            var high = await TestSpecs.EventuallyAsync(c.Job("high").GetStatusAsync, s => s.State == JobState.Running, "high formed on low's worker after the restart");
            Assert.Equal("p1", Assert.Single(high.Workers).WorkerId);
            var released = Assert.Single((await c.Job("low").GetStatusAsync()).Events, e => e.Kind == K.Released);
            Assert.Equal(("checkpoint_timeout", 0L, 3L), (released.Reason, released.ResumeStep, released.StepsRedone));
        }
    }
}
