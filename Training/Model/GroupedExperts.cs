// All routed experts of a layer (or of an expert-parallel rank) in one batched matmul per projection, instead of one small GEMM chain per expert.
using TorchSharp;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Model;

// Shape legend: M rows grouped by expert (counts[g] each), D hidden, F expert intermediate, G groups (experts, or
// (source, expert) pairs under expert parallelism), C rows per group after padding (the largest count).
/// <summary>
/// How a MoE layer runs its routed experts. PerExpert: one gate/up/down chain per expert on its slice (no padding, one
/// kernel per expert and projection). Grouped: every expert's slice padded to the largest count, the weights stacked,
/// and one <c>bmm</c> for gate+up and one for down (3 kernels for the layer, padding rows computed and thrown away).
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
    /// differentiable in the input and every weight. A group with no rows still takes part (its rows are all padding),
    /// so its weights get a defined zero gradient, as the per-expert path's empty slice gives them.
    /// </summary>
    /// <param name="gate_FD">Group g's gate_proj weight (F, D), by g; likewise <paramref name="up_FD"/> and <paramref name="down_DF"/>.</param>
    /// <param name="recomputeProduct">Selective recompute in training: silu(gate)·up is made again in backward (as SwiGluMlp does).</param>
    public static Tensor Run(Tensor input_MD, ReadOnlySpan<long> counts, IReadOnlyList<Tensor> gate_FD, IReadOnlyList<Tensor> up_FD,
        IReadOnlyList<Tensor> down_DF, bool recomputeProduct = false)
    {
        int groups = counts.Length;
        if (gate_FD.Count != groups || up_FD.Count != groups || down_DF.Count != groups)
            throw new ArgumentException($"expected {groups} gate, up and down weights (one per group), got {gate_FD.Count}, {up_FD.Count} and {down_DF.Count}");
        long rows = 0, padded = 0;
        foreach (var c in counts) { rows += c; padded = Math.Max(padded, c); }
        if (input_MD.shape[0] != rows) throw new ArgumentException($"input_MD has {input_MD.shape[0]} rows, the counts add up to {rows}");
        long D = input_MD.shape[1], F = gate_FD[0].shape[0];

        using var scope = NewDisposeScope();
        // Row i of group g goes to padded row g·C + i; the rest of the padded rows stay zero.
        var slot = new long[rows];
        long at = 0;
        for (int g = 0; g < groups; g++)
            for (long i = 0; i < counts[g]; i++) slot[at++] = g * padded + i;
        var slot_M = tensor(slot, device: input_MD.device);
        var x_GCD = zeros(groups * padded, D, input_MD.dtype, input_MD.device).index_copy(0, slot_M, input_MD).view(groups, padded, D);

        // gate and up of each group side by side: one (G, 2F, D) stack and one bmm for both projections.
        var gateUp = new Tensor[2 * groups];
        for (int g = 0; g < groups; g++) { gateUp[2 * g] = gate_FD[g]; gateUp[2 * g + 1] = up_FD[g]; }
        var wGateUp_G2FD = stack(gateUp).view(groups, 2 * F, D);
        var h_GC2F = x_GCD.bmm(wGateUp_G2FD.transpose(1, 2));
        var gate = h_GC2F.narrow(2, 0, F);
        var up = h_GC2F.narrow(2, F, F);
        var product_GCF = ActivationRecompute.Active(recomputeProduct, training: true)
            ? ActivationRecompute.Run(t => [SwiGluMlp.Product(t[0], t[1])], [gate, up], [])[0]
            : SwiGluMlp.Product(gate, up);
        var y_GCD = product_GCF.bmm(stack(down_DF).transpose(1, 2));
        return y_GCD.view(groups * padded, D).index_select(0, slot_M).MoveToOuterDisposeScope();
    }

    /// <summary><see cref="Run"/> over experts modules' own weights.</summary>
    public static Tensor Run(Tensor input_MD, ReadOnlySpan<long> counts, IReadOnlyList<SwiGluMlp> experts, bool training)
    {
        var recompute = experts.Count > 0 && experts[0].RecomputeProduct && training;
        return Run(input_MD, counts, [.. experts.Select(e => (Tensor)e.gate_proj.weight!)], [.. experts.Select(e => (Tensor)e.up_proj.weight!)],
            [.. experts.Select(e => (Tensor)e.down_proj.weight!)], recompute);
    }
}
