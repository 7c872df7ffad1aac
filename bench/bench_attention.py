"""Fused prefill attention (janus_rt.kernels.flash_attention) vs torch SDPA (flash backend) and the reference.

Shapes: the LLM's causal attention at head_dim 128 (B=4, H=16, T=1024 / 4096; forward, and forward + backward for
training), SigLIP's bidirectional attention at head_dim 64 (B=8, H=16, T=576), the VQ decoder's single-head
512-wide attention over 24x24 latents, and a packed (varlen) training batch. Reports ms, TFLOP/s and the fraction
of the measured bf16 matmul peak. FLOPs: forward 4·B·H·Tq·Tk·D (halved when causal), backward 2.5x forward.

Run: python bench/bench_attention.py. Prints a markdown table; main() returns the rows.
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_name, peak_tflops, print_table, require_cuda  # noqa: E402

from janus_rt import kernels as K  # noqa: E402
from janus_rt.kernels.attention import flash_attention_ref  # noqa: E402

# (name, B, T, H, D, causal, with backward)
CASES = [
    ("llm prefill", 4, 1024, 16, 128, True, True),
    ("llm prefill", 4, 4096, 16, 128, True, True),
    ("siglip", 8, 576, 16, 64, False, True),
    ("vq decoder attn", 1, 576, 1, 512, False, False),
]


def _sdpa(q, k, v, causal):
    # torch wants [B, H, T, D]; the flash backend takes D <= 256, larger falls back to torch's choice
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    backends = [torch.nn.attention.SDPBackend.FLASH_ATTENTION] if q.shape[-1] <= 256 else \
        [torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION, torch.nn.attention.SDPBackend.MATH]
    with torch.nn.attention.sdpa_kernel(backends):
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)


def _time_fwd_bwd(fn, q, k, v):
    from triton.testing import do_bench

    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    o = fn(q, k, v)
    do = torch.randn_like(o)
    fwd = do_bench(lambda: fn(q, k, v))
    total = do_bench(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do))
    return fwd, total - fwd


def main() -> list[dict]:
    if not require_cuda("bench_attention"):
        return []
    from triton.testing import do_bench

    peak = peak_tflops(torch.bfloat16)
    rows = []
    for name, b, t, h, d, causal, backward in CASES:
        q, k, v = (torch.randn(b, t, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = 4 * b * h * t * t * d * (0.5 if causal else 1.0)
        err = (K.flash_attention(q, k, v, causal).float() - _sdpa(q, k, v, causal).float()).abs().max().item()
        impls = [("triton", lambda q, k, v: K.flash_attention(q, k, v, causal)),
                 ("torch sdpa", lambda q, k, v: _sdpa(q, k, v, causal))]
        if b * h * t * t * 4 <= 2 ** 32:  # the reference materialises [B, H, T, T] fp32 scores
            impls.append(("ref", lambda q, k, v: flash_attention_ref(q, k, v, causal)))
        for impl, fn in impls:
            if backward and impl != "ref":
                fwd_ms, bwd_ms = _time_fwd_bwd(fn, q, k, v)
            else:
                fwd_ms, bwd_ms = do_bench(lambda: fn(q, k, v)), float("nan")
            rows.append({
                "case": f"{name} B{b} T{t} H{h} D{d}{' causal' if causal else ''}", "impl": impl,
                "fwd ms": fwd_ms, "fwd TFLOP/s": flops / fwd_ms / 1e9, "fwd % peak": 100 * flops / fwd_ms / 1e9 / peak,
                "bwd ms": bwd_ms, "bwd TFLOP/s": 2.5 * flops / bwd_ms / 1e9,
                "max |triton - sdpa|": err,
            })
    # packed training batch: 8 documents of mixed lengths, 8192 tokens, H=16, D=128, causal
    lens = torch.tensor([2048, 512, 1536, 1024, 256, 768, 1280, 768])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).to("cuda", torch.int32)
    total, max_len = int(lens.sum()), int(lens.max())
    q, k, v = (torch.randn(total, 16, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flops = sum(4 * 16 * int(n) ** 2 * 128 * 0.5 for n in lens)
    fwd_ms, bwd_ms = _time_fwd_bwd(lambda q, k, v: K.flash_attention_varlen(q, k, v, cu, max_len, True), q, k, v)
    rows.append({"case": f"varlen 8 docs {total} tok H16 D128 causal", "impl": "triton", "fwd ms": fwd_ms,
                 "fwd TFLOP/s": flops / fwd_ms / 1e9, "fwd % peak": 100 * flops / fwd_ms / 1e9 / peak,
                 "bwd ms": bwd_ms, "bwd TFLOP/s": 2.5 * flops / bwd_ms / 1e9, "max |triton - sdpa|": float("nan")})
    print(f"# flash_attention on {device_name()} (bf16 matmul peak {peak:.0f} TFLOP/s)")
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
