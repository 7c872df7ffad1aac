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


def assert_same_roundings(out, ref, what, flips=0.01):
    """A low-precision result computed with `ref`'s rounding points (the same values rounded at the same places,
    in another fp32 summation order) equals it but for rare rounding flips: an intermediate that lands on the
    other side of a rounding boundary moves an element by about one ulp. So: at most `flips` of the elements
    differ, each by at most one ulp of its reference value (or of max|ref| / 128, for elements that cancel to
    near zero). A rounding point skipped or added moves a quarter or more of the elements (measured on the csrc
    row code: 25-55 %), so it fails here though it may make the result more accurate."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, f"{what}: {out.dtype}{tuple(out.shape)} vs " \
                                                             f"{ref.dtype}{tuple(ref.shape)}"
    o, r = out.float(), ref.float()
    finite = torch.isfinite(r)
    assert torch.equal(torch.isfinite(o), finite), f"{what}: non-finite elements where the reference has none"
    assert torch.equal(o[~finite].nan_to_num(), r[~finite].nan_to_num()), f"{what}: other infinities or NaNs"
    o, r = o[finite], r[finite]
    differ = o != r
    share = differ.float().mean().item() if o.numel() else 0.0
    assert share <= flips, f"{what}: {share:.1%} of the elements differ from the reference (> {flips:.0%})"
    floor = r.abs().max() / 128 if r.numel() else r.new_zeros(())
    exponent = torch.frexp(torch.maximum(r.abs(), floor)).exponent  # |v| in [2^(e-1), 2^e)
    ulp = torch.ldexp(torch.full_like(r, torch.finfo(out.dtype).eps), exponent - 1)
    assert torch.all((o - r).abs() <= ulp), f"{what}: an element differs by more than one ulp"
