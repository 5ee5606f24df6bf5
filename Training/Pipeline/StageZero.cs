// ZeRO inside a pipeline stage: the stage's optimizer state (ZeRO-2: its gradient sums; ZeRO-3: its parameters) sharded over the stage's replicas.
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Optim;
using DeepSeekCluster.Training.Parallel;

namespace DeepSeekCluster.Training.Pipeline;

/// <summary>
/// A pipeline stage's replicas form its data-parallel group, so ZeRO there is the data-parallel trainer's over that group
/// and the stage's own parameters: replica d holds rows [d·n/dp, (d+1)·n/dp) of each of them — the rows it also writes
/// to a checkpoint (ShardingPlan.WriteRows for rank stage·dp + d), so a stage's sharded state is its checkpoint slice.
/// Under ep a routed expert's rows are split over the stage's replicas that hold it (ExpertZeroStep), as without pp.
/// ZeRO-3 shards the stage's parameters over the same rows (<see cref="ShardParameters(PipelineStage, AdamW, ZeroStep?, TrainingOptions, ExactGradientSum)"/>).
/// </summary>
public static class StageZero
{
    /// <summary>The layout of one stage's data-parallel group whose ZeRO shards the optimizer holds, or null when nothing is sharded.</summary>
    public static ParallelLayout? Layout(TrainingOptions options, int replicas) =>
        options.Zero > 0 && replicas > 1 ? new ParallelLayout(replicas, 1, [new StageLayers(0, 1)]) { Zero = options.Zero, Ep = options.Ep }.Validated() : null;

    /// <summary>
    /// ZeRO-3 in a stage (null below zero 3): the stage's parameters sharded over its replicas as <paramref name="zero"/>'s
    /// rows, its decoder layers (and on the last stage the MTP blocks) gathered per use, everything else of the stage per
    /// step. <paramref name="gradients"/> (made while the parameters are whole) takes each layer's reduce-scattered words
    /// during the backward unless <see cref="TrainingOptions.Zero3Overlap"/> is off.
    /// </summary>
    public static ZeroParameters? ShardParameters(PipelineStage stage, AdamW optimizer, ZeroStep? zero, TrainingOptions options, ExactGradientSum gradients)
    {
        if (zero is null || options.Zero < 3) return null;
        var parameters = optimizer.Slots.Select(s => s.Param).ToList();
        var sharded = new ZeroParameters(stage.Model, parameters, [new ZeroParameters.Partition(zero.Collective, zero.Layout, zero.Shard)],
                                         new int[parameters.Count], zero.BucketBytes, LayersOf(stage));
        if (options.Zero3Overlap) sharded.Overlap(gradients, options.ExchangeThread);
        return sharded;
    }

    /// <summary>
    /// ZeRO-3 under ep in a stage (null below zero 3): the stage's parameters over <paramref name="expertZero"/>'s two
    /// partitions, as its optimizer state; no overlap (the forward's all-to-all shares the stage's links), as without pp.
    /// </summary>
    public static ZeroParameters? ShardParameters(PipelineStage stage, ExpertZeroStep? expertZero, TrainingOptions options) =>
        expertZero is not null && options.Zero >= 3 ? expertZero.ShardParameters(stage.Model, LayersOf(stage)) : null;

    /// <summary>The stage's decoder layers, and on the last stage the MTP blocks: the layers its ZeRO-3 gathers per use.</summary>
    static (IReadOnlyList<DecoderLayer> Main, IReadOnlyList<DecoderLayer> Mtp) LayersOf(PipelineStage stage) =>
        ([.. Enumerable.Range(stage.Layers.FirstLayer, stage.Layers.End - stage.Layers.FirstLayer).Select(l => stage.Model.model.layers[l])],
         stage.IsLast ? [.. stage.Model.mtp.Select(m => m.block)] : []);

    /// <summary>
    /// The rows of a stage's parameter <paramref name="name"/> replica <paramref name="replica"/>'s optimizer holds: its
    /// share over the stage's replicas, or, for a routed expert under ep, over the replicas holding that expert.
    /// </summary>
    public static Func<string, long[], (long Start, long Count)>? Rows(TrainingOptions options, int replica, int replicas) =>
        Layout(options, replicas) is { } layout ? (name, shape) => layout.ZeroRowsOfRank(shape, replica, ExpertParallel.IsExpertParameter(name)) : null;

    /// <summary>
    /// The ZeRO step of a stage without routed experts of its own (ep 1, or a stage of dense layers only); null when
    /// nothing is sharded or <see cref="ForExperts"/> applies. The optimizer must hold replica <paramref name="replica"/>'s rows.
    /// </summary>
    public static ZeroStep? For(AdamW optimizer, TrainingOptions options, int replica, int replicas, IGradientReducer? reducer)
    {
        if (HoldsExperts(optimizer, options) || Layout(options, replicas) is not { } layout) return null;
        var bucketed = reducer as BucketedGradientReducer
            ?? throw new ArgumentException($"zero {options.Zero} on {replicas} replicas of a stage needs the stage's data-parallel collective (a BucketedGradientReducer)");
        foreach (var slot in optimizer.Slots)
            if (slot.RowCount is null || (slot.RowStart, slot.RowCount.Value) != layout.ZeroRows(slot.Param.shape, replica))
                throw new ArgumentException($"the optimizer's state of '{slot.Name}' is not replica {replica}'s ZeRO shard of {replicas} (rows {slot.RowStart}+{slot.RowCount?.ToString() ?? "all"}); create it with PipelineTrainer.CreateOptimizer");
        return new ZeroStep(bucketed.Collective, new ZeroShards(layout, [.. optimizer.Slots.Select(s => s.Param.shape)]), bucketed.BucketBytes, layout);
    }

    static bool HoldsExperts(AdamW optimizer, TrainingOptions options) =>
        options.Ep > 1 && optimizer.Slots.Any(s => ExpertParallel.IsExpertParameter(s.Name));

    /// <summary>
    /// ZeRO under ep in a stage (null without either): the replicated parameters sharded over the stage's replicas, each
    /// routed expert over the replicas holding it, the stage's collective as the data-parallel trainer's world.
    /// </summary>
    public static ExpertZeroStep? ForExperts(ExpertParallel? experts, AdamW optimizer, TrainingOptions options, int replica, int replicas, IGradientReducer? reducer)
    {
        if (experts is null || !HoldsExperts(optimizer, options) || Layout(options, replicas) is not { } layout) return null;
        var bucketed = reducer as BucketedGradientReducer
            ?? throw new ArgumentException($"zero {options.Zero} with ep {options.Ep} on {replicas} replicas of a stage needs the stage's data-parallel collective (a BucketedGradientReducer)");
        return new ExpertZeroStep(experts, optimizer, experts.Collective, layout, replica, options.Zero, bucketed.BucketBytes);
    }
}
