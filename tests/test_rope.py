"""rope vs rope_ref: q and k outputs and grads, [N, H, D] and [B, T, H, D], strided q/k views."""
import pytest
import torch

from janus_rt.kernels.rope import rope, rope_ref
from tolerances import assert_matches, max_err


pytestmark = pytest.mark.usefixtures("poison")


def run(fn, q, k, pos, theta, dq, dk):
    q, k = q.clone().requires_grad_(), k.clone().requires_grad_()
    q_out, k_out = fn(q, k, pos, theta)
    grads = torch.autograd.grad((q_out.float() * dq).sum() + (k_out.float() * dk).sum(), (q, k))
    return (q_out, k_out), grads


def check_against_ref(q, k, pos, theta=10000.0):
    g = torch.Generator().manual_seed(1)
    dq = torch.randn(q.shape, generator=g).to(q.device)
    dk = torch.randn(k.shape, generator=g).to(q.device)
    outs, grads = run(rope, q, k, pos, theta, dq, dk)
    outs_lp, grads_lp = run(rope_ref, q, k, pos, theta, dq, dk)
    outs32, grads32 = run(rope_ref, q.float(), k.float(), pos, theta, dq, dk)
    for name, a, lp, ref, x in zip(("q_out", "k_out", "dq", "dk"), outs + grads, outs_lp + grads_lp,
                                   outs32 + grads32, (q, k, q, k)):
        assert a.shape == x.shape and a.dtype == x.dtype, name
        assert_matches(a, lp, ref, name)


@pytest.mark.parametrize("N,Hq,Hk,D", [(1, 3, 1, 48), (7, 4, 2, 136), (41, 2, 3, 200), (341, 1, 1, 48)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rope_matches_ref(device, N, Hq, Hk, D, dtype):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(N, Hq, D, generator=g).to(device, dtype)
    k = torch.randn(N, Hk, D, generator=g).to(device, dtype)
    pos = torch.randint(0, 16384, (N,), generator=g).to(device)  # up to Janus' max positions
    check_against_ref(q, k, pos)


def test_rope_janus_head_dim_batched_int32(device):
    # [B, T, H, D] with positions [B, T]; head_dim 128, 16 heads (1B); int32 positions; another theta
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 16, 128, generator=g).to(device, torch.bfloat16)
    k = torch.randn(2, 5, 16, 128, generator=g).to(device, torch.bfloat16)
    pos = torch.stack([torch.arange(5), torch.arange(600, 605)]).to(device, torch.int32)
    check_against_ref(q, k, pos, theta=500000.0)


def test_rope_fused_qkv_views(device):
    # q and k as views into one fused qkv projection output [N, (Hq + 2 Hk) * D]: no copy needed
    N, Hq, Hk, D = 9, 4, 2, 64
    qkv = torch.randn(N, (Hq + 2 * Hk) * D, device=device)
    q = qkv[:, : Hq * D].view(N, Hq, D)
    k = qkv[:, Hq * D: (Hq + Hk) * D].view(N, Hk, D)
    pos = torch.arange(3, 3 + N, device=device)
    assert not q.is_contiguous()
    q_out, k_out = rope(q, k, pos)
    q_ref, k_ref = rope_ref(q, k, pos)
    assert max_err(q_out, q_ref) <= 1e-4 * q_ref.abs().max().item()
    assert max_err(k_out, k_ref) <= 1e-4 * k_ref.abs().max().item()


def test_rope_position_zero_is_identity(device):
    q, k = torch.randn(3, 2, 48, device=device), torch.randn(3, 1, 48, device=device)
    q_out, k_out = rope(q, k, torch.zeros(3, dtype=torch.int64, device=device))
    assert torch.equal(q_out, q) and torch.equal(k_out, k)


def test_rope_misuse_raises(device):
    q, k = torch.randn(4, 2, 48, device=device), torch.randn(4, 2, 48, device=device)
    pos = torch.arange(4, device=device)
    with pytest.raises(ValueError, match="even"):
        rope(q[..., :47], k[..., :47], pos)
    with pytest.raises(ValueError, match="positions"):
        rope(q, k, pos[:3])
    with pytest.raises(ValueError, match="positions"):
        rope(q, k, pos.float())
    with pytest.raises(ValueError, match="k"):
        rope(q, k.half(), pos)


def test_rope_launches_power_of_two_warps(device, monkeypatch):
    """Every launch asks for 1-8 warps, a power of 2 (a GPU launch rejects others; the interpreter ignores them):
    GQA head counts such as 4 + 2 or 3 + 1 once gave 3 or 6."""
    import importlib

    rope_mod = importlib.import_module("janus_rt.kernels.rope")  # (the package's `rope` names the function)

    real, seen = rope_mod._rope_fwd_kernel, []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(kwargs["num_warps"])
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(rope_mod, "_rope_fwd_kernel", Recorder())
    g = torch.Generator().manual_seed(0)
    for N, Hq, Hk, D in [(1, 3, 1, 48), (7, 4, 2, 136), (41, 2, 3, 200), (64, 6, 2, 64), (33, 16, 16, 128)]:
        q = torch.randn(N, Hq, D, generator=g).to(device)
        k = torch.randn(N, Hk, D, generator=g).to(device)
        rope(q, k, torch.arange(N, device=device), 10000.0)
    assert len(seen) == 5 and all(w in (1, 2, 4, 8) for w in seen), seen


def test_compile_check_compiles_rope_for_sm90_and_reports_a_bad_launch(tmp_path):
    """bench/compile_check.py (every test launch compiled for a GPU target, no GPU): the rope launches above compile
    for sm_90; a launch with 3 warps is reported as failed and the tool exits 1."""
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    bad = tmp_path / "test_bad_launch.py"
    bad.write_text(
        "import torch, triton, triton.language as tl\n"
        "@triton.jit\n"
        "def _copy_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):\n"
        "    offs = tl.arange(0, BLOCK)\n"
        "    tl.store(y_ptr + offs, tl.load(x_ptr + offs))\n"
        "def test_bad():\n"
        "    x = torch.zeros(16)\n"
        "    _copy_kernel[(1,)](x, x, BLOCK=16, num_warps=3)\n")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = lambda *tests: subprocess.run([sys.executable, str(root / "bench" / "compile_check.py"), *tests],
                                        cwd=root, env=env, capture_output=True, text=True, timeout=600)
    good = run(f"{root / 'tests' / 'test_rope.py'}::test_rope_launches_power_of_two_warps")
    assert good.returncode == 0, good.stdout[-2000:] + good.stderr[-2000:]
    row = next(line for line in good.stdout.splitlines() if line.startswith("_rope_fwd_kernel"))
    assert row.split()[1:] == ["5", "0", "0"]  # 5 launches compiled, none failed, no spills
    failed = run(str(bad))
    assert failed.returncode == 1 and "num_warps must be a power of 2" in failed.stdout
    assert next(line for line in failed.stdout.splitlines() if line.startswith("_copy_kernel")).split()[1:3] == ["0", "1"]
