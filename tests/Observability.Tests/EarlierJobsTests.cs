// What the AppHost does with the jobs an earlier run left in its run folder, and the default job it submits otherwise.
using DeepSeekCluster.AppHost;
using DeepSeekCluster.Contracts.Grains;

namespace DeepSeekCluster.Observability.Tests;

public class EarlierJobsTests
{
    static readonly DateTimeOffset T0 = new(2026, 12, 6, 6, 0, 0, TimeSpan.Zero);

    static JobStatus Job(string id, JobState state, long step, int minutes) =>
        new() { JobId = id, State = state, Step = step, Spec = new JobSpec { Steps = 300 }, SubmittedAt = T0.AddMinutes(minutes) };

    [Fact]
    public void WithoutEarlierJobsANewDefaultJobIsSubmittedAndNothingIsSaid()
    {
        var plan = EarlierJobs.Decide([], fresh: false);
        Assert.Equal((null, 0, 0), (plan.Follow, plan.Stop.Count, plan.Messages.Count));
    }

    [Fact]
    public void FinishedEarlierJobsAreListedAndLeftAlone()
    {
        var plan = EarlierJobs.Decide([Job("a", JobState.Completed, 300, 0), Job("b", JobState.Stopped, 40, 5)], fresh: false);
        Assert.Null(plan.Follow);
        Assert.Empty(plan.Stop);
        Assert.Equal("earlier jobs, finished: a (completed, step 300/300, submitted 2026-12-06 06:00:00 UTC), b (stopped, step 40/300, submitted 2026-12-06 06:05:00 UTC)",
                     Assert.Single(plan.Messages));
    }

    [Fact]
    public void AnUnfinishedEarlierJobIsResumedAndFollowedInsteadOfSubmittingASecondOne()
    {
        var plan = EarlierJobs.Decide([Job("done", JobState.Completed, 300, 0), Job("interrupted", JobState.Forming, 40, 10)], fresh: false);
        Assert.Equal("interrupted", plan.Follow);
        Assert.Empty(plan.Stop);
        Assert.Contains("earlier job interrupted is unfinished (forming, step 40/300, submitted 2026-12-06 06:10:00 UTC)", plan.Messages);
        Assert.Contains(plan.Messages, m => m.StartsWith("resuming it with this run's workers", StringComparison.Ordinal) && m.Contains("no new default job while one is unfinished"));
    }

    [Fact]
    public void OfSeveralUnfinishedJobsAllResumeAndTheNewestIsFollowed()
    {
        var plan = EarlierJobs.Decide([Job("newer", JobState.Running, 5, 20), Job("older", JobState.Rescaling, 90, 10)], fresh: false);
        Assert.Equal("newer", plan.Follow);
        Assert.Contains(plan.Messages, m => m.StartsWith("resuming all 2 ", StringComparison.Ordinal));
    }

    [Fact]
    public void FreshStopsEveryUnfinishedJobAndSubmitsANewOne()
    {
        var plan = EarlierJobs.Decide([Job("done", JobState.Completed, 300, 0), Job("x", JobState.Running, 40, 10), Job("y", JobState.Pending, 0, 12)], fresh: true);
        Assert.Null(plan.Follow);
        Assert.Equal(["x", "y"], plan.Stop);
        Assert.Contains("--fresh: stopping all 2, then submitting a new default job", plan.Messages);
    }

    [Fact]
    public void FreshIsAnOptionAndOffByDefault()
    {
        Assert.False(AppHostOptions.Parse([], "/repo", []).Fresh);
        Assert.True(AppHostOptions.Parse(["--fresh"], "/repo", []).Fresh);
        Assert.Contains("--fresh", AppHostOptions.Usage);
    }

    [Fact]
    public void TheDefaultJobIsAValidJobSpecOfTheOptions()
    {
        var options = AppHostOptions.Parse(["--workers", "4", "--pp", "2", "--steps", "20", "--max-workers", "6"], "/repo", []);
        var spec = DefaultJob.Spec(options, "ds-1", new DateTime(2026, 12, 6, 7, 8, 9, DateTimeKind.Utc));
        Assert.Empty(spec.Validate());
        Assert.Equal(("tiny-20261206-070809", "tiny", "ds-1"), (spec.Name, spec.ModelPreset, spec.Dataset));
        Assert.Equal((0, 2), (spec.Parallel.Dp, spec.Parallel.Pp));
        Assert.Equal((20, 2), (spec.Steps, spec.Schedule.WarmupSteps)); // a tenth of a short run
        Assert.Equal((2, 6), (spec.MinWorkers, spec.MaxWorkers));
    }
}
