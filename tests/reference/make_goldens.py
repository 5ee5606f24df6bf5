"""Generate the DeepSeek-V3 golden files used by tests/Training.Tests.

    /usr/bin/python3 tests/reference/make_goldens.py

Deterministic: weights and inputs come from numpy's PCG64 generator with
fixed seeds, files are written with sorted names and fixed JSON formatting,
so a re-run reproduces byte-identical files (on the same CPU/BLAS).
See tests/reference/README.md for what each file holds.
"""

import json
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import deepseek_v3_reference as ref  # noqa: E402

REPO = os.path.dirname(os.path.dirname(HERE))
GOLDENS = os.path.join(REPO, "tests", "Training.Tests", "Goldens")

NEG_INF = float("-inf")

# ---------------------------------------------------------------------------
# configurations
# ---------------------------------------------------------------------------

TINY = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_shared_experts": 1,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_group": 4,
    "topk_group": 2,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 32,
    "q_lora_rank": 48,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "first_k_dense_replace": 1,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "hidden_act": "silu",
    "rope_theta": 10000,
    "rope_scaling": {
        "type": "yarn",
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 64,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    "max_position_embeddings": 256,
    "rope_interleave": True,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "num_nextn_predict_layers": 1,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "use_cache": True,
    "torch_dtype": "float32",
}

PLAIN = dict(TINY)
for _k in ("rope_theta", "rope_scaling"):
    del PLAIN[_k]
PLAIN.update(
    {
        "num_hidden_layers": 2,
        "q_lora_rank": None,
        "rope_interleave": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": False,
        "first_k_dense_replace": 0,
        "num_nextn_predict_layers": 0,
    }
)

GENERATION_CONFIG = {"_from_model_config": True, "bos_token_id": 0, "eos_token_id": 1}

# e_score_correction_bias per MoE layer of the tiny model (8 experts, 4 groups of 2).
# Most entries are strongly negative so that, for many tokens, fewer than
# top_k (=2) experts inside the two kept groups have a positive
# bias-corrected score. Then HF's 0.0 fill of the masked groups would make
# the final top-k pick an expert OUTSIDE the kept groups, whereas the -inf
# fill (DeepSeek's, and ours) never does. make() asserts that this happens for
# several tokens in every MoE layer, so a C# implementation that fills with
# 0.0 fails the routing and logits comparison.
TINY_BIAS = {
    1: [0.30, -1.20, -0.70, -0.90, -0.75, -0.80, -0.65, -1.00],
    2: [-1.10, -0.75, 0.35, -1.00, -0.70, -0.90, -0.65, -0.85],
    3: [-0.70, -0.95, -0.75, -1.05, -0.85, 0.30, -0.65, -0.90],
}


# ---------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------


class Gen:
    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def normal(self, shape, std):
        return torch.from_numpy((self.rng.standard_normal(shape) * std).astype(np.float32))

    def norm_weight(self, n):
        return torch.from_numpy((1.0 + 0.1 * self.rng.standard_normal(n)).astype(np.float32))


def layer_weights(cfg, g, li, bias):
    H = cfg.hidden_size
    nh = cfg.num_attention_heads
    p = {}
    pre = f"model.layers.{li}."
    a = pre + "self_attn."
    p[pre + "input_layernorm.weight"] = g.norm_weight(H)
    if cfg.q_lora_rank is None:
        p[a + "q_proj.weight"] = g.normal((nh * cfg.qk_head_dim, H), 0.2)
    else:
        p[a + "q_a_proj.weight"] = g.normal((cfg.q_lora_rank, H), 0.2)
        p[a + "q_a_layernorm.weight"] = g.norm_weight(cfg.q_lora_rank)
        p[a + "q_b_proj.weight"] = g.normal((nh * cfg.qk_head_dim, cfg.q_lora_rank), 0.2)
    p[a + "kv_a_proj_with_mqa.weight"] = g.normal((cfg.kv_lora_rank + cfg.qk_rope_head_dim, H), 0.2)
    p[a + "kv_a_layernorm.weight"] = g.norm_weight(cfg.kv_lora_rank)
    p[a + "kv_b_proj.weight"] = g.normal((nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank), 0.2)
    p[a + "o_proj.weight"] = g.normal((H, nh * cfg.v_head_dim), 0.15)
    p[pre + "post_attention_layernorm.weight"] = g.norm_weight(H)
    m = pre + "mlp."
    if li >= cfg.first_k_dense_replace:
        I = cfg.moe_intermediate_size
        p[m + "gate.weight"] = g.normal((cfg.n_routed_experts, H), 0.2)
        p[m + "gate.e_score_correction_bias"] = torch.tensor(bias, dtype=torch.float32)
        for e in range(cfg.n_routed_experts):
            p[f"{m}experts.{e}.gate_proj.weight"] = g.normal((I, H), 0.2)
            p[f"{m}experts.{e}.up_proj.weight"] = g.normal((I, H), 0.2)
            p[f"{m}experts.{e}.down_proj.weight"] = g.normal((H, I), 0.2)
        Is = I * cfg.n_shared_experts
        p[m + "shared_experts.gate_proj.weight"] = g.normal((Is, H), 0.2)
        p[m + "shared_experts.up_proj.weight"] = g.normal((Is, H), 0.2)
        p[m + "shared_experts.down_proj.weight"] = g.normal((H, Is), 0.2)
    else:
        I = cfg.intermediate_size
        p[m + "gate_proj.weight"] = g.normal((I, H), 0.2)
        p[m + "up_proj.weight"] = g.normal((I, H), 0.2)
        p[m + "down_proj.weight"] = g.normal((H, I), 0.15)
    return p


def model_weights(cfg, seed, biases):
    g = Gen(seed)
    H, V = cfg.hidden_size, cfg.vocab_size
    p = {"model.embed_tokens.weight": g.normal((V, H), 1.0)}
    for li in range(cfg.num_hidden_layers):
        p.update(layer_weights(cfg, g, li, biases.get(li)))
    p["model.norm.weight"] = g.norm_weight(H)
    p["lm_head.weight"] = g.normal((V, H), 0.2)
    for k in range(cfg.num_nextn_predict_layers):
        li = cfg.num_hidden_layers + k
        pre = f"model.layers.{li}."
        p.update(layer_weights(cfg, g, li, biases.get(li)))
        p[pre + "enorm.weight"] = g.norm_weight(H)
        p[pre + "hnorm.weight"] = g.norm_weight(H)
        p[pre + "eh_proj.weight"] = g.normal((H, 2 * H), 0.15)
        p[pre + "shared_head.norm.weight"] = g.norm_weight(H)
        # the official checkpoint stores copies of the shared embedding / head under the MTP prefix
        p[pre + "embed_tokens.weight"] = p["model.embed_tokens.weight"].clone()
        p[pre + "shared_head.head.weight"] = p["lm_head.weight"].clone()
    return p


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def sorted_routing(idx, w):
    order = idx.argsort(dim=-1)
    return idx.gather(1, order).to(torch.int64).contiguous(), w.gather(1, order).contiguous()


def routing_margins(cfg, p, prefix, x2d):
    """Smallest gaps at the group and expert top-k boundaries (float64, -inf masking)."""
    E, G, k = cfg.n_routed_experts, cfg.n_group, cfg.num_experts_per_tok
    s = torch.sigmoid(ref.linear(x2d, p[prefix + "gate.weight"]))
    b = s + p[prefix + "gate.e_score_correction_bias"]
    gs = b.view(-1, G, E // G).topk(min(2, E // G), dim=-1).values.sum(-1)
    gm = float("inf")
    if cfg.topk_group < G:
        srt = gs.sort(dim=-1, descending=True).values
        gm = float((srt[:, cfg.topk_group - 1] - srt[:, cfg.topk_group]).min())
    kept = gs.topk(cfg.topk_group, dim=-1).indices
    keep = torch.zeros(b.shape[0], G, dtype=torch.bool).scatter_(1, kept, True)
    keep = keep[:, :, None].expand(-1, G, E // G).reshape(-1, E)
    srt = b.masked_fill(~keep, NEG_INF).sort(dim=-1, descending=True).values
    em = float((srt[:, k - 1] - srt[:, k]).min())
    return gm, em


def routing_under_zero_fill_differs(cfg, p, prefix, x2d):
    a, _ = ref.route(cfg, p, prefix, x2d, NEG_INF)
    z, _ = ref.route(cfg, p, prefix, x2d, 0.0)
    return int((a.sort(-1).values != z.sort(-1).values).any(-1).sum())


def moe_inputs(cfg, p, li, x_in, S):
    """Recompute the post-attention normalised input of the MoE in layer li."""
    pre = f"model.layers.{li}."
    cos, sin = ref.rope_cos_sin(cfg, range(S))
    h = x_in + ref.mla_attention(
        cfg, p, pre + "self_attn.", ref.rms_norm(x_in, p[pre + "input_layernorm.weight"], cfg.rms_norm_eps), cos, sin
    )
    z = ref.rms_norm(h, p[pre + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
    return z.reshape(-1, cfg.hidden_size)


def check_routing(cfg, p, li, x_in, S, need_zero_fill_difference, report, what=""):
    z = moe_inputs(cfg, p, li, x_in, S)
    gm, em = routing_margins(cfg, p, f"model.layers.{li}.mlp.", z)
    diff = routing_under_zero_fill_differs(cfg, p, f"model.layers.{li}.mlp.", z)
    report.append(
        f"{what}layer {li}: min group margin {gm:.3e}, min expert margin {em:.3e}, "
        f"tokens whose routing changes with HF 0.0 fill: {diff}/{z.shape[0]}"
    )
    assert min(gm, em) > 1e-3, f"layer {li}: routing too close to a tie for float32 comparisons"
    if need_zero_fill_difference:
        assert diff >= 2, f"layer {li}: bias does not exercise the -inf masking"


def greedy_case(cfg, p, seed, report):
    """Greedy run from a random 5-token prompt; None if any decision (argmax or routing) is a near tie."""
    prompt = torch.from_numpy(np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(1, 5)).astype(np.int64))
    cont = ref.greedy(cfg, p, prompt, 10)
    full = torch.cat([prompt, cont], 1)
    out = ref.forward(cfg, p, full)
    top2 = out["logits"][0, prompt.shape[1] - 1 : -1].topk(2, dim=-1).values
    gap = float((top2[:, 0] - top2[:, 1]).min())
    if gap <= 1e-3:
        return None
    # causal model: routing of the full sequence equals the routing at every decoding step
    xs = [p["model.embed_tokens.weight"][full]] + out["layers"]
    lines = []
    try:
        for li in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
            check_routing(cfg, p, li, xs[li], full.shape[1], False, lines, "greedy ")
    except AssertionError:
        return None
    report.append(f"greedy: prompt seed {seed}, min top1-top2 logit gap over the 10 steps {gap:.3e}")
    report.extend(lines)
    return prompt, cont


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def make_tiny(report):
    folder = os.path.join(GOLDENS, "hf-tiny")
    os.makedirs(folder, exist_ok=True)
    cfg = ref.Config(TINY)
    w32 = model_weights(cfg, seed=20250301, biases=TINY_BIAS)
    write_json(os.path.join(folder, "config.json"), TINY)
    write_json(os.path.join(folder, "generation_config.json"), GENERATION_CONFIG)
    ref.save_safetensors(os.path.join(folder, "model.safetensors"), w32, {"format": "pt"})

    p = ref.to_f64(ref.load_safetensors(os.path.join(folder, "model.safetensors")))
    rng = np.random.default_rng(7)
    B, S = 2, 12
    ids = torch.from_numpy(rng.integers(0, cfg.vocab_size, size=(B, S)).astype(np.int64))

    out = ref.forward(cfg, p, ids)
    mtp = ref.mtp_forward(cfg, p, ids, out["hidden"])
    inv_freq, att = ref.rope_inv_freq(cfg)
    cos, sin = ref.rope_cos_sin(cfg, range(S))

    g = {
        "input_ids": ids,
        "logits": out["logits"],
        "mtp_logits": mtp[0]["logits"],
        "rope.cos": cos,
        "rope.sin": sin,
        "rope.inv_freq": inv_freq,
        "rope.attention_factor": torch.tensor([att], dtype=torch.float64),
        "attn.softmax_scale": torch.tensor([ref.softmax_scale(cfg)], dtype=torch.float64),
        "hidden.final_norm": out["hidden"],
    }
    for li, x in enumerate(out["layers"]):
        g[f"hidden.layer{li}"] = x
    routing = dict(out["routing"])
    routing.update(mtp[0]["routing"])
    for li, (idx, w) in routing.items():
        si, sw = sorted_routing(idx, w)
        g[f"layer{li}.topk_indices"] = si
        g[f"layer{li}.topk_weights"] = sw

    # routing robustness and the -inf vs 0.0 check, per MoE layer
    x_in = [p["model.embed_tokens.weight"][ids]] + out["layers"]
    for li in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
        check_routing(cfg, p, li, x_in[li], S, True, report)
    # MTP layer input: eh_proj output
    L = cfg.num_hidden_layers
    pre = f"model.layers.{L}."
    emb = p[pre + "embed_tokens.weight"][ids[:, 1:]]
    cat = torch.cat(
        [ref.rms_norm(emb, p[pre + "enorm.weight"], cfg.rms_norm_eps), ref.rms_norm(out["hidden"][:, : S - 1], p[pre + "hnorm.weight"], cfg.rms_norm_eps)],
        -1,
    )
    check_routing(cfg, p, L, ref.linear(cat, p[pre + "eh_proj.weight"]), S - 1, True, report)

    # the whole model under HF's 0.0 fill must give visibly different logits
    hf_zero = ref.forward(cfg, p, ids, group_mask_value=0.0)["logits"]
    d = float((hf_zero - out["logits"]).abs().max())
    report.append(f"hf-tiny: max |logits(-inf fill) - logits(0.0 fill)| = {d:.3e}")
    assert d > 1e-2

    # greedy decoding: first prompt seed whose decisions are all clear of ties
    for seed in range(100, 200):
        case = greedy_case(cfg, p, seed, report)
        if case is not None:
            prompt, cont = case
            break
    else:
        raise AssertionError("no well-conditioned greedy prompt")
    g["greedy_prompt"] = prompt
    g["greedy_continuation"] = cont

    ref.save_safetensors(os.path.join(GOLDENS, "hf-tiny-expected.safetensors"), g, {"format": "pt"})
    report.append(f"hf-tiny logits std {float(out['logits'].std()):.3f}, mtp logits std {float(mtp[0]['logits'].std()):.3f}")


def make_plain(report):
    folder = os.path.join(GOLDENS, "hf-tiny-plain")
    os.makedirs(folder, exist_ok=True)
    cfg = ref.Config(PLAIN)
    biases = {0: [0.20, -0.30, 0.10, -0.50, 0.40, -0.10, -0.20, 0.30], 1: [-0.40, 0.30, -0.10, 0.20, -0.30, 0.50, 0.00, -0.20]}
    w32 = model_weights(cfg, seed=20250302, biases=biases)
    write_json(os.path.join(folder, "config.json"), PLAIN)
    write_json(os.path.join(folder, "generation_config.json"), GENERATION_CONFIG)
    ref.save_safetensors(os.path.join(folder, "model.safetensors"), w32, {"format": "pt"})

    p = ref.to_f64(ref.load_safetensors(os.path.join(folder, "model.safetensors")))
    rng = np.random.default_rng(8)
    B, S = 2, 12
    ids = torch.from_numpy(rng.integers(0, cfg.vocab_size, size=(B, S)).astype(np.int64))
    out = ref.forward(cfg, p, ids)
    cos, sin = ref.rope_cos_sin(cfg, range(S))
    g = {"input_ids": ids, "logits": out["logits"], "rope.cos": cos, "rope.sin": sin, "hidden.final_norm": out["hidden"]}
    for li, x in enumerate(out["layers"]):
        g[f"hidden.layer{li}"] = x
    for li, (idx, w) in out["routing"].items():
        si, sw = sorted_routing(idx, w)
        g[f"layer{li}.topk_indices"] = si
        g[f"layer{li}.topk_weights"] = sw
    x_in = [p["model.embed_tokens.weight"][ids]] + out["layers"]
    for li in range(cfg.num_hidden_layers):
        check_routing(cfg, p, li, x_in[li], S, False, report)
    ref.save_safetensors(os.path.join(GOLDENS, "hf-tiny-plain-expected.safetensors"), g, {"format": "pt"})
    report.append(f"hf-tiny-plain logits std {float(out['logits'].std()):.3f}")


def main():
    torch.set_num_threads(1)  # fixed reduction order -> reproducible bytes
    report = []
    make_tiny(report)
    make_plain(report)
    for line in report:
        print(line)
    total = 0
    for root, _, files in os.walk(GOLDENS):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    print(f"goldens total {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
