// The DeepSeek-V3 model configuration, with Hugging Face config.json field names; presets and parameter counts.
using System.Text.Json;
using System.Text.Json.Nodes;
using System.Text.Json.Serialization;

namespace DeepSeekCluster.Training.Model;

/// <summary>RoPE scaling (HF <c>rope_scaling</c>, called <c>rope_parameters</c> in newer configs).</summary>
public sealed record RopeScaling
{
    [JsonPropertyName("rope_type")] public string RopeType { get; init; } = "default";
    [JsonPropertyName("factor")] public double Factor { get; init; } = 1.0;
    [JsonPropertyName("original_max_position_embeddings")] public int? OriginalMaxPositionEmbeddings { get; init; }
    [JsonPropertyName("beta_fast")] public double? BetaFast { get; init; }
    [JsonPropertyName("beta_slow")] public double? BetaSlow { get; init; }
    [JsonPropertyName("mscale")] public double? Mscale { get; init; }
    [JsonPropertyName("mscale_all_dim")] public double? MscaleAllDim { get; init; }
    [JsonPropertyName("attention_factor")] public double? AttentionFactor { get; init; }
    [JsonPropertyName("truncate")] public bool? Truncate { get; init; }

    public bool IsYarn => RopeType == "yarn";
}

/// <summary>
/// DeepSeek-V3 architecture hyper-parameters. Property names serialize to the exact HF
/// <c>DeepseekV3Config</c> keys so a config.json goes both ways.
/// </summary>
public sealed record DeepSeekConfig
{
    [JsonPropertyName("model_type")] public string ModelType { get; init; } = "deepseek_v3";
    [JsonPropertyName("architectures")] public string[] Architectures { get; init; } = ["DeepseekV3ForCausalLM"];
    [JsonPropertyName("vocab_size")] public int VocabSize { get; init; } = 129280;
    [JsonPropertyName("hidden_size")] public int HiddenSize { get; init; } = 7168;
    [JsonPropertyName("intermediate_size")] public int IntermediateSize { get; init; } = 18432;
    [JsonPropertyName("moe_intermediate_size")] public int MoeIntermediateSize { get; init; } = 2048;
    [JsonPropertyName("num_hidden_layers")] public int NumHiddenLayers { get; init; } = 61;
    [JsonPropertyName("num_attention_heads")] public int NumAttentionHeads { get; init; } = 128;
    [JsonPropertyName("num_key_value_heads")] public int NumKeyValueHeads { get; init; } = 128;
    [JsonPropertyName("n_shared_experts")] public int NSharedExperts { get; init; } = 1;
    [JsonPropertyName("n_routed_experts")] public int NRoutedExperts { get; init; } = 256;
    [JsonPropertyName("routed_scaling_factor")] public double RoutedScalingFactor { get; init; } = 2.5;
    [JsonPropertyName("kv_lora_rank")] public int KvLoraRank { get; init; } = 512;
    [JsonPropertyName("q_lora_rank")] public int? QLoraRank { get; init; } = 1536;
    [JsonPropertyName("qk_rope_head_dim")] public int QkRopeHeadDim { get; init; } = 64;
    [JsonPropertyName("v_head_dim")] public int VHeadDim { get; init; } = 128;
    [JsonPropertyName("qk_nope_head_dim")] public int QkNopeHeadDim { get; init; } = 128;
    [JsonPropertyName("n_group")] public int NGroup { get; init; } = 8;
    [JsonPropertyName("topk_group")] public int TopkGroup { get; init; } = 4;
    [JsonPropertyName("num_experts_per_tok")] public int NumExpertsPerTok { get; init; } = 8;
    [JsonPropertyName("first_k_dense_replace")] public int FirstKDenseReplace { get; init; } = 3;
    [JsonPropertyName("norm_topk_prob")] public bool NormTopkProb { get; init; } = true;
    [JsonPropertyName("scoring_func")] public string ScoringFunc { get; init; } = "sigmoid";
    [JsonPropertyName("topk_method")] public string TopkMethod { get; init; } = "noaux_tc";
    /// <summary>Weight of the sequence-wise balance loss; 0 turns it off (V3 relies on the bias instead).</summary>
    [JsonPropertyName("aux_loss_alpha")] public double AuxLossAlpha { get; init; } = 0.0;
    [JsonPropertyName("seq_aux")] public bool SeqAux { get; init; } = true;
    [JsonPropertyName("hidden_act")] public string HiddenAct { get; init; } = "silu";
    [JsonPropertyName("max_position_embeddings")] public int MaxPositionEmbeddings { get; init; } = 4096;
    [JsonPropertyName("initializer_range")] public double InitializerRange { get; init; } = 0.02;
    [JsonPropertyName("rms_norm_eps")] public double RmsNormEps { get; init; } = 1e-6;
    [JsonPropertyName("tie_word_embeddings")] public bool TieWordEmbeddings { get; init; }
    [JsonPropertyName("rope_theta")] public double RopeTheta { get; init; } = 10000.0;
    [JsonPropertyName("rope_scaling")] public RopeScaling? RopeScaling { get; init; }
    /// <summary>HF default true: DeepSeek checkpoints store the rope dimensions interleaved (pairs 2i, 2i+1).</summary>
    [JsonPropertyName("rope_interleave")] public bool RopeInterleave { get; init; } = true;
    [JsonPropertyName("attention_bias")] public bool AttentionBias { get; init; }
    [JsonPropertyName("attention_dropout")] public double AttentionDropout { get; init; }
    [JsonPropertyName("num_nextn_predict_layers")] public int NumNextnPredictLayers { get; init; } = 1;
    [JsonPropertyName("bos_token_id")] public int? BosTokenId { get; init; } = 0;
    [JsonPropertyName("eos_token_id")] public int? EosTokenId { get; init; } = 1;
    [JsonPropertyName("pad_token_id")] public int? PadTokenId { get; init; }
    [JsonPropertyName("torch_dtype")] public string TorchDtype { get; init; } = "float32";

    [JsonIgnore] public int QkHeadDim => QkNopeHeadDim + QkRopeHeadDim;
    [JsonIgnore] public int NumMoeLayers => Math.Max(0, NumHiddenLayers - FirstKDenseReplace);

    // ---- Presets ----

    /// <summary>Trains in minutes on 2 CPU cores: 4 layers (1 dense), 8 experts in 4 groups, 1 MTP layer.</summary>
    public static DeepSeekConfig Tiny(int vocabSize = 2048) => new()
    {
        VocabSize = vocabSize, HiddenSize = 128, IntermediateSize = 384, MoeIntermediateSize = 96,
        NumHiddenLayers = 4, NumAttentionHeads = 4, NumKeyValueHeads = 4,
        NSharedExperts = 1, NRoutedExperts = 8, NumExpertsPerTok = 2, NGroup = 4, TopkGroup = 2,
        RoutedScalingFactor = 1.0, KvLoraRank = 32, QLoraRank = 64,
        QkNopeHeadDim = 32, QkRopeHeadDim = 16, VHeadDim = 32,
        FirstKDenseReplace = 1, MaxPositionEmbeddings = 512, NumNextnPredictLayers = 1,
    };

    /// <summary>About 40M total parameters: big enough that matmuls dominate a CPU step.</summary>
    public static DeepSeekConfig Small(int vocabSize = 8192) => new()
    {
        VocabSize = vocabSize, HiddenSize = 512, IntermediateSize = 1536, MoeIntermediateSize = 384,
        NumHiddenLayers = 6, NumAttentionHeads = 8, NumKeyValueHeads = 8,
        NSharedExperts = 1, NRoutedExperts = 16, NumExpertsPerTok = 4, NGroup = 4, TopkGroup = 2,
        RoutedScalingFactor = 2.5, KvLoraRank = 128, QLoraRank = 256,
        QkNopeHeadDim = 64, QkRopeHeadDim = 32, VHeadDim = 64,
        FirstKDenseReplace = 1, MaxPositionEmbeddings = 1024, NumNextnPredictLayers = 1,
    };

    /// <summary>DeepSeek-V3 / R1 (671B total, 37B active), as in deepseek-ai/DeepSeek-V3's config.json.</summary>
    public static DeepSeekConfig DeepSeekV3_671B() => new()
    {
        MaxPositionEmbeddings = 163840, RopeTheta = 10000,
        RopeScaling = new RopeScaling
        {
            RopeType = "yarn", Factor = 40, OriginalMaxPositionEmbeddings = 4096,
            BetaFast = 32, BetaSlow = 1, Mscale = 1.0, MscaleAllDim = 1.0,
        },
        TorchDtype = "bfloat16",
    };

    /// <summary>DeepSeek-V2-Lite shapes (15.7B total, 2.4B active): no q LoRA, 64 experts, softmax-free V3 routing here.</summary>
    public static DeepSeekConfig DeepSeekV2Lite() => new()
    {
        VocabSize = 102400, HiddenSize = 2048, IntermediateSize = 10944, MoeIntermediateSize = 1408,
        NumHiddenLayers = 27, NumAttentionHeads = 16, NumKeyValueHeads = 16,
        NSharedExperts = 2, NRoutedExperts = 64, NumExpertsPerTok = 6, NGroup = 1, TopkGroup = 1,
        RoutedScalingFactor = 1.0, KvLoraRank = 512, QLoraRank = null,
        QkNopeHeadDim = 128, QkRopeHeadDim = 64, VHeadDim = 128,
        FirstKDenseReplace = 1, NormTopkProb = false, MaxPositionEmbeddings = 163840,
        RopeScaling = new RopeScaling
        {
            RopeType = "yarn", Factor = 40, OriginalMaxPositionEmbeddings = 4096,
            BetaFast = 32, BetaSlow = 1, Mscale = 0.707, MscaleAllDim = 0.707,
        },
        NumNextnPredictLayers = 0, BosTokenId = 100000, EosTokenId = 100001, TorchDtype = "bfloat16",
    };

    /// <summary>
    /// DeepSeek-V2-Lite's layer shapes (hidden 2048, MLA with kv_lora_rank 512, 64 routed experts of 1408 plus 2 shared,
    /// top-6, V3's sigmoid routing with the correction bias) cut to the depth one 80 GB GPU trains with AdamW in bf16:
    /// 3 layers (1 dense, 2 MoE), 1.67B parameters. Training state is 32 bytes a parameter (bf16 weights and gradients,
    /// fp32 master weights and both moments, the 16-byte exact gradient sum) = 53 GB; a fourth layer makes it 72 GB and
    /// leaves no room for activations. The GPU speed goal is measured on it: its 2048-wide matmuls can fill a GPU.
    /// </summary>
    public static DeepSeekConfig V2LiteFor80GB() => DeepSeekV2Lite() with
    {
        NumHiddenLayers = V2LiteLayersFor80GB, MaxPositionEmbeddings = 4096, RopeScaling = null,
    };

    public const int V2LiteLayersFor80GB = 3;

    /// <summary>Bytes of training state per parameter in bf16 with AdamW: weight 2 + gradient 2 + master 4 + moments 8 + exact sum 16.</summary>
    public const int Bf16AdamWStateBytesPerParameter = 32;

    public static DeepSeekConfig Preset(string name) => name.ToLowerInvariant() switch
    {
        "tiny" => Tiny(),
        "small" => Small(),
        "deepseek-v3" or "v3-671b" or "deepseek-v3-671b" => DeepSeekV3_671B(),
        "deepseek-v2-lite" or "v2-lite" => DeepSeekV2Lite(),
        "v2-lite-80gb" => V2LiteFor80GB(),
        _ => throw new ArgumentException($"Unknown model preset '{name}': expected tiny, small, deepseek-v3, deepseek-v2-lite or v2-lite-80gb."),
    };

    // ---- Validation ----

    /// <summary>Every problem with this config, named by its config.json key; empty when it is usable.</summary>
    public IReadOnlyList<string> Problems()
    {
        var p = new List<string>();
        void Positive(string key, int v) { if (v <= 0) p.Add($"{key} must be > 0, got {v}"); }
        Positive("vocab_size", VocabSize); Positive("hidden_size", HiddenSize);
        Positive("num_hidden_layers", NumHiddenLayers); Positive("num_attention_heads", NumAttentionHeads);
        Positive("kv_lora_rank", KvLoraRank); Positive("qk_rope_head_dim", QkRopeHeadDim);
        Positive("qk_nope_head_dim", QkNopeHeadDim); Positive("v_head_dim", VHeadDim);
        if (QLoraRank is <= 0) p.Add($"q_lora_rank must be > 0 or null, got {QLoraRank}");
        if (QkRopeHeadDim % 2 != 0) p.Add($"qk_rope_head_dim must be even, got {QkRopeHeadDim}");
        if (FirstKDenseReplace < 0) p.Add($"first_k_dense_replace must be >= 0, got {FirstKDenseReplace}");
        if (FirstKDenseReplace > 0) Positive("intermediate_size", IntermediateSize);
        if (NumMoeLayers > 0)
        {
            Positive("n_routed_experts", NRoutedExperts); Positive("moe_intermediate_size", MoeIntermediateSize);
            Positive("num_experts_per_tok", NumExpertsPerTok); Positive("n_group", NGroup); Positive("topk_group", TopkGroup);
            if (NSharedExperts < 0) p.Add($"n_shared_experts must be >= 0, got {NSharedExperts}");
            if (NGroup > 0 && NRoutedExperts % NGroup != 0)
                p.Add($"n_routed_experts ({NRoutedExperts}) must be divisible by n_group ({NGroup})");
            if (TopkGroup > NGroup) p.Add($"topk_group ({TopkGroup}) must be <= n_group ({NGroup})");
            if (NGroup > 1 && NRoutedExperts / NGroup < 2)
                p.Add($"group-limited routing scores a group by its top-2 experts: n_routed_experts / n_group must be >= 2, got {NRoutedExperts}/{NGroup}");
            if (NGroup > 0 && NumExpertsPerTok > TopkGroup * (NRoutedExperts / NGroup))
                p.Add($"num_experts_per_tok ({NumExpertsPerTok}) exceeds the experts in topk_group groups ({TopkGroup * (NRoutedExperts / Math.Max(1, NGroup))})");
            if (ScoringFunc != "sigmoid") p.Add($"scoring_func must be 'sigmoid' (DeepSeek-V3), got '{ScoringFunc}'");
        }
        if (NumNextnPredictLayers < 0) p.Add($"num_nextn_predict_layers must be >= 0, got {NumNextnPredictLayers}");
        if (HiddenAct != "silu") p.Add($"hidden_act must be 'silu', got '{HiddenAct}'");
        if (RopeScaling is { } rs && rs.RopeType is not ("default" or "yarn"))
            p.Add($"rope_scaling.rope_type must be 'default' or 'yarn', got '{rs.RopeType}'");
        if (RopeScaling is { IsYarn: true, Factor: < 1.0 }) p.Add($"rope_scaling.factor must be >= 1, got {RopeScaling.Factor}");
        return p;
    }

    public DeepSeekConfig Validated()
    {
        var problems = Problems();
        if (problems.Count > 0)
            throw new InvalidDataException("Invalid model config: " + string.Join("; ", problems));
        return this;
    }

    // ---- Parameter counts ----

    long AttentionParams()
    {
        long h = HiddenSize, nH = NumAttentionHeads;
        long q = QLoraRank is int r ? h * r + r + (long)r * nH * QkHeadDim : h * nH * QkHeadDim;
        long kv = h * (KvLoraRank + QkRopeHeadDim) + KvLoraRank + (long)KvLoraRank * nH * (QkNopeHeadDim + VHeadDim);
        return q + kv + nH * VHeadDim * h;
    }

    long MlpParams(long inter) => 3L * HiddenSize * inter;

    long LayerParams(int layer, bool activeOnly)
    {
        long norms = 2L * HiddenSize;
        if (layer < FirstKDenseReplace) return AttentionParams() + MlpParams(IntermediateSize) + norms;
        int experts = activeOnly ? NumExpertsPerTok : NRoutedExperts;
        long moe = (long)experts * MlpParams(MoeIntermediateSize) + MlpParams((long)MoeIntermediateSize * NSharedExperts)
                   + (long)NRoutedExperts * HiddenSize; // router weight
        return AttentionParams() + moe + norms;
    }

    /// <summary>Parameters of decoder layer <paramref name="layer"/> (an index at or past NumHiddenLayers: an MTP module's MoE layer).</summary>
    public long LayerParameterCount(int layer) => LayerParams(layer, activeOnly: false);

    /// <summary>Parameters of the routed experts of decoder layer <paramref name="layer"/> (0 for a dense layer): what expert parallelism splits.</summary>
    public long RoutedExpertParameterCount(int layer) => layer < FirstKDenseReplace ? 0 : (long)NRoutedExperts * MlpParams(MoeIntermediateSize);

    /// <summary>Parameters of the main model (embeddings, layers, final norm, head), without MTP layers.</summary>
    public long ParameterCount(bool activeOnly = false)
    {
        long n = (long)VocabSize * HiddenSize + HiddenSize + (TieWordEmbeddings ? 0 : (long)VocabSize * HiddenSize);
        for (int i = 0; i < NumHiddenLayers; i++) n += LayerParams(i, activeOnly);
        return n;
    }

    /// <summary>Parameters of the multi-token-prediction modules (each: 2 norms, eh_proj, one MoE decoder layer, shared_head.norm; embedding and head are shared).</summary>
    public long MtpParameterCount(bool activeOnly = false)
    {
        long perModule = 3L * HiddenSize + 2L * HiddenSize * HiddenSize + LayerParams(Math.Max(FirstKDenseReplace, NumHiddenLayers), activeOnly);
        return NumNextnPredictLayers * perModule;
    }

    /// <summary>
    /// Training FLOPs per token: 6 x active non-embedding matmul parameters (lm_head included) plus the
    /// attention score/value term 6 * layers * heads * (qk_head_dim + v_head_dim) * seqLen / 2 (causal).
    /// </summary>
    public double TrainingFlopsPerToken(int seqLen, bool includeMtp = true)
    {
        long active = ParameterCount(activeOnly: true) - (long)VocabSize * HiddenSize; // the embedding lookup is no matmul
        if (TieWordEmbeddings) active += (long)VocabSize * HiddenSize;
        int layers = NumHiddenLayers;
        if (includeMtp && NumNextnPredictLayers > 0)
        {
            active += MtpParameterCount(activeOnly: true) + (long)NumNextnPredictLayers * VocabSize * HiddenSize; // MTP head matmul
            layers += NumNextnPredictLayers;
        }
        double attention = 6.0 * layers * NumAttentionHeads * (QkHeadDim + VHeadDim) * seqLen / 2.0;
        return 6.0 * active + attention;
    }

    // ---- JSON ----

    public static readonly JsonSerializerOptions Json = new()
    {
        WriteIndented = true,
        DefaultIgnoreCondition = JsonIgnoreCondition.Never,
        NumberHandling = JsonNumberHandling.AllowReadingFromString,
    };

    public string ToJson() => JsonSerializer.Serialize(this, Json);

    /// <summary>Reads an HF config.json; accepts <c>rope_parameters</c> (newer HF) as well as <c>rope_scaling</c>.</summary>
    public static DeepSeekConfig FromJson(string json, string source = "config.json")
    {
        JsonObject obj;
        try { obj = JsonNode.Parse(json)?.AsObject() ?? throw new InvalidDataException($"{source}: expected a JSON object"); }
        catch (JsonException e) { throw new InvalidDataException($"{source}: not valid JSON ({e.Message})", e); }

        if (obj["model_type"]?.GetValue<string>() is { } mt && mt is not ("deepseek_v3" or "deepseek_v2"))
            throw new InvalidDataException($"{source}: model_type '{mt}' is not a DeepSeek-V3 model (expected 'deepseek_v3')");

        if (obj["rope_parameters"] is JsonObject rp)
        {
            // Newer HF: rope_theta lives inside rope_parameters; rope_type 'default' means no scaling.
            if (rp["rope_theta"] is JsonNode theta) obj["rope_theta"] = theta.DeepClone();
            var type = (rp["rope_type"] ?? rp["type"])?.GetValue<string>() ?? "default";
            if (type != "default" && obj["rope_scaling"] is null) obj["rope_scaling"] = rp.DeepClone();
        }
        obj.Remove("rope_parameters");
        if (obj["rope_scaling"] is JsonObject rs && rs["rope_type"] is null && rs["type"] is JsonNode t)
            rs["rope_type"] = t.DeepClone(); // BC: old configs say "type"
        if (obj["eos_token_id"] is JsonArray eos) obj["eos_token_id"] = eos.Count > 0 ? eos[0]!.DeepClone() : null;

        try
        {
            return obj.Deserialize<DeepSeekConfig>(Json) ?? throw new InvalidDataException($"{source}: empty config");
        }
        catch (JsonException e)
        {
            throw new InvalidDataException($"{source}: field {e.Path} has the wrong type ({e.Message})", e);
        }
    }

    public static DeepSeekConfig Load(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"Model config '{path}' does not exist.", path);
        return FromJson(File.ReadAllText(path), path);
    }
}
