"""Self-checks of deepseek_v3_reference.py against independent formulations.

    /usr/bin/python3 tests/reference/self_check.py

Each check recomputes one piece a different way (naive loops, complex
numbers, the weight-absorbed MLA form, hand-derived constants) and compares.
Run make_goldens.py first: the last check reloads the goldens.
"""

import math
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import deepseek_v3_reference as ref  # noqa: E402
import make_goldens as mg  # noqa: E402

torch.set_num_threads(1)
TOL = 1e-10


def close(a, b, what, tol=TOL):
    d = float((a - b).abs().max())
    assert d <= tol, f"{what}: max diff {d}"
    print(f"ok  {what} (max diff {d:.1e})")


def tiny():
    cfg = ref.Config(mg.TINY)
    return cfg, ref.to_f64(mg.model_weights(cfg, 20250301, mg.TINY_BIAS))


def check_yarn_constants():
    cfg = ref.Config(mg.TINY)
    inv, att = ref.rope_inv_freq(cfg)
    d, theta, f = 8, 10000.0, 4.0
    base = [theta ** (-2 * j / d) for j in range(d // 2)]
    # beta_fast=32 -> dim 8*ln(64/(64*pi))/(2 ln 1e4) = -0.497 -> floor -1 -> clamp 0
    # beta_slow=1  -> dim 8*ln(64/(2*pi))/(2 ln 1e4) = 1.008 -> ceil 2
    # ramp over j=0..3 with low=0, high=2: 0, .5, 1, 1 -> extrapolated weight 1, .5, 0, 0
    want = torch.tensor([base[0], 0.5 * base[1] + 0.5 * base[1] / f, base[2] / f, base[3] / f], dtype=torch.float64)
    close(inv, want, "yarn inv_freq vs hand-derived blend")
    assert att == 1.0  # mscale == mscale_all_dim
    s = ref.softmax_scale(cfg)
    close(torch.tensor(s), torch.tensor(24 ** -0.5 * (1 + 0.1 * math.log(4.0)) ** 2), "softmax scale with mscale_all_dim")
    # attention factor when mscale differs from mscale_all_dim
    c2 = dict(mg.TINY)
    c2["rope_scaling"] = dict(c2["rope_scaling"], mscale=0.707, mscale_all_dim=0.0)
    _, att2 = ref.rope_inv_freq(ref.Config(c2))
    close(torch.tensor(att2), torch.tensor(1 + 0.1 * math.log(4.0)), "attention factor falls back to mscale(f,1)")
    # the plain config in its new rope_parameters form equals the classic rope_theta form
    old = dict(mg.PLAIN)
    del old["rope_parameters"]
    old["rope_theta"] = 10000
    close(ref.rope_inv_freq(ref.Config(old))[0], ref.rope_inv_freq(ref.Config(mg.PLAIN))[0], "rope_parameters == rope_theta form")


def check_rope_relative_and_complex():
    torch.manual_seed(0)
    for interleave in (True, False):
        cfg = ref.Config(dict(mg.TINY, rope_interleave=interleave))
        S = 40
        cos, sin = ref.rope_cos_sin(cfg, range(S))
        q = torch.randn(8, dtype=torch.float64)
        k = torch.randn(8, dtype=torch.float64)
        Q = ref.apply_rope(q.expand(S, 8), cos, sin, interleave)
        K = ref.apply_rope(k.expand(S, 8), cos, sin, interleave)
        sc = Q @ K.t()  # sc[m, n] = score of query at m with key at n
        for delta in (0, 3, 7):
            diag = torch.diagonal(sc, offset=-delta)
            close(diag, diag[0].expand_as(diag), f"rope interleave={interleave}: score depends only on m-n (delta {delta})")
    # interleaved == rotation of adjacent pairs as complex numbers (DeepSeek's formulation)
    cfg = ref.Config(mg.TINY)
    inv, att = ref.rope_inv_freq(cfg)
    S = 12
    cos, sin = ref.rope_cos_sin(cfg, range(S))
    x = torch.randn(3, S, 8, dtype=torch.float64)
    y = torch.randn(3, S, 8, dtype=torch.float64)
    rot = torch.polar(torch.full((S, 4), att, dtype=torch.float64), torch.arange(S, dtype=torch.float64)[:, None] * inv[None])

    def cplx(t):
        return torch.view_as_real(torch.view_as_complex(t.reshape(3, S, 4, 2).contiguous()) * rot).reshape(3, S, 8)

    xr, yr = cplx(x), cplx(y)
    a = ref.apply_rope(x, cos, sin, True)
    b = ref.apply_rope(y, cos, sin, True)
    close(a @ b.transpose(-1, -2), xr @ yr.transpose(-1, -2), "interleaved rope q.k == complex pair rotation q.k")
    # and the regrouped layout is evens-then-odds of the complex result
    close(a, torch.cat([xr[..., 0::2], xr[..., 1::2]], -1), "interleaved rope output layout (evens then odds)")


def naive_route(cfg, s_row, bias):
    E, G, k = cfg.n_routed_experts, cfg.n_group, cfg.num_experts_per_tok
    n = E // G
    biased = [s_row[e] + bias[e] for e in range(E)]
    gscore = []
    for gi in range(G):
        members = sorted(biased[gi * n : (gi + 1) * n], reverse=True)
        gscore.append(sum(members[:2]))
    kept = sorted(range(G), key=lambda gi: -gscore[gi])[: cfg.topk_group]
    cand = [e for e in range(E) if e // n in kept]
    chosen = sorted(cand, key=lambda e: -biased[e])[:k]
    w = [s_row[e] for e in chosen]
    if cfg.norm_topk_prob:
        tot = sum(w) + 1e-20
        w = [x / tot for x in w]
    return chosen, [x * cfg.routed_scaling_factor for x in w]


def check_moe_naive():
    for name, conf, seed, biases in (
        ("tiny", mg.TINY, 20250301, mg.TINY_BIAS),
        ("plain", mg.PLAIN, 20250302, {0: [0.2] * 8, 1: [-0.3, 0.1, 0.0, 0.2, -0.1, 0.3, 0.0, -0.2]}),
    ):
        cfg = ref.Config(conf)
        p = ref.to_f64(mg.model_weights(cfg, seed, biases))
        li = cfg.first_k_dense_replace
        pre = f"model.layers.{li}.mlp."
        torch.manual_seed(1)
        x = torch.randn(2, 12, cfg.hidden_size, dtype=torch.float64)
        y, idx, w = ref.moe(cfg, p, pre, x)
        x2 = x.reshape(-1, cfg.hidden_size)
        s = torch.sigmoid(x2 @ p[pre + "gate.weight"].t())
        bias = p[pre + "gate.e_score_correction_bias"].tolist()
        rows = []
        for t in range(x2.shape[0]):
            chosen, ws = naive_route(cfg, s[t].tolist(), bias)
            assert sorted(chosen) == sorted(idx[t].tolist()), (t, chosen, idx[t])
            acc = torch.zeros(cfg.hidden_size, dtype=torch.float64)
            for e, we in zip(chosen, ws):
                acc = acc + we * ref.swiglu_mlp(p, f"{pre}experts.{e}.", x2[t : t + 1])[0]
            acc = acc + ref.swiglu_mlp(p, pre + "shared_experts.", x2[t : t + 1])[0]
            rows.append(acc)
        close(y.reshape(-1, cfg.hidden_size), torch.stack(rows), f"{name}: MoE == per-token loop with list-based routing")


def check_mla_absorbed():
    """Weight-absorbed MLA (attention in the kv latent space) == the expanded form."""
    for name, conf in (("tiny", mg.TINY), ("plain", mg.PLAIN)):
        cfg = ref.Config(conf)
        p = ref.to_f64(mg.model_weights(cfg, 5, {i: [0.0] * 8 for i in range(4)}))
        a = "model.layers.0.self_attn."
        torch.manual_seed(2)
        B, S = 2, 9
        x = torch.randn(B, S, cfg.hidden_size, dtype=torch.float64)
        cos, sin = ref.rope_cos_sin(cfg, range(S))
        want = ref.mla_attention(cfg, p, a, x, cos, sin)

        nh, dn, dr, dv, r = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        eps = cfg.rms_norm_eps
        if cfg.q_lora_rank is None:
            q = x @ p[a + "q_proj.weight"].t()
        else:
            q = ref.rms_norm(x @ p[a + "q_a_proj.weight"].t(), p[a + "q_a_layernorm.weight"], eps) @ p[a + "q_b_proj.weight"].t()
        q = q.view(B, S, nh, dn + dr)
        ckv = x @ p[a + "kv_a_proj_with_mqa.weight"].t()
        c = ref.rms_norm(ckv[..., :r], p[a + "kv_a_layernorm.weight"], eps)  # [B,S,r]
        kpe = ref.apply_rope(ckv[..., r:], cos, sin, cfg.rope_interleave)  # [B,S,dr]
        wkv = p[a + "kv_b_proj.weight"].view(nh, dn + dv, r)
        w_uk, w_uv = wkv[:, :dn], wkv[:, dn:]
        out = torch.zeros(B, S, nh, dv, dtype=torch.float64)
        scale = ref.softmax_scale(cfg)
        for h in range(nh):
            qn = q[:, :, h, :dn] @ w_uk[h]  # absorbed into latent space [B,S,r]
            qp = ref.apply_rope(q[:, :, h, dn:], cos, sin, cfg.rope_interleave)
            sc = (qn @ c.transpose(1, 2) + qp @ kpe.transpose(1, 2)) * scale
            for i in range(S):
                pr = torch.softmax(sc[:, i, : i + 1], dim=-1)  # causal: keys 0..i
                out[:, i, h] = (pr[:, :, None] * c[:, : i + 1]).sum(1) @ w_uv[h].t()
        got = out.reshape(B, S, nh * dv) @ p[a + "o_proj.weight"].t()
        close(want, got, f"{name}: MLA expanded == weight-absorbed per-head loop")


def check_causality_and_mtp():
    cfg, p = tiny()
    ids = torch.from_numpy(np.random.default_rng(3).integers(0, 512, size=(1, 12)))
    o = ref.forward(cfg, p, ids)
    m = ref.mtp_forward(cfg, p, ids, o["hidden"])[0]["logits"]
    j = 7
    ids2 = ids.clone()
    ids2[0, j] = (ids2[0, j] + 1) % 512
    o2 = ref.forward(cfg, p, ids2)
    m2 = ref.mtp_forward(cfg, p, ids2, o2["hidden"])[0]["logits"]
    close(o["logits"][:, :j], o2["logits"][:, :j], "main logits before a changed token are unchanged")
    assert float((o["logits"][:, j:] - o2["logits"][:, j:]).abs().max()) > 1e-3
    # MTP position i reads h_i (tokens <= i) and t_{i+1}: positions < j-1 are unaffected
    close(m[:, : j - 1], m2[:, : j - 1], "MTP logits at i < j-1 unaffected by token j")
    assert float((m[:, j - 1] - m2[:, j - 1]).abs().max()) > 1e-3
    # MTP on a prefix equals the MTP of the full sequence restricted to it
    o3 = ref.forward(cfg, p, ids[:, :8])
    m3 = ref.mtp_forward(cfg, p, ids[:, :8], o3["hidden"])[0]["logits"]
    close(m3, m[:, :7], "MTP on a prefix == prefix of MTP")
    # explicit per-position MTP with the concat order [enorm(emb(t_{i+1})); hnorm(h_i)]
    L = cfg.num_hidden_layers
    pre = f"model.layers.{L}."
    e = ref.rms_norm(p[pre + "embed_tokens.weight"][ids[0, 1:]], p[pre + "enorm.weight"], cfg.rms_norm_eps)
    h = ref.rms_norm(o["hidden"][0, :11], p[pre + "hnorm.weight"], cfg.rms_norm_eps)
    W = p[pre + "eh_proj.weight"]
    x = e @ W[:, :64].t() + h @ W[:, 64:].t()
    cos, sin = ref.rope_cos_sin(cfg, range(11))
    y, _ = ref.decoder_layer(cfg, p, L, x[None], cos, sin)
    lg = ref.rms_norm(y, p[pre + "shared_head.norm.weight"], cfg.rms_norm_eps) @ p[pre + "shared_head.head.weight"].t()
    close(lg, m, "MTP == eh_proj split as [emb | hidden] columns")
    # shifting all MTP positions by +1 (token positions, as Megatron/vLLM do) changes nothing
    cos1, sin1 = ref.rope_cos_sin(cfg, range(1, 12))
    y1, _ = ref.decoder_layer(cfg, p, L, x[None], cos1, sin1)
    close(y1, y, "MTP positions i vs i+1 give the same result")


def check_goldens():
    g = ref.load_safetensors(os.path.join(mg.GOLDENS, "hf-tiny-expected.safetensors"))
    cfg = ref.Config.from_json(os.path.join(mg.GOLDENS, "hf-tiny", "config.json"))
    p = ref.to_f64(ref.load_safetensors(os.path.join(mg.GOLDENS, "hf-tiny", "model.safetensors")))
    o = ref.forward(cfg, p, g["input_ids"])
    close(o["logits"], g["logits"], "hf-tiny logits reload", 0.0)
    cont = g["greedy_continuation"]
    first = ref.forward(cfg, p, g["greedy_prompt"])["logits"][0, -1].argmax()
    assert int(first) == int(cont[0, 0])
    print("ok  greedy first token == argmax of prompt logits; continuation:", cont.tolist())
    gp = ref.load_safetensors(os.path.join(mg.GOLDENS, "hf-tiny-plain-expected.safetensors"))
    cp = ref.Config.from_json(os.path.join(mg.GOLDENS, "hf-tiny-plain", "config.json"))
    pp = ref.to_f64(ref.load_safetensors(os.path.join(mg.GOLDENS, "hf-tiny-plain", "model.safetensors")))
    close(ref.forward(cp, pp, gp["input_ids"])["logits"], gp["logits"], "hf-tiny-plain logits reload", 0.0)
    # float32 weights, float32 compute: how far a float32 implementation is expected to land
    p32 = {k: v.to(torch.float32) for k, v in p.items()}
    old = ref.DTYPE
    ref.DTYPE = torch.float32
    try:
        l32 = ref.forward(cfg, p32, g["input_ids"])["logits"].double()
    finally:
        ref.DTYPE = old
    print(f"info float32 forward vs float64 golden: max |diff| {float((l32 - g['logits']).abs().max()):.2e}")


if __name__ == "__main__":
    check_yarn_constants()
    check_rope_relative_and_complex()
    check_moe_naive()
    check_mla_absorbed()
    check_causality_and_mtp()
    check_goldens()
    print("all self-checks passed")
