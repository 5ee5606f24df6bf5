// The recovery clock of a re-formation, as a plain object: cause → formed → resumed → first step.
using DeepSeekCluster.Coordinator.Grains;

namespace DeepSeekCluster.Coordinator.Tests;

public class RecoveryClockTests
{
    static readonly DateTimeOffset T0 = new(2026, 1, 1, 0, 0, 0, TimeSpan.Zero);

    [Fact]
    public void TheFirstStepAfterTheResumeEndsTheRecoveryWithEachPartTimed()
    {
        var clock = new RecoveryClock();
        clock.Start("worker_lost", T0);
        clock.Formed(4, T0.AddSeconds(2));
        clock.Resumed(4, 30, T0.AddSeconds(5));
        Assert.Null(clock.StepCompleted(3, 31, T0.AddSeconds(6)));  // a late report of the old generation
        Assert.Null(clock.StepCompleted(4, 30, T0.AddSeconds(6)));  // the resumed step itself, reported again
        var r = clock.StepCompleted(4, 31, T0.AddSeconds(9));
        Assert.Equal(new Recovery("worker_lost", 9, 2, 3, 4, 30), r);
        Assert.Null(clock.Current);
        Assert.Null(clock.StepCompleted(4, 32, T0.AddSeconds(10))); // over
    }

    [Fact]
    public void ASecondFailureDuringARecoveryExtendsItAndAFirstFormationIsNotARecovery()
    {
        var clock = new RecoveryClock();
        clock.Formed(1, T0);
        Assert.Null(clock.Current);

        clock.Start("worker_left", T0);
        clock.Formed(2, T0.AddSeconds(1));
        clock.Start("collective_failed", T0.AddSeconds(3)); // before generation 2 resumed
        clock.Formed(3, T0.AddSeconds(4));
        clock.Resumed(2, 10, T0.AddSeconds(5));             // generation 2's resume no longer counts
        clock.Resumed(3, 10, T0.AddSeconds(6));
        var r = clock.StepCompleted(3, 11, T0.AddSeconds(8))!;
        Assert.Equal(("worker_left", 8.0, 4.0, 2.0, 2.0), (r.Cause, r.Total, r.Formation, r.Restore, r.FirstStep));
    }

    [Fact]
    public void AStoppedJobTimesNoRecovery()
    {
        var clock = new RecoveryClock();
        clock.Start("grow", T0);
        clock.Formed(2, T0.AddSeconds(1));
        clock.Stop();
        Assert.Null(clock.StepCompleted(2, 5, T0.AddSeconds(2)));
    }
}
