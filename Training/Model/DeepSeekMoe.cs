// DeepSeekMoE layer: shared experts plus routed experts, tokens grouped per expert by sorting (no dense dispatch).
using DeepSeekCluster.Training.Parallel;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Model;

// Shape legend: B batch, T tokens per sequence, N = B*T, D hidden, E routed experts, K experts per token, M = N*K.
public sealed class DeepSeekMoe : nn.Module<Tensor, Tensor>
{
    /// <summary>The routed experts this rank holds: all of them, or one expert-parallel shard (<see cref="KeepExperts"/>).</summary>
    public ExpertList experts;
    public MoeRouter gate;
    public SwiGluMlp? shared_experts;

    readonly int nExperts, k;
    readonly double auxAlpha;
    readonly bool seqAux;

    /// <summary>Tokens routed to each expert in the last forward pass (E), on the CPU.</summary>
    public long[] LastLoad { get; private set; }

    /// <summary>When set, the last forward's routing (indices and weights, (N, K)) is kept for inspection.</summary>
    public bool RecordRouting { get; set; }
    public RouterOutput? LastRoute { get; private set; }

    /// <summary>Set on an expert-parallel rank: runs the routed experts across the ranks of its group (forward and backward).</summary>
    public ExpertParallel? Parallel { get; set; }

    /// <summary>How the routed experts run: one GEMM chain per expert, or one batched matmul per projection (<see cref="GroupedExperts"/>).</summary>
    public ExpertKernel Kernel { get; set; } = ExpertKernel.PerExpert;

    /// <summary>
    /// Rows each routed expert's matmuls run on, per expert, rounded up to a multiple of this (null: <see cref="AutoRowBucket"/>);
    /// the grouped kernel's chunk rows too (<see cref="GroupedExperts.ChunkRows"/>).
    /// The extra rows are the next experts' tokens (or zeros past the last), whose outputs are dropped, so their gradient
    /// is zero and adds nothing. Why: oneDNN, which runs bf16 matmuls on a CPU, creates a primitive per shape (about
    /// 0.3 ms each); a token count per expert that changes every step made ~180 new ones per tiny bf16 step (0.05 s, a
    /// sixth of the step), while counts rounded to 64 repeat and hit its cache.
    /// </summary>
    public long? RowBucket { get; set; }

    /// <summary>64 rows for bf16 and fp16 on a CPU (oneDNN's matmuls), 1 (no rounding) otherwise: fp32 runs through BLAS.</summary>
    public static long AutoRowBucket(Tensor x) =>
        x.device_type == TorchSharp.DeviceType.CPU && x.dtype is ScalarType.BFloat16 or ScalarType.Float16 ? 64 : 1;

    /// <summary>The row bucket this layer's experts run with on rows like <paramref name="input_MD"/>, here or on their expert-parallel ranks.</summary>
    long BucketFor(Tensor input_MD)
    {
        long bucket = RowBucket ?? AutoRowBucket(input_MD);
        if (bucket < 1) throw new InvalidOperationException($"RowBucket must be at least 1, got {bucket}");
        return bucket;
    }

    /// <summary>
    /// <paramref name="run"/> on each group of consecutive rows of <paramref name="rows_MD"/> (<paramref name="counts"/>[i]
    /// rows for group i, in order), each group's window rounded up to a multiple of <paramref name="bucket"/>
    /// (<see cref="RowBucket"/>): the extra rows are the next groups' (or zeros past the last), their outputs dropped.
    /// A group with no rows still runs, on an empty (or all-extra) window: its expert's weights then get a defined zero
    /// gradient, so data-parallel reduction and the optimizer never see a missing or NaN gradient.
    /// </summary>
    internal static List<Tensor> RunInBuckets(Tensor rows_MD, IReadOnlyList<long> counts, long bucket, Func<int, Tensor, Tensor> run)
    {
        // Zero rows past the last group, so that its rounded-up window fits.
        var padded_MD = bucket == 1 ? rows_MD : cat([rows_MD, zeros(bucket - 1, rows_MD.shape[1], rows_MD.dtype, rows_MD.device)], 0);
        var outputs = new List<Tensor>(counts.Count);
        long offset = 0;
        for (int i = 0; i < counts.Count; i++)
        {
            long count = counts[i], rounded = (count + bucket - 1) / bucket * bucket;
            var output = run(i, padded_MD.narrow(0, offset, rounded));
            outputs.Add(rounded == count ? output : output.narrow(0, 0, count));
            offset += count;
        }
        return outputs;
    }

    public DeepSeekMoe(DeepSeekConfig config) : base(nameof(DeepSeekMoe))
    {
        nExperts = config.NRoutedExperts;
        k = config.NumExpertsPerTok;
        auxAlpha = config.AuxLossAlpha;
        seqAux = config.SeqAux;
        experts = new ExpertList(0, Enumerable.Range(0, nExperts).Select(_ => new SwiGluMlp(config.HiddenSize, config.MoeIntermediateSize)));
        gate = new MoeRouter(config);
        if (config.NSharedExperts > 0)
            shared_experts = new SwiGluMlp(config.HiddenSize, (long)config.MoeIntermediateSize * config.NSharedExperts);
        LastLoad = new long[nExperts];
        RegisterComponents();
    }

    public override Tensor forward(Tensor x_BTD) => Forward(x_BTD).output;

    /// <summary>
    /// Keeps routed experts [<paramref name="first"/>, first + <paramref name="count"/>) and disposes the others: an
    /// expert-parallel rank's shard. Their names stay global (<see cref="ExpertList"/>).
    /// </summary>
    public void KeepExperts(int first, int count)
    {
        if (experts.First != 0 || experts.Count != nExperts) throw new InvalidOperationException($"this layer already holds experts [{experts.First}, {experts.First + experts.Count}) only");
        if (first < 0 || count < 1 || first + count > nExperts) throw new ArgumentOutOfRangeException(nameof(count), $"experts [{first}, {first + count}) are not within the layer's {nExperts}");
        experts.Keep(first, count);
    }

    /// <summary>The layer output and, when aux_loss_alpha > 0 in training, the sequence-wise balance loss.</summary>
    public (Tensor output, Tensor? auxLoss) Forward(Tensor x_BTD)
    {
        using var scope = NewDisposeScope();
        var shape = x_BTD.shape;
        long D = shape[^1];
        var x_ND = x_BTD.reshape(-1, D);
        long N = x_ND.shape[0];
        var route = gate.Route(x_ND);
        if (RecordRouting)
        {
            LastRoute?.Indices_NK.Dispose(); LastRoute?.Weights_NK.Dispose(); LastRoute?.Scores_NE.Dispose();
            LastRoute = new RouterOutput(route.Indices_NK.detach().clone().DetachFromDisposeScope(),
                route.Weights_NK.detach().clone().DetachFromDisposeScope(), route.Scores_NE.detach().clone().DetachFromDisposeScope());
        }

        // Group the N*K (token, expert) pairs by expert: a stable sort keeps token order inside each expert.
        var expert_M = route.Indices_NK.reshape(-1);
        var (_, order_M) = expert_M.sort(stable: true);
        var token_M = order_M.div(k, rounding_mode: RoundingMode.floor);
        var weight_M = route.Weights_NK.reshape(-1).index_select(0, order_M);
        var load_E = expert_M.bincount(null, nExperts).cpu();
        LastLoad = load_E.data<long>().ToArray();

        var input_MD = x_ND.index_select(0, token_M);
        var expertOut_MD = Parallel is { } ep ? ep.RunExperts(input_MD, LastLoad, route.Indices_NK, experts, Kernel, BucketFor(input_MD)) : RunAll(input_MD);
        var weighted_MD = expertOut_MD * weight_M.unsqueeze(-1);
        var routed_ND = zeros(N, D, weighted_MD.dtype, x_BTD.device).index_add(0, token_M, weighted_MD, 1);
        var output = routed_ND.to_type(x_BTD.dtype).view(shape);
        if (shared_experts is not null) output = output + shared_experts.forward(x_BTD);

        Tensor? aux = null;
        if (auxAlpha > 0 && training) aux = SequenceBalanceLoss(route, shape[0], shape[1]);
        return (output.MoveToOuterDisposeScope(), aux?.MoveToOuterDisposeScope());
    }

    /// <summary>Every routed expert on its rows of <paramref name="input_MD"/> (grouped by expert, <see cref="LastLoad"/> each).</summary>
    Tensor RunAll(Tensor input_MD)
    {
        if (experts.Count != nExperts)
            throw new InvalidOperationException($"this layer holds experts [{experts.First}, {experts.First + experts.Count}) of {nExperts} and has no expert-parallel group to run the others");
        if (Kernel == ExpertKernel.Grouped) return GroupedExperts.Run(input_MD, LastLoad, experts, training, BucketFor(input_MD));
        // call, not forward: a module hook on an expert sees the rows it runs on (the tests check the bucket by it).
        return cat(RunInBuckets(input_MD, LastLoad, BucketFor(input_MD), (e, rows) => experts[e].call(rows)), 0);
    }

    /// <summary>
    /// DeepSeek-V3 eq. 17-20: alpha * sum_i f_i P_i per sequence, averaged; f_i = E/(K*T) * (tokens choosing i),
    /// P_i = mean over tokens of the normalized affinity s_i / sum_j s_j. With seq_aux false, the batch is one sequence.
    /// </summary>
    Tensor SequenceBalanceLoss(RouterOutput route, long B, long T)
    {
        if (!seqAux) { T = B * T; B = 1; }
        var scores_BTE = route.Scores_NE.view(B, T, nExperts);
        var p_BE = (scores_BTE / scores_BTE.sum(-1, keepdim: true)).mean([1L]);
        Tensor f_BE;
        using (no_grad())
        {
            var idx_BM = route.Indices_NK.view(B, T * k);
            f_BE = zeros(B, nExperts, p_BE.dtype, p_BE.device)
                .scatter_add(1, idx_BM, ones(B, T * k, p_BE.dtype, p_BE.device)) * ((double)nExperts / (k * T));
        }
        return (f_BE * p_BE).sum(-1).mean() * auxAlpha;
    }
}
