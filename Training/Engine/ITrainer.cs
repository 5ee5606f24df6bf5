// What runs a job's steps, whatever the parallel layout: the single-process Trainer (one data-parallel rank) or one
// pipeline stage's PipelineTrainer. The worker's step loop and the end of its run see only this.
using DeepSeekCluster.Training.Data;
using DeepSeekCluster.Training.Optim;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Engine;

/// <summary>A change to the parameters, optimizer moments or routing biases that a step is about to make (<see cref="ITrainer.BeforeStateChange"/>).</summary>
public enum StateChange
{
    /// <summary>ZeRO-3's start of a step: rows written into the exposed parameters become the rank's own, and the parameters are emptied.</summary>
    ReleaseParameters,
    /// <summary>
    /// The optimizer update, applied or skipped: from here until the step returns the parameters, moments and routing
    /// biases are of no one step (under ZeRO the updated rows are still to be gathered).
    /// </summary>
    Update,
}

public interface ITrainer : IDisposable
{
    TrainingOptions Options { get; }
    AdamW Optimizer { get; }
    /// <summary>Optimizer steps completed; the next step is this number.</summary>
    long Step { get; }
    /// <summary>Samples of the global stream consumed by completed steps (step × global batch): the only data state.</summary>
    long ConsumedSamples { get; }

    /// <summary>
    /// Called right before each change <see cref="TrainStep"/> makes to the parameters, the optimizer moments and the
    /// routing biases, with which change it is: the update (<see cref="StateChange.Update"/>, once per step, after forward,
    /// backward and the gradient exchange) and, under ZeRO-3, the emptying of the parameters at the step's start
    /// (<see cref="StateChange.ReleaseParameters"/>). A background checkpoint copy of the previous step's state
    /// (AsyncCheckpointSaver.BeginSave) may run until the first of them and is waited for there (WaitForSnapshot); from the
    /// update until the step returns the state is of no one step, so a worker marks its live state not held (StepLoop).
    /// </summary>
    Action<StateChange>? BeforeStateChange { get; set; }

    /// <summary>
    /// Multiplies the schedule's learning rate (1 unless the step guard lowered it after a rollback). A step whose loss or
    /// gradient norm is NaN/Inf is never applied (<see cref="StepMetrics.Skipped"/>); every rank decides the same.
    /// </summary>
    double LrScale { get; set; }

    /// <summary>One optimizer step over this rank's share of the global batch.</summary>
    StepMetrics TrainStep();

    /// <summary>
    /// Mean LM cross-entropy (nats/token) over the first <paramref name="batches"/> micro-batches of
    /// <paramref name="validation"/> (<see cref="Evaluation.Batches"/>); NaN when it holds none. A pipeline's stages call
    /// it together and all return the last stage's figure.
    /// </summary>
    double Evaluate(ISampleSource validation, int batches);

    /// <summary>The tensors a checkpoint of this rank holds (HF names; a stage's own only): weights, buffers, optimizer moments.</summary>
    IReadOnlyDictionary<string, Tensor> CheckpointTensors();

    /// <summary>Bytes of <see cref="CheckpointTensors"/>: what this rank holds of the training state.</summary>
    long HeldBytes => CheckpointTensors().Values.Sum(t => t.numel() * t.element_size());

    /// <summary>Positions the trainer after <paramref name="step"/> completed steps (used when resuming).</summary>
    void ResumeAt(long step, long optimizerSteps);
}
