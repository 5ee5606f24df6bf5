#!/usr/bin/env python3
"""PyTorch eager training step of the same DeepSeek-V3-architecture model our trainer runs: the yardstick of the GPU
speed goal (docs/benchmarks.md). Written the way a PyTorch user would (HF's eager modelling, a per-expert loop over
tokens sorted by expert, scaled_dot_product_attention, autocast bf16 over fp32 weights, fused AdamW), not tuned for
this comparison. Prints one Markdown table row per mode; --compile adds torch.compile beside eager.

  python3 bench/torch/deepseek_step.py --preset v2-lite-80gb --seq-len 4096 --batch 4 --steps 10 --compile
"""
import argparse, json, math, sys, time

import torch
import torch.nn as nn
import torch.nn.functional as F

# Shapes of the presets in Training/Model/DeepSeekConfig.cs (names as there). MTP layers are left out on both sides of
# the comparison (v2-lite-80gb has none; run our side with the same preset).
PRESETS = {
    "small": dict(vocab=8192, hidden=512, inter=1536, moe_inter=384, layers=6, heads=8, shared=1, experts=16, topk=4,
                  n_group=4, topk_group=2, scaling=2.5, kv_rank=128, q_rank=256, nope=64, rope=32, v=64, dense=1),
    "v2-lite-80gb": dict(vocab=102400, hidden=2048, inter=10944, moe_inter=1408, layers=3, heads=16, shared=2,
                         experts=64, topk=6, n_group=1, topk_group=1, scaling=1.0, kv_rank=512, q_rank=None, nope=128,
                         rope=64, v=128, dense=1),
}


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        dt = x.dtype
        x = x.float()
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dt)


class Mlp(nn.Module):
    def __init__(self, d, i):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(d, i, bias=False), nn.Linear(d, i, bias=False), nn.Linear(i, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Mla(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, h = c["hidden"], c["heads"]
        self.h, self.nope, self.rope, self.v, self.kv_rank = h, c["nope"], c["rope"], c["v"], c["kv_rank"]
        qk = self.nope + self.rope
        if c["q_rank"]:
            self.q = nn.Sequential(nn.Linear(d, c["q_rank"], bias=False), RMSNorm(c["q_rank"]), nn.Linear(c["q_rank"], h * qk, bias=False))
        else:
            self.q = nn.Linear(d, h * qk, bias=False)
        self.kv_a = nn.Linear(d, self.kv_rank + self.rope, bias=False)
        self.kv_norm = RMSNorm(self.kv_rank)
        self.kv_b = nn.Linear(self.kv_rank, h * (self.nope + self.v), bias=False)
        self.o = nn.Linear(h * self.v, d, bias=False)
        self.scale = qk ** -0.5

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.h, -1).transpose(1, 2)
        q_nope, q_rope = q.split([self.nope, self.rope], -1)
        latent, k_rope = self.kv_a(x).split([self.kv_rank, self.rope], -1)
        kv = self.kv_b(self.kv_norm(latent)).view(B, T, self.h, -1).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v], -1)
        k_rope = rope(k_rope.view(B, 1, T, self.rope), cos, sin).expand(B, self.h, T, self.rope)
        q = torch.cat([q_nope, rope(q_rope, cos, sin)], -1)
        k = torch.cat([k_nope, k_rope], -1)
        if hasattr(F, "scaled_dot_product_attention"):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:  # PyTorch < 2.0 (Debian's python3-torch): the same attention written out
            s = (q @ k.transpose(-1, -2)) * self.scale
            s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
            out = s.float().softmax(-1).to(v.dtype) @ v
        return self.o(out.transpose(1, 2).reshape(B, T, -1))


class Moe(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.gate = nn.Linear(c["hidden"], c["experts"], bias=False)
        self.register_buffer("bias", torch.zeros(c["experts"]))
        self.experts = nn.ModuleList(Mlp(c["hidden"], c["moe_inter"]) for _ in range(c["experts"]))
        self.shared = Mlp(c["hidden"], c["moe_inter"] * c["shared"])

    def forward(self, x):
        c, shape = self.c, x.shape
        x = x.reshape(-1, shape[-1])
        scores = torch.sigmoid(self.gate(x).float())
        biased = scores + self.bias
        E, G = c["experts"], c["n_group"]
        group = biased.view(-1, G, E // G).topk(min(2, E // G), -1).values.sum(-1)
        keep = torch.zeros_like(group, dtype=torch.bool).scatter_(1, group.topk(c["topk_group"], -1).indices, True)
        biased = biased.masked_fill(~keep.repeat_interleave(E // G, 1), float("-inf"))
        idx = biased.topk(c["topk"], -1).indices
        w = scores.gather(1, idx)
        w = (w / w.sum(-1, keepdim=True) * c["scaling"]).to(x.dtype)
        flat = idx.view(-1)
        order = flat.argsort(stable=True)
        tokens = order // c["topk"]
        counts = flat.bincount(minlength=E).tolist()
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n:
                t = tokens[start:start + n]
                out.index_add_(0, t, self.experts[e](x[t]) * w.view(-1)[order[start:start + n], None])
            start += n
        return (out + self.shared(x)).view(shape)


class Layer(nn.Module):
    def __init__(self, c, dense):
        super().__init__()
        self.n1, self.attn, self.n2 = RMSNorm(c["hidden"]), Mla(c), RMSNorm(c["hidden"])
        self.mlp = Mlp(c["hidden"], c["inter"]) if dense else Moe(c)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.n1(x), cos, sin)
        return x + self.mlp(self.n2(x))


class Model(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed = nn.Embedding(c["vocab"], c["hidden"])
        self.layers = nn.ModuleList(Layer(c, i < c["dense"]) for i in range(c["layers"]))
        self.norm, self.head = RMSNorm(c["hidden"]), nn.Linear(c["hidden"], c["vocab"], bias=False)
        self.rope = c["rope"]

    def forward(self, ids):
        T = ids.shape[1]
        inv = 1.0 / (10000 ** (torch.arange(0, self.rope, 2, device=ids.device).float() / self.rope))
        f = torch.outer(torch.arange(T, device=ids.device).float(), inv)
        emb = torch.cat([f, f], -1)
        cos, sin = emb.cos(), emb.sin()
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.head(self.norm(x))


def flops_per_token(c, seq):
    """DeepSeekConfig.TrainingFlopsPerToken without MTP: 6 x active matmul parameters + the causal attention term."""
    d, h, qk = c["hidden"], c["heads"], c["nope"] + c["rope"]
    q = d * c["q_rank"] + c["q_rank"] * h * qk if c["q_rank"] else d * h * qk
    attn = q + d * (c["kv_rank"] + c["rope"]) + c["kv_rank"] * h * (c["nope"] + c["v"]) + h * c["v"] * d
    mlp = lambda i: 3 * d * i
    active = c["vocab"] * d  # the head; the embedding lookup is no matmul
    for i in range(c["layers"]):
        active += attn + (mlp(c["inter"]) if i < c["dense"] else c["topk"] * mlp(c["moe_inter"]) + mlp(c["moe_inter"] * c["shared"]) + c["experts"] * d)
    return 6.0 * active + 6.0 * c["layers"] * h * (qk + c["v"]) * seq / 2.0


def run(model, step, ids, warmup, steps, device):
    for _ in range(warmup):
        step(ids)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step(ids)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps, float(loss)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--peak-tflops", type=float, default=0, help="the peak MFU is taken against (0: no MFU column)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the same step")
    a = ap.parse_args()
    c = PRESETS[a.preset]
    torch.manual_seed(1)
    model = Model(c).to(a.device)
    fused = a.device == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, **({"fused": True} if fused else {}))
    ids = torch.randint(0, c["vocab"], (a.batch, a.seq_len + 1), device=a.device)
    dtype = torch.bfloat16  # autocast is off for fp32

    def step(ids, forward=model):
        with torch.autocast(a.device, dtype=dtype, enabled=a.precision == "bf16"):
            logits = forward(ids[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, c["vocab"]), ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    modes = [("eager", step)]
    if a.compile:
        compiled = torch.compile(model)
        modes.append(("torch.compile", lambda ids: step(ids, compiled)))
    fpt = flops_per_token(c, a.seq_len)
    print(f"<!-- torch {torch.__version__}, device {torch.cuda.get_device_name() if a.device == 'cuda' else 'cpu'}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e9:.3f} B parameters, {fpt / 1e9:.2f} GFLOP a token -->")
    print("| runtime | preset | precision | seq x batch | tokens/s | MFU | step s | loss |")
    print("|---|---|---|---|---|---|---|---|")
    for name, fn in modes:
        seconds, loss = run(model, fn, ids, a.warmup, a.steps, a.device)
        tps = a.batch * a.seq_len / seconds
        mfu = f"{min(1.0, tps * fpt / (a.peak_tflops * 1e12)) * 100:.1f}%" if a.peak_tflops > 0 else "n/a"
        print(f"| PyTorch {name} | {a.preset} | {a.precision} | {a.seq_len} x {a.batch} | {tps:.0f} | {mfu} | {seconds:.3f} | {loss:.3f} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
