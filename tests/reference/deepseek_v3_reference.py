"""Independent float64 reference of the DeepSeek-V3 forward pass.

Written from the formulas of Hugging Face transformers' DeepseekV3ForCausalLM
(models/deepseek_v3/modeling_deepseek_v3.py, modeling_rope_utils.py,
configuration_deepseek_v3.py), the DeepSeek-V3 technical report
(arXiv:2412.19437) and the public MTP implementations that load the official
checkpoint. It is deliberately plain: every function is a direct statement of
one formula, and everything runs in float64 on the CPU.

Two intentional choices that differ from, or go beyond, HF:

* Group-limited routing masks the experts of the non-selected groups with
  -inf before the final top-k (DeepSeek's own code). HF fills them with 0.0,
  which lets a masked expert win whenever fewer than top_k experts in the kept
  groups have a positive bias-corrected score. ``group_mask_value`` lets a test
  compute the HF variant for comparison.

* Multi-token prediction (HF has none; it drops ``model.layers.{L}.*``).
  Module k (1-based) at sequence index i combines the main model's
  representation of token i with the embedding of token i+k:

      h'_i = eh_proj( concat( enorm(Emb(t_{i+k})), hnorm(h^{k-1}_i) ) )

  i.e. the EMBEDDING half comes first in the concatenation. The paper writes
  the pair the other way round ([RMSNorm(h); RMSNorm(Emb)]), but every public
  implementation that consumes the official eh_proj weights concatenates
  embedding first: Megatron-LM (MultiTokenPredictionLayer._concat_embeddings:
  torch.cat((decoder_input, hidden_states), -1)) and vLLM
  (deepseek_mtp.py: torch.cat([inputs_embeds, previous_hidden_states])). The
  column order of eh_proj.weight is therefore [emb | hidden].
  h^0 is the main model's final hidden state AFTER model.norm (the tensor that
  feeds lm_head), as in Megatron (decoder block ends with final_layernorm) and
  vLLM/SGLang (target hidden states are post-norm). h'_i passes through the
  MTP decoder layer (same structure as a main layer, MoE when its index >=
  first_k_dense_replace), then shared_head.norm and shared_head.head give the
  logits for t_{i+k+1}. h^k (input to module k+1) is taken after
  shared_head.norm, as in Megatron; with num_nextn_predict_layers = 1 this
  last choice does not affect any golden.
  The MTP sequence for module k has length S-k (indices 0..S-k-1); RoPE uses
  positions 0..S-k-1. Using the token's own position (i+k, as Megatron/vLLM do)
  gives identical results because RoPE attention scores depend only on
  position differences.
"""

import json
import math
import struct

import torch

DTYPE = torch.float64

# --------------------------------------------------------------------------
# safetensors I/O (own implementation of the documented format)
# --------------------------------------------------------------------------

_ST_DTYPES = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
}
_ST_NAMES = {v[0]: k for k, v in _ST_DTYPES.items()}


def save_safetensors(path, tensors, metadata=None):
    """Write tensors (name -> torch.Tensor) in safetensors layout.

    Names are sorted; data follow the header in the same order; the header is
    padded with spaces so the data start on an 8-byte boundary. The output is
    a pure function of the input (byte-identical on re-run).
    """
    header = {}
    if metadata is not None:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        dt = _ST_NAMES[t.dtype]
        raw = t.numpy().astype(t.numpy().dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": dt, "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    hjson = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    pad = (8 - (len(hjson) % 8)) % 8
    hjson += b" " * pad
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for b in blobs:
            f.write(b)


def load_safetensors(path):
    import numpy as np

    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n].decode("utf-8"))
    base = 8 + n
    out = {}
    np_types = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4"}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        arr = np.frombuffer(data[base + a : base + b], dtype=np_types[info["dtype"]]).reshape(info["shape"])
        out[name] = torch.from_numpy(arr.copy())
    return out


# --------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------


class Config:
    """The subset of DeepseekV3Config the forward pass reads.

    Accepts both RoPE spellings: the classic ``rope_theta`` + ``rope_scaling``
    keys and the newer ``rope_parameters`` dict (which carries rope_theta and,
    for YaRN, the scaling keys).
    """

    def __init__(self, d):
        self.raw = dict(d)
        self.vocab_size = d["vocab_size"]
        self.hidden_size = d["hidden_size"]
        self.intermediate_size = d["intermediate_size"]
        self.moe_intermediate_size = d["moe_intermediate_size"]
        self.num_hidden_layers = d["num_hidden_layers"]
        self.num_attention_heads = d["num_attention_heads"]
        self.num_key_value_heads = d.get("num_key_value_heads", d["num_attention_heads"])
        self.n_shared_experts = d.get("n_shared_experts", 1)
        self.n_routed_experts = d["n_routed_experts"]
        self.num_experts_per_tok = d["num_experts_per_tok"]
        self.n_group = d.get("n_group", 1)
        self.topk_group = d.get("topk_group", 1)
        self.routed_scaling_factor = float(d.get("routed_scaling_factor", 1.0))
        self.norm_topk_prob = bool(d.get("norm_topk_prob", True))
        self.kv_lora_rank = d["kv_lora_rank"]
        self.q_lora_rank = d.get("q_lora_rank")
        self.qk_nope_head_dim = d["qk_nope_head_dim"]
        self.qk_rope_head_dim = d["qk_rope_head_dim"]
        self.v_head_dim = d["v_head_dim"]
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        self.first_k_dense_replace = d.get("first_k_dense_replace", 0)
        self.rms_norm_eps = float(d.get("rms_norm_eps", 1e-6))
        self.max_position_embeddings = d.get("max_position_embeddings", 4096)
        self.rope_interleave = bool(d.get("rope_interleave", True))
        self.num_nextn_predict_layers = d.get("num_nextn_predict_layers", 0) or 0
        self.hidden_act = d.get("hidden_act", "silu")
        assert self.hidden_act == "silu"
        assert not d.get("attention_bias", False)
        assert self.num_key_value_heads == self.num_attention_heads

        # RoPE parameters, normalised to one dict: {rope_type, rope_theta, ...}
        if d.get("rope_parameters") is not None:
            rp = dict(d["rope_parameters"])
        else:
            rp = dict(d.get("rope_scaling") or {})
            rp.setdefault("rope_theta", d.get("rope_theta", 10000.0))
        rp["rope_type"] = rp.get("rope_type", rp.get("type", "default"))
        self.rope = rp

    @staticmethod
    def from_json(path):
        with open(path) as f:
            return Config(json.load(f))


# --------------------------------------------------------------------------
# RoPE
# --------------------------------------------------------------------------


def yarn_mscale(scale, m):
    """0.1 * m * ln(scale) + 1 for scale > 1, else 1."""
    if scale <= 1:
        return 1.0
    return 0.1 * m * math.log(scale) + 1.0


def rope_inv_freq(cfg):
    """Return (inv_freq [d/2] float64, attention_factor) for the rotary dims.

    The rotary width is qk_rope_head_dim (HF sets config.head_dim to it).
    default: inv_freq_j = theta^(-2j/d).
    yarn:    blend of the extrapolated (theta^(-2j/d)) and interpolated
             (theta^(-2j/d) / factor) frequencies, weight of the extrapolated
             one = 1 - clamp((j - low) / (high - low), 0, 1), where low/high
             are the (floored/ceiled, clamped to [0, d-1]) dimensions at which
             the wavelength makes beta_fast / beta_slow turns over the original
             context length.
             attention_factor = mscale(f, mscale) / mscale(f, mscale_all_dim)
             when both are given, else mscale(f, 1).
    """
    d = cfg.qk_rope_head_dim
    rp = cfg.rope
    theta = float(rp["rope_theta"])
    j2 = torch.arange(0, d, 2, dtype=DTYPE)  # 0, 2, 4, ...
    base_freq = 1.0 / (theta ** (j2 / d))
    kind = rp["rope_type"]
    if kind == "default":
        return base_freq, 1.0
    if kind != "yarn":
        raise NotImplementedError(kind)

    orig = rp.get("original_max_position_embeddings")
    factor = rp.get("factor")
    if factor is None:
        factor = cfg.max_position_embeddings / orig
    factor = float(factor)
    if orig is None:
        orig = cfg.max_position_embeddings
    beta_fast = rp.get("beta_fast") or 32
    beta_slow = rp.get("beta_slow") or 1
    truncate = rp.get("truncate", True)

    def dim_for_rotations(n_rot):
        # the rotary dim index whose wavelength completes n_rot turns in `orig` positions
        return (d * math.log(orig / (n_rot * 2 * math.pi))) / (2 * math.log(theta))

    low = dim_for_rotations(beta_fast)
    high = dim_for_rotations(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=DTYPE) - low) / (high - low)).clamp(0.0, 1.0)
    keep_extrapolated = 1.0 - ramp
    inv_freq = (base_freq / factor) * (1.0 - keep_extrapolated) + base_freq * keep_extrapolated

    att = rp.get("attention_factor")
    if att is None:
        m, m_all = rp.get("mscale"), rp.get("mscale_all_dim")
        if m and m_all:
            att = yarn_mscale(factor, m) / yarn_mscale(factor, m_all)
        else:
            att = yarn_mscale(factor, 1.0)
    return inv_freq, float(att)


def rope_cos_sin(cfg, positions):
    """cos/sin tables [len(positions), d]: angle table repeated twice along the last dim, times attention_factor."""
    inv_freq, att = rope_inv_freq(cfg)
    pos = torch.as_tensor(positions, dtype=DTYPE)
    ang = pos[:, None] * inv_freq[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return torch.cos(ang) * att, torch.sin(ang) * att


def softmax_scale(cfg):
    """qk_head_dim^-1/2, times mscale(factor, mscale_all_dim)^2 when YaRN gives mscale_all_dim."""
    s = cfg.qk_head_dim ** -0.5
    rp = cfg.rope
    if rp["rope_type"] != "default" and rp.get("mscale_all_dim"):
        factor = rp.get("factor")
        if factor is None:
            factor = cfg.max_position_embeddings / rp["original_max_position_embeddings"]
        m = yarn_mscale(float(factor), rp["mscale_all_dim"])
        s = s * m * m
    return s


def _half_swap(x):
    """(a, b) -> (-b, a) on the two halves of the last dim."""
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def apply_rope(x, cos, sin, interleave):
    """x: [..., S, d]; cos/sin: [S, d].

    interleave=True: the rotary pairs of the input are adjacent (x0,x1),(x2,x3)...
    (DeepSeek's checkpoint layout). They are first regrouped to
    (x0,x2,x4,...,x1,x3,...) -- evens then odds -- and then rotated with the
    half-split formula. The result stays in the regrouped order, exactly as HF
    does; q and k get the same regrouping, so q.k is the same as rotating the
    adjacent pairs in place (the complex-number formulation).
    """
    if interleave:
        x = torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)
    return x * cos + _half_swap(x) * sin


# --------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------


def rms_norm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps))


def linear(x, w):
    return x @ w.t()


def swiglu_mlp(p, prefix, x):
    g = linear(x, p[prefix + "gate_proj.weight"])
    u = linear(x, p[prefix + "up_proj.weight"])
    return linear(torch.nn.functional.silu(g) * u, p[prefix + "down_proj.weight"])


def mla_attention(cfg, p, prefix, x, cos, sin):
    """Multi-head latent attention, causal. x: [B, S, H]."""
    B, S, _ = x.shape
    nh = cfg.num_attention_heads
    dn, dr, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    eps = cfg.rms_norm_eps

    if cfg.q_lora_rank is None:
        q = linear(x, p[prefix + "q_proj.weight"])
    else:
        cq = rms_norm(linear(x, p[prefix + "q_a_proj.weight"]), p[prefix + "q_a_layernorm.weight"], eps)
        q = linear(cq, p[prefix + "q_b_proj.weight"])
    q = q.view(B, S, nh, dn + dr).transpose(1, 2)  # [B, nh, S, dn+dr]
    q_nope, q_pe = q[..., :dn], q[..., dn:]

    ckv = linear(x, p[prefix + "kv_a_proj_with_mqa.weight"])  # [B, S, r + dr]
    c, k_pe = ckv[..., : cfg.kv_lora_rank], ckv[..., cfg.kv_lora_rank :]
    kv = linear(rms_norm(c, p[prefix + "kv_a_layernorm.weight"], eps), p[prefix + "kv_b_proj.weight"])
    kv = kv.view(B, S, nh, dn + dv).transpose(1, 2)  # [B, nh, S, dn+dv]
    k_nope, v = kv[..., :dn], kv[..., dn:]
    k_pe = k_pe[:, None, :, :]  # one rotary key shared by all heads

    q_pe = apply_rope(q_pe, cos, sin, cfg.rope_interleave)
    k_pe = apply_rope(k_pe, cos, sin, cfg.rope_interleave).expand(B, nh, S, dr)

    qf = torch.cat([q_nope, q_pe], dim=-1)
    kf = torch.cat([k_nope, k_pe], dim=-1)
    scores = (qf @ kf.transpose(-1, -2)) * softmax_scale(cfg)
    future = torch.ones(S, S, dtype=torch.bool).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(B, S, nh * dv)
    return linear(out, p[prefix + "o_proj.weight"])


def route(cfg, p, prefix, x2d, group_mask_value=float("-inf")):
    """Sigmoid router with bias-corrected, group-limited top-k.

    Returns (topk_idx [T, k] int64, topk_w [T, k] float64), in the order the
    top-k produced them (descending biased score).
    """
    T = x2d.shape[0]
    E, G, k = cfg.n_routed_experts, cfg.n_group, cfg.num_experts_per_tok
    s = torch.sigmoid(linear(x2d, p[prefix + "gate.weight"]))  # unbiased affinities
    biased = s + p[prefix + "gate.e_score_correction_bias"][None, :]
    per_group = biased.view(T, G, E // G)
    group_score = per_group.topk(min(2, E // G), dim=-1).values.sum(dim=-1)  # [T, G]
    kept_groups = group_score.topk(cfg.topk_group, dim=-1).indices
    keep = torch.zeros(T, G, dtype=torch.bool)
    keep.scatter_(1, kept_groups, True)
    keep = keep[:, :, None].expand(T, G, E // G).reshape(T, E)
    choice = biased.masked_fill(~keep, group_mask_value)
    idx = choice.topk(k, dim=-1).indices
    w = s.gather(1, idx)
    if cfg.norm_topk_prob:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return idx, w * cfg.routed_scaling_factor


def moe(cfg, p, prefix, x, group_mask_value=float("-inf")):
    """Routed experts weighted by the router, plus the shared expert(s)."""
    shp = x.shape
    x2d = x.reshape(-1, shp[-1])
    idx, w = route(cfg, p, prefix, x2d, group_mask_value)
    y = torch.zeros_like(x2d)
    for e in range(cfg.n_routed_experts):
        tok, slot = torch.nonzero(idx == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        y.index_add_(0, tok, swiglu_mlp(p, f"{prefix}experts.{e}.", x2d[tok]) * w[tok, slot][:, None])
    y = y + swiglu_mlp(p, prefix + "shared_experts.", x2d)
    return y.view(shp), idx, w


def decoder_layer(cfg, p, li, x, cos, sin, group_mask_value=float("-inf")):
    """Pre-norm block: x + attn(norm(x)); then + mlp(norm(.)). Returns (out, routing or None)."""
    pre = f"model.layers.{li}."
    eps = cfg.rms_norm_eps
    h = x + mla_attention(cfg, p, pre + "self_attn.", rms_norm(x, p[pre + "input_layernorm.weight"], eps), cos, sin)
    z = rms_norm(h, p[pre + "post_attention_layernorm.weight"], eps)
    if li >= cfg.first_k_dense_replace:
        m, idx, w = moe(cfg, p, pre + "mlp.", z, group_mask_value)
        return h + m, (idx, w)
    return h + swiglu_mlp(p, pre + "mlp.", z), None


# --------------------------------------------------------------------------
# whole model
# --------------------------------------------------------------------------


def to_f64(params):
    return {k: v.to(DTYPE) for k, v in params.items()}


def forward(cfg, p, input_ids, group_mask_value=float("-inf")):
    """Main model. Returns dict with logits [B,S,V], hidden (post final norm),
    per-layer outputs and routing {layer: (idx, w)}."""
    B, S = input_ids.shape
    cos, sin = rope_cos_sin(cfg, range(S))
    x = p["model.embed_tokens.weight"][input_ids]
    layers, routing = [], {}
    for li in range(cfg.num_hidden_layers):
        x, r = decoder_layer(cfg, p, li, x, cos, sin, group_mask_value)
        layers.append(x)
        if r is not None:
            routing[li] = r
    h = rms_norm(x, p["model.norm.weight"], cfg.rms_norm_eps)
    return {"logits": linear(h, p["lm_head.weight"]), "hidden": h, "layers": layers, "routing": routing}


def mtp_forward(cfg, p, input_ids, h_main, group_mask_value=float("-inf")):
    """Multi-token prediction modules (see module docstring).

    h_main: main model hidden state after model.norm, [B, S, H].
    Returns a list over modules k = 1..D of dicts with logits [B, S-k, V]
    (position i predicts t_{i+k+1}) and routing of the module's MoE layer.
    """
    B, S = input_ids.shape
    eps = cfg.rms_norm_eps
    out = []
    h_prev = h_main
    for k in range(1, cfg.num_nextn_predict_layers + 1):
        li = cfg.num_hidden_layers + k - 1
        pre = f"model.layers.{li}."
        n = S - k
        emb = p[pre + "embed_tokens.weight"][input_ids[:, k : k + n]]
        hk = h_prev[:, :n]
        cat = torch.cat([rms_norm(emb, p[pre + "enorm.weight"], eps), rms_norm(hk, p[pre + "hnorm.weight"], eps)], dim=-1)
        x = linear(cat, p[pre + "eh_proj.weight"])
        cos, sin = rope_cos_sin(cfg, range(n))
        x, r = decoder_layer(cfg, p, li, x, cos, sin, group_mask_value)
        hn = rms_norm(x, p[pre + "shared_head.norm.weight"], eps)
        out.append({"logits": linear(hn, p[pre + "shared_head.head.weight"]), "routing": {li: r} if r else {}})
        h_prev = hn
    return out


def greedy(cfg, p, prompt, new_tokens):
    """Greedy decoding with full recomputation each step. prompt: [1, P] int64."""
    ids = prompt.clone()
    for _ in range(new_tokens):
        logits = forward(cfg, p, ids)["logits"]
        nxt = logits[:, -1].argmax(dim=-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids[:, prompt.shape[1] :]
