// ZeRO-1/2 under expert parallelism: replicated parameters sharded over every replica, each routed expert over the replicas that hold it.
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Optim;

namespace DeepSeekCluster.Training.Parallel;

/// <summary>
/// The sharded optimizer step of a data-parallel rank with ep &gt; 1 and ZeRO stage 1 or 2. Two partitions, two groups:
/// the replicated parameters (the optimizer's first <see cref="ExpertParallel.FirstExpertParameter"/> slots) are split
/// over all Dp replicas, as without ep; the routed experts this rank holds are split over the Dp/Ep replicas that hold
/// the same expert shard (<see cref="ExpertParallel.ShardPeers"/>), whose exchanges go through a
/// <see cref="SubgroupCollective"/>. Each rank's rows of either kind are the rows it writes to a checkpoint
/// (<see cref="ParallelLayout.ZeroRowsOfRank"/>), so a checkpoint needs no gather and loads into any layout.
/// <para>
/// Each part keeps its own exact gradient sum: the replicated words are reduce-scattered over the world, the expert
/// words over the holders (per micro-batch under ZeRO-2, each other source's expert gradient a term of its own, as with
/// ep alone). The words are integers, so every held row's gradient is the single process's bits; the norm sums every
/// row of the whole model in the single process's order (<see cref="ExpertParallel.ClipShardedGradNorm"/>).
/// </para>
/// </summary>
public sealed class ExpertZeroStep : IDisposable
{
    readonly ExpertParallel experts;
    readonly AdamW.Slot[] replicatedSlots, expertSlots;

    /// <summary>The replicated parameters' ZeRO step, over every data-parallel rank.</summary>
    public ZeroStep Replicated { get; }
    /// <summary>The held experts' ZeRO step, over the ranks that hold this expert shard.</summary>
    public ZeroStep Experts { get; }
    public ExactGradientSum ReplicatedSum { get; }
    public ExactGradientSum ExpertSum { get; }

    /// <summary>Bytes of both exact sums' int64 words on this rank.</summary>
    public long WordBytes => (ReplicatedSum.High.numel() + ReplicatedSum.Low.numel() + ExpertSum.High.numel() + ExpertSum.Low.numel()) * sizeof(long);

    public ExpertZeroStep(ExpertParallel experts, AdamW optimizer, ICollective world, ParallelLayout layout, int rank, int zero, long bucketBytes)
    {
        if (zero is not (1 or 2 or 3)) throw new ArgumentOutOfRangeException(nameof(zero), zero, "expert parallelism with ZeRO: zero 1, 2 or 3");
        if (layout.Ep != experts.Ep || layout.Dp != world.WorldSize || layout.Pp != 1)
            throw new ArgumentException($"the layout dp {layout.Dp} x pp {layout.Pp}, ep {layout.Ep} is not this data-parallel group's ({world.WorldSize} ranks, ep {experts.Ep})");
        this.experts = experts;
        int first = experts.FirstExpertParameter;
        replicatedSlots = [.. optimizer.Slots.Take(first)];
        expertSlots = [.. optimizer.Slots.Skip(first)];
        if (replicatedSlots.Length == 0 || expertSlots.Length == 0)
            throw new ArgumentException($"expert parallelism with ZeRO needs replicated and expert parameters; the optimizer has {replicatedSlots.Length} and {expertSlots.Length}");
        foreach (var (slot, expert) in replicatedSlots.Select(s => (s, false)).Concat(expertSlots.Select(s => (s, true))))
        {
            var rows = layout.ZeroRowsOfRank(slot.Param.shape, rank, expert);
            if (ExpertParallel.IsExpertParameter(slot.Name) != expert || slot.RowCount is null || (slot.RowStart, slot.RowCount.Value) != rows)
                throw new ArgumentException($"the optimizer's state of '{slot.Name}' (rows {slot.RowStart}+{slot.RowCount?.ToString() ?? "all"}) is not rank {rank}'s ZeRO shard " +
                                            $"(rows {rows.Start}+{rows.Count}, {(expert ? $"over the {layout.Dp / layout.Ep} holders of its experts" : $"over {layout.Dp} replicas")}); create it with Trainer.CreateOptimizer");
        }
        var whole = new ParallelLayout(layout.Dp, 1, [new StageLayers(0, 1)]) { Zero = zero };
        var holders = whole with { Dp = layout.Dp / layout.Ep };
        Replicated = new ZeroStep(world, new ZeroShards(whole, [.. replicatedSlots.Select(s => s.Param.shape)]), bucketBytes);
        Experts = new ZeroStep(new SubgroupCollective(world, experts.ShardPeers), new ZeroShards(holders, [.. expertSlots.Select(s => s.Param.shape)]), bucketBytes);
        if (Experts.Shard != layout.ReplicaOfRank(rank) / layout.Ep)
            throw new InvalidOperationException($"rank {rank} is holder {Experts.Shard} of its expert shard; the layout says {layout.ReplicaOfRank(rank) / layout.Ep}");
        ReplicatedSum = Replicated.NewGradientSum([.. replicatedSlots.Select(s => s.Param)], zero);
        ExpertSum = Experts.NewGradientSum([.. expertSlots.Select(s => s.Param)], zero);
    }

    /// <summary>
    /// ZeRO-3: the parameters sharded over the same two partitions as the optimizer (the replicated ones over every
    /// replica, the held experts over their holders); made while the parameters are whole, and empties them.
    /// </summary>
    /// <param name="stage">A pipeline stage's decoder layers and MTP blocks; null: the whole model's.</param>
    public ZeroParameters ShardParameters(DeepSeekForCausalLM model, (IReadOnlyList<DecoderLayer> Main, IReadOnlyList<DecoderLayer> Mtp)? stage = null) =>
        new(model, [.. replicatedSlots.Concat(expertSlots).Select(s => s.Param)],
            [new(Replicated.Collective, Replicated.Layout, Replicated.Shard), new(Experts.Collective, Experts.Layout, Experts.Shard)],
            [.. replicatedSlots.Select(_ => 0).Concat(expertSlots.Select(_ => 1))], Replicated.BucketBytes, stage);

    /// <summary>Empties both sums and every <c>.grad</c>: the start of a step.</summary>
    public void Clear()
    {
        ReplicatedSum.Clear();
        ExpertSum.Clear();
    }

    /// <summary>
    /// After a micro-batch's backward: its gradients, then each other source's expert gradients as terms of their own.
    /// Every rank makes the same calls (ZeRO-2 exchanges in each), members of a subgroup or not.
    /// </summary>
    public void AddMicroBatch() => AddMicroBatch(pending: false);

    /// <summary>
    /// <see cref="AddMicroBatch()"/> in a pipeline stage, where <paramref name="pending"/>: later micro-batches' forwards
    /// may hold expert leaves that their own backward has not reached yet (ExpertParallel.AddSourceGradients).
    /// </summary>
    public void AddMicroBatch(bool pending)
    {
        ReplicatedSum.AddAndClearGradients();
        ExpertSum.AddAndClearGradients();
        experts.AddSourceGradients(() => ExpertSum.AddAndClearGradients(), pending);
    }

    /// <summary>Leaves this rank's rows of both sums with their totals over the ranks that hold them, and writes their mean over <paramref name="count"/> micro-batches.</summary>
    public void ReduceAndWriteMean(long count)
    {
        Replicated.ReduceScatter(ReplicatedSum);
        Experts.ReduceScatter(ExpertSum);
        ReplicatedSum.WriteShardMean(count, Replicated.Shard);
        ExpertSum.WriteShardMean(count, Experts.Shard);
    }

    /// <summary>The global norm over every row of the whole model, and the clip of this rank's rows.</summary>
    public double ClipGradNorm(AdamW optimizer, double maxNorm) => experts.ClipShardedGradNorm(optimizer, maxNorm);

    /// <summary>The sum of squares of every row of the optimizer's parameters, without the clip: a pipeline stage's share of the global norm.</summary>
    public double SumOfSquares(AdamW optimizer) => experts.ShardedSumOfSquares(optimizer);

    /// <summary>Every replica gets every updated replicated row; every holder of an expert shard gets its updated rows.</summary>
    public void AllGatherParameters()
    {
        Replicated.AllGatherParameters(replicatedSlots);
        Experts.AllGatherParameters(expertSlots);
    }

    public void Dispose()
    {
        ReplicatedSum.Dispose();
        ExpertSum.Dispose();
    }
}
