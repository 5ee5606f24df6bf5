// All routed experts of a layer (or of an expert-parallel rank) in one batched matmul per projection, instead of one small GEMM chain per expert.
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Model;

// Shape legend: M rows grouped by expert (counts[g] each), D hidden, F expert intermediate, G groups (experts, or
// (source, expert) pairs under expert parallelism), B chunks (batch entries), C rows per chunk (the bucket size).
/// <summary>
/// How a MoE layer runs its routed experts. PerExpert: one gate/up/down chain per expert on its slice (no padding, one
/// kernel per expert and projection). Grouped: every expert's slice cut into chunks of one bucket size (the largest count
/// when that pads little, <see cref="GroupedExperts.BucketRows"/>, rounded up to the layer's row bucket as the per-expert
/// windows are: <see cref="GroupedExperts.ChunkRows"/>), the weights stacked, and one <c>bmm</c> for gate+up and one for
/// down (padding rows computed and thrown away).
/// Auto: grouped on CUDA, per-expert on the CPU (docs/benchmarks.md, "Grouped experts", has the measurements).
/// </summary>
public enum ExpertKernel { PerExpert, Grouped }

public static class GroupedExperts
{
    /// <summary>The values <see cref="Parse"/> accepts, as the trainer options spell them.</summary>
    public static readonly string[] Modes = ["auto", "grouped", "per-expert"];

    /// <summary><paramref name="mode"/> resolved for <paramref name="device"/> (auto: grouped on CUDA only).</summary>
    public static ExpertKernel Parse(string mode, DeviceType device) => mode switch
    {
        "auto" => device == DeviceType.CUDA ? ExpertKernel.Grouped : ExpertKernel.PerExpert,
        "grouped" => ExpertKernel.Grouped,
        "per-expert" => ExpertKernel.PerExpert,
        _ => throw new ArgumentException($"experts must be one of {string.Join(", ", Modes)}, got '{mode}'"),
    };

    /// <summary>Sets every MoE layer of <paramref name="model"/> (main and MTP) to run its routed experts with <paramref name="kernel"/>.</summary>
    public static void Apply(DeepSeekForCausalLM model, ExpertKernel kernel)
    {
        foreach (var (_, module) in model.named_modules())
            if (module is DeepSeekMoe moe) moe.Kernel = kernel;
    }

    /// <summary>
    /// SwiGLU of group g's weights on its <paramref name="counts"/>[g] rows of <paramref name="input_MD"/>, every group at once;
    /// differentiable in the input and every weight. Each group's rows are cut into chunks of <paramref name="bucketRows"/>
    /// rows (the last one padded with zeros; at least one chunk, so a group with no rows still takes part and its weights
    /// get a defined zero gradient, as the per-expert path's empty slice gives them), and every chunk is one batch entry.
    /// </summary>
    /// <param name="gate_FD">Group g's gate_proj weight (F, D), by g; likewise <paramref name="up_FD"/> and <paramref name="down_DF"/>.</param>
    /// <param name="recomputeProduct">Selective recompute in training: silu(gate)·up is made again in backward (as SwiGluMlp does).</param>
    /// <param name="bucketRows">Rows per chunk; unset, <see cref="BucketRows"/> of the counts.</param>
    public static Tensor Run(Tensor input_MD, ReadOnlySpan<long> counts, IReadOnlyList<Tensor> gate_FD, IReadOnlyList<Tensor> up_FD,
        IReadOnlyList<Tensor> down_DF, bool recomputeProduct = false, long? bucketRows = null)
    {
        int groups = counts.Length;
        if (gate_FD.Count != groups || up_FD.Count != groups || down_DF.Count != groups)
            throw new ArgumentException($"expected {groups} gate, up and down weights (one per group), got {gate_FD.Count}, {up_FD.Count} and {down_DF.Count}");
        long rows = 0;
        foreach (var c in counts) rows += c;
        if (input_MD.shape[0] != rows) throw new ArgumentException($"input_MD has {input_MD.shape[0]} rows, the counts add up to {rows}");
        long C = bucketRows ?? BucketRows(counts);
        if (C < 1) throw new ArgumentOutOfRangeException(nameof(bucketRows), C, "a chunk must hold at least one row");
        long D = input_MD.shape[1], F = gate_FD[0].shape[0];

        using var scope = NewDisposeScope();
        // Row i of group g goes to row i mod C of its chunk ⌊i / C⌋; the other rows of the chunks stay zero.
        var chunkGroup = new List<long>(groups);
        var slot = new long[rows];
        long at = 0;
        for (int g = 0; g < groups; g++)
        {
            long first = chunkGroup.Count;
            for (long n = Math.Max(1, (counts[g] + C - 1) / C); n > 0; n--) chunkGroup.Add(g);
            for (long i = 0; i < counts[g]; i++) slot[at++] = (first + i / C) * C + i % C;
        }
        long B = chunkGroup.Count;
        var slot_M = tensor(slot, device: input_MD.device);
        var x_BCD = zeros(B * C, D, input_MD.dtype, input_MD.device).index_copy(0, slot_M, input_MD).view(B, C, D);

        // gate and up of each group side by side: one (G, 2F, D) stack and one bmm for both projections. A group cut into
        // several chunks has its weights repeated (index_select, whose backward sums the chunks' gradients).
        var gateUp = new Tensor[2 * groups];
        for (int g = 0; g < groups; g++) { gateUp[2 * g] = gate_FD[g]; gateUp[2 * g + 1] = up_FD[g]; }
        var wGateUp_G2FD = stack(gateUp).view(groups, 2 * F, D);
        var wDown_GDF = stack(down_DF);
        if (B != groups)
        {
            var group_B = tensor(chunkGroup.ToArray(), device: input_MD.device);
            wGateUp_G2FD = wGateUp_G2FD.index_select(0, group_B);
            wDown_GDF = wDown_GDF.index_select(0, group_B);
        }
        var h_BC2F = x_BCD.bmm(wGateUp_G2FD.transpose(1, 2));
        var gate = h_BC2F.narrow(2, 0, F);
        var up = h_BC2F.narrow(2, F, F);
        var product_BCF = ActivationRecompute.Active(recomputeProduct, training: true)
            ? ActivationRecompute.Run(t => [SwiGluMlp.Product(t[0], t[1])], [gate, up], [])[0]
            : SwiGluMlp.Product(gate, up);
        var y_BCD = product_BCF.bmm(wDown_GDF.transpose(1, 2));
        return y_BCD.view(B * C, D).index_select(0, slot_M).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Rows per chunk for <paramref name="counts"/>: the largest count (one chunk per group, no repeated weights) when
    /// padding every group to it adds at most a quarter more rows; otherwise the largest of max/2, max/4, … (multiples of
    /// 8, at least 32) that does, or, if none does, the one with the fewest padded rows. Uneven loads (a trained router's
    /// max/mean is 1.5–2) would otherwise double the expert FLOPs.
    /// </summary>
    public static long BucketRows(ReadOnlySpan<long> counts)
    {
        long rows = 0, max = 0;
        foreach (var c in counts) { rows += c; max = Math.Max(max, c); }
        if (max == 0) return 1;
        long best = max;
        for (long c = max; ; c = Math.Max(32, (c / 2 + 7) / 8 * 8))
        {
            long padded = PaddedRows(counts, c);
            if (padded < PaddedRows(counts, best)) best = c;
            if (padded * 4 <= rows * 5) return c;
            if (c <= 32) return best;
        }
    }

    /// <summary>
    /// The chunk rows the layer runs with: <see cref="BucketRows"/> of <paramref name="counts"/>, rounded up to a multiple of
    /// the layer's row bucket (<see cref="DeepSeekMoe.RowBucket"/>: 64 in bf16 on a CPU, 1 otherwise), the rule the
    /// per-expert path's windows follow, so the batched matmuls' row count repeats from step to step as theirs does.
    /// </summary>
    public static long ChunkRows(ReadOnlySpan<long> counts, long rowBucket)
    {
        if (rowBucket < 1) throw new ArgumentOutOfRangeException(nameof(rowBucket), rowBucket, "a row bucket must be at least 1");
        return (BucketRows(counts) + rowBucket - 1) / rowBucket * rowBucket;
    }

    /// <summary>Rows the batched matmuls compute for <paramref name="counts"/> in chunks of <paramref name="bucketRows"/>, padding included.</summary>
    public static long PaddedRows(ReadOnlySpan<long> counts, long bucketRows)
    {
        long chunks = 0;
        foreach (var c in counts) chunks += Math.Max(1, (c + bucketRows - 1) / bucketRows);
        return chunks * bucketRows;
    }

    /// <summary><see cref="Run"/> over experts modules' own weights.</summary>
    public static Tensor Run(Tensor input_MD, ReadOnlySpan<long> counts, IReadOnlyList<SwiGluMlp> experts, bool training, long rowBucket = 1)
    {
        var recompute = experts.Count > 0 && experts[0].RecomputeProduct && training;
        return Run(input_MD, counts, [.. experts.Select(e => (Tensor)e.gate_proj.weight!)], [.. experts.Select(e => (Tensor)e.up_proj.weight!)],
            [.. experts.Select(e => (Tensor)e.down_proj.weight!)], recompute, ChunkRows(counts, rowBucket));
    }
}
