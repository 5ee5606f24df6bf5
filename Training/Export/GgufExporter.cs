// Writes a DeepSeek-V3 model as a GGUF file for llama.cpp's `deepseek2` architecture (MLA, sigmoid-gated MoE); no MTP layers.
using DeepSeekCluster.Text.Tokenization;
using DeepSeekCluster.Training.IO;
using DeepSeekCluster.Training.Model;
using static TorchSharp.torch;

namespace DeepSeekCluster.Training.Export;

/// <summary>The whole-file type of a GGUF export (llama.cpp's general.file_type).</summary>
public enum GgufType { F16, Q8_0, Q4_0 }

/// <summary>
/// Maps HF DeepseekV3ForCausalLM weights to llama.cpp's tensor names and shapes, as llama.cpp's own converter
/// does: kv_b_proj is split per head into attn_k_b (transposed) and attn_v_b so llama.cpp can run MLA on the
/// latent cache; e_score_correction_bias becomes exp_probs_b; experts are stacked into 3-D tensors; MTP
/// layers are left out (llama.cpp does not run them). Norms, the router and its bias stay F32; 2-D weights
/// take the requested type, except where a row is not a whole number of quantization blocks (then F16).
/// </summary>
public static class GgufExporter
{
    public const string Architecture = "deepseek2";

    /// <summary>Exports an HF model folder (config.json, weights, tokenizer.json) to <paramref name="outPath"/>.</summary>
    public static void Write(string modelFolder, string outPath, GgufType type)
    {
        var loaded = HfModelFolder.Load(modelFolder);
        using var model = loaded.Model;
        var tokenizer = loaded.Tokenizer
            ?? throw new InvalidDataException($"{modelFolder}: GGUF carries the tokenizer, but the folder has no {HfModelFolder.TokenizerFile}");
        Write(model, tokenizer, outPath, type, Path.GetFileName(Path.TrimEndingDirectorySeparator(modelFolder)));
    }

    public static void Write(DeepSeekForCausalLM model, BpeTokenizer tokenizer, string outPath, GgufType type, string name = "deepseek-cluster")
    {
        var config = model.Config;
        CheckExpressible(config, tokenizer);
        var gguf = new GgufWriter();
        AddHyperParameters(gguf, config, type, name);
        GgufTokenizer.Add(gguf, tokenizer, config.VocabSize);
        using var noGrad = no_grad();
        var weights = model.HfStateDict().ToDictionary(kv => kv.Key, kv => kv.Value);
        AddTensors(gguf, config, weights, type);
        gguf.Write(outPath);
    }

    /// <summary>Refuses what llama.cpp's deepseek2 graph cannot run, naming the config key.</summary>
    static void CheckExpressible(DeepSeekConfig c, BpeTokenizer tokenizer)
    {
        var problems = new List<string>();
        if (c.AttentionBias) problems.Add("attention_bias is true, but llama.cpp's deepseek2 attention has no bias tensors");
        if (c.NumMoeLayers > 0 && c.NSharedExperts == 0) problems.Add("n_shared_experts is 0, but llama.cpp's deepseek2 MoE layers require a shared expert");
        if (c.NumMoeLayers > 0 && c.NGroup > 1 && c.NGroup >= c.NRoutedExperts) problems.Add($"n_group ({c.NGroup}) must be below n_routed_experts ({c.NRoutedExperts}) for llama.cpp");
        if (tokenizer.VocabSize > c.VocabSize) problems.Add($"the tokenizer has {tokenizer.VocabSize} tokens but vocab_size is {c.VocabSize}");
        if (problems.Count > 0) throw new NotSupportedException("GGUF (deepseek2) cannot express this model: " + string.Join("; ", problems));
    }

    static void AddHyperParameters(GgufWriter g, DeepSeekConfig c, GgufType type, string name)
    {
        string a = Architecture;
        g.Add("general.architecture", a);
        g.Add("general.name", name);
        g.Add("general.file_type", type switch { GgufType.F16 => 1u, GgufType.Q4_0 => 2u, _ => 7u }); // llama_ftype MOSTLY_*
        g.Add("general.quantization_version", 2u);
        g.Add($"{a}.vocab_size", (uint)c.VocabSize);
        g.Add($"{a}.context_length", (uint)c.MaxPositionEmbeddings);
        g.Add($"{a}.embedding_length", (uint)c.HiddenSize);
        g.Add($"{a}.block_count", (uint)c.NumHiddenLayers);
        g.Add($"{a}.feed_forward_length", (uint)c.IntermediateSize);
        g.Add($"{a}.leading_dense_block_count", (uint)Math.Min(c.FirstKDenseReplace, c.NumHiddenLayers));
        g.Add($"{a}.attention.head_count", (uint)c.NumAttentionHeads);
        // MLA runs as multi-query attention over the latent: one kv "head" of kv_lora_rank (+ rope) values.
        g.Add($"{a}.attention.head_count_kv", 1u);
        g.Add($"{a}.attention.layer_norm_rms_epsilon", (float)c.RmsNormEps);
        // Written even when null (as 0): llama.cpp reads the key for every layer count but DeepSeek-V2-Lite's, and 0 selects attn_q.
        g.Add($"{a}.attention.q_lora_rank", (uint)(c.QLoraRank ?? 0));
        g.Add($"{a}.attention.kv_lora_rank", (uint)c.KvLoraRank);
        g.Add($"{a}.attention.key_length", (uint)(c.KvLoraRank + c.QkRopeHeadDim));
        g.Add($"{a}.attention.value_length", (uint)c.KvLoraRank);
        g.Add($"{a}.attention.key_length_mla", (uint)c.QkHeadDim);
        g.Add($"{a}.attention.value_length_mla", (uint)c.VHeadDim);
        g.Add($"{a}.rope.dimension_count", (uint)c.QkRopeHeadDim);
        g.Add($"{a}.rope.freq_base", (float)c.RopeTheta);
        if (c.RopeScaling is { IsYarn: true } rs)
        {
            g.Add($"{a}.rope.scaling.type", "yarn");
            g.Add($"{a}.rope.scaling.factor", (float)rs.Factor);
            g.Add($"{a}.rope.scaling.original_context_length", (uint)(rs.OriginalMaxPositionEmbeddings ?? c.MaxPositionEmbeddings));
            // llama.cpp divides this by 0.1 again when loading (its converter's convention).
            if (rs.MscaleAllDim is double all) g.Add($"{a}.rope.scaling.yarn_log_multiplier", (float)(0.1 * all));
            if (rs.BetaFast is double bf) g.Add($"{a}.rope.scaling.yarn_beta_fast", (float)bf);
            if (rs.BetaSlow is double bs) g.Add($"{a}.rope.scaling.yarn_beta_slow", (float)bs);
        }
        g.Add($"{a}.expert_feed_forward_length", (uint)c.MoeIntermediateSize);
        g.Add($"{a}.expert_shared_count", (uint)c.NSharedExperts);
        if (c.NumMoeLayers > 0)
        {
            g.Add($"{a}.expert_count", (uint)c.NRoutedExperts);
            g.Add($"{a}.expert_used_count", (uint)c.NumExpertsPerTok);
            g.Add($"{a}.expert_weights_scale", (float)c.RoutedScalingFactor);
            g.Add($"{a}.expert_weights_norm", c.NormTopkProb);
            g.Add($"{a}.expert_gating_func", 2u); // LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID
            if (c.NGroup > 1)
            {
                g.Add($"{a}.expert_group_count", (uint)c.NGroup);
                g.Add($"{a}.expert_group_used_count", (uint)c.TopkGroup);
            }
        }
    }

    // ---- Tensors ----

    static void AddTensors(GgufWriter g, DeepSeekConfig c, Dictionary<string, Tensor> hf, GgufType type)
    {
        var matrix = type switch { GgufType.F16 => GgmlType.F16, GgufType.Q8_0 => GgmlType.Q8_0, _ => GgmlType.Q4_0 };
        Tensor Get(string n) => hf.TryGetValue(n, out var t) ? t : throw new InvalidDataException($"model has no tensor '{n}'");
        void Matrix(string name, Tensor t, GgmlType? forced = null) => Add(g, name, t.shape, () => t, forced ?? MatrixType(matrix, t.shape[^1]));
        void Computed(string name, long[] shape, Func<Tensor> make) => Add(g, name, shape, make, MatrixType(matrix, shape[^1]));
        void Vector(string name, Tensor t) => Add(g, name, t.shape, () => t, GgmlType.F32);

        Matrix("token_embd.weight", Get("model.embed_tokens.weight"));
        Vector("output_norm.weight", Get("model.norm.weight"));
        // llama-quantize keeps the output head wider than the body for 4-bit files; Q8_0 is the closest we write.
        if (!c.TieWordEmbeddings) Matrix("output.weight", Get("lm_head.weight"), type == GgufType.Q4_0 ? MatrixType(GgmlType.Q8_0, c.HiddenSize) : null);

        int H = c.NumAttentionHeads, N = c.QkNopeHeadDim, V = c.VHeadDim, C = c.KvLoraRank, R = c.QkRopeHeadDim;
        var ropeOrder = RopeToInterleaved(R, c.RopeInterleave);
        for (int i = 0; i < c.NumHiddenLayers; i++)
        {
            string p = $"model.layers.{i}.", b = $"blk.{i}.";
            Vector(b + "attn_norm.weight", Get(p + "input_layernorm.weight"));
            if (c.QLoraRank is not null)
            {
                Matrix(b + "attn_q_a.weight", Get(p + "self_attn.q_a_proj.weight"));
                Vector(b + "attn_q_a_norm.weight", Get(p + "self_attn.q_a_layernorm.weight"));
                var qb = Get(p + "self_attn.q_b_proj.weight");
                Computed(b + "attn_q_b.weight", qb.shape, () => PermuteQRope(qb, H, N, R, ropeOrder));
            }
            else
            {
                var q = Get(p + "self_attn.q_proj.weight");
                Computed(b + "attn_q.weight", q.shape, () => PermuteQRope(q, H, N, R, ropeOrder));
            }
            var kva = Get(p + "self_attn.kv_a_proj_with_mqa.weight");
            Computed(b + "attn_kv_a_mqa.weight", kva.shape, () => PermuteKvRope(kva, C, R, ropeOrder));
            Vector(b + "attn_kv_a_norm.weight", Get(p + "self_attn.kv_a_layernorm.weight"));
            // kv_b_proj (H*(N+V), C): per head, N rows make keys and V rows values from the latent.
            var kvb = Get(p + "self_attn.kv_b_proj.weight");
            Computed(b + "attn_k_b.weight", [H, C, N], () => kvb.view(H, N + V, C).narrow(1, 0, N).transpose(1, 2));
            Computed(b + "attn_v_b.weight", [H, V, C], () => kvb.view(H, N + V, C).narrow(1, N, V));
            Matrix(b + "attn_output.weight", Get(p + "self_attn.o_proj.weight"));
            Vector(b + "ffn_norm.weight", Get(p + "post_attention_layernorm.weight"));

            if (i < c.FirstKDenseReplace)
            {
                Matrix(b + "ffn_gate.weight", Get(p + "mlp.gate_proj.weight"));
                Matrix(b + "ffn_up.weight", Get(p + "mlp.up_proj.weight"));
                Matrix(b + "ffn_down.weight", Get(p + "mlp.down_proj.weight"));
                continue;
            }
            var router = Get(p + "mlp.gate.weight");
            Add(g, b + "ffn_gate_inp.weight", router.shape, () => router, GgmlType.F32);
            Vector(b + "exp_probs_b.bias", Get(p + "mlp.gate.e_score_correction_bias"));
            foreach (var (proj, gguf) in new[] { ("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"), ("down_proj", "ffn_down_exps") })
            {
                var experts = Enumerable.Range(0, c.NRoutedExperts).Select(e => Get($"{p}mlp.experts.{e}.{proj}.weight")).ToArray();
                Computed(b + gguf + ".weight", [c.NRoutedExperts, .. experts[0].shape], () => stack(experts)); // (E, out, in)
            }
            Matrix(b + "ffn_gate_shexp.weight", Get(p + "mlp.shared_experts.gate_proj.weight"));
            Matrix(b + "ffn_up_shexp.weight", Get(p + "mlp.shared_experts.up_proj.weight"));
            Matrix(b + "ffn_down_shexp.weight", Get(p + "mlp.shared_experts.down_proj.weight"));
        }
    }

    static GgmlType MatrixType(GgmlType wanted, long rowLength) =>
        wanted is GgmlType.Q8_0 or GgmlType.Q4_0 && rowLength % GgmlQuant.BlockSize != 0 ? GgmlType.F16 : wanted;

    /// <summary>
    /// Adds a tensor of torch shape <paramref name="shape"/> that <paramref name="make"/> builds only when the file
    /// is written, so derived tensors (stacked experts, split kv_b) never all exist at once.
    /// </summary>
    static void Add(GgufWriter g, string name, long[] shape, Func<Tensor> make, GgmlType type)
    {
        var ne = shape.Reverse().Select(d => (ulong)d).ToArray();
        g.AddTensor(name, ne, type, () =>
        {
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            var t = make();
            if (!t.shape.SequenceEqual(shape))
                throw new InvalidDataException($"tensor '{name}' has shape [{string.Join(", ", t.shape)}], expected [{string.Join(", ", shape)}]");
            return t.detach().to_type(ScalarType.Float32).cpu().contiguous().data<float>().ToArray();
        });
    }

    // ---- Rope layout ----

    /// <summary>
    /// llama.cpp's deepseek2 rotates pairs (2i, 2i+1), the layout DeepSeek's checkpoints store (rope_interleave).
    /// A model trained with rope_interleave false rotates (i, i + R/2) instead: its rope rows are reordered so
    /// pair i lands on (2i, 2i+1). The same order on q and k leaves every attention score unchanged.
    /// Null when no reordering is needed.
    /// </summary>
    static long[]? RopeToInterleaved(int R, bool interleaved)
    {
        if (interleaved) return null;
        var order = new long[R];
        for (int i = 0; i < R / 2; i++) { order[2 * i] = i; order[2 * i + 1] = i + R / 2; }
        return order;
    }

    static Tensor PermuteQRope(Tensor q_Xin, int H, int N, int R, long[]? order)
    {
        if (order is null) return q_Xin;
        var perHead_HxIn = q_Xin.view(H, N + R, -1);
        using var idx = tensor(order);
        var rope = perHead_HxIn.narrow(1, N, R).index_select(1, idx);
        return cat([perHead_HxIn.narrow(1, 0, N), rope], 1).reshape(q_Xin.shape);
    }

    static Tensor PermuteKvRope(Tensor kva_Xin, int C, int R, long[]? order)
    {
        if (order is null) return kva_Xin;
        using var idx = tensor(order);
        return cat([kva_Xin.narrow(0, 0, C), kva_Xin.narrow(0, C, R).index_select(0, idx)], 0);
    }
}
