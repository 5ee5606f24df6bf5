// The global gradient norm under expert parallelism: every row of every expert, summed in the single process's order.
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Optim;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Parallel;

public sealed partial class ExpertParallel
{
    // The whole model's parameters in the single process's optimizer order (module order): a replicated one is a local
    // slot; an expert is rows [Offset, Offset + Rows) of its shard's vector of expert row squares.
    (int Slot, int Shard, long Offset, long Rows)[] normOrder = [];
    int[] expertSlots = [];  // this shard's expert slots, in the order of its vector
    long vectorRows;         // rows in each shard's vector (the same for every shard)
    // Under ZeRO: where each slot's rows sit in the vector of the whole model's rows (replicated ones first, then each
    // shard's expert vector in shard order).
    long[] slotRowAt = [];
    long replicatedRows;

    /// <summary>
    /// Learns the single process's parameter order from <paramref name="model"/> (which holds this shard's experts where
    /// the whole model holds all of them, <see cref="ExpertList.Keep"/>) for <see cref="ClipGradNorm"/>.
    /// </summary>
    internal void PlanNorm(DeepSeekForCausalLM model, AdamW optimizer)
    {
        var slotOf = optimizer.Slots.Select((s, i) => (s.Name, i)).ToDictionary(x => x.Name, x => x.i);
        static long Rows(TorchSharp.torch.Tensor t) => t.dim() == 0 ? 1 : t.shape[0];
        var order = new List<(int, int, long, long)>();
        var cursor = new long[Ep];
        var mine = new List<int>();
        var expanded = new HashSet<string>();
        var names = model.named_parameters().Select(p => (Hf: model.ToHfName(p.name), p.parameter)).Where(p => slotOf.ContainsKey(p.Hf)).ToList();
        const string marker = ".mlp.experts.";
        foreach (var (hf, p) in names)
        {
            if (!IsExpertParameter(hf)) { order.Add((slotOf[hf], -1, 0, Rows(p))); continue; }
            var prefix = hf[..(hf.IndexOf(marker, StringComparison.Ordinal) + marker.Length)];
            if (!expanded.Add(prefix)) continue;
            // This layer's experts: each of the first held expert's projections, for every expert of the model in turn.
            string firstHeld = $"{prefix}{Shard * PerShard}.";
            var projections = names.Where(n => n.Hf.StartsWith(firstHeld, StringComparison.Ordinal)).Select(n => (Tail: n.Hf[firstHeld.Length..], Count: Rows(n.parameter))).ToList();
            for (int e = 0; e < Ep * PerShard; e++)
                foreach (var (tail, rows) in projections)
                {
                    int shard = e / PerShard;
                    order.Add((-1, shard, cursor[shard], rows));
                    cursor[shard] += rows;
                    if (shard == Shard)
                        mine.Add(slotOf.TryGetValue($"{prefix}{e}.{tail}", out var slot) ? slot
                            : throw new InvalidOperationException($"expert shard {Shard} has no optimizer slot for '{prefix}{e}.{tail}'"));
                }
        }
        if (cursor.Distinct().Count() > 1) throw new InvalidOperationException($"the expert shards hold different numbers of rows ({string.Join(", ", cursor)})");
        normOrder = [.. order];
        expertSlots = [.. mine];
        vectorRows = cursor.Length > 0 ? cursor[0] : 0;
        slotRowAt = new long[optimizer.Slots.Count];
        replicatedRows = 0;
        foreach (var (slot, _, _, rows) in normOrder)
            if (slot >= 0) { slotRowAt[slot] = replicatedRows; replicatedRows += rows; }
        long at = replicatedRows + Shard * vectorRows;
        foreach (var slot in expertSlots)
        {
            slotRowAt[slot] = at;
            at += Rows(optimizer.Slots[slot].Param);
        }
    }

    /// <summary>
    /// <see cref="ClipGradNorm"/> when every rank holds the gradients of its ZeRO rows only (<see cref="ExpertZeroStep"/>):
    /// each rank writes its rows' squares into the vector of the whole model's rows (zeros elsewhere), one all-reduce over
    /// the world gives every row its holder's value (x + 0 is exact), and the rows are summed in the single process's
    /// order, so the norm is its bits. Only this rank's rows are clipped: the others are not read by its update.
    /// </summary>
    public double ClipShardedGradNorm(AdamW optimizer, double maxNorm)
    {
        double norm = Math.Sqrt(ShardedSumOfSquares(optimizer));
        if (maxNorm > 0 && norm > maxNorm) ZeroStep.ScaleGradients(optimizer, maxNorm / (norm + 1e-6)); // AdamW.ClipGradNorm's scale
        return norm;
    }

    /// <summary>
    /// <see cref="ClipShardedGradNorm"/>'s sum of squares without the clip: every row of the optimizer's parameters from
    /// the rank holding it, in the single process's order. A pipeline stage's share of the global norm under ep × ZeRO.
    /// </summary>
    public double ShardedSumOfSquares(AdamW optimizer)
    {
        using var noGrad = no_grad();
        using var scope = NewDisposeScope();
        var slots = optimizer.Slots;
        var vector = zeros(replicatedRows + Ep * vectorRows, dtype: ScalarType.Float64);
        for (int i = 0; i < slots.Count; i++)
        {
            var slot = slots[i];
            if (slot.Empty || slot.Param.grad is not { } grad) continue;
            var squares = AdamW.RowSquares(slot.Own(grad));
            vector.narrow(0, slotRowAt[i] + slot.RowStart, squares.shape[0]).copy_(squares);
        }
        var summed = vector.to(Collective.Device);
        Collective.AllReduce(summed, Collectives.ReduceOp.Sum);
        var all = summed.cpu().data<double>().ToArray();
        double sumSq = 0;
        foreach (var (slot, shard, offset, rows) in normOrder)
        {
            long start = slot >= 0 ? slotRowAt[slot] : replicatedRows + shard * vectorRows + offset;
            for (long i = 0; i < rows; i++) sumSq += all[start + i];
        }
        return sumSq;
    }

    /// <summary>
    /// Clips every held gradient by the global norm over the whole model: the row squares of each shard's experts are
    /// exchanged within the group, and all rows are summed in the order the single process sums them
    /// (<see cref="AdamW.ClipGradNorm"/>), so the norm and the clipped gradients are its bits.
    /// </summary>
    public double ClipGradNorm(AdamW optimizer, double maxNorm)
    {
        double norm = Math.Sqrt(SumOfSquares(optimizer));
        if (maxNorm > 0 && norm > maxNorm)
        {
            using var noGrad = no_grad();
            double scale = maxNorm / (norm + 1e-6);
            foreach (var s in optimizer.Slots) s.Param.grad?.mul_(scale);
        }
        return norm;
    }

    /// <summary>
    /// The sum of squares of every gradient row this rank's group holds (each shard's experts exchanged within the group),
    /// in the single process's order: <see cref="ClipGradNorm"/>'s, and a pipeline stage's share of the global norm.
    /// </summary>
    public double SumOfSquares(AdamW optimizer)
    {
        using var noGrad = no_grad();
        using var scope = NewDisposeScope();
        var slots = optimizer.Slots;
        var squares = slots.Select(s => s.Param.grad is { } g ? AdamW.RowSquares(g) : zeros(s.Param.dim() == 0 ? 1 : s.Param.shape[0], dtype: ScalarType.Float64)).ToList();
        var vector = expertSlots.Length == 0 ? zeros(0, dtype: ScalarType.Float64) : cat(expertSlots.Select(i => squares[i]).ToList(), 0);
        var send = new long[Collective.WorldSize];
        foreach (var r in GroupRanks) send[r] = vectorRows;
        var input = vector.to(Collective.Device).unsqueeze(0).expand(Ep, vectorRows).reshape(-1).contiguous();
        var output = empty(Ep * vectorRows, ScalarType.Float64, Collective.Device);
        Collective.AllToAll(input, send, output, send);
        var all = output.cpu().data<double>().ToArray();
        var local = squares.Select(t => t.data<double>().ToArray()).ToArray();
        double sumSq = 0;
        foreach (var (slot, shard, offset, rows) in normOrder)
            if (slot >= 0) foreach (var x in local[slot]) sumSq += x;
            else for (long i = 0; i < rows; i++) sumSq += all[shard * vectorRows + offset + i];
        return sumSq;
    }
}
