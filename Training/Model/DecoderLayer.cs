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

    public override Tensor forward(Tensor x_BTD) => Forward(x_BTD, 0, null, -1).output;

    public (Tensor output, Tensor? auxLoss) Forward(Tensor x_BTD, long start, ILatentCache? cache, int cacheLayer)
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
