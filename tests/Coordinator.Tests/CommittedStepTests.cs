// What an export or an evaluation job may read: a committed step that retention has not deleted; every other step is
// refused with the reason and the steps that are committed.
using DeepSeekCluster.Contracts.Grains;
using DeepSeekCluster.Coordinator.Exports;

namespace DeepSeekCluster.Coordinator.Tests;

public class CommittedStepTests
{
    static JobStatus Job(JobSpec? spec = null) => new()
    {
        JobId = "j", Spec = spec ?? new JobSpec { Name = "j" },
        Checkpoints = [new CheckpointRecord { Step = 10, World = 2, Complete = true }, new CheckpointRecord { Step = 20, World = 2, Complete = true },
                       new CheckpointRecord { Step = 30, World = 2, Complete = true }],
        Committed = [new CommittedCheckpoint(10, 1, 2, 100) { DeletedAt = DateTimeOffset.UnixEpoch }, new CommittedCheckpoint(20, 1, 2, 100)],
    };

    [Fact]
    public void ACommittedStepIsReadableAndEveryOtherStepIsRefusedWithItsReason()
    {
        Assert.Null(CommittedStep.Check(Job(), "j", 20));
        Assert.Equal((ExportRefusal.Conflict, "step 30 of job 'j' is not committed (its checkpoint files were reported, the store has not committed them); committed steps: 20"),
                     CommittedStep.Check(Job(), "j", 30));
        Assert.Equal((ExportRefusal.NotFound, "job 'j' has no checkpoint at step 40; committed steps: 20"), CommittedStep.Check(Job(), "j", 40));
        var deleted = CommittedStep.Check(Job(), "j", 10);
        Assert.Equal(ExportRefusal.Conflict, deleted?.Kind);
        Assert.StartsWith("the checkpoint at step 10 of job 'j' was deleted by retention (keepLast)", deleted?.Reason);
        Assert.Equal((ExportRefusal.NotFound, "no job 'x'"), CommittedStep.Check(new JobStatus { JobId = "x" }, "x", 20));
    }

    [Fact]
    public void AnEvaluationRequestNamesEveryBadField()
    {
        var problems = new EvaluationSpec { Job = "bad job", Step = 0, Tasks = ["a", "a", "Upper"], Limit = -1, Workers = 65 }.Validate();
        Assert.Equal(["job", "step", "tasks", "limit", "workers"], problems.Select(p => p.Field));
        Assert.Empty(new EvaluationSpec { Job = "j", Step = 20, Tasks = ["kjv_cloze"], Workers = 3 }.Validate());
    }
}
