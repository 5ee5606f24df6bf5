// The server's DeepSeekMoE forward: the training layer's routing and experts, minus what only training needs.
using DeepSeekCluster.Training.Model;
using static TorchSharp.torch;

namespace DeepSeekCluster.ModelServer.Engine;

// Shape legend: N tokens, D hidden, K experts per token, M = N*K (token, expert) pairs.
/// <summary>
/// The routing and expert math of <see cref="DeepSeekMoe.Forward"/> on the same modules. When few experts are busy it
/// runs them one by one in the same order (bit-identical output) and skips the idle ones, which training runs on empty
/// slices so every expert gets a defined gradient (12 of 16 experts' dispatches per layer for nothing at one request).
/// When most are busy and the weights are plain floats, all experts run as three batched matmuls over their stacked
/// weights (the same products, summed in another order: equal to rounding). No balance loss, no load statistics. The
/// DeepSeekMoe stays registered in its layer (its weights, now views of the stacks, are still its parameters).
/// </summary>
public sealed class InferenceMoe : nn.Module<Tensor, Tensor>
{
    readonly DeepSeekMoe moe;
    readonly int experts, k;
    // Every expert's weights as one slice of these, (E, I, D) gate and up and (E, D, I) down, when they are plain float
    // weights nothing rewrites (not int8/int4, whose layers are expanded into a shared arena before each forward).
    readonly Tensor? gate_EID, up_EID, down_EDI;

    InferenceMoe(DeepSeekMoe moe, DeepSeekConfig config, bool stackExperts) : base(nameof(InferenceMoe))
    {
        this.moe = moe;
        experts = config.NRoutedExperts;
        k = config.NumExpertsPerTok;
        if (!stackExperts) return;
        gate_EID = Stack(moe.experts.Select(x => x.gate_proj));
        up_EID = Stack(moe.experts.Select(x => x.up_proj));
        down_EDI = Stack(moe.experts.Select(x => x.down_proj));
    }

    /// <summary>Copies the linears' weights into one (E, out, in) tensor and makes each weight a view of its slice (no second copy is held).</summary>
    static Tensor Stack(IEnumerable<TorchSharp.Modules.Linear> linears)
    {
        using var noGrad = no_grad();
        var list = linears.ToList();
        var stacked = stack(list.Select(l => l.weight!).ToArray()).DetachFromDisposeScope();
        for (int e = 0; e < list.Count; e++)
        {
            var old = list[e].weight!;
            list[e].weight = new TorchSharp.Modules.Parameter(stacked[e], requires_grad: false);
            old.Dispose();
        }
        return stacked;
    }

    /// <summary>Puts an InferenceMoe in front of every MoE layer of <paramref name="model"/> (the layers' own modules stay registered); returns them for disposal.</summary>
    public static List<InferenceMoe> Install(DeepSeekForCausalLM model)
    {
        var installed = new List<InferenceMoe>();
        bool plainWeights = model.model.BeforeLayer is null; // no int8/int4 arena rewriting the layers' weights
        foreach (var layer in model.model.layers)
            if (layer.mlp is DeepSeekMoe moe) installed.Add((InferenceMoe)(layer.mlp = new InferenceMoe(moe, model.Config, plainWeights)));
        return installed;
    }

    public override Tensor forward(Tensor x_BTD)
    {
        using var scope = NewDisposeScope();
        var shape = x_BTD.shape;
        var x_ND = x_BTD.reshape(-1, shape[^1]);
        var route = moe.gate.Route(x_ND);
        var expert_M = route.Indices_NK.reshape(-1);
        var (_, order_M) = expert_M.sort(stable: true);
        var token_M = order_M.div(k, rounding_mode: RoundingMode.floor);
        var weight_M = route.Weights_NK.reshape(-1).index_select(0, order_M);
        var load = expert_M.bincount(null, experts).cpu().data<long>().ToArray();
        var input_MD = x_ND.index_select(0, token_M);
        int active = load.Count(l => l > 0);
        Tensor expertOut_MD;
        // Most experts busy (a large decode batch): three batched matmuls over all experts, rows padded to the busiest
        // one, instead of a SwiGLU per expert. Few busy (one request): per expert, so idle experts' weights are not read.
        if (gate_EID is not null && 2 * active >= experts) expertOut_MD = Stacked(input_MD, load);
        else expertOut_MD = PerExpert(input_MD, load);
        var weighted_MD = expertOut_MD * weight_M.unsqueeze(-1);
        var output = zeros_like(x_ND, weighted_MD.dtype).index_add(0, token_M, weighted_MD, 1).to_type(x_BTD.dtype).view(shape);
        if (moe.shared_experts is not null) output = output + moe.shared_experts.forward(x_BTD);
        return output.MoveToOuterDisposeScope();
    }

    Tensor Stacked(Tensor input_MD, long[] load)
    {
        long P = load.Max(), D = input_MD.shape[1];
        // Pair m (sorted by expert) goes to padded row e * P + its rank among expert e's pairs.
        var slots = new long[input_MD.shape[0]];
        long m = 0;
        for (int e = 0; e < experts; e++)
            for (long j = 0; j < load[e]; j++) slots[m++] = e * P + j;
        var slot_M = tensor(slots, device: input_MD.device);
        var padded_EPD = zeros(experts * P, D, input_MD.dtype, input_MD.device).index_copy_(0, slot_M, input_MD).view(experts, P, D);
        var hidden_EPI = nn.functional.silu(bmm(padded_EPD, gate_EID!.transpose(1, 2))).mul_(bmm(padded_EPD, up_EID!.transpose(1, 2)));
        return bmm(hidden_EPI, down_EDI!.transpose(1, 2)).view(experts * P, D).index_select(0, slot_M);
    }

    Tensor PerExpert(Tensor input_MD, long[] load)
    {
        var outputs = new List<Tensor>(experts);
        long offset = 0;
        for (int e = 0; e < experts; e++)
        {
            if (load[e] == 0) continue;
            outputs.Add(moe.experts[e].forward(input_MD.narrow(0, offset, load[e])));
            offset += load[e];
        }
        return cat(outputs, 0);
    }

    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            gate_EID?.Dispose();
            up_EID?.Dispose();
            down_EDI?.Dispose();
        }
        base.Dispose(disposing);
    }
}
