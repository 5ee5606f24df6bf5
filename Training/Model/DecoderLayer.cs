// One transformer block: pre-norm MLA and pre-norm MLP (dense SwiGLU for the first layers, DeepSeekMoE after).
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Model;

public sealed class DecoderLayer : nn.Module<Tensor, Tensor>
{
    public RmsNorm input_layernorm;
    public MultiHeadLatentAttention self_attn;
    public RmsNorm post_attention_layernorm;
    public nn.Module<Tensor, Tensor> mlp;          // SwiGluMlp or DeepSeekMoe

    public DecoderLayer(DeepSeekConfig config, RotaryEmbedding rotary, bool moe) : base(nameof(DecoderLayer))
    {
        input_layernorm = new RmsNorm(config.HiddenSize, config.RmsNormEps);
        self_attn = new MultiHeadLatentAttention(config, rotary);
        post_attention_layernorm = new RmsNorm(config.HiddenSize, config.RmsNormEps);
        mlp = moe ? new DeepSeekMoe(config) : new SwiGluMlp(config.HiddenSize, config.IntermediateSize);
        RegisterComponents();
    }

    public DeepSeekMoe? Moe => mlp as DeepSeekMoe;

    /// <summary>Full activation recompute: keep only this layer's input, run it again in backward (<see cref="ActivationRecompute"/>).</summary>
    public bool RecomputeLayer { get; set; }

    /// <summary>
    /// ZeRO-3: this layer's parameters are whole only while it runs. Under training every run gathers them and is a
    /// recompute segment whatever <see cref="RecomputeLayer"/> says (a kept graph would hold the gathered weights until
    /// backward); without gradients (evaluation) the layer gathers, runs and releases. Null: the parameters stay whole.
    /// </summary>
    public GatheredParameters? Zero3 { get; set; }

    /// <summary>
    /// Told when this layer's backward is done (its parameters' <c>.grad</c>s hold their whole gradient): the
    /// data-parallel overlap reduces them then (<see cref="BackwardSignal"/>). Null: the layer's graph is as without it.
    /// </summary>
    public IBackwardListener? BackwardDone { get; set; }

    public override Tensor forward(Tensor x_BTD) => Forward(x_BTD, 0, null, -1).output;

    public (Tensor output, Tensor? auxLoss) Forward(Tensor x_BTD, long start, ILatentCache? cache, int cacheLayer)
    {
        if (BackwardDone is { } done && training && is_grad_enabled() && x_BTD.requires_grad) x_BTD = BackwardSignal.Around(x_BTD, done);
        bool sharded = Zero3 is not null && ActivationRecompute.Active(true, training) && cache is null;
        if (Zero3 is { } zero3 && !sharded)
        {
            zero3.Gather();
            try { return ForwardKept(x_BTD, start, cache, cacheLayer); }
            finally { zero3.Release(); }
        }
        if (!sharded && (!ActivationRecompute.Active(RecomputeLayer, training) || cache is not null)) return ForwardKept(x_BTD, start, cache, cacheLayer);
        // The MoE routing of the second run is the first's: same input, weights and biases (the bias moves only after the
        // step). The second run sets the MoE's LastLoad again to the same counts; the trainer reads them once, after forward.
        var outputs = sharded
            ? ActivationRecompute.RunGathered(Body, [x_BTD], parameters().ToList<Tensor>(), Zero3!)
            : ActivationRecompute.Run(Body, [x_BTD], parameters().ToList<Tensor>());
        return (outputs[0], outputs.Length > 1 ? outputs[1] : null);

        Tensor[] Body(Tensor[] x)
        {
            var (h, aux) = ForwardKept(x[0], start, null, cacheLayer);
            return aux is null ? [h] : [h, aux];
        }
    }

    (Tensor output, Tensor? auxLoss) ForwardKept(Tensor x_BTD, long start, ILatentCache? cache, int cacheLayer)
    {
        using var scope = NewDisposeScope();
        var h = x_BTD + self_attn.Forward(input_layernorm.forward(x_BTD), start, cache, cacheLayer);
        var normed = post_attention_layernorm.forward(h);
        Tensor? aux = null;
        Tensor mlpOut;
        if (mlp is DeepSeekMoe moe) (mlpOut, aux) = moe.Forward(normed);
        else mlpOut = mlp.forward(normed);
        return ((h + mlpOut).MoveToOuterDisposeScope(), aux?.MoveToOuterDisposeScope());
    }
}
