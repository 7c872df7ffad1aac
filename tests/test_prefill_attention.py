"""csrc's bf16 prefill attention (csrc/prefill_attention.cpp, cpu_ops.prefill_attention) against ops.attention_torch
in fp32 (the suite's rule: at most twice torch's own bf16 error), at odd shapes; and where ops.attention uses it."""
import pytest
import torch

from tolerances import assert_matches
from janus_rt import cpu_ops, ops

pytestmark = pytest.mark.skipif(not cpu_ops.prefill_attention_available(),
                                reason="no bf16 prefill attention in this build (AVX512_BF16)")


def _qkv(B, Tq, Tk, H, Hkv, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Tq, H, D, generator=g).bfloat16()
    k, v = (torch.randn(B, Tk, Hkv, D, generator=g).bfloat16() for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("B, Tq, Tk, H, Hkv, D, causal", [
    (1, 40, 40, 2, 2, 64, False),    # SigLIP-like, not a multiple of 16 tokens
    (1, 67, 67, 2, 2, 128, True),    # the LLM's prompt, causal
    (2, 37, 53, 4, 2, 32, True),     # GQA, Tq < Tk (bottom-right), two sequences
    (1, 5, 5, 2, 2, 16, False),      # fewer tokens than a block
    (1, 1, 19, 3, 1, 48, True),      # one query (sees every key), D not a power of two
    (1, 17, 33, 1, 1, 256, False),   # the largest head_dim
    (1, 33, 33, 2, 2, 80, True),     # D: a 64-wide pass and a 16-wide tail
])
def test_prefill_attention_matches_the_reference(B, Tq, Tk, H, Hkv, D, causal):
    q, k, v = _qkv(B, Tq, Tk, H, Hkv, D)
    kk, vv = (t.repeat_interleave(H // Hkv, dim=2) for t in (k, v))
    ref32 = ops.attention_torch(q.float(), kk.float(), vv.float(), causal)
    ref16 = ops.attention_torch(q, kk, vv, causal)
    out = cpu_ops.prefill_attention(q, k, v, causal)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    assert_matches(out, ref16, ref32, f"prefill_attention B{B} Tq{Tq} Tk{Tk} H{H}/{Hkv} D{D} causal={causal}")


def test_prefill_attention_scale_and_rows_alone():
    """sm_scale is applied; each sequence of a batch gets the bits it gets alone; a larger scale changes the output."""
    q, k, v = _qkv(3, 21, 30, 2, 2, 32, seed=1)
    both = cpu_ops.prefill_attention(q, k, v, True, sm_scale=0.3)
    for b in range(3):
        alone = cpu_ops.prefill_attention(q[b:b + 1].contiguous(), k[b:b + 1].contiguous(), v[b:b + 1].contiguous(),
                                          True, sm_scale=0.3)
        assert torch.equal(alone[0], both[b])
    ref32 = ops.attention_torch(q.float(), k.float(), v.float(), True, 0.3)
    assert_matches(both, ops.attention_torch(q, k, v, True, 0.3), ref32, "prefill_attention sm_scale 0.3")
    assert not torch.equal(both, cpu_ops.prefill_attention(q, k, v, True))


def test_prefill_attention_non_finite_inputs_poison_their_rows():
    """A NaN or +inf in q makes its row NaN; a NaN key makes NaN every row that sees it (causal: the rows from its
    position on), as torch's SDPA; the other rows stay finite and match it."""
    q, k, v = _qkv(1, 20, 20, 2, 2, 32, seed=3)
    q[0, 3, 0, 5] = float("nan")
    q[0, 7, 1, 2] = float("inf")
    k[0, 12, 1, 0] = float("nan")
    out = cpu_ops.prefill_attention(q, k, v, True)
    ref = ops.attention_torch(q.float(), k.float(), v.float(), True)
    assert torch.equal(out.float().isnan(), ref.isnan())
    assert out[0, 3, 0].isnan().all() and out[0, 7, 1].isnan().all() and out[0, 12:, 1].isnan().all()
    assert out[0, :3, 0].isfinite().all() and out[0, 4:, 0].isfinite().all() and out[0, 8:12, 1].isfinite().all()


def test_prefill_attention_refuses_what_it_cannot_do():
    q, k, v = _qkv(1, 8, 8, 2, 2, 32)
    with pytest.raises(ValueError, match="dtype"):
        cpu_ops.prefill_attention(q.float(), k.float(), v.float(), False)
    with pytest.raises(ValueError, match="multiple of 16"):
        cpu_ops.prefill_attention(q[..., :8].contiguous(), k[..., :8].contiguous(), v[..., :8].contiguous(), False)
    with pytest.raises(ValueError, match="Tq <= Tk"):
        cpu_ops.prefill_attention(q, k[:, :4].contiguous(), v[:, :4].contiguous(), True)
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        qq = _qkv(1, 8, 8, 3, 3, 32)[0]
        cpu_ops.prefill_attention(qq, k, v, False)


def test_ops_attention_takes_it_for_bf16_inference_only(monkeypatch):
    """ops.attention (SigLIP, the LLM's prefill through attention_varlen) on the cpu backend: csrc for bf16 without
    gradients, torch's SDPA for fp32, for tensors that want a gradient, for head dims it does not take, and where the
    GEMV runs on AMX (unmeasured there)."""
    calls = []
    real = cpu_ops.prefill_attention
    monkeypatch.setattr(cpu_ops, "prefill_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(ops, "_backend", "cpu")
    monkeypatch.setattr(cpu_ops, "amx_available", lambda: False)  # (an AMX host's own setting is tested below)
    q, k, v = _qkv(1, 24, 24, 2, 2, 32)
    out = ops.attention(q, k, v, causal=True)
    assert calls == [1] and torch.equal(out, real(q, k, v, True))
    ops.attention_varlen(q[0], k[0], v[0], torch.tensor([0, 10, 24], dtype=torch.int32), 14, causal=True)
    assert len(calls) == 3  # one call per packed sequence
    ops.attention(q.float(), k.float(), v.float(), causal=True)
    ops.attention(q.requires_grad_(), k, v, causal=True)
    ops.attention(*(t[..., :8].detach() for t in (q, k, v)), causal=True)
    assert len(calls) == 3
    monkeypatch.setattr(cpu_ops, "amx_available", lambda: True)
    ops.attention(*(t.detach() for t in (q, k, v)), causal=True)
    assert len(calls) == 3


def test_bench_prefill_attention_smoke():
    import bench_scripts

    rows = bench_scripts.load("bench_prefill_attention").main(1, [("tiny", 1, 20, 2, 32, True)])
    assert len(rows) == 1 and rows[0]["csrc_ms"] > 0 and rows[0]["speedup"] > 0


def test_prefill_attention_minus_inf_scores_weigh_nothing():
    """Keys scoring -inf get weight 0, also where they fill a row's first 32-key block (whose max is then -inf:
    -inf - -inf made those rows NaN), and a row whose every score is -inf is 0, as torch's."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, T, 1, 32, generator=g).bfloat16() for T in (40, 40, 40))
    q[..., 0] = 1.0
    k[0, :32, 0, 0] = -float("inf")  # keys 0-31 score -inf for every query, keys 32-39 finite
    for causal in (False, True):
        ref32 = ops.attention_torch(q.float(), k.float(), v.float(), causal)
        out = cpu_ops.prefill_attention(q, k, v, causal)
        assert out.isnan().any(-1).sum() == ref32.isnan().any(-1).sum() == 0
        assert_matches(out, ops.attention_torch(q, k, v, causal), ref32, f"-inf keys 0-31, causal={causal}")
    k[0, :, 0, 0] = -float("inf")  # every key
    assert (cpu_ops.prefill_attention(q, k, v, False) == ops.attention_torch(q, k, v, False)).all()


def test_prefill_attention_takes_strided_views_as_they_are():
    """q, k, v as views of a fused qkv projection's output ([B, T, 3, H, D]: token stride 3 H D) or of a batch-major
    buffer with a gap between sequences give the bits their contiguous copies give."""
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(2, 37, 3, 4, 32, generator=g).bfloat16()
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous() and cpu_ops._token_rows(q)
    for causal in (False, True):
        want = cpu_ops.prefill_attention(q.contiguous(), k.contiguous(), v.contiguous(), causal)
        assert torch.equal(cpu_ops.prefill_attention(q, k, v, causal), want)
    big = torch.randn(2, 50, 4, 32, generator=g).bfloat16()
    kv = big[:, 5:42]  # batch stride 50 tokens, 37 tokens each
    want = cpu_ops.prefill_attention(q.contiguous(), kv.contiguous(), kv.contiguous(), False)
    assert torch.equal(cpu_ops.prefill_attention(q, kv, kv, False), want)
    one = qkv[:, :1, 0]  # one query token: its token stride is never used
    assert torch.equal(cpu_ops.prefill_attention(one, k, v, True), cpu_ops.prefill_attention(one.contiguous(), k, v,
                                                                                              True))


def test_prefill_attention_output_is_contiguous_for_a_dense_permuted_q():
    """A q whose tokens' heads are contiguous but whose batch and token dims are swapped in memory (a [T, B, H, D]
    buffer seen as [B, T, H, D]: dense, not contiguous) is taken as it is; the result is still [B, Tq, H, D] in the
    layout the kernel writes (torch.empty_like would have copied q's permuted strides, and the rows landed at the wrong
    batch and token)."""
    g = torch.Generator().manual_seed(3)
    B, T, H, D = 2, 5, 3, 32
    q = torch.randn(T, B, H, D, generator=g).bfloat16().transpose(0, 1)
    k, v = (torch.randn(B, T, H, D, generator=g).bfloat16() for _ in range(2))
    assert not q.is_contiguous() and cpu_ops._token_rows(q)
    for causal in (False, True):
        out = cpu_ops.prefill_attention(q, k, v, causal)
        assert out.is_contiguous()
        assert torch.equal(out, cpu_ops.prefill_attention(q.contiguous(), k, v, causal))
