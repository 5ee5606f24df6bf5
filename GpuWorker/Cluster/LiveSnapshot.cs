// A copy of a rank's whole training state (weights, buffers, optimizer moments and step count) that the step guard rolls
// back to; not a checkpoint: it never leaves the process and is not committed anywhere.
using DeepSeekCluster.Training.Engine;
using static TorchSharp.torch;

namespace DeepSeekCluster.GpuWorker.Cluster;

/// <summary>
/// Taken on the snapshot interval's good steps, into buffers allocated once (host memory for a GPU's state: one more
/// copy of what a checkpoint holds). Restoring copies the values back in place, so every view and the optimizer's slots
/// keep pointing at the same tensors; the trainer's step is not rewound (the samples since are skipped, not redone).
/// </summary>
public sealed class LiveSnapshot : IDisposable
{
    readonly Dictionary<string, Tensor> copies = new(StringComparer.Ordinal);

    /// <summary>The step whose state is held; -1 before the first.</summary>
    public long Step { get; private set; } = -1;
    long optimizerSteps;

    public void Take(ITrainer trainer)
    {
        using var noGrad = no_grad();
        foreach (var (name, t) in trainer.CheckpointTensors())
        {
            if (!copies.TryGetValue(name, out var copy))
                copies[name] = copy = empty(t.shape, dtype: t.dtype, device: CPU).DetachFromDisposeScope();
            copy.copy_(t);
        }
        Step = trainer.Step;
        optimizerSteps = trainer.Optimizer.StepCount;
    }

    public void Restore(ITrainer trainer)
    {
        if (Step < 0) throw new InvalidOperationException("no snapshot was taken to roll back to");
        using var noGrad = no_grad();
        foreach (var (name, t) in trainer.CheckpointTensors())
            t.copy_(copies.TryGetValue(name, out var copy) ? copy
                : throw new InvalidOperationException($"the snapshot of step {Step} holds no tensor '{name}'"));
        trainer.Optimizer.StepCount = optimizerSteps;
    }

    public void Dispose()
    {
        foreach (var t in copies.Values) t.Dispose();
        copies.Clear();
    }
}
