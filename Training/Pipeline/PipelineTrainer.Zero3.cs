// ZeRO-3 in a pipeline stage: the stage's parameters live as this replica's rows between uses (Parallel/ZeroParameters.cs).
using DeepSeekCluster.Training.Parallel;

namespace DeepSeekCluster.Training.Pipeline;

/// <summary>
/// Under ZeRO-3 the stage's parameters are sharded over its replicas. Each decoder layer gathers its parameters right
/// before each use and frees them right after, per micro-batch: in the forward, and again in the backward's recompute
/// (the layer runs as a recompute segment), so whatever the schedule interleaves — 1F1B runs micro-batch a's backward
/// after a later micro-batch's forward — a layer's weights are present exactly while it computes, and the stage never
/// holds more than the layers in flight. Keeping a stage's gathered layers for the whole step would hold the stage's
/// whole parameters through the step (ZeRO-2's memory) to save the regathers. The stage's parameters outside the layers
/// (embedding; final norm, head, MTP norms and projection) are gathered once per step, as without pp.
/// </summary>
public sealed partial class PipelineTrainer
{
    /// <summary>ZeRO-3's sharded parameters of this stage (null otherwise): what this replica holds of them.</summary>
    public ZeroParameters? ShardedParameters => zeroParameters;

    /// <summary>
    /// The start of a ZeRO-3 step: rows a rollback or load wrote into the exposed parameters become the replica's own, then
    /// the stage's parameters outside the layers are gathered. Emptying the parameters is the step's first change to them:
    /// a background checkpoint copy of what <see cref="CheckpointTensors"/> exposed is waited for first.
    /// </summary>
    void BeginShardedStep()
    {
        if (zeroParameters is null) return;
        BeforeStateChange?.Invoke(Engine.StateChange.ReleaseParameters);
        zeroParameters.KeepOwnRowsAndRelease();
        zeroParameters.GatherRest();
    }

    /// <summary>A micro-batch's backward is done: its gradients into this replica's words of the exact sum.</summary>
    void AddShardedMicroBatch()
    {
        if (zeroParameters!.ScattersLayers)
        {
            zeroParameters.ScatterRest(); // the layers' went during the backward; those outside them now
            return;
        }
        zeroParameters.NoteHoldings();
        gradients!.AddAndClearGradients();
    }

    /// <summary>ZeRO-3 before the update: every parameter gets its full shape with this replica's rows (and a <c>.grad</c> for them).</summary>
    void ExposeOwnRows()
    {
        if (zeroParameters is null) return;
        zeroParameters.MaterializeOwnRows();
        if (zeroParameters.ScattersLayers) zeroParameters.GiveGradients();
    }
}
