// ZeRO-3's parameter storage: each rank keeps its rows of every parameter, and gathers a decoder layer's whole
// parameters only while that layer runs (forward, and the recompute in backward).
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Optim;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Parallel;

/// <summary>
/// The parameters of a data-parallel rank under ZeRO stage 3. Between uses every parameter's tensor is emptied
/// (<c>set_</c> to a zero-element tensor: the module keeps the same parameter object, whose storage is freed) and the
/// rank keeps only its <see cref="ParallelLayout.ZeroRows"/> of it (the rows its AdamW shard updates and it writes to
/// a checkpoint) in a tensor of its own. Groups gathered together:
/// <list type="bullet">
/// <item>each decoder layer (main and MTP blocks): gathered right before its forward and again before its backward
/// (the layer runs as a recompute segment, <see cref="ActivationRecompute.RunGathered"/>), emptied after each;</item>
/// <item>everything else (embedding, final norm, head, the MTP modules' norms and projection): gathered once at the
/// start of a step (<see cref="GatherRest"/>) and emptied at its end, since the head is used at both ends of the graph.</item>
/// </list>
/// The optimizer step needs only this rank's rows: <see cref="MaterializeOwnRows"/> gives each parameter its full
/// shape with this rank's rows filled (the other rows are allocated, never read or written, so on the CPU they are not
/// even resident), and <see cref="KeepOwnRowsAndRelease"/> takes the updated rows back and empties every tensor.
/// The gathers move the exact bits of each shard, so the gathered layer is the single process's. <see cref="Overlap"/>
/// (ZeroParameters.Overlap.cs) prefetches the next layer's gather and reduce-scatters each layer's gradients as its
/// backward ends, on an exchange thread of their own.
/// </summary>
public sealed partial class ZeroParameters : IDisposable
{
    /// <summary>
    /// A set of ranks that split some parameters' rows among themselves: <paramref name="Layout"/>'s Dp of them, this rank
    /// holder <paramref name="Shard"/>. Without ep, one partition over the data-parallel group; under ep, the replicated
    /// parameters over every replica and the routed experts over the replicas holding them (ExpertZeroStep's two).
    /// </summary>
    public sealed record Partition(ICollective Collective, ParallelLayout Layout, int Shard);

    // One gather: per partition, the group's members in it and their ZeRO partition (shard-major windows). Layers are
    // numbered in forward order (main layers, then MTP blocks; Index -1: the group outside the layers).
    sealed record Group(string Name, int Index, int[] Members, (int Partition, int[] Members, ZeroShards Shards)[] Parts);

    readonly Partition[] partitions;
    readonly int[] partitionOf;
    readonly long bucketBytes;
    readonly Tensor[] parameters;
    readonly long[][] shapes;
    readonly (long Start, long Count)[] rows;
    readonly Tensor[] homes;
    readonly Group rest;
    readonly Dictionary<DecoderLayer, Group> layers = new(ReferenceEqualityComparer.Instance);
    readonly Group[] order;       // the layers' groups by Index
    readonly int mainLayers;      // order[..mainLayers]: the model's layers; after them the MTP blocks
    OrderedExchange exchange = new(async: false);
    (Group Group, Tensor[] Full, Task Done)? pending; // a prefetched gather (at most one)
    ExactGradientSum? sink;       // per-layer reduce-scatter during the backward into its words, or null: after the backward
    Dictionary<Group, LayerGradientScatter>? scatters;
    long pendingGradientBytes, peak;

    /// <summary>Sharded over the data-parallel group alone (ep 1): <paramref name="collective"/>'s ranks, this rank its own shard.</summary>
    public ZeroParameters(DeepSeekForCausalLM model, IReadOnlyList<Tensor> parameters, ICollective collective, ParallelLayout layout, long bucketBytes)
        : this(model, parameters, [new Partition(collective, layout, collective.Rank)], new int[parameters.Count], bucketBytes)
    {
        if (layout.Dp != collective.WorldSize || layout.Pp != 1 || layout.Ep != 1)
            throw new ArgumentException($"ZeRO-3 parameters over one partition need the data-parallel group alone; the layout is dp {layout.Dp} x pp {layout.Pp}, ep {layout.Ep} on {collective.WorldSize} ranks");
    }

    /// <param name="parameters">Every parameter once (the optimizer's order); each must be whole (full shape) now.</param>
    /// <param name="partitionOf">The partition each parameter's rows are split over.</param>
    /// <param name="stage">A pipeline stage's decoder layers and MTP blocks (the model's others belong to other stages and
    /// are not among <paramref name="parameters"/>); null: the whole model's.</param>
    public ZeroParameters(DeepSeekForCausalLM model, IReadOnlyList<Tensor> parameters, IReadOnlyList<Partition> partitions, IReadOnlyList<int> partitionOf, long bucketBytes,
                          (IReadOnlyList<DecoderLayer> Main, IReadOnlyList<DecoderLayer> Mtp)? stage = null)
    {
        if (partitionOf.Count != parameters.Count || partitionOf.Any(p => p < 0 || p >= partitions.Count))
            throw new ArgumentException($"each of the {parameters.Count} parameters needs a partition in [0, {partitions.Count})", nameof(partitionOf));
        foreach (var part in partitions)
            if (part.Layout.Dp != part.Collective.WorldSize || part.Shard < 0 || part.Shard >= part.Layout.Dp)
                throw new ArgumentException($"a partition of {part.Layout.Dp} shards over {part.Collective.WorldSize} ranks, this rank shard {part.Shard}: expected one shard per rank");
        this.partitions = [.. partitions];
        this.partitionOf = [.. partitionOf];
        this.bucketBytes = bucketBytes;
        this.parameters = [.. parameters];
        shapes = [.. parameters.Select(p => p.shape)];
        rows = [.. shapes.Select((s, i) => partitions[partitionOf[i]].Layout.ZeroRows(s, partitions[partitionOf[i]].Shard))];
        var index = new Dictionary<IntPtr, int>();
        for (int i = 0; i < parameters.Count; i++) index[parameters[i].Handle] = i;
        var inLayer = new bool[parameters.Count];
        var (main, mtp) = stage ?? ([.. model.model.layers], [.. model.mtp.Select(m => m.block)]);
        var decoderLayers = main.Concat(mtp).ToList();
        mainLayers = main.Count;
        foreach (var (layer, l) in decoderLayers.Select((x, i) => (x, i)))
        {
            var members = layer.parameters().Select(p => index.TryGetValue(p.Handle, out int i) ? i
                : throw new ArgumentException($"a parameter of decoder layer {l} is not among the {parameters.Count} given")).Distinct().ToArray();
            foreach (var m in members) inLayer[m] = true;
            layers[layer] = NewGroup($"layer {l}", l, members);
        }
        order = [.. decoderLayers.Select(l => layers[l])];
        rest = NewGroup("outside the layers", -1, [.. Enumerable.Range(0, parameters.Count).Where(i => !inLayer[i])]);
        using var noGrad = no_grad();
        homes = new Tensor[parameters.Count];
        for (int i = 0; i < homes.Length; i++)
        {
            using var own = Own(parameters[i], i);
            homes[i] = own.clone().DetachFromDisposeScope();
        }
        foreach (var p in this.parameters) Empty(p);
        foreach (var (layer, group) in layers)
            layer.Zero3 = new GatheredParameters(() => Gather(group, backward: false), () => Release(group))
            {
                GatherForBackward = () => Gather(group, backward: true),
                Differentiated = () => Differentiated(group),
            };
    }

    // Every rank has the same members in each partition (the same layers, and under ep as many experts of the same shapes),
    // so every rank makes the same all-gathers in the same order.
    Group NewGroup(string name, int index, int[] members) =>
        new(name, index, members, [.. Enumerable.Range(0, partitions.Length)
            .Select(p => (p, Members: members.Where(m => partitionOf[m] == p).ToArray()))
            .Where(x => x.Members.Length > 0)
            .Select(x => (x.p, x.Members, new ZeroShards(partitions[x.p].Layout, [.. x.Members.Select(m => shapes[m])])))]);

    /// <summary>Bytes of parameter storage this rank holds now: its rows, and whatever is gathered at the moment.</summary>
    public long ResidentBytes => homes.Sum(h => h.numel() * h.ElementSize) + parameters.Sum(p => p.numel() * p.ElementSize);

    /// <summary>Bytes of this rank's rows alone (what stays between steps).</summary>
    public long ShardBytes => homes.Sum(h => h.numel() * h.ElementSize);

    Tensor Own(Tensor full, int i) => shapes[i].Length == 0 ? full.alias() : full.narrow(0, rows[i].Start, rows[i].Count);

    static void Empty(Tensor p)
    {
        using var noGrad = no_grad();
        using var nothing = empty(0, dtype: p.dtype, device: p.device);
        p.set_(nothing);
    }

    /// <summary>Gives the parameters outside the decoder layers their whole values: at the start of a step (every rank calls it).</summary>
    public void GatherRest() => Gather(rest, backward: false);

    /// <summary>The whole model gathered (every rank calls it): for an evaluation or an export that reads every weight.</summary>
    public void GatherAll()
    {
        Gather(rest, backward: false);
        foreach (var g in order) Gather(g, backward: false);
    }

    /// <summary>Every parameter gets its full shape with this rank's rows filled; nothing is exchanged.</summary>
    public void MaterializeOwnRows()
    {
        Settle();
        using var noGrad = no_grad();
        for (int i = 0; i < parameters.Length; i++)
        {
            if (parameters[i].numel() != 0 || Numel(shapes[i]) == 0) continue; // the rest group is whole already
            WithOwnRows(i);
        }
    }

    /// <summary>
    /// Copies this rank's rows of every parameter that has its full shape (after the update, or after a caller wrote into
    /// the tensors <see cref="MaterializeOwnRows"/> exposed: a checkpoint load, a rollback) back into its own storage,
    /// empties every parameter and drops every <c>.grad</c>.
    /// </summary>
    public void KeepOwnRowsAndRelease()
    {
        Settle();
        using var noGrad = no_grad();
        for (int i = 0; i < parameters.Length; i++)
        {
            var p = parameters[i];
            if (p.numel() == Numel(shapes[i]) && Numel(shapes[i]) > 0)
            {
                using var own = Own(p, i);
                homes[i].copy_(own);
            }
            Empty(p);
            p.grad = null;
        }
    }

    /// <summary>
    /// This rank's current rows of parameter <paramref name="i"/> (the constructor's order), read without gathering: from a
    /// parameter that has its full shape (a rollback or load wrote there; <see cref="KeepOwnRowsAndRelease"/> takes them next),
    /// else from the rank's own storage. An alias: parallel.redundancy copies it to the ring neighbour between steps.
    /// </summary>
    public Tensor OwnRows(int i) =>
        parameters[i].numel() == Numel(shapes[i]) && Numel(shapes[i]) > 0 ? Own(parameters[i], i) : homes[i].alias();

    /// <summary>Empties every parameter without taking rows back (after a skipped step, or to undo <see cref="GatherAll"/>).</summary>
    public void ReleaseAll()
    {
        Settle();
        foreach (var p in parameters) Empty(p);
    }

    /// <summary>Parameter <paramref name="i"/> gets fresh storage of its full shape with this rank's rows filled (the others unset).</summary>
    void WithOwnRows(int i)
    {
        var full = empty(shapes[i], dtype: homes[i].dtype, device: homes[i].device);
        using (var own = Own(full, i)) own.copy_(homes[i]);
        parameters[i].set_(full);
        full.Dispose();
    }

    static long Numel(long[] shape) => shape.Aggregate(1L, (a, b) => a * b);

    void Release(Group group)
    {
        foreach (var i in group.Members) Empty(parameters[i]);
    }

    /// <summary>
    /// Leaves every parameter with its full shape and this rank's rows (the others unset): the live state a later trainer
    /// of the same shard takes its rows from (a cluster worker keeps it across generations), as after <see cref="MaterializeOwnRows"/>.
    /// </summary>
    public void Dispose()
    {
        foreach (var layer in layers.Keys) layer.Zero3 = null;
        try { Settle(); }
        catch (Exception) { pending = null; } // a failed exchange was thrown to the step it belonged to already
        exchange.Dispose();
        exchange = new OrderedExchange(async: false);
        MaterializeOwnRows();
        foreach (var h in homes) h.Dispose();
    }
}
