// One multi-token-prediction module (DeepSeek-V3 §2.2): combines the previous depth's hidden state with the embedding of a later token.
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Model;

/// <summary>
/// Depth k (1-based) at position i: h'_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)]), then a decoder
/// block, then shared_head.norm and the shared output head predict t_{i+k+1}. The embedding-first order is the
/// one DeepSeek-V3's released weights use (eh_proj's first D input columns act on the embedding).
/// In a HF folder the module is stored as model.layers.{num_hidden_layers + k - 1}.*.
/// </summary>
public sealed class MultiTokenPrediction : nn.Module<Tensor, Tensor>
{
    public RmsNorm enorm, hnorm;
    public Linear eh_proj;
    public DecoderLayer block;
    public SharedHead shared_head;

    public MultiTokenPrediction(DeepSeekConfig config, RotaryEmbedding rotary) : base(nameof(MultiTokenPrediction))
    {
        enorm = new RmsNorm(config.HiddenSize, config.RmsNormEps);
        hnorm = new RmsNorm(config.HiddenSize, config.RmsNormEps);
        eh_proj = nn.Linear(2L * config.HiddenSize, config.HiddenSize, hasBias: false);
        block = new DecoderLayer(config, rotary, moe: config.NumMoeLayers > 0);
        shared_head = new SharedHead(config);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x) => throw new InvalidOperationException("call Forward(previousHidden, nextEmbeddings)");

    /// <summary>previous (B, T', D) hidden states and embeddings (B, T', D) of the tokens k positions ahead.</summary>
    public (Tensor hidden, Tensor? auxLoss) Forward(Tensor previous_BTD, Tensor embeddings_BTD)
    {
        using var scope = NewDisposeScope();
        var joined = cat([enorm.forward(embeddings_BTD), hnorm.forward(previous_BTD)], -1);
        var (h, aux) = block.Forward(eh_proj.forward(joined), 0, null, -1);
        return (h.MoveToOuterDisposeScope(), aux?.MoveToOuterDisposeScope());
    }
}

/// <summary>The MTP module's own final norm; its output head is the main model's lm_head.</summary>
public sealed class SharedHead : nn.Module<Tensor, Tensor>
{
    public RmsNorm norm;

    public SharedHead(DeepSeekConfig config) : base(nameof(SharedHead))
    {
        norm = new RmsNorm(config.HiddenSize, config.RmsNormEps);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x) => norm.forward(x);
}
