// What runs a job's steps, whatever the parallel layout: the single-process Trainer (one data-parallel rank) or one
// pipeline stage's PipelineTrainer. The worker's step loop and the end of its run see only this.
using DeepSeekCluster.Training.Data;
using DeepSeekCluster.Training.Optim;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Engine;

public interface ITrainer : IDisposable
{
    TrainingOptions Options { get; }
    AdamW Optimizer { get; }
    /// <summary>Optimizer steps completed; the next step is this number.</summary>
    long Step { get; }
    /// <summary>Samples of the global stream consumed by completed steps (step × global batch): the only data state.</summary>
    long ConsumedSamples { get; }

    /// <summary>
    /// Called after forward, backward and the gradient exchange, right before the first change to the parameters, the
    /// optimizer moments and the routing biases: a background checkpoint copy of the previous step's state
    /// (AsyncCheckpointSaver.BeginSave) may run until then and is waited for here (WaitForSnapshot). Under ZeRO-3 also at
    /// the start of the step, whose emptying of the parameters is such a change; <see cref="UpdateBegins"/> marks the update alone.
    /// </summary>
    Action? BeforeOptimizerUpdate { get; set; }

    /// <summary>
    /// Called once per step, after the pre-update <see cref="BeforeOptimizerUpdate"/> and before the update is applied or
    /// skipped: from here until <see cref="TrainStep"/> returns the parameters, moments and routing biases are of no one
    /// step (under ZeRO the updated rows are still to be gathered), so a worker marks its live state not held (StepLoop).
    /// </summary>
    Action? UpdateBegins { get; set; }

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
