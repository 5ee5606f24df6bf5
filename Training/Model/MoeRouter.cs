// DeepSeek-V3 router (HF DeepseekV3TopkRouter): sigmoid affinities, bias-corrected group-limited top-k choice.
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Model;

// Shape legend: N tokens (B*T flattened), D hidden, E routed experts, G groups, K experts per token.
public sealed record RouterOutput(Tensor Indices_NK, Tensor Weights_NK, Tensor Scores_NE);

public sealed class MoeRouter : nn.Module<Tensor, Tensor>
{
    public Parameter weight;                       // (E, D)
    public Tensor e_score_correction_bias;         // (E) float32 buffer: set by load balancing, never by gradients

    readonly int experts, groups, topkGroup, k;
    readonly bool normTopk;
    readonly double scaling;

    public MoeRouter(DeepSeekConfig config) : base(nameof(MoeRouter))
    {
        experts = config.NRoutedExperts;
        groups = config.NGroup;
        topkGroup = config.TopkGroup;
        k = config.NumExpertsPerTok;
        normTopk = config.NormTopkProb;
        scaling = config.RoutedScalingFactor;
        weight = new Parameter(empty(experts, config.HiddenSize));
        e_score_correction_bias = zeros(experts, ScalarType.Float32);
        register_buffer(nameof(e_score_correction_bias), e_score_correction_bias);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x_ND) => Route(x_ND).Weights_NK;

    public RouterOutput Route(Tensor x_ND)
    {
        using var scope = NewDisposeScope();
        // Routing in float32 at least (HF upcasts), float64 stays float64 for reference checks.
        var compute = x_ND.dtype == ScalarType.Float64 ? ScalarType.Float64 : ScalarType.Float32;
        var logits_NE = nn.functional.linear(x_ND.to_type(compute), weight.to_type(compute));
        var scores_NE = logits_NE.sigmoid();
        var indices_NK = ChooseExperts(scores_NE);
        var weights_NK = scores_NE.gather(1, indices_NK); // gate weights come from the unbiased scores
        if (normTopk) weights_NK = weights_NK / (weights_NK.sum(-1, keepdim: true) + 1e-20);
        weights_NK = weights_NK * scaling;
        return new RouterOutput(indices_NK.MoveToOuterDisposeScope(), weights_NK.MoveToOuterDisposeScope(), scores_NE.MoveToOuterDisposeScope());
    }

    /// <summary>
    /// Top-k experts by bias-corrected score, among the topk_group groups whose two best experts score highest.
    /// Experts outside the chosen groups are masked with -inf (as DeepSeek's own code does; HF masks with 0,
    /// which lets a negative biased score lose to an expert outside the chosen groups).
    /// </summary>
    Tensor ChooseExperts(Tensor scores_NE)
    {
        using var noGrad = no_grad();
        var choice_NE = scores_NE + e_score_correction_bias.to_type(scores_NE.dtype).unsqueeze(0);
        if (groups > 1)
        {
            long n = choice_NE.shape[0];
            var grouped_NGx = choice_NE.view(n, groups, experts / groups);
            var groupScore_NG = grouped_NGx.topk(2, dim: -1).values.sum(-1);
            var groupIdx_Nk = groupScore_NG.topk(topkGroup, dim: -1, sorted: false).indexes;
            var keep_NG = zeros(n, groups, ScalarType.Bool, choice_NE.device).scatter(1, groupIdx_Nk, ones_like(groupIdx_Nk, ScalarType.Bool));
            var keep_NE = keep_NG.unsqueeze(-1).expand(n, groups, experts / groups).reshape(n, experts);
            choice_NE = choice_NE.masked_fill(keep_NE.logical_not(), double.NegativeInfinity);
        }
        return choice_NE.topk(k, dim: -1, sorted: false).indexes;
    }

    /// <summary>
    /// Auxiliary-loss-free balancing (DeepSeek-V3 §2.1.2): after a step, raise the bias of under-loaded experts
    /// and lower it for over-loaded ones by <paramref name="speed"/>.
    /// </summary>
    public void UpdateBias(ReadOnlySpan<long> load_E, double speed)
    {
        if (load_E.Length != experts) throw new ArgumentException($"expected a load for each of {experts} experts, got {load_E.Length}");
        double mean = 0;
        foreach (var l in load_E) mean += l;
        mean /= experts;
        var delta = new float[experts];
        for (int e = 0; e < experts; e++) delta[e] = (float)(speed * Math.Sign(mean - load_E[e]));
        using var noGrad = no_grad();
        using var d = tensor(delta, device: e_score_correction_bias.device);
        e_score_correction_bias.add_(d);
    }
}
