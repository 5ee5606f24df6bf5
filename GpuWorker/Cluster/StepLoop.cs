// A generation's steps on this worker: train, report each step (with the samples the source actually served and, at the
// job's eval interval, the validation loss), save checkpoints, and keep saving the final one until the store takes it.
using DeepSeekCluster.Contracts.Control;
using DeepSeekCluster.Training.Checkpoints;
using DeepSeekCluster.Training.Data;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Parallel;

namespace DeepSeekCluster.GpuWorker.Cluster;

/// <param name="validation">The validation this rank takes part in (null: none between steps); see <see cref="RunEnd.Validates"/>.</param>
/// <param name="evaluation">The job's evaluation tasks, scored at scheduled checkpoint steps (null: the job names none).</param>
sealed class StepLoop(RunContext run, JobPlan plan, RunFormation formed, ISampleSource source, WorkerProgress progress, RunValidation? validation,
                      CheckpointEvaluation? evaluation = null)
{
    /// <summary>The longest wait between two saves of a final checkpoint that the store did not take.</summary>
    static readonly TimeSpan FinalCheckpointRetryCap = TimeSpan.FromSeconds(30);

    readonly System.Collections.Concurrent.ConcurrentDictionary<long, string> manifests = new();
    int finalStored;
    Assignment A => run.Assignment;
    TrainingOptions Options => plan.Options;
    ITrainer Trainer => formed.Trainer;

    /// <summary>The last validation taken between steps: the end of the run reuses it when it is the final step's.</summary>
    public (long Step, double Loss)? LastValidation { get; private set; }

    /// <summary>
    /// The steps to the job's last, with checkpoints (this rank's file of the sharding plan; rank 0 also writes the
    /// manifest) and step reports, then the final checkpoint saved until the store takes it or the run is cancelled.
    /// </summary>
    public void Run(CancellationToken ct)
    {
        // The trainer keeps every torch thread while a save runs (YieldTorchThreads 0): a CPU kernel's bits depend on its
        // thread count, and which steps a yield would slow depends on timing and on whether this generation began the
        // previous step's save, so a resumed or rescaled job would no longer equal an uninterrupted one (docs/decisions.md).
        var saver = new AsyncCheckpointSaver(formed.Store, formed.Sharding, A.Rank, Saved);
        Trainer.BeforeStateChange = change =>
        {
            if (saver.WaitForSnapshot() is not null) run.Metrics?.CheckpointSnapshot(A.JobId, run.WorkerId, saver.LastStall);
            if (change != StateChange.Update) return;
            // From the update until the step returns the state is of no one step: a peer lost in the ZeRO all-gather after
            // the update leaves this rank's rows and moments a step ahead of the others' rows. Not held, a live resume
            // cannot start from it; the loop sets it again once the step is done.
            formed.Live.Step = -1;
            run.Settings.Faults.AtUpdate(Trainer.Step + 1, run.WorkerId, run.Log);
        };
        // Whatever ends this generation, the live state is not touched again (a re-formation's broadcast) while a copy reads it.
        using var snapshotSettled = saver.SnapshotScope();
        // The host copies every save refills, allocated and faulted in beside the first steps rather than inside the
        // first save's step (the worker would hold them from that save on anyway).
        _ = saver.Prepare(Trainer.CheckpointTensors());

        if (A.CheckpointOnly)
        {
            SaveForPreemption(saver);
            return;
        }
        // A generation that resumes at the last step trains nothing: the previous one finished the run, but its reports
        // crossed the re-formation and were refused, so its final checkpoint can never commit. This generation saves it.
        if (formed.Live.Step >= Options.Steps && Options.Steps > 0) SaveCheckpoint(saver, formed.Live.Step);

        progress.Generation = A.Generation;
        // In a pipeline the ring is the stage's replicas: each keeps its neighbour's pieces of the stage's state.
        bool redundant = plan.Spec.Parallel.Redundancy && (formed.Layout.Zero > 0 || formed.Layout.Ep > 1);
        // ZeRO-3: between steps the trainer holds this rank's parameter rows (the parameters themselves are emptied).
        Func<int, TorchSharp.torch.Tensor>? ownRows = ((Trainer as Trainer)?.ShardedParameters ?? (Trainer as Training.Pipeline.PipelineTrainer)?.ShardedParameters) is { } sharded
            ? sharded.OwnRows : null;
        using var guard = new StepGuardRun(run, plan, Trainer, formed.Live);
        guard.Start();
        long? deviceBytes = null;
        while (Trainer.Step < Options.Steps)
        {
            ct.ThrowIfCancellationRequested();
            run.Doing = $"training step {Trainer.Step + 1}";
            long stepStart = System.Diagnostics.Stopwatch.GetTimestamp();
            var m = run.Settings.Faults.Step(Trainer, run.WorkerId, A.Generation, A.Rank, run.Log);
            formed.Live.Step = Trainer.Step; // the optimizer update is done: the live state is consistent at this step
            if (redundant) LiveShards.Refresh(formed.Ring, formed.Live, ownRows); // the neighbour's copy of this rank's shard, at this step
            run.LastStep = System.Diagnostics.Stopwatch.GetElapsedTime(stepStart);
            var served = source.TakeServed();
            progress.Step = m.Step; progress.Loss = m.Loss; progress.TokensPerSecond = m.TokensPerSecond;
            // A replica's tokens pass through each of its stages: stage 0 alone counts them, so sums over workers stay the job's.
            bool countsTokens = A.PpStage == 0;
            run.Metrics?.Record(A.JobId, run.WorkerId, countsTokens ? m : m with { TokensPerSecond = 0 },
                                countsTokens ? (long)ParallelLayout.ReplicaSamples(0, Options.GlobalBatch, A.DpRank, A.DpSize).Count * Options.SeqLen : 0);
            // The resident tensors are all allocated after the first step (gradients, optimizer moments) and keep their sizes.
            if (run.Metrics is not null)
                run.Metrics.DeviceMemory(A.JobId, run.WorkerId,
                    deviceBytes ??= TrainingMetrics.TrainingStateBytes(formed.Live.Tensors().Select(kv => kv.Value).Concat(formed.Live.Neighbour is { } n ? [n.Words] : []),
                                                                      formed.Live.Model.parameters()));
            double? validationLoss = Options.EvalEvery > 0 && m.Step % Options.EvalEvery == 0 ? Validate(m.Step) : null;
            // Every replica scores its share of the tasks before the checkpoint's copy (the weights are the same).
            // Under ZeRO-3 the model is whole only while the trainer gathers it (evaluation tasks need pp 1: a Trainer).
            string? evalResults = evaluation?.Due(m.Step) == true
                ? Trainer is Trainer whole ? whole.Evaluating(model => evaluation.Run(model, m.Step)) : evaluation.Run(formed.Live.Model, m.Step)
                : null;
            var report = Report(m, served, validationLoss);
            report.EvalResultsJson = evalResults ?? "";
            run.Send(new WorkerMessage { Step = report });
            if (A.Rank == 0 && (m.Step % 10 == 0 || m.Step == Options.Steps || m.Step == 1))
                run.Log(ConsoleProgress.Format(m, Options.Steps, A.World, TimeSpan.Zero).Split(" | ETA")[0] +
                        (validationLoss is { } v ? $" | val {v:F4} (ppl {Math.Exp(v):F1})" : ""));
            // After the report (the samples were consumed whatever the guard does), before a save (which then holds what survived).
            int rollbacks = guard.Rollbacks;
            guard.After(m, () => saver.WaitForSnapshot());
            if (redundant && guard.Rollbacks != rollbacks) LiveShards.Refresh(formed.Ring, formed.Live, ownRows); // the copy must hold what the rollback restored
            bool due = Options.CheckpointEvery > 0 && m.Step % Options.CheckpointEvery == 0 || m.Step == Options.Steps || run.TakeCheckpointRequest(m.Step);
            if (due) SaveCheckpoint(saver, m.Step);
        }
        run.Doing = "waiting for the last checkpoint's upload";
        if (TrainingThread.Wait(saver.WaitAsync()) is { } lastFailure) run.Log($"the last checkpoint failed: {lastFailure.Message}");
        // The job completes when its final checkpoint commits, so a final shard the store could not take (storage down
        // past the upload's own retries) is saved again from the live state until it is stored, or until the run is
        // cancelled (Stop, or a re-formation whose generation saves it instead).
        for (var delay = TimeSpan.FromSeconds(2); Trainer.Step >= Options.Steps && Options.Steps > 0 && Volatile.Read(ref finalStored) == 0;
             delay = TimeSpan.FromTicks(Math.Min(delay.Ticks * 2, FinalCheckpointRetryCap.Ticks)))
        {
            run.Log($"the final checkpoint (step {Options.Steps}) is not stored yet; saving it again in {delay.TotalSeconds:0} s");
            if (ct.WaitHandle.WaitOne(delay)) break;
            run.Doing = $"saving the final checkpoint (step {Options.Steps}) again";
            SaveCheckpoint(saver, Options.Steps);
            if (TrainingThread.Wait(saver.WaitAsync()) is { } failure) run.Log($"the final checkpoint failed again: {failure.Message}");
        }
        run.Doing = "closing the checkpoint saver";
        TrainingThread.Wait(saver.DisposeAsync());
    }

    /// <summary>
    /// The step's report. Its samples are those the source served this rank for the step (ISampleSource.TakeServed), so
    /// the Coordinator's exactly-once ledger counts what was trained on, not what the step's arithmetic says; every stage
    /// of a replica trains on its slice, so stage 0 alone reports it and the ledger counts it once.
    /// </summary>
    StepReport Report(StepMetrics m, IReadOnlyList<SampleRange> served, double? validationLoss)
    {
        var samples = A.PpStage == 0 ? SingleRange(served, m.Step) : default;
        return new StepReport
        {
            Generation = A.Generation, Rank = A.Rank, Step = m.Step, Loss = m.Loss,
            TokensPerSecond = m.TokensPerSecond * A.DpSize, LearningRate = m.LearningRate,
            AchievedFlops = m.AchievedFlops, Peak = PeakMessage.From(m.Peak),
            SampleStart = samples.Start, SampleCount = samples.Count,
            ExpertLoad = { A.Rank == 0 ? ExpertFractions(m) : [] },
            ExpertLayers = { A.Rank == 0 && m.ExpertLoad.Count > 0 ? ExpertLayers(plan.Config, m.ExpertLoad.Count) : [] },
            Experts = A.Rank == 0 && m.ExpertLoad.Count > 0 ? m.ExpertLoad[0].Length : 0,
            ValidationLoss = A.Rank == 0 && validationLoss is { } v ? v : 0,
            HasValidation = A.Rank == 0 && validationLoss is not null,
        };
    }

    /// <summary>A step's samples as the one range a report carries: a rank trains on a contiguous share, so anything else is a fault said aloud.</summary>
    internal static SampleRange SingleRange(IReadOnlyList<SampleRange> served, long step) => served.Count == 1 ? served[0]
        : throw new InvalidDataException($"step {step}: the sample source served {(served.Count == 0 ? "no samples" : string.Join(", ", served))}, " +
                                         "not one contiguous range; the step report would not say what was trained on");

    /// <summary>This rank's part of a validation between steps; the loss (every evaluating rank gets the same figure).</summary>
    double? Validate(long step)
    {
        if (validation is null) return null;
        double loss = validation.Evaluate(Trainer);
        LastValidation = (step, loss);
        run.Metrics?.ValidationLoss(A.JobId, run.WorkerId, loss);
        return loss;
    }

    /// <summary>A save's outcome, from the saver: a stored file is reported (rank 0's with the manifest), a failure named.</summary>
    Task Saved(SaveOutcome outcome, CancellationToken token)
    {
        if (outcome.File is { } f)
        {
            if (outcome.Step == Options.Steps) Volatile.Write(ref finalStored, 1);
            run.Metrics?.CheckpointSaved(A.JobId, run.WorkerId, outcome.Duration, f.Size);
            run.Send(new WorkerMessage
            {
                Checkpoint = new CheckpointReport
                {
                    Generation = A.Generation, Step = outcome.Step, Rank = A.Rank, File = f.Name, SizeBytes = f.Size, Sha256 = f.Sha256,
                    ManifestJson = manifests.TryRemove(outcome.Step, out var mj) ? mj : "",
                },
            });
            return Task.CompletedTask;
        }
        run.Log($"checkpoint of step {outcome.Step} failed: {outcome.Error?.Message}");
        manifests.TryRemove(outcome.Step, out _);
        if (outcome.Error is not OperationCanceledException) // cancelled: the run is ending, nothing to tell
            NotStored(outcome.Step, $"could not store its file: {outcome.Error?.Message}");
        return Task.CompletedTask;
    }

    /// <summary>A checkpoint that will not commit from this generation is a job event naming the rank and why.</summary>
    void NotStored(long step, string why) =>
        run.Send(new WorkerMessage { Checkpoint = new CheckpointReport { Generation = A.Generation, Step = step, Rank = A.Rank, Error = why } });

    /// <param name="now">Copy the tensors here rather than beside the next step (the last step, or no step follows).</param>
    void SaveCheckpoint(AsyncCheckpointSaver saver, long step, bool now = false)
    {
        var tensors = Trainer.CheckpointTensors();
        if (A.Rank == 0)
            manifests[step] = GrpcCheckpointStore.ManifestJsonForReport(A.JobId, formed.Sharding,
                new CheckpointPosition(Trainer.Step, A.Generation, Trainer.ConsumedSamples, Trainer.Optimizer.StepCount),
                plan.Config.ToJson(), formed.TokenizerHash, formed.Live.Guard);
        // The copy runs beside the next step's forward and backward and the trainer waits for it before the update
        // (BeforeStateChange); after the last step nothing follows to overlap, so the copy is taken here.
        bool last = now || step >= Options.Steps;
        var request = last ? saver.Save(step, tensors) : saver.BeginSave(step, tensors);
        if (request.Started && last) run.Metrics?.CheckpointSnapshot(A.JobId, run.WorkerId, request.Stall);
        if (request.PreviousFailure is { } failure) run.Log($"an earlier checkpoint failed: {failure.Message}");
        if (request.Started) return;
        // Not started: the previous save is still uploading (a failed copy comes back through the saver's callback).
        if (last)
        {
            TrainingThread.Wait(saver.WaitAsync());
            var final = saver.Save(step, tensors); // the final state must be saved even if the previous save was still running
            if (final.Started) run.Metrics?.CheckpointSnapshot(A.JobId, run.WorkerId, final.Stall);
        }
        else
        {
            manifests.TryRemove(step, out _);
            NotStored(step, "skipped its save: the previous one was still uploading");
        }
    }

    /// <summary>
    /// A checkpoint-only generation (the job was preempted): the live state every rank resumed at is saved and reported
    /// through the ordinary commit, and nothing is trained; the Coordinator releases the workers once it commits. A state
    /// no newer than the committed checkpoint named in the assignment (or the start) is already stored: nothing is saved,
    /// as the Coordinator decides from the same Resumed report.
    /// </summary>
    void SaveForPreemption(AsyncCheckpointSaver saver)
    {
        long step = formed.Live.Step;
        if (step <= A.ResumeStep)
        {
            run.Log($"preempted at step {step}: already committed, nothing to save");
            return;
        }
        run.Log($"preempted at step {step}: saving its checkpoint before the workers are released");
        SaveCheckpoint(saver, step, now: true);
        if (TrainingThread.Wait(saver.WaitAsync()) is { } failure) run.Log($"the checkpoint at preemption failed: {failure.Message}");
        TrainingThread.Wait(saver.DisposeAsync());
    }

    /// <summary>Routed-token fractions, layers × experts flattened (a layer that routed nothing reports zeros).</summary>
    static float[] ExpertFractions(StepMetrics m) =>
        [.. m.ExpertLoad.SelectMany(load => { double total = load.Sum(); return load.Select(l => total == 0 ? 0f : (float)(l / total)); })];

    /// <summary>The model-layer index of each MoE layer: main layers after the dense ones, then the MTP modules (HF numbering).</summary>
    static int[] ExpertLayers(DeepSeekConfig config, int count) =>
        [.. Enumerable.Range(0, count).Select(i => i < config.NumMoeLayers ? config.FirstKDenseReplace + i : config.NumHiddenLayers + (i - config.NumMoeLayers))];
}
