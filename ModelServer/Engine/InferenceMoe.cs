// The server's DeepSeekMoE forward: the training layer's routing and experts, minus what only training needs.
using DeepSeekCluster.Training.Model;
using static TorchSharp.torch;

namespace DeepSeekCluster.ModelServer.Engine;

// Shape legend: N tokens, D hidden, K experts per token, M = N*K (token, expert) pairs.
/// <summary>
/// Runs the same modules as <see cref="DeepSeekMoe.Forward"/> in the same order, so the numbers are identical, but
/// experts no token chose are skipped: training runs them on empty slices so every expert gets a defined gradient,
/// which in a one-request decode step is 12 of 16 experts' worth of dispatches per layer for nothing. No balance loss,
/// no load statistics. The DeepSeekMoe stays registered in its layer (weights, quantization and disposal are its).
/// </summary>
public sealed class InferenceMoe : nn.Module<Tensor, Tensor>
{
    readonly DeepSeekMoe moe;
    readonly int experts, k;

    InferenceMoe(DeepSeekMoe moe, DeepSeekConfig config) : base(nameof(InferenceMoe))
    {
        this.moe = moe;
        experts = config.NRoutedExperts;
        k = config.NumExpertsPerTok;
    }

    /// <summary>Puts an InferenceMoe in front of every MoE layer of <paramref name="model"/> (the layers' own modules stay registered); returns them for disposal.</summary>
    public static List<InferenceMoe> Install(DeepSeekForCausalLM model)
    {
        var installed = new List<InferenceMoe>();
        foreach (var layer in model.model.layers)
            if (layer.mlp is DeepSeekMoe moe) installed.Add((InferenceMoe)(layer.mlp = new InferenceMoe(moe, model.Config)));
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
        var outputs = new List<Tensor>(experts);
        long offset = 0;
        for (int e = 0; e < experts; e++)
        {
            if (load[e] == 0) continue;
            outputs.Add(moe.experts[e].forward(input_MD.narrow(0, offset, load[e])));
            offset += load[e];
        }
        var weighted_MD = cat(outputs, 0) * weight_M.unsqueeze(-1);
        var output = zeros_like(x_ND, weighted_MD.dtype).index_add(0, token_M, weighted_MD, 1).to_type(x_BTD.dtype).view(shape);
        if (moe.shared_experts is not null) output = output + moe.shared_experts.forward(x_BTD);
        return output.MoveToOuterDisposeScope();
    }
}
