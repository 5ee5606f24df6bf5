// The step guard on one rank's run: judges every step (SpikeRule), keeps the rollback target (LiveSnapshot), acts, and
// tells the Coordinator (rank 0; every rank acts the same). docs/agent.md describes the rule.
using DeepSeekCluster.Contracts.Control;
using DeepSeekCluster.Training.Engine;

namespace DeepSeekCluster.GpuWorker.Cluster;

/// <summary>The job diverged past what the guard may undo; the message says why and becomes the job's failure.</summary>
public sealed class JobDivergedException(string message) : Exception(message);

/// <param name="live">The live state the run trains: its <see cref="ReplicaState.Guard"/> is where the rule resumes and what it leaves.</param>
sealed class StepGuardRun(RunContext run, JobPlan plan, ITrainer trainer, ReplicaState live) : IDisposable
{
    readonly SpikeRule rule = new(plan.Spec.Guard, ResumedState(run, live));
    readonly LiveSnapshot snapshot = new();

    /// <summary>Rollbacks so far: one that moves tells the caller the live state changed after the step.</summary>
    public int Rollbacks => rule.Rollbacks;

    /// <summary>
    /// The first rollback target is the state the run starts (or resumes) from, and the learning rate is the one the
    /// carried rollbacks left (after a re-formation as in the undisturbed run).
    /// </summary>
    public void Start()
    {
        trainer.LrScale = rule.LrScale;
        live.Guard = rule.State;
        if (plan.Spec.Guard.Rollback) snapshot.Take(trainer);
    }

    /// <summary>
    /// The carried state when it is the resumed step's. A state of an earlier step (the run that held it ended between a
    /// step's update and its judgement) still holds the window up to there; one from a later step cannot be this state's.
    /// </summary>
    static GuardState? ResumedState(RunContext run, ReplicaState live)
    {
        if (live.Guard is not { } g) return null;
        if (g.Step == live.Step) return g;
        if (g.Step < live.Step)
        {
            run.Log($"the step guard's state is of step {g.Step}, the live state of step {live.Step}: step {live.Step} was not judged and is not in its window");
            return g;
        }
        run.Log($"the step guard's state is of step {g.Step}, after the live state's {live.Step}: the rule starts afresh");
        return null;
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
        live.Guard = rule.State;
    }

    void Tell(GuardAction action)
    {
        if (run.Rank != 0) return;
        action.Generation = run.Assignment.Generation;
        run.Send(new WorkerMessage { Guard = action });
    }

    public void Dispose() => snapshot.Dispose();
}
