// The batch-size finder: the largest micro-batch whose predicted bytes (MemoryPlanner) fit a rank's memory with headroom,
// grown from one sequence until the plan says stop. Not a measurement: the activations in the prediction are estimates.
using DeepSeekCluster.Training.Model;

namespace DeepSeekCluster.Training.Parallel;

/// <summary>The finder's answer and the numbers behind it.</summary>
/// <param name="PredictedBytes">The largest rank's predicted bytes at <paramref name="MicroBatch"/>.</param>
/// <param name="LimitBytes">What a prediction may reach: the headroom's share of <paramref name="BudgetBytes"/>.</param>
/// <param name="Tried">Every candidate grown through with its prediction, in order; the last is the first that did not fit,
/// unless the replica's share ran out first.</param>
public sealed record MicroBatchChoice(int MicroBatch, long PredictedBytes, long LimitBytes, long BudgetBytes, IReadOnlyList<(int MicroBatch, long Bytes)> Tried)
{
    /// <summary>The next candidate that did not fit; null when the whole share fits in one micro-batch.</summary>
    public (int MicroBatch, long Bytes)? Stopper => Tried[^1].MicroBatch != MicroBatch ? Tried[^1] : null;

    public override string ToString() =>
        $"micro-batch {MicroBatch}: {RankMemory.Gib(PredictedBytes)} predicted of the {RankMemory.Gib(LimitBytes)} allowed " +
        $"({Math.Round(100.0 * LimitBytes / BudgetBytes)}% of {RankMemory.Gib(BudgetBytes)})" +
        (Stopper is { } s ? $"; {s.MicroBatch} would need {RankMemory.Gib(s.Bytes)}" : "; the replica's whole share fits");
}

public static class MicroBatchFinder
{
    /// <summary>
    /// A tenth of the memory stays free: the activations are an estimate, and the allocator's caching and fragmentation
    /// and the step's temporaries (logits' softmax, the optimizer's scratch) come on top of what the plan counts.
    /// </summary>
    public const double DefaultHeadroom = 0.9;

    /// <summary>
    /// Grows the micro-batch through the divisors of <paramref name="replicaShare"/> (a replica's sequences per step: it
    /// must split into whole micro-batches) while the largest rank's prediction stays within <paramref name="headroom"/> of
    /// <paramref name="budgetBytes"/>, and returns the largest that did. <paramref name="inputs"/>' micro-batch fields are
    /// replaced per candidate. Throws <see cref="PlanDoesNotFitException"/> when not even one sequence fits.
    /// </summary>
    public static MicroBatchChoice Find(DeepSeekConfig config, ParallelLayout layout, MemoryInputs inputs, int replicaShare, long budgetBytes,
                                        double headroom = DefaultHeadroom)
    {
        if (replicaShare < 1) throw new ArgumentOutOfRangeException(nameof(replicaShare), replicaShare, "a replica's share of a step must be at least 1 sequence");
        if (budgetBytes < 1) throw new ArgumentOutOfRangeException(nameof(budgetBytes), budgetBytes, "the memory budget must be a positive number of bytes");
        if (headroom is <= 0 or > 1 || double.IsNaN(headroom)) throw new ArgumentOutOfRangeException(nameof(headroom), headroom, "the headroom must be in (0, 1]");
        long limit = (long)(budgetBytes * headroom);
        var tried = new List<(int, long)>();
        (int MicroBatch, long Bytes) best = (0, 0);
        foreach (int m in Enumerable.Range(1, replicaShare).Where(m => replicaShare % m == 0))
        {
            long bytes = MemoryPlanner.PredictAll(config, layout, inputs with { MicroBatch = m, MicroBatchesPerStep = replicaShare / m }).Max(r => r.Total);
            tried.Add((m, bytes));
            if (bytes > limit) break; // the prediction grows with the micro-batch: no larger one fits either
            best = (m, bytes);
        }
        if (best.MicroBatch == 0)
            throw new PlanDoesNotFitException(
                $"the batch-size finder found no micro-batch that fits: one sequence of {inputs.SeqLen} tokens is predicted at {RankMemory.Gib(tried[0].Item2)} " +
                $"(dp {layout.Dp} x pp {layout.Pp}, ep {layout.Ep}, zero {layout.Zero}, {inputs.Precision}, recompute {inputs.Recompute}), against " +
                $"{RankMemory.Gib(limit)} allowed ({Math.Round(headroom * 100)}% of {RankMemory.Gib(budgetBytes)}). Shard more, recompute activations, or shorten seqLen.");
        return new MicroBatchChoice(best.MicroBatch, best.Bytes, limit, budgetBytes, tried);
    }
}
