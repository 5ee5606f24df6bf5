// ZeRO-1/2 inside a pipeline stage: the stage's optimizer state (and, ZeRO-2, its gradient sums) sharded over the stage's replicas.
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Optim;
using DeepSeekCluster.Training.Parallel;

namespace DeepSeekCluster.Training.Pipeline;

/// <summary>
/// A pipeline stage's replicas form its data-parallel group, so ZeRO there is the data-parallel trainer's over that group
/// and the stage's own parameters: replica d holds rows [d·n/dp, (d+1)·n/dp) of each of them — the rows it also writes
/// to a checkpoint (ShardingPlan.WriteRows for rank stage·dp + d), so a stage's sharded state is its checkpoint slice.
/// </summary>
public static class StageZero
{
    /// <summary>The layout of one stage's data-parallel group whose ZeRO shards the optimizer holds, or null when nothing is sharded.</summary>
    public static ParallelLayout? Layout(TrainingOptions options, int replicas) =>
        options.Zero > 0 && replicas > 1 ? new ParallelLayout(replicas, 1, [new StageLayers(0, 1)]) { Zero = options.Zero }.Validated() : null;

    /// <summary>What a stage's ZeRO is not built for yet: ZeRO-3 (parameters sharded) and ZeRO with expert parallelism.</summary>
    public static void CheckSupported(TrainingOptions options, int replicas)
    {
        if (Layout(options, replicas) is null) return;
        if (options.Zero >= 3)
            throw new NotSupportedException($"zero {options.Zero} in a pipeline stage: sharded parameters are built for pp 1 only; expected zero 1 or 2 with pp > 1");
        if (options.Ep > 1)
            throw new NotSupportedException($"zero {options.Zero} with ep {options.Ep} in a pipeline stage is not built; expected ep 1 or zero 0 with pp > 1");
    }

    /// <summary>The ZeRO step of a stage (null when nothing is sharded): the optimizer must hold replica <paramref name="replica"/>'s rows.</summary>
    public static ZeroStep? For(AdamW optimizer, TrainingOptions options, int replica, int replicas, IGradientReducer? reducer)
    {
        CheckSupported(options, replicas);
        if (Layout(options, replicas) is not { } layout) return null;
        var bucketed = reducer as BucketedGradientReducer
            ?? throw new ArgumentException($"zero {options.Zero} on {replicas} replicas of a stage needs the stage's data-parallel collective (a BucketedGradientReducer)");
        foreach (var slot in optimizer.Slots)
            if (slot.RowCount is null || (slot.RowStart, slot.RowCount.Value) != layout.ZeroRows(slot.Param.shape, replica))
                throw new ArgumentException($"the optimizer's state of '{slot.Name}' is not replica {replica}'s ZeRO shard of {replicas} (rows {slot.RowStart}+{slot.RowCount?.ToString() ?? "all"}); create it with PipelineTrainer.CreateOptimizer");
        return new ZeroStep(bucketed.Collective, new ZeroShards(layout, [.. optimizer.Slots.Select(s => s.Param.shape)]), bucketed.BucketBytes, layout);
    }
}
