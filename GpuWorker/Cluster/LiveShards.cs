// parallel.redundancy: each rank's copy of the pieces of its ring neighbour's state that no other rank holds (its ZeRO
// optimizer shard; under ZeRO-3 with its parameter rows; under ep its expert shard's optimizer rows and weights where no
// other replica holds them: StatePieces), refreshed after every step, and the live reshard that rebuilds every rank's state
// of a new layout from what the survivors hold. Neither is a checkpoint: nothing leaves the ring, and a piece lost with
// both its rank and that rank's neighbour is loaded from storage instead.
using DeepSeekCluster.Contracts.Parallel;
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Optim;
using DeepSeekCluster.Training.Parallel;
using static TorchSharp.torch;

namespace DeepSeekCluster.GpuWorker.Cluster;

/// <summary>Rank r's copy of replica (r + 1) mod dp's singly held pieces (<see cref="Shard"/>: that replica): their words in LiveShards.Words' order, at <see cref="Step"/>.</summary>
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
/// Where each piece of the old layout (<see cref="Pieces"/>: under ep 1 one per ZeRO shard, of <see cref="Shards"/>) is read
/// from: <see cref="Holders"/>[i] is the new rank holding piece i, from its neighbour copy when <see cref="FromCopy"/>[i].
/// <see cref="Source"/> sends the replicated weights to the ranks that do not keep theirs (<see cref="Keeps"/>: at the
/// cover's step and of the same expert shard); <see cref="InPlace"/>: every rank holds its own shard of the same layout.
/// </summary>
public sealed record ShardCover(int Source, long Step, long Lineage, long OptimizerSteps, int Shards, int[] Holders, bool[] FromCopy, bool[] Current,
                                bool InPlace, StatePieces Pieces, bool[] Keeps);

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
    /// the source's history and layout, each piece of the old layout (<see cref="StatePieces"/> of its dp, <paramref name="ep"/>
    /// and <paramref name="zero"/>) read from a rank holding it if one survived, else from the neighbour copy of that step.
    /// Null, with the reason, when some piece is held by no survivor.
    /// </summary>
    public static (ShardCover? Cover, string Why) Cover(HeldShards[] held, long step, int source, int dp, int ep = 1, int zero = 1)
    {
        var from = held[source];
        if (from.Shards < 1) return (null, $"the live state of rank {source} holds no ZeRO shard");
        var pieces = new StatePieces(from.Shards, ep, zero > 0 && from.Shards > 1);
        bool Current(HeldShards h) => h.Step == step && h.Lineage == from.Lineage && h.Shards == from.Shards;
        var all = pieces.All().ToArray();
        var holders = new int[all.Length];
        var fromCopy = new bool[all.Length];
        for (int i = 0; i < all.Length; i++)
        {
            var p = all[i];
            holders[i] = Array.FindIndex(held, h => Current(h) && pieces.Of(h.Shard).Contains(p));
            if (holders[i] >= 0) continue;
            holders[i] = Array.FindIndex(held, h => Current(h) && h.CopyShard >= 0 && h.CopyStep == step && pieces.Copied(h.CopyShard).Contains(p));
            if (holders[i] < 0)
            {
                // A survivor's copy of another step (its refresh did not reach this one) is not this step's piece.
                long? stale = held.Where(h => h.Lineage == from.Lineage && h.Shards == from.Shards && h.CopyShard >= 0 && h.CopyStep != step && pieces.Copied(h.CopyShard).Contains(p))
                                  .Select(h => (long?)h.CopyStep).FirstOrDefault();
                return (null, $"{p} of {from.Shards} at step {step} is held by no survivor " +
                              (stale is null ? "(its rank and the neighbour keeping its copy are both gone)" : $"(its rank is gone and the copy a survivor keeps is of step {stale})"));
            }
            fromCopy[i] = true;
        }
        var current = held.Select(Current).ToArray();
        bool inPlace = from.Shards == dp && held.Select((h, r) => current[r] && h.Shard == r).All(x => x);
        // With ep a rank's model holds its expert shard's experts alone: one whose shard moves builds another model.
        var keeps = held.Select((h, r) => current[r] && h.Shard % ep == r % ep).ToArray();
        return (new ShardCover(source, step, from.Lineage, from.OptimizerSteps, from.Shards, holders, fromCopy, current, inPlace, pieces, keeps), "");
    }

    const int Moment1 = 0, Moment2 = 1, Master = 2, Rows = 3;

    /// <summary>
    /// The kinds of words slot <paramref name="s"/> keeps: both moments, then the fp32 master rows if any; without a master,
    /// the parameter rows themselves where the optimizer's rows are the only place they are held or where a lost rank's must
    /// be rebuilt from them (<paramref name="parameterRows"/>: ZeRO-3, and the routed experts under ep). With a master the
    /// parameter rows are the master's rounded (AdamW writes them so), and a reshard writes them from it.
    /// </summary>
    static int[] Kinds(AdamW.Slot s, bool parameterRows) => s.Master is not null ? [Moment1, Moment2, Master] : parameterRows ? [Moment1, Moment2, Rows] : [Moment1, Moment2];

    static long[] ShapeOf(ReplicaState state, int slot) => state.Shapes?[slot] ?? state.Optimizer.Slots[slot].Param.shape;

    readonly record struct Word(AdamW.Slot Slot, int Index, int Kind, long Start, long Count, long RowSize, long Offset);

    /// <summary>
    /// The state words of <paramref name="pieces"/> one after the other, by slot of the state's optimizer: each replicated
    /// (or, for an expert piece, each routed expert) tensor's (exp_avg, exp_avg_sq, then master or parameter rows,
    /// <see cref="Kinds"/>) rows of the piece. Every rank's optimizer has the same replicated slots, and every expert shard's
    /// slots the same shapes in the same order, so any rank lays out any piece. A scalar is whole in every piece (AdamW
    /// keeps it so); only part 0 updates it.
    /// </summary>
    static IEnumerable<Word> Words(ReplicaState state, int ep, IEnumerable<StatePiece> pieces)
    {
        long word = 0;
        var slots = state.Optimizer.Slots;
        foreach (var p in pieces)
            for (int i = 0; i < slots.Count; i++)
            {
                var s = slots[i];
                bool expert = ep > 1 && ExpertParallel.IsExpertParameter(s.Name);
                if (expert != p.Experts) continue;
                var shape = ShapeOf(state, i);
                long rowSize = shape.Length == 0 ? 1 : shape.Skip(1).Aggregate(1L, (a, b) => a * b);
                var (start, count) = shape.Length == 0 ? (0L, 1L) : ParallelLayout.Split(shape[0], p.Parts, p.Index);
                foreach (var kind in Kinds(s, state.ShardedParameters || expert))
                {
                    yield return new Word(s, i, kind, start, count, rowSize, word);
                    word += count * rowSize;
                }
            }
    }

    static long WordCount(ReplicaState state, int ep, IEnumerable<StatePiece> pieces) => Words(state, ep, pieces).Sum(w => w.Count * w.RowSize);

    static Tensor State(AdamW.Slot s, int kind) => kind switch { Moment1 => s.ExpAvg, Moment2 => s.ExpAvgSq, Master => s.Master!, _ => s.Param };

    static ScalarType WordType(ReplicaState state, int ep)
    {
        var types = state.Optimizer.Slots.SelectMany(s => Kinds(s, state.ShardedParameters || ep > 1 && ExpertParallel.IsExpertParameter(s.Name))
            .Select(k => State(s, k).dtype)).Distinct().ToList();
        return types.Count == 1 ? types[0]
            : throw new InvalidOperationException($"redundancy keeps one word type, but the optimizer state (and parameter rows) hold {string.Join(", ", types)}");
    }

    /// <summary>
    /// This rank's own <paramref name="pieces"/> (some of <see cref="StatePieces.Of"/> its replica) as words on
    /// <paramref name="device"/>: its state tensors, flattened in slot order; slot i's parameter rows (ZeRO-3 without a
    /// master) from <paramref name="ownRows"/> (the trainer's ZeroParameters between steps), else read off the parameter.
    /// </summary>
    static Tensor OwnWords(ReplicaState state, IEnumerable<StatePiece> pieces, Device device, Func<int, Tensor>? ownRows)
    {
        using var scope = NewDisposeScope();
        var parts = new List<Tensor>();
        foreach (var w in Words(state, state.Ep, pieces))
        {
            var t = w.Kind != Rows ? State(w.Slot, w.Kind) : ownRows?.Invoke(w.Index) ?? w.Slot.Own(w.Slot.Param);
            if (t.numel() != w.Count * w.RowSize)
                throw new InvalidOperationException($"'{w.Slot.Name}' holds {t.numel()} words of kind {w.Kind}, but its piece has {w.Count} rows of {w.RowSize}: the state is not this layout's");
            parts.Add(t.reshape(-1));
        }
        return (parts.Count == 0 ? zeros(0, dtype: WordType(state, state.Ep)) : cat(parts)).to(device).contiguous().MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Sends the pieces of this rank that no other rank holds (<see cref="StatePieces.Copied"/>) to the rank before it and
    /// receives the next rank's into its copy: one all-to-all with one non-zero count each way (after the optimizer step,
    /// and once when a generation resumes). dp 1, or a layout in which every piece has two holders, keeps nothing.
    /// <paramref name="ownRows"/>: under ZeRO-3, where this rank's parameter rows of slot i are while a trainer holds them.
    /// </summary>
    public static long Refresh(ICollective ring, ReplicaState state, Func<int, Tensor>? ownRows = null)
    {
        int dp = ring.WorldSize, rank = ring.Rank;
        var pieces = PiecesOf(state, dp);
        int to = (rank + dp - 1) % dp, from = (rank + 1) % dp;
        if (pieces.Copied(from).Length == 0)
        {
            state.Neighbour?.Dispose(); // nothing to keep (one of an earlier layout is no copy of this one)
            state.Neighbour = null;
            return 0;
        }
        using var noGrad = no_grad();
        using var mine = OwnWords(state, pieces.Copied(rank), ring.Device, ownRows);
        long size = WordCount(state, state.Ep, pieces.Copied(from));
        if (state.Neighbour is not { } copy || copy.Shard != from || copy.Words.numel() != size)
        {
            state.Neighbour?.Dispose();
            state.Neighbour = copy = new NeighbourCopy { Shard = from, Words = zeros(size, dtype: WordType(state, state.Ep), device: ring.Device) };
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

    /// <summary>The pieces of the layout <paramref name="state"/> is laid out for on a ring of <paramref name="dp"/>.</summary>
    static StatePieces PiecesOf(ReplicaState state, int dp) => new(dp, state.Ep, state.Optimizer.Sharded);

    /// <summary>
    /// The replicated tensors of the model (HF names, buffers included): with ep, every rank's; the experts are pieces. Under
    /// ZeRO-3 the buffers alone: a rank holds only its own rows of each parameter, which come with the pieces, and a rank
    /// keeping its model has yet to send its rows from it (the source's broadcast rows would overwrite them). A pipeline
    /// stage's own only: its ring is the stage's replicas, and its model holds no other stage's weights (only stale seed
    /// values of their routing biases).
    /// </summary>
    static List<KeyValuePair<string, Tensor>> ReplicatedWeights(ReplicaState state, int ep)
    {
        var parameters = state.ShardedParameters ? state.Optimizer.Slots.Select(s => s.Name).ToHashSet(StringComparer.Ordinal) : [];
        var owner = state.Stage is { } stage ? new Training.Checkpoints.ShardingPlan(stage.Layout, []) : null;
        return [.. Training.Checkpoints.CheckpointTensors.Collect(state.Model, null)
            .Where(kv => (ep < 2 || !ExpertParallel.IsExpertParameter(kv.Key)) && !parameters.Contains(kv.Key)
                         && (owner is null || owner.StageOf(kv.Key) == state.Stage!.Index))];
    }

    /// <summary>
    /// Fills <paramref name="target"/> (this rank's state of the new layout: its model, a fresh AdamW over its rows) from
    /// <paramref name="cover"/>: the replicated weights from the source to every rank not keeping its model, then each old
    /// piece broadcast from its holder, every rank keeping the rows its new shard overlaps. Under ZeRO-3 those rows include
    /// the parameter's, and under ep an expert piece's carries its weights: they are written into the (whole-shaped)
    /// parameters of every rank of that expert shard. The bytes broadcast.
    /// </summary>
    public static long Reshard(ICollective ring, ShardCover cover, ReplicaState? old, ReplicaState target)
    {
        using var noGrad = no_grad();
        long bytes = 0;
        long step = cover.Step, optimizerSteps = cover.OptimizerSteps, lineage = cover.Lineage;
        int ep = cover.Pieces.Ep, myExperts = ring.Rank % ep;
        if (cover.Keeps.Any(k => !k))
        {
            // A source whose expert shard moved (the lost rank was rank 0) builds a new model from the seed: it sends the
            // weights it held, and takes them itself, rather than its new model's step-0 weights.
            var into = ReplicatedWeights(target, ep);
            bool fromOld = ring.Rank == cover.Source && !cover.Keeps[ring.Rank] && old is not null && !ReferenceEquals(old.Model, target.Model);
            var sent = fromOld ? ReplicatedWeights(old!, ep) : into;
            bytes += ReplicaSync.Broadcast(ring, cover.Source, sent, ref step, ref optimizerSteps, ref lineage);
            if (fromOld)
                foreach (var (to, held) in into.Zip(sent)) to.Value.copy_(held.Value);
        }
        var type = WordType(target, ep);
        var all = cover.Pieces.All().ToArray();
        for (int i = 0; i < all.Length; i++)
        {
            var p = all[i];
            using var words = ring.Rank != cover.Holders[i] ? zeros(WordCount(target, ep, [p]), dtype: type, device: ring.Device)
                : cover.FromCopy[i] ? CopyOf(old!, cover.Pieces, p) : OwnWords(old!, [p], ring.Device, null);
            ring.Broadcast(words, cover.Holders[i]);
            bytes += words.numel() * words.element_size();
            if (p.Experts && p.ExpertShard != myExperts) continue; // another expert shard's: this rank holds none of its tensors
            foreach (var (slot, _, kind, start, count, rowSize, word) in Words(target, ep, [p]))
            {
                var into = State(slot, kind);
                if (slot.Param.dim() == 0)
                {
                    // Only part 0 updates a scalar; a ZeRO-3 scalar parameter is whole on every rank.
                    if (p.Index == 0 && (!slot.Empty || kind == Rows)) into.copy_(words.narrow(0, word, 1).reshape(into.shape));
                    continue;
                }
                // An expert's weights are whole on its holders (ZeRO-3's parameter rows have the whole shape too, and the
                // rows a rank does not hold are never read): every row of the piece goes into the parameter.
                if (kind == Rows || kind == Master && p.Experts)
                {
                    using var weights = slot.Param.narrow(0, start, count);
                    weights.copy_(words.narrow(0, word, count * rowSize).reshape(weights.shape));
                    if (kind == Rows) continue;
                }
                // The state holds only this rank's rows.
                long mineStart = slot.RowStart, mineCount = slot.RowCount ?? slot.Param.shape[0];
                long lo = Math.Max(start, mineStart), hi = Math.Min(start + count, mineStart + mineCount);
                if (lo >= hi) continue;
                using var rows = words.narrow(0, word + (lo - start) * rowSize, (hi - lo) * rowSize);
                using var dest = into.narrow(0, lo - mineStart, hi - lo);
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

    /// <summary>Piece <paramref name="piece"/>'s words in <paramref name="old"/>'s neighbour copy (the copied pieces one after the other).</summary>
    static Tensor CopyOf(ReplicaState old, StatePieces pieces, StatePiece piece)
    {
        var copied = pieces.Copied(old.Neighbour!.Shard);
        int at = Array.IndexOf(copied, piece);
        long offset = WordCount(old, pieces.Ep, copied.Take(at));
        return old.Neighbour.Words.narrow(0, offset, WordCount(old, pieces.Ep, [piece])).alias();
    }
}
