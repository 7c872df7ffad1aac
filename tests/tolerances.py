"""The suite's tolerance rule for kernels: fp32 relative error <= 1e-4; fp16/bf16 error against an fp32
reference <= 2x PyTorch's own error in that dtype."""
import torch


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def assert_matches(out, ref_lowp, ref32, what):
    assert torch.isfinite(out).all(), f"{what}: non-finite (unwritten) elements"
    if out.dtype == torch.float32:
        rel = max_err(out, ref32) / ref32.abs().max().item()
        assert rel <= 1e-4, f"{what}: fp32 rel err {rel:.3g}"
    else:
        err, err_torch = max_err(out, ref32), max_err(ref_lowp, ref32)
        assert err <= 2 * err_torch, f"{what}: err {err:.3g} > 2x torch's {err_torch:.3g}"
