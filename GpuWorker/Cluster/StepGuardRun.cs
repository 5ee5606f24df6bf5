// The step guard on one rank's run: judges every step (SpikeRule), keeps the rollback target (LiveSnapshot), acts, and
// tells the Coordinator (rank 0; every rank acts the same). docs/agent.md describes the rule.
using DeepSeekCluster.Contracts.Control;
using DeepSeekCluster.Training.Engine;

namespace DeepSeekCluster.GpuWorker.Cluster;

/// <summary>The job diverged past what the guard may undo; the message says why and becomes the job's failure.</summary>
public sealed class JobDivergedException(string message) : Exception(message);

sealed class StepGuardRun(RunContext run, JobPlan plan, ITrainer trainer) : IDisposable
{
    readonly SpikeRule rule = new(plan.Spec.Guard);
    readonly LiveSnapshot snapshot = new();

    /// <summary>Rollbacks so far: one that moves tells the caller the live state changed after the step.</summary>
    public int Rollbacks => rule.Rollbacks;

    /// <summary>The first rollback target is the state the run starts (or resumes) from.</summary>
    public void Start()
    {
        if (plan.Spec.Guard.Rollback) snapshot.Take(trainer);
    }

    /// <summary>
    /// Judges the step just trained and acts: a snapshot on the interval, a skip event, a rollback (after
    /// <paramref name="settleCopies"/>: no checkpoint copy may still be reading the state it overwrites), or a failure.
    /// </summary>
    public void After(StepMetrics m, Action settleCopies)
    {
        var verdict = rule.Judge(m.Step, m.Loss, m.GradNorm, m.Skipped);
        switch (verdict.Act)
        {
            case GuardAct.Apply when verdict.SnapshotDue:
                snapshot.Take(trainer);
                break;
            case GuardAct.Skip:
                run.Log($"step {m.Step} skipped: {verdict.Reason}");
                Tell(new GuardAction { Step = m.Step, Action = "skipped", Reason = verdict.Reason, LrScale = trainer.LrScale });
                break;
            case GuardAct.Rollback:
                settleCopies();
                snapshot.Restore(trainer);
                trainer.LrScale = rule.LrScale;
                long skipped = (trainer.Step - snapshot.Step) * plan.Options.GlobalBatch;
                run.Log($"step {m.Step}: rolled back to the state of step {snapshot.Step}, {skipped} samples skipped, learning rate x{rule.LrScale:0.####}: {verdict.Reason}");
                Tell(new GuardAction
                {
                    Step = m.Step, Action = "rolled_back", Reason = verdict.Reason, RestoredStep = snapshot.Step, SamplesSkipped = skipped,
                    LrScale = rule.LrScale, Rollbacks = rule.Rollbacks,
                });
                break;
            case GuardAct.Fail:
                throw new JobDivergedException($"step {m.Step}: {verdict.Reason}");
        }
    }

    void Tell(GuardAction action)
    {
        if (run.Rank != 0) return;
        action.Generation = run.Assignment.Generation;
        run.Send(new WorkerMessage { Guard = action });
    }

    public void Dispose() => snapshot.Dispose();
}
