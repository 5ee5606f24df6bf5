// Multi-head Latent Attention (DeepSeek-V2/V3): low-rank q and joint kv compression, decoupled rope part.
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Model;

// Shape legend: B batch, T new tokens, S keys (cached + new), H heads, D hidden,
// C kv_lora_rank, R qk_rope_head_dim, N qk_nope_head_dim, V v_head_dim.
public sealed class MultiHeadLatentAttention : nn.Module<Tensor, Tensor>
{
    // Submodules in call order; names are HF's so weights map one to one.
    public Linear? q_proj;                         // when q_lora_rank is null
    public Linear? q_a_proj;
    public RmsNorm? q_a_layernorm;
    public Linear? q_b_proj;
    public Linear kv_a_proj_with_mqa;
    public RmsNorm kv_a_layernorm;
    public Linear kv_b_proj;
    public Linear o_proj;

    readonly int heads, nope, rope, vDim, kvRank;
    readonly double softmaxScale;
    readonly RotaryEmbedding rotary;

    public MultiHeadLatentAttention(DeepSeekConfig config, RotaryEmbedding rotary) : base(nameof(MultiHeadLatentAttention))
    {
        heads = config.NumAttentionHeads;
        nope = config.QkNopeHeadDim;
        rope = config.QkRopeHeadDim;
        vDim = config.VHeadDim;
        kvRank = config.KvLoraRank;
        this.rotary = rotary;
        softmaxScale = RotaryEmbedding.SoftmaxScale(config);
        long d = config.HiddenSize;
        bool bias = config.AttentionBias;

        if (config.QLoraRank is int qr)
        {
            q_a_proj = nn.Linear(d, qr, hasBias: bias);
            q_a_layernorm = new RmsNorm(qr, config.RmsNormEps);
            q_b_proj = nn.Linear(qr, (long)heads * config.QkHeadDim, hasBias: false);
        }
        else
            q_proj = nn.Linear(d, (long)heads * config.QkHeadDim, hasBias: false);
        kv_a_proj_with_mqa = nn.Linear(d, kvRank + rope, hasBias: bias);
        kv_a_layernorm = new RmsNorm(kvRank, config.RmsNormEps);
        kv_b_proj = nn.Linear(kvRank, (long)heads * (nope + vDim), hasBias: false);
        o_proj = nn.Linear((long)heads * vDim, d, hasBias: bias);
        RegisterComponents();
    }

    /// <summary>
    /// When set, a one-token step onto a cache attends in latent space (DeepSeek-V2 §2.1.3's absorbed form): W_UK is
    /// folded into the query and W_UV applied after attention, so the step never expands the cached latents into per-head
    /// keys and values. The model server turns it on; training and prefill keep the expanded form, which costs fewer
    /// flops when many queries share the keys.
    /// </summary>
    public bool AbsorbedDecode { get; set; }
    /// <summary>How attention over the new tokens runs without a cache (with one it is always fused: the server's path).</summary>
    public AttentionKernel Kernel { get; set; } = AttentionKernel.Auto;
    /// <summary>Selective recompute of the up-projections (q_a_layernorm→q_b_proj, kv_a_layernorm→kv_b_proj).</summary>
    public bool RecomputeUpProjections { get; set; }

    public override Tensor forward(Tensor x_BTD) => Forward(x_BTD, 0, null, -1);

    static Tensor UpProject(RmsNorm norm, Linear up, Tensor compressed, bool recompute)
    {
        if (!recompute) return up.forward(norm.Normalize(compressed));
        var parameters = new List<Tensor> { norm.weight, up.weight! };
        if (up.bias is { } b) parameters.Add(b);
        return ActivationRecompute.Run(t => [up.forward(norm.Normalize(t[0]))], [compressed], parameters)[0];
    }

    /// <summary>Attention over the new tokens x (B, T, D) at positions [start, start+T), extending the cache when given.</summary>
    public Tensor Forward(Tensor x_BTD, long start, ILatentCache? cache, int layer)
    {
        using var scope = NewDisposeScope();
        long B = x_BTD.shape[0], T = x_BTD.shape[1];

        // Selective recompute keeps only the up-projections' inputs: their norm products are made again in backward.
        bool recompute = ActivationRecompute.Active(RecomputeUpProjections, training) && cache is null;
        var q = q_proj is not null
            ? q_proj.forward(x_BTD)
            : UpProject(q_a_layernorm!, q_b_proj!, q_a_proj!.forward(x_BTD), recompute);
        var q_BHTq = q.view(B, T, heads, nope + rope).transpose(1, 2);
        var qSplit = q_BHTq.split([nope, rope], -1);
        var qNope_BHTN = qSplit[0];
        var qRope_BHTR = qSplit[1];

        var compressed_BTx = kv_a_proj_with_mqa.forward(x_BTD);
        var kvSplit = compressed_BTx.split([kvRank, rope], -1);
        // Training (no cache) up-projects the new latent in one piece; with a cache the normed latent is appended first.
        var latent_BTC = cache is null ? kvSplit[0] : kv_a_layernorm.forward(kvSplit[0]);
        var kRope_B1TR = kvSplit[1].view(B, 1, T, rope);

        var (cos_TR, sin_TR) = cache?.Rotation(rotary, layer, T, x_BTD.dtype, x_BTD.device) ?? rotary.CosSin(start, T, x_BTD.dtype, x_BTD.device);
        qRope_BHTR = rotary.Apply(qRope_BHTR, cos_TR, sin_TR);
        var kRopeRot_BTR = rotary.Apply(kRope_B1TR, cos_TR, sin_TR).view(B, T, rope);

        Tensor latent_BSC = latent_BTC, kRope_BSR = kRopeRot_BTR;
        Tensor? visible_B1TS = null;
        if (cache is not null) (latent_BSC, kRope_BSR, visible_B1TS) = cache.Append(layer, latent_BTC, kRopeRot_BTR);
        long S = latent_BSC.shape[1];
        if (AbsorbedDecode && cache is not null && T == 1)
            return o_proj.forward(AbsorbedAttention(qNope_BHTN, qRope_BHTR, latent_BSC, kRope_BSR, visible_B1TS)).MoveToOuterDisposeScope();

        var kvUp = cache is null ? UpProject(kv_a_layernorm, kv_b_proj, latent_BSC, recompute) : kv_b_proj.forward(latent_BSC);
        var kv_BHSx = kvUp.view(B, S, heads, nope + vDim).transpose(1, 2);
        var kvParts = kv_BHSx.split([nope, vDim], -1);
        var kNope_BHSN = kvParts[0];
        var v_BHSV = kvParts[1];
        var kRope_BHSR = kRope_BSR.view(B, 1, S, rope).expand(B, heads, S, rope);

        var query_BHTq = cat([qNope_BHTN, qRope_BHTR], -1);
        var key_BHSq = cat([kNope_BHSN, kRope_BHSR], -1);

        bool writtenOut = cache is null && Kernel switch
        {
            AttentionKernel.WrittenOut => true,
            AttentionKernel.Fused => false,
            _ => CausalAttention.PrefersWrittenOut(query_BHTq, S),
        };
        var out_BHTV = writtenOut
            ? CausalAttention.Explicit(query_BHTq, key_BHSq, v_BHSV, S - T, softmaxScale)
            : CausalAttention.Fused(query_BHTq, key_BHSq, v_BHSV, S - T, softmaxScale, visible_B1TS);
        var out_BTx = out_BHTV.transpose(1, 2).reshape(B, T, heads * vDim);
        return o_proj.forward(out_BTx).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// One new token per row (T = 1): scores = scale * (q_nope W_UK · latent + q_rope · k_rope) over the cached latents,
    /// output = (probs · latent) W_UV^T per head; the same numbers as the expanded form, reassociated.
    /// </summary>
    Tensor AbsorbedAttention(Tensor qNope_BH1N, Tensor qRope_BH1R, Tensor latent_BSC, Tensor kRope_BSR, Tensor? visible_B11S)
    {
        long B = qNope_BH1N.shape[0], S = latent_BSC.shape[1];
        // kv_b_proj's rows are per head [W_UK (N rows); W_UV (V rows)], each row over the C latent features.
        var wkv_HxC = kv_b_proj.weight!.view(heads, nope + vDim, kvRank);
        var wUK_HNC = wkv_HxC.narrow(1, 0, nope);
        var wUV_HVC = wkv_HxC.narrow(1, nope, vDim);

        // Heads lead so one batched matmul folds every row's query through its head's W_UK: (H, B, N) x (H, N, C).
        var qLatent_HBC = bmm(qNope_BH1N.reshape(B, heads, nope).transpose(0, 1), wUK_HNC);
        var qLatent_BHC = qLatent_HBC.transpose(0, 1);
        var qRope_BHR = qRope_BH1R.reshape(B, heads, rope);
        // All heads of a row share one latent key per position, so a row's heads are the rows of one matmul.
        var scores_BHS = bmm(qLatent_BHC, latent_BSC.transpose(1, 2)).add_(bmm(qRope_BHR, kRope_BSR.transpose(1, 2))).mul_(softmaxScale);
        if (visible_B11S is not null)
            scores_BHS = scores_BHS.masked_fill_(visible_B11S.view(B, 1, S).logical_not(), double.NegativeInfinity);
        var probs_BHS = scores_BHS.dtype is ScalarType.BFloat16 or ScalarType.Float16
            ? scores_BHS.softmax(-1, ScalarType.Float32).to_type(scores_BHS.dtype)
            : scores_BHS.softmax(-1);
        var context_BHC = bmm(probs_BHS, latent_BSC);
        // W_UV after attention: (H, B, C) x (H, C, V) -> (H, B, V), then back to HF's (B, 1, H*V) head-major layout.
        var out_HBV = bmm(context_BHC.transpose(0, 1), wUV_HVC.transpose(1, 2));
        return out_HBV.transpose(0, 1).reshape(B, 1, heads * vDim);
    }
}
