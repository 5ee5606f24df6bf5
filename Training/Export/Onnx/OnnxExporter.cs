// The DeepSeek-V3 forward pass (MLA, grouped sigmoid routing, shared + routed experts) as an ONNX graph: input_ids → logits,
// optionally a decode step over the MLA latent cache (past → present per layer). No MTP.
using DeepSeekCluster.Training.Model;
using Google.Protobuf;
using Onnx;
using static TorchSharp.torch;
using DataType = Onnx.TensorProto.Types.DataType;

namespace DeepSeekCluster.Training.Export.Onnx;

// Shape legend: B batch, T tokens, N = B*T, D hidden, H heads, C kv_lora_rank, R rope dims, E experts, I expert width.
public static class OnnxExporter
{
    /// <summary>
    /// Writes the forward pass (fp32, opset 18) to <paramref name="path"/> through a temporary name. With
    /// <paramref name="withCache"/> the graph is a decode step: it also takes past_latent.{i} (batch, past, kv_lora_rank)
    /// and past_krope.{i} (batch, past, qk_rope_head_dim) per layer — the normed latent and the rotated rope key, what
    /// LatentKvCache holds — places the new tokens at positions past.., and returns present_latent.{i} / present_krope.{i}
    /// (past + new tokens) to feed back. An empty past (past = 0) runs a prompt.
    /// </summary>
    public static void Write(DeepSeekForCausalLM model, string path, bool withCache = false)
    {
        var bytes = Build(model, withCache).ToByteArray();
        var tmp = path + ".partial";
        File.WriteAllBytes(tmp, bytes);
        File.Move(tmp, path, overwrite: true);
    }

    public static ModelProto Build(DeepSeekForCausalLM model, bool withCache = false)
    {
        var c = model.Config;
        if (c.AttentionBias) throw new NotSupportedException("ONNX export does not write attention biases (attention_bias is true)");
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var hf = model.HfStateDict().ToDictionary(kv => kv.Key, kv => kv.Value);
        var g = new OnnxGraph();
        var b = new Builder(g, c, hf);
        g.Input("input_ids", DataType.Int64, "batch", "sequence");
        if (withCache)
            for (int i = 0; i < c.NumHiddenLayers; i++)
            {
                g.Input($"past_latent.{i}", DataType.Float, "batch", "past", c.KvLoraRank.ToString());
                g.Input($"past_krope.{i}", DataType.Float, "batch", "past", c.QkRopeHeadDim.ToString());
            }
        var x = g.Op("Gather", [b.Weight("model.embed_tokens.weight"), "input_ids"], OnnxGraph.Attr("axis", 0L));
        b.PrepareSequence("input_ids", withCache ? "past_latent.0" : null);
        for (int i = 0; i < c.NumHiddenLayers; i++)
        {
            string p = $"model.layers.{i}.";
            x = g.Op("Add", [x, b.Attention(p, b.RmsNorm(x, p + "input_layernorm.weight"), withCache ? i : null)]);
            var h = b.RmsNorm(x, p + "post_attention_layernorm.weight");
            x = g.Op("Add", [x, i < c.FirstKDenseReplace ? b.Mlp(h, p + "mlp.") : b.Moe(h, p + "mlp.")]);
        }
        var logits = b.Linear(b.RmsNorm(x, "model.norm.weight"), c.TieWordEmbeddings ? "model.embed_tokens.weight" : "lm_head.weight");
        g.Output("logits", logits, DataType.Float, "batch", "sequence", c.VocabSize.ToString());
        return g.ToModel();
    }

    sealed class Builder(OnnxGraph g, DeepSeekConfig c, Dictionary<string, Tensor> hf)
    {
        readonly Dictionary<string, string> weights = new();
        string cos = "", sin = "", mask = "", negInf = "";

        float[] Values(Tensor t) => t.detach().to_type(ScalarType.Float32).cpu().contiguous().data<float>().ToArray();
        Tensor Get(string name) => hf.TryGetValue(name, out var t) ? t : throw new InvalidDataException($"model has no tensor '{name}'");

        public string Weight(string name) => weights.TryGetValue(name, out var n) ? n : weights[name] = g.Initializer(name, Values(Get(name)), Get(name).shape);

        /// <summary>x @ W^T for an HF (out, in) weight, stored transposed so MatMul needs no Transpose node.</summary>
        public string Linear(string x, string name, Tensor? weight = null)
        {
            var w = weight ?? Get(name);
            var key = name + ".T";
            if (!weights.TryGetValue(key, out var init)) weights[key] = init = g.Initializer(key, Values(w.t()), w.shape[1], w.shape[0]);
            return g.Op("MatMul", [x, init]);
        }

        public string RmsNorm(string x, string weight)
        {
            var meanSquare = g.Op("ReduceMean", [g.Op("Mul", [x, x]), g.Ints(-1)], OnnxGraph.Attr("keepdims", 1L));
            var normed = g.Op("Div", [x, g.Op("Sqrt", [g.Op("Add", [meanSquare, g.Scalar((float)c.RmsNormEps)])])]);
            return g.Op("Mul", [normed, Weight(weight)]);
        }

        string Silu(string x) => g.Op("Mul", [x, g.Op("Sigmoid", [x])]);

        public string Mlp(string x, string p) =>
            Linear(g.Op("Mul", [Silu(Linear(x, p + "gate_proj.weight")), Linear(x, p + "up_proj.weight")]), p + "down_proj.weight");

        /// <summary>cos/sin rows for positions past..past+T-1 and the causal mask (T, past + T), shared by every layer.</summary>
        public void PrepareSequence(string ids, string? pastLatent)
        {
            var rotary = new RotaryEmbedding(c with { RopeInterleave = false });
            var (cosAll, sinAll) = rotary.CosSin(0, c.MaxPositionEmbeddings, ScalarType.Float32, CPU);
            var tLen = g.Op("Gather", [g.Op("Shape", [ids]), g.Ints(1)]);                                    // (1)
            var past = pastLatent is null ? g.Ints(0) : g.Op("Gather", [g.Op("Shape", [pastLatent]), g.Ints(1)]); // (1)
            var end = g.Op("Add", [past, tLen]);
            cos = g.Op("Slice", [g.Initializer("rope_cos", Values(cosAll), cosAll.shape), past, end, g.Ints(0)]);
            sin = g.Op("Slice", [g.Initializer("rope_sin", Values(sinAll), sinAll.shape), past, end, g.Ints(0)]);
            var ones_TS = g.Op("ConstantOfShape", [g.Op("Concat", [tLen, end], OnnxGraph.Attr("axis", 0L))], OnnxGraph.Fill(DataType.Float, 1));
            // Query i sits at position past + i and sees keys 0..past + i: mask what lies above diagonal past.
            var diagonal = g.Op("Squeeze", [g.Op("Add", [past, g.Ints(1)])]);
            mask = g.Op("Greater", [g.Op("Trilu", [ones_TS, diagonal], OnnxGraph.Attr("upper", 1L)), g.Scalar(0.5f)]);
            negInf = g.Scalar(float.NegativeInfinity);
        }

        string Rope(string x_BxTR)
        {
            int half = c.QkRopeHeadDim / 2;
            var parts = g.Node("Split", 2, [x_BxTR, g.Ints(half, half)], OnnxGraph.Attr("axis", -1L));
            var rotated = g.Op("Concat", [g.Op("Neg", [parts[1]]), parts[0]], OnnxGraph.Attr("axis", -1L));
            return g.Op("Add", [g.Op("Mul", [x_BxTR, cos]), g.Op("Mul", [rotated, sin])]);
        }

        /// <summary>
        /// The graph rotates (i, i + R/2) pairs; a checkpoint with rope_interleave stores pairs (2i, 2i+1). Its rope rows of
        /// q and of kv_a are reordered here (the same order on q and k leaves the scores as they were).
        /// </summary>
        Tensor RopeRows(Tensor w, long start, long count, long block)
        {
            if (!c.RopeInterleave) return w;
            int R = c.QkRopeHeadDim;
            var order = Enumerable.Range(0, R).Select(i => (long)(i < R / 2 ? 2 * i : 2 * (i - R / 2) + 1)).ToArray();
            var blocks_Kx = w.view(-1, block, w.shape[1]);
            var rope = blocks_Kx.narrow(1, start, count).index_select(1, tensor(order));
            var parts = new List<Tensor> { blocks_Kx.narrow(1, 0, start), rope };
            if (start + count < block) parts.Add(blocks_Kx.narrow(1, start + count, block - start - count));
            return cat(parts, 1).reshape(w.shape);
        }

        public string Attention(string p, string x_BTD, int? cacheLayer)
        {
            int H = c.NumAttentionHeads, N = c.QkNopeHeadDim, R = c.QkRopeHeadDim, V = c.VHeadDim, C = c.KvLoraRank;
            string a = p + "self_attn.";
            var q = c.QLoraRank is null
                ? Linear(x_BTD, a + "q_proj.weight", RopeRows(Get(a + "q_proj.weight"), N, R, N + R))
                : Linear(RmsNorm(Linear(x_BTD, a + "q_a_proj.weight"), a + "q_a_layernorm.weight"), a + "q_b_proj.weight", RopeRows(Get(a + "q_b_proj.weight"), N, R, N + R));
            var q_BHTq = g.Op("Transpose", [g.Op("Reshape", [q, g.Ints(0, 0, H, N + R)])], OnnxGraph.Attr("perm", [0L, 2, 1, 3]));
            var qParts = g.Node("Split", 2, [q_BHTq, g.Ints(N, R)], OnnxGraph.Attr("axis", -1L));

            var kva = Get(a + "kv_a_proj_with_mqa.weight");
            var compressed = Linear(x_BTD, a + "kv_a_proj_with_mqa.weight", RopeRows(kva, C, R, C + R));
            var kvParts = g.Node("Split", 2, [compressed, g.Ints(C, R)], OnnxGraph.Attr("axis", -1L));
            var latent_BTC = RmsNorm(kvParts[0], a + "kv_a_layernorm.weight");
            var kRope_B1TR = Rope(g.Op("Unsqueeze", [kvParts[1], g.Ints(1)]));
            if (cacheLayer is int l)
            {
                latent_BTC = g.Op("Concat", [$"past_latent.{l}", latent_BTC], OnnxGraph.Attr("axis", 1L));                       // (B, S, C)
                kRope_B1TR = g.Op("Concat", [g.Op("Unsqueeze", [$"past_krope.{l}", g.Ints(1)]), kRope_B1TR], OnnxGraph.Attr("axis", 2L)); // (B, 1, S, R)
                g.Output($"present_latent.{l}", latent_BTC, DataType.Float, "batch", "total", C.ToString());
                g.Output($"present_krope.{l}", g.Op("Squeeze", [kRope_B1TR, g.Ints(1)]), DataType.Float, "batch", "total", R.ToString());
            }

            var kv = Linear(latent_BTC, a + "kv_b_proj.weight");
            var kv_BHSx = g.Op("Transpose", [g.Op("Reshape", [kv, g.Ints(0, 0, H, N + V)])], OnnxGraph.Attr("perm", [0L, 2, 1, 3]));
            var kvSplit = g.Node("Split", 2, [kv_BHSx, g.Ints(N, V)], OnnxGraph.Attr("axis", -1L));
            var ropeShape = g.Op("Concat", [g.Op("Slice", [g.Op("Shape", [kvSplit[0]]), g.Ints(0), g.Ints(3)]), g.Ints(R)], OnnxGraph.Attr("axis", 0L));
            var key = g.Op("Concat", [kvSplit[0], g.Op("Expand", [kRope_B1TR, ropeShape])], OnnxGraph.Attr("axis", -1L));
            var query = g.Op("Concat", [qParts[0], Rope(qParts[1])], OnnxGraph.Attr("axis", -1L));

            var scores = g.Op("Mul", [g.Op("MatMul", [query, g.Op("Transpose", [key], OnnxGraph.Attr("perm", [0L, 1, 3, 2]))]), g.Scalar((float)RotaryEmbedding.SoftmaxScale(c))]);
            var probs = g.Op("Softmax", [g.Op("Where", [mask, negInf, scores])], OnnxGraph.Attr("axis", -1L));
            var out_BHTV = g.Op("MatMul", [probs, kvSplit[1]]);
            var out_BTx = g.Op("Reshape", [g.Op("Transpose", [out_BHTV], OnnxGraph.Attr("perm", [0L, 2, 1, 3])), g.Ints(0, 0, H * V)]);
            return Linear(out_BTx, a + "o_proj.weight");
        }

        /// <summary>
        /// Routing as MoeRouter does it (sigmoid, bias-corrected choice among the best topk_group groups, gate weights from
        /// the unbiased scores), then every expert on every token, weighted by a dense (N, E) matrix that is zero off the choice.
        /// </summary>
        public string Moe(string x_BTD, string p)
        {
            int E = c.NRoutedExperts, G = c.NGroup, I = c.MoeIntermediateSize, D = c.HiddenSize, K = c.NumExpertsPerTok;
            var x_ND = g.Op("Reshape", [x_BTD, g.Ints(-1, D)]);
            var scores_NE = g.Op("Sigmoid", [Linear(x_ND, p + "gate.weight")]);
            var choice_NE = g.Op("Add", [scores_NE, Weight(p + "gate.e_score_correction_bias")]);
            if (G > 1)
            {
                var grouped = g.Op("Reshape", [choice_NE, g.Ints(-1, G, E / G)]);
                var best2 = g.Node("TopK", 2, [grouped, g.Ints(2)], OnnxGraph.Attr("axis", -1L))[0];
                var groupScore_NG = g.Op("ReduceSum", [best2, g.Ints(-1)], OnnxGraph.Attr("keepdims", 0L));
                var groupIdx = g.Node("TopK", 2, [groupScore_NG, g.Ints(c.TopkGroup)], OnnxGraph.Attr("axis", -1L))[1];
                var zeros_NG = g.Op("ConstantOfShape", [g.Op("Shape", [groupScore_NG])], OnnxGraph.Fill(DataType.Float, 0));
                var ones_Nk = g.Op("ConstantOfShape", [g.Op("Shape", [groupIdx])], OnnxGraph.Fill(DataType.Float, 1));
                var keep = g.Op("ScatterElements", [zeros_NG, groupIdx, ones_Nk], OnnxGraph.Attr("axis", 1L));
                var kept = g.Op("Greater", [g.Op("Unsqueeze", [keep, g.Ints(-1)]), g.Scalar(0.5f)]);
                choice_NE = g.Op("Reshape", [g.Op("Where", [kept, grouped, negInf]), g.Ints(-1, E)]);
            }
            var idx_NK = g.Node("TopK", 2, [choice_NE, g.Ints(K)], OnnxGraph.Attr("axis", -1L))[1];
            var w_NK = g.Op("GatherElements", [scores_NE, idx_NK], OnnxGraph.Attr("axis", 1L));
            if (c.NormTopkProb) w_NK = g.Op("Div", [w_NK, g.Op("Add", [g.Op("ReduceSum", [w_NK, g.Ints(-1)], OnnxGraph.Attr("keepdims", 1L)), g.Scalar(1e-20f)])]);
            w_NK = g.Op("Mul", [w_NK, g.Scalar((float)c.RoutedScalingFactor)]);
            var dense_NE = g.Op("ScatterElements", [g.Op("ConstantOfShape", [g.Op("Shape", [scores_NE])], OnnxGraph.Fill(DataType.Float, 0)), idx_NK, w_NK], OnnxGraph.Attr("axis", 1L));

            Tensor Stacked(string proj) => stack(Enumerable.Range(0, E).Select(e => Get($"{p}experts.{e}.{proj}.weight")).ToArray()); // (E, out, in)
            var gateAll = g.Initializer(p + "experts.gate_proj.DxEI", Values(Stacked("gate_proj").permute(2, 0, 1).reshape(D, E * I)), D, (long)E * I);
            var upAll = g.Initializer(p + "experts.up_proj.DxEI", Values(Stacked("up_proj").permute(2, 0, 1).reshape(D, E * I)), D, (long)E * I);
            var downAll = g.Initializer(p + "experts.down_proj.ExIxD", Values(Stacked("down_proj").transpose(1, 2)), E, I, D);
            var gate_NEI = g.Op("Reshape", [g.Op("MatMul", [x_ND, gateAll]), g.Ints(-1, E, I)]);
            var up_NEI = g.Op("Reshape", [g.Op("MatMul", [x_ND, upAll]), g.Ints(-1, E, I)]);
            var act_ENI = g.Op("Transpose", [g.Op("Mul", [Silu(gate_NEI), up_NEI])], OnnxGraph.Attr("perm", [1L, 0, 2]));
            var out_NED = g.Op("Transpose", [g.Op("MatMul", [act_ENI, downAll])], OnnxGraph.Attr("perm", [1L, 0, 2]));
            var routed_ND = g.Op("ReduceSum", [g.Op("Mul", [out_NED, g.Op("Unsqueeze", [dense_NE, g.Ints(-1)])]), g.Ints(1)], OnnxGraph.Attr("keepdims", 0L));
            if (c.NSharedExperts > 0) routed_ND = g.Op("Add", [routed_ND, Mlp(x_ND, p + "shared_experts.")]);
            return g.Op("Reshape", [routed_ND, g.Op("Shape", [x_BTD])]);
        }
    }
}
