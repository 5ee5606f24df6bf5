// Expert parallelism: each rank of an ep group holds E/ep routed experts; tokens reach their experts' ranks and come back through an all-to-all inside autograd.
using DeepSeekCluster.Training.Collectives;
using DeepSeekCluster.Training.Engine;
using DeepSeekCluster.Training.Model;
using DeepSeekCluster.Training.Optim;
using Parameter = TorchSharp.Modules.Parameter;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Parallel;

// Shape legend: M (token, expert) pairs of this rank grouped by expert, R rows received from the group, D hidden, P experts per shard.
/// <summary>
/// One rank's part in expert parallelism. Its group is <see cref="Ep"/> consecutive replicas (ParallelLayout); shard j
/// holds routed experts [j·P, (j+1)·P). A MoE layer's (token, expert) pairs, already sorted by expert, are contiguous per
/// shard, so the dispatch is one all-to-all of row blocks; the owner runs each expert on each source's block separately,
/// the same rows with the same shapes a single process runs for that source's micro-batch, and the combine returns the
/// outputs in the order they left. Forward and backward are therefore the single process's bits, and each source's
/// expert gradient is a separate term of the exact sum (<see cref="AddSourceGradients"/>), as its micro-batch's is there.
/// </summary>
public sealed partial class ExpertParallel
{
    public ICollective Collective { get; }
    /// <summary>Ranks in the expert-parallel group (expert shards).</summary>
    public int Ep { get; }
    /// <summary>This rank's expert shard: it holds experts [Shard·PerShard, (Shard+1)·PerShard).</summary>
    public int Shard { get; }
    public int PerShard { get; }
    /// <summary>The world rank of shard j of this rank's group, by j.</summary>
    public IReadOnlyList<int> GroupRanks { get; }
    /// <summary>The world ranks holding this rank's shard (itself included), ascending: its expert gradients are summed over them.</summary>
    public IReadOnlyList<int> ShardPeers { get; }
    /// <summary>The optimizer's (and the exact sum's) index of its first routed-expert parameter: the experts come last.</summary>
    public int FirstExpertParameter { get; internal set; }

    /// <summary>Bytes this rank sent to other ranks in dispatch and combine, forward and backward, since <see cref="TakeTraffic"/>.</summary>
    long sentBytes, tokens, tokenRanks;
    // Another source's expert weights: a leaf sharing the parameter's storage, so its gradient stays a separate term.
    readonly List<(Tensor Param, Tensor Leaf, int Round)> leaves = [];

    public ExpertParallel(ParallelLayout layout, int rank, ICollective collective, int routedExperts)
    {
        if (layout.WorldSize != collective.WorldSize || rank != collective.Rank)
            throw new ArgumentException($"the layout's world {layout.WorldSize} (rank {rank}) is not the collective's {collective.WorldSize} (rank {collective.Rank})");
        if (routedExperts % layout.Ep != 0) throw new ArgumentException($"ep {layout.Ep} must divide the routed experts ({routedExperts})");
        Collective = collective;
        Ep = layout.Ep;
        Shard = layout.ExpertShardOfRank(rank);
        PerShard = routedExperts / Ep;
        int stage = layout.StageOfRank(rank), first = layout.ExpertGroupOfRank(rank) * Ep;
        GroupRanks = [.. Enumerable.Range(0, Ep).Select(j => layout.Rank(stage, first + j))];
        ShardPeers = [.. Enumerable.Range(0, layout.Dp).Where(d => d % Ep == Shard).Select(d => layout.Rank(stage, d))];
    }

    /// <summary>Drops from every MoE layer of <paramref name="model"/> the routed experts that <paramref name="rank"/>'s shard does not hold.</summary>
    public static void ShardModel(DeepSeekForCausalLM model, ParallelLayout layout, int rank)
    {
        int per = model.Config.NRoutedExperts / layout.Ep, shard = layout.ExpertShardOfRank(rank);
        if (model.Config.NRoutedExperts % layout.Ep != 0) throw new ArgumentException($"ep {layout.Ep} must divide the routed experts ({model.Config.NRoutedExperts})");
        foreach (var moe in model.MoeLayers()) moe.KeepExperts(shard * per, per);
    }

    /// <summary>True for a routed expert's parameter name (internal or HF): the ones sharded over ep.</summary>
    public static bool IsExpertParameter(string name) => name.Contains(".mlp.experts.", StringComparison.Ordinal);

    /// <summary>
    /// The routed experts' outputs for <paramref name="input_MD"/>'s rows (grouped by expert, <paramref name="load_E"/>
    /// rows each), computed by the ranks that hold them; differentiable in the input and in every expert's weights. Per
    /// expert, each source's block runs on a window of rows rounded up to <paramref name="rowBucket"/> (the layer's
    /// <see cref="DeepSeekMoe.RowBucket"/> rule), as that source's micro-batch runs it in a single process.
    /// </summary>
    public Tensor RunExperts(Tensor input_MD, long[] load_E, Tensor indices_NK, ExpertList experts, ExpertKernel kernel, long rowBucket)
    {
        if (load_E.Length != Ep * PerShard) throw new ArgumentException($"expected a load for each of {Ep * PerShard} experts, got {load_E.Length}");
        if (experts.First != Shard * PerShard || experts.Count != PerShard)
            throw new InvalidOperationException($"shard {Shard} of {Ep} should hold experts [{Shard * PerShard}, {(Shard + 1) * PerShard}), the layer holds [{experts.First}, {experts.First + experts.Count})");
        int world = Collective.WorldSize;
        var send = new long[world];
        for (int j = 0; j < Ep; j++) send[GroupRanks[j]] = load_E.AsSpan(j * PerShard, PerShard).ToArray().Sum();
        var counts_SP = ExchangeCounts(load_E); // row s: how many rows of each of my experts source s sends
        var receive = new long[world];
        for (int s = 0; s < Ep; s++) receive[GroupRanks[s]] = counts_SP[s].Sum();
        CountFanOut(indices_NK);

        var received_RD = ExpertAllToAll.apply(input_MD, this, send, receive);
        bool recording = is_grad_enabled() && input_MD.requires_grad;
        if (kernel == ExpertKernel.Grouped)
            return ExpertAllToAll.apply(RunGrouped(received_RD, counts_SP, experts, recording, rowBucket), this, receive, send);
        // Blocks by source, then by expert; an expert no token reached still runs (a defined zero gradient, as without ep).
        var outputs = DeepSeekMoe.RunInBuckets(received_RD, [.. counts_SP.SelectMany(c => c)], rowBucket, (i, rows) =>
        {
            int s = i / PerShard, e = i % PerShard;
            return s == Shard || !recording ? experts[e].call(rows) : ForeignSource(experts[e], rows, (s - Shard + Ep) % Ep);
        });
        var out_RD = cat(outputs, 0);
        return ExpertAllToAll.apply(out_RD, this, receive, send);
    }

    /// <summary>The expert on another source's rows, through leaves of its weights whose gradients stay apart (round r).</summary>
    Tensor ForeignSource(SwiGluMlp expert, Tensor x, int round)
    {
        // The same operations as SwiGluMlp.forward (Linear is F.linear without bias): the same bits.
        var gate = nn.functional.linear(x, Leaf(expert.gate_proj.weight!, round));
        var up = nn.functional.linear(x, Leaf(expert.up_proj.weight!, round));
        return nn.functional.linear(nn.functional.silu(gate) * up, Leaf(expert.down_proj.weight!, round));
    }

    Tensor Leaf(Parameter p, int round)
    {
        var leaf = p.detach().requires_grad_(true).DetachFromDisposeScope();
        leaves.Add((p, leaf, round));
        ActivationRecompute.DeclareLeaf(leaf); // a layer recomputed in backward creates its leaves there
        return leaf;
    }

    /// <summary>
    /// Every (source, expert) block of <paramref name="received_RD"/> in one batched matmul per projection: a group per
    /// pair, its own source's through the parameters and each other source's through that round's leaves, so the
    /// gradient terms stay apart exactly as in the per-expert path.
    /// </summary>
    Tensor RunGrouped(Tensor received_RD, long[][] counts_SP, ExpertList experts, bool recording, long rowBucket)
    {
        var gate = new List<Tensor>(Ep * PerShard);
        var up = new List<Tensor>(Ep * PerShard);
        var down = new List<Tensor>(Ep * PerShard);
        for (int s = 0; s < Ep; s++)
            for (int e = 0; e < PerShard; e++)
            {
                bool own = s == Shard || !recording;
                int round = (s - Shard + Ep) % Ep;
                Tensor W(Parameter p) => own ? p : Leaf(p, round);
                gate.Add(W(experts[e].gate_proj.weight!));
                up.Add(W(experts[e].up_proj.weight!));
                down.Add(W(experts[e].down_proj.weight!));
            }
        bool recompute = experts[0].RecomputeProduct && experts[0].training;
        long[] counts = [.. counts_SP.SelectMany(c => c)];
        return GroupedExperts.Run(received_RD, counts, gate, up, down, recompute, GroupedExperts.ChunkRows(counts, rowBucket));
    }

    /// <summary>
    /// After a micro-batch's backward and <see cref="ExactGradientSum.AddAndClearGradients"/> (which took this rank's own
    /// tokens' expert gradients): adds each other source's expert gradients as its own term, round by round, as the
    /// single process adds each micro-batch's. Every rank runs Ep − 1 rounds, so a sum that exchanges per term stays in step.
    /// </summary>
    /// <param name="sum">The exact sum the terms go into.</param>
    /// <param name="pending">Other micro-batches' forwards still await their backward (a pipeline stage's 1F1B): only the
    /// leaves this backward reached are taken, and theirs stay for their own backward.</param>
    public void AddSourceGradients(ExactGradientSum sum, bool pending = false) => AddSourceGradients(() => sum.AddAndClearGradients(FirstExpertParameter), pending);

    /// <summary>
    /// <see cref="AddSourceGradients(ExactGradientSum, bool)"/> where <paramref name="addTerm"/> adds the expert gradients as one
    /// term and clears them (under ZeRO the experts have an exact sum of their own, <see cref="ExpertZeroStep"/>).
    /// </summary>
    public void AddSourceGradients(Action addTerm, bool pending = false)
    {
        using var noGrad = no_grad();
        for (int round = 1; round < Ep; round++)
        {
            foreach (var (param, leaf, r) in leaves)
            {
                if (r != round || leaf.grad is not { } g) continue;
                if (param.grad is { } pg) pg.add_(g);
                else param.grad = g.clone().DetachFromDisposeScope();
            }
            addTerm();
        }
        // A leaf without a gradient after its backward (an expert its source sent no row) holds nothing to add.
        var done = pending ? leaves.Where(l => l.Leaf.grad is not null).ToList() : leaves;
        foreach (var (_, leaf, _) in done) leaf.Dispose();
        if (pending) leaves.RemoveAll(l => l.Leaf.IsInvalid);
        else leaves.Clear();
    }

    /// <summary>Drops the leaves no backward reached (called once a pipeline stage's step has run every backward).</summary>
    public void DropLeaves()
    {
        foreach (var (_, leaf, _) in leaves) leaf.Dispose();
        leaves.Clear();
    }

    /// <summary>Row counts per (source, my expert): an all-to-all of each rank's per-expert loads, shard by shard.</summary>
    long[][] ExchangeCounts(long[] load_E)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        int world = Collective.WorldSize;
        var rows = new long[world];
        foreach (var r in GroupRanks) rows[r] = 1;
        var mine = tensor(load_E, [Ep, PerShard]).to(Collective.Device);
        var theirs = zeros([Ep, PerShard], ScalarType.Int64, Collective.Device);
        Collective.AllToAll(mine, rows, theirs, rows);
        var flat = theirs.cpu().data<long>().ToArray();
        return [.. Enumerable.Range(0, Ep).Select(s => flat.AsSpan(s * PerShard, PerShard).ToArray())];
    }

    /// <summary>Tokens and distinct ranks per token (fan-out) of one layer's routing.</summary>
    void CountFanOut(Tensor indices_NK)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var (shards_NK, _) = indices_NK.div(PerShard, rounding_mode: RoundingMode.floor).sort(dim: 1);
        long n = indices_NK.shape[0], k = indices_NK.shape[1];
        long changes = k < 2 ? 0 : shards_NK.narrow(1, 1, k - 1).ne(shards_NK.narrow(1, 0, k - 1)).sum().cpu().item<long>();
        tokens += n;
        tokenRanks += n + changes;
    }

    /// <summary>A row block to the group and back: the one exchange dispatch and combine (and their backward) make.</summary>
    internal Tensor Exchange(Tensor x, long[] send, long[] receive)
    {
        var device = x.device;
        using var input = x.to(Collective.Device).contiguous();
        var output = empty([receive.Sum(), .. x.shape.Skip(1)], x.dtype, Collective.Device);
        Collective.AllToAll(input, send, output, receive);
        long rowBytes = x.shape.Skip(1).Aggregate(1L, (a, b) => a * b) * x.element_size();
        sentBytes += (send.Sum() - send[Collective.Rank]) * rowBytes;
        return output.device == device ? output : output.to(device);
    }

    /// <summary>Bytes sent to other ranks, tokens routed and (token, rank) pairs since the last call; then resets them.</summary>
    public ExpertTraffic TakeTraffic()
    {
        var t = new ExpertTraffic(sentBytes, tokens, tokenRanks);
        sentBytes = tokens = tokenRanks = 0;
        return t;
    }
}

/// <summary>What expert parallelism moved: bytes sent, and the mean number of ranks a token's experts live on (its fan-out).</summary>
public readonly record struct ExpertTraffic(long SentBytes, long Tokens, long TokenRanks)
{
    public double FanOut => Tokens == 0 ? 0 : (double)TokenRanks / Tokens;
}

/// <summary>The all-to-all as an autograd function: the gradient goes back by the same exchange with the counts swapped.</summary>
sealed class ExpertAllToAll : autograd.SingleTensorFunction<ExpertAllToAll>
{
    public override string Name => nameof(ExpertAllToAll);

    public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
    {
        var (x, ep, send, receive) = ((Tensor)vars[0], (ExpertParallel)vars[1], (long[])vars[2], (long[])vars[3]);
        ctx.save_data("ep", ep);
        ctx.save_data("send", send);
        ctx.save_data("receive", receive);
        return ep.Exchange(x, send, receive);
    }

    public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor grad_output)
    {
        var ep = (ExpertParallel)ctx.get_data("ep");
        return [ep.Exchange(grad_output, (long[])ctx.get_data("receive"), (long[])ctx.get_data("send")), null!, null!, null!];
    }
}

public static class ExpertParallelTraining
{
    /// <summary>
    /// Wires a data-parallel rank for ep &gt; 1: checks that <paramref name="model"/> holds the rank's expert shard and
    /// the optimizer has its experts last, points every MoE layer at the group, and wraps the reducer so expert words are
    /// summed over their holders only. ep 1: nothing (and the model must hold every expert).
    /// </summary>
    public static (ExpertParallel? Experts, IGradientReducer? Reducer) Attach(
        DeepSeekForCausalLM model, int ep, Optim.AdamW optimizer, int rank, int worldSize, IGradientReducer? reducer)
    {
        var layers = model.MoeLayers().ToList();
        int routed = model.Config.NRoutedExperts;
        if (ep <= 1)
        {
            if (layers.Any(m => m.experts.Count != routed))
                throw new ArgumentException($"the model holds one shard of the routed experts, but the options' ep is {ep}");
            return (null, reducer);
        }
        if (worldSize % ep != 0 || routed % ep != 0)
            throw new ArgumentException($"ep {ep} must divide the data-parallel width ({worldSize}) and the routed experts ({routed})");
        var collective = (reducer as BucketedGradientReducer)?.Collective
            ?? throw new ArgumentException($"ep {ep} on {worldSize} ranks needs the data-parallel collective (a BucketedGradientReducer)");
        var layout = new ParallelLayout(worldSize, 1, [new StageLayers(0, 1)]) { Ep = ep }.Validated();
        var parallel = new ExpertParallel(layout, rank, collective, routed);
        foreach (var m in layers)
        {
            if (m.experts.First != parallel.Shard * parallel.PerShard || m.experts.Count != parallel.PerShard)
                throw new ArgumentException($"rank {rank} is expert shard {parallel.Shard} of {ep} (experts [{parallel.Shard * parallel.PerShard}, {(parallel.Shard + 1) * parallel.PerShard})), " +
                                            $"but its model holds [{m.experts.First}, {m.experts.First + m.experts.Count}); shard it with ExpertParallel.ShardModel");
            m.Parallel = parallel;
        }
        parallel.PlanNorm(model, optimizer);
        long replicated = 0;
        bool inExperts = false;
        foreach (var slot in optimizer.Slots)
        {
            bool expert = ExpertParallel.IsExpertParameter(slot.Name);
            if (!expert && inExperts) throw new ArgumentException($"the optimizer's '{slot.Name}' follows a routed expert's parameter; with ep the experts come last (Trainer.CreateOptimizer)");
            inExperts |= expert;
            if (!expert) { replicated += slot.Param.numel(); parallel.FirstExpertParameter++; }
        }
        return (parallel, new ExpertGradientReducer((BucketedGradientReducer)reducer!, parallel, replicated));
    }

    /// <summary>The parameters in the optimizer's order: with ep &gt; 1, the routed experts (sharded) after every replicated one.</summary>
    public static IEnumerable<(string name, Parameter parameter)> OptimizerOrder(IEnumerable<(string name, Parameter parameter)> parameters, int ep) =>
        ep > 1 ? parameters.OrderBy(p => ExpertParallel.IsExpertParameter(p.name)) : parameters;
}
