// parallel.redundancy: each ZeRO rank's copy of its ring neighbour's optimizer shard (under ZeRO-3 with its parameter
// rows), refreshed after every step, and the live reshard that rebuilds every rank's shard of a new layout from what the
// survivors hold. Neither is a checkpoint:
// nothing leaves the ring, and a shard lost with both its rank and that rank's neighbour is loaded from storage instead.
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Optim;
using DeepSeekCluster.Training.Parallel;
using static TorchSharp.torch;

namespace DeepSeekCluster.GpuWorker.Cluster;

/// <summary>Rank r's copy of shard (r + 1) mod dp: that rank's AdamW state words (and ZeRO-3 parameter rows; LiveShards.Words' order), at <see cref="Step"/>.</summary>
public sealed class NeighbourCopy : IDisposable
{
    public required int Shard { get; init; }
    public required Tensor Words { get; init; }
    /// <summary>The step the words are of; -1 while a refresh writes them (half-written words are no copy).</summary>
    public long Step { get; set; } = -1;

    public void Dispose() => Words.Dispose();
}

/// <summary>One rank's held state as a reshard sees it: its step and lineage, its own shard, its neighbour copy, its optimizer steps.</summary>
public readonly record struct HeldShards(long Step, long Lineage, int Shard, int Shards, int CopyShard, long CopyStep, long OptimizerSteps);

/// <summary>
/// Where each shard of the old layout (<see cref="Shards"/> of them) is read from: <see cref="Holders"/>[d] is the new rank
/// holding it, from its neighbour copy when <see cref="FromCopy"/>[d]. <see cref="Source"/> sends the weights to ranks
/// without them; <see cref="InPlace"/>: every rank already holds its own shard of the same layout, nothing moves.
/// </summary>
public sealed record ShardCover(int Source, long Step, long Lineage, long OptimizerSteps, int Shards, int[] Holders, bool[] FromCopy, bool[] Current, bool InPlace);

public static class LiveShards
{
    const int Fields = 7;

    /// <summary>Every rank's <see cref="HeldShards"/> (a one-hot sum, like ReplicaSync.ExchangeHeldSteps).</summary>
    public static HeldShards[] Exchange(ICollective ring, ReplicaState? state)
    {
        using var all = zeros(Fields * ring.WorldSize, dtype: ScalarType.Int64);
        if (state is { Held: true } s)
        {
            var copy = s.Neighbour;
            long[] mine = [s.Step + 1, s.Lineage, s.ZeroShard + 1, s.ZeroShards, (copy?.Shard ?? -1) + 1, (copy?.Step ?? -1) + 1, s.Optimizer.StepCount];
            for (int i = 0; i < Fields; i++) all[Fields * ring.Rank + i] = mine[i];
        }
        ring.AllReduce(all, ReduceOp.Sum);
        var v = all.data<long>().ToArray();
        return [.. Enumerable.Range(0, ring.WorldSize).Select(r =>
        {
            int o = Fields * r;
            return new HeldShards(v[o] - 1, v[o + 1], (int)v[o + 2] - 1, (int)v[o + 3], (int)v[o + 4] - 1, v[o + 5] - 1, v[o + 6]);
        })];
    }

    /// <summary>
    /// The cover of step <paramref name="step"/> (the newest held, from <paramref name="source"/>): the ranks at that step of
    /// the source's history and layout, each old shard read from its own rank if it survived, else from the neighbour
    /// copy of that step. Null, with the reason, when some shard is held by no survivor.
    /// </summary>
    public static (ShardCover? Cover, string Why) Cover(HeldShards[] held, long step, int source, int dp)
    {
        var from = held[source];
        if (from.Shards < 1) return (null, $"the live state of rank {source} holds no ZeRO shard");
        bool Current(HeldShards h) => h.Step == step && h.Lineage == from.Lineage && h.Shards == from.Shards;
        var holders = new int[from.Shards];
        var fromCopy = new bool[from.Shards];
        for (int d = 0; d < from.Shards; d++)
        {
            holders[d] = Array.FindIndex(held, h => Current(h) && h.Shard == d);
            if (holders[d] >= 0) continue;
            holders[d] = Array.FindIndex(held, h => Current(h) && h.CopyShard == d && h.CopyStep == step);
            if (holders[d] < 0)
                return (null, $"shard {d} of {from.Shards} at step {step} is held by no survivor (its rank and the neighbour keeping its copy are both gone)");
            fromCopy[d] = true;
        }
        var current = held.Select(Current).ToArray();
        bool inPlace = from.Shards == dp && held.Select((h, r) => current[r] && h.Shard == r).All(x => x);
        return (new ShardCover(source, step, from.Lineage, from.OptimizerSteps, from.Shards, holders, fromCopy, current, inPlace), "");
    }

    const int Moment1 = 0, Moment2 = 1, Master = 2, Rows = 3;

    /// <summary>
    /// The kinds of words slot <paramref name="s"/> keeps: both moments, then the fp32 master rows if any; under ZeRO-3
    /// without a master (fp32, fp64) the parameter rows themselves, the only place they are held. With a master the
    /// parameter rows are the master's rounded (AdamW writes them so), and a reshard writes them from it.
    /// </summary>
    static int[] Kinds(AdamW.Slot s, bool parameterRows) => s.Master is not null ? [Moment1, Moment2, Master] : parameterRows ? [Moment1, Moment2, Rows] : [Moment1, Moment2];

    static long[] ShapeOf(ReplicaState state, int slot) => state.Shapes?[slot] ?? state.Optimizer.Slots[slot].Param.shape;

    /// <summary>
    /// The state words of shard <paramref name="shard"/> of <paramref name="shards"/>, by slot of the state's optimizer
    /// (same names and shapes on every rank): each state tensor's (exp_avg, exp_avg_sq, then master or ZeRO-3 parameter
    /// rows, <see cref="Kinds"/>) rows of that shard. A scalar is whole in every shard (AdamW keeps it so); only shard 0 updates it.
    /// </summary>
    static IEnumerable<(AdamW.Slot Slot, int Kind, long Start, long Count, long RowSize, long Word)> Words(ReplicaState state, int shards, int shard)
    {
        long word = 0;
        var slots = state.Optimizer.Slots;
        for (int i = 0; i < slots.Count; i++)
        {
            var s = slots[i];
            var shape = ShapeOf(state, i);
            long rowSize = shape.Length == 0 ? 1 : shape.Skip(1).Aggregate(1L, (a, b) => a * b);
            var (start, count) = shape.Length == 0 ? (0L, 1L) : ParallelLayout.Split(shape[0], shards, shard);
            foreach (var kind in Kinds(s, state.ShardedParameters))
            {
                yield return (s, kind, start, count, rowSize, word);
                word += count * rowSize;
            }
        }
    }

    static long WordCount(ReplicaState state, int shards, int shard) => Words(state, shards, shard).Sum(w => w.Count * w.RowSize);

    static Tensor State(AdamW.Slot s, int kind) => kind switch { Moment1 => s.ExpAvg, Moment2 => s.ExpAvgSq, Master => s.Master!, _ => s.Param };

    static ScalarType WordType(ReplicaState state)
    {
        var types = state.Optimizer.Slots.SelectMany(s => Kinds(s, state.ShardedParameters).Select(k => State(s, k).dtype)).Distinct().ToList();
        return types.Count == 1 ? types[0]
            : throw new InvalidOperationException($"redundancy keeps one word type, but the optimizer state (and parameter rows) hold {string.Join(", ", types)}");
    }

    /// <summary>
    /// This rank's own shard as words on <paramref name="device"/>: its state tensors, flattened in slot order; slot i's
    /// parameter rows (ZeRO-3 without a master) from <paramref name="ownRows"/> (the trainer's ZeroParameters between
    /// steps), else read off the parameter, whole between generations.
    /// </summary>
    static Tensor OwnWords(ReplicaState state, Device device, Func<int, Tensor>? ownRows)
    {
        using var scope = NewDisposeScope();
        var slots = state.Optimizer.Slots;
        var parts = new List<Tensor>();
        for (int i = 0; i < slots.Count; i++)
        {
            var s = slots[i];
            foreach (var kind in Kinds(s, state.ShardedParameters))
                parts.Add((kind != Rows ? State(s, kind) : ownRows?.Invoke(i) ?? s.Own(s.Param)).reshape(-1));
        }
        return cat(parts).to(device).contiguous().MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Sends this rank's shard to the rank before it and receives the next rank's into its copy: one all-to-all with one
    /// non-zero count each way (after the optimizer step, and once when a generation resumes). dp 1 keeps nothing.
    /// <paramref name="ownRows"/>: under ZeRO-3, where this rank's parameter rows of slot i are while a trainer holds them.
    /// </summary>
    public static long Refresh(ICollective ring, ReplicaState state, Func<int, Tensor>? ownRows = null)
    {
        int dp = ring.WorldSize, rank = ring.Rank;
        if (dp < 2)
        {
            state.Neighbour?.Dispose(); // a ring of one keeps no copy (one of an earlier layout is no copy of this one)
            state.Neighbour = null;
            return 0;
        }
        int to = (rank + dp - 1) % dp, from = (rank + 1) % dp;
        using var noGrad = no_grad();
        using var mine = OwnWords(state, ring.Device, ownRows);
        long size = WordCount(state, dp, from);
        if (state.Neighbour is not { } copy || copy.Shard != from || copy.Words.numel() != size)
        {
            state.Neighbour?.Dispose();
            state.Neighbour = copy = new NeighbourCopy { Shard = from, Words = zeros(size, dtype: WordType(state), device: ring.Device) };
        }
        copy.Step = -1;
        var send = new long[dp];
        var receive = new long[dp];
        send[to] = mine.numel();
        receive[from] = size;
        ring.AllToAll(mine, send, copy.Words, receive);
        copy.Step = state.Step;
        return mine.numel() * mine.element_size();
    }

    /// <summary>
    /// Fills <paramref name="target"/> (this rank's state of the new layout: its model, a fresh AdamW over its rows) from
    /// <paramref name="cover"/>: the weights from the source to every rank not at the cover's step, then each old shard
    /// broadcast from its holder, every rank keeping the rows its new shard overlaps. Under ZeRO-3 those rows include the
    /// parameter's: a rank's new rows are written into its (whole-shaped) parameters. The bytes broadcast.
    /// </summary>
    public static long Reshard(ICollective ring, ShardCover cover, ReplicaState? old, ReplicaState target)
    {
        using var noGrad = no_grad();
        long bytes = 0;
        long step = cover.Step, optimizerSteps = cover.OptimizerSteps, lineage = cover.Lineage;
        if (cover.Current.Any(c => !c))
            bytes += ReplicaSync.Broadcast(ring, cover.Source, Training.Checkpoints.CheckpointTensors.Collect(target.Model, null), ref step, ref optimizerSteps, ref lineage);
        var type = WordType(target);
        for (int d = 0; d < cover.Shards; d++)
        {
            using var words = ring.Rank != cover.Holders[d] ? zeros(WordCount(target, cover.Shards, d), dtype: type, device: ring.Device)
                : cover.FromCopy[d] ? old!.Neighbour!.Words.alias() : OwnWords(old!, ring.Device, null);
            ring.Broadcast(words, cover.Holders[d]);
            bytes += words.numel() * words.element_size();
            foreach (var (slot, kind, start, count, rowSize, word) in Words(target, cover.Shards, d))
            {
                var into = State(slot, kind);
                if (slot.Param.dim() == 0)
                {
                    // Only shard 0 updates a scalar; a ZeRO-3 scalar parameter is whole on every rank.
                    if (d == 0 && (!slot.Empty || kind == Rows)) into.copy_(words.narrow(0, word, 1).reshape(into.shape));
                    continue;
                }
                // The parameter has every row (rows a ZeRO-3 rank does not hold are never read); the state only this rank's.
                long mineStart = slot.RowStart, mineCount = slot.RowCount ?? slot.Param.shape[0];
                long lo = Math.Max(start, mineStart), hi = Math.Min(start + count, mineStart + mineCount);
                if (lo >= hi) continue;
                using var rows = words.narrow(0, word + (lo - start) * rowSize, (hi - lo) * rowSize);
                using var dest = into.narrow(0, kind == Rows ? lo : lo - mineStart, hi - lo);
                dest.copy_(rows.reshape(dest.shape));
            }
        }
        // ZeRO-3 in bf16: the new rows of each parameter are its master rows rounded, as AdamW's update writes them.
        if (target.ShardedParameters)
            foreach (var slot in target.Optimizer.Slots.Where(s => s.Master is not null && !s.Empty))
            {
                using var own = slot.Own(slot.Param);
                own.copy_(slot.Master!);
            }
        target.Optimizer.StepCount = cover.OptimizerSteps;
        target.Lineage = cover.Lineage;
        target.Step = cover.Step;
        return bytes;
    }
}
