"""vq_lookup (exact gather, F.normalize to 1e-6) and vq_nearest (fused argmin) against their references."""
import pytest
import torch
import torch.nn.functional as F

from janus_rt.kernels.vq import vq_lookup, vq_lookup_ref, vq_nearest, vq_nearest_ref


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("shape,K,D", [((1,), 100, 8), ((7,), 1000, 8), ((3, 341), 16384, 8), ((5, 4), 100, 13)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vq_lookup(shape, K, D, dtype, device, poison):
    gen = torch.Generator().manual_seed(K + D)
    codebook = (torch.randn(K, D, generator=gen) * 2).to(dtype).to(device)
    idx = torch.randint(0, K, shape, generator=gen).to(device)
    idx.view(-1)[0] = K - 1
    assert torch.equal(vq_lookup(idx, codebook, l2_normalize=False), codebook[idx])
    assert torch.equal(vq_lookup(idx.int(), codebook, l2_normalize=False), codebook[idx])
    out = vq_lookup(idx, codebook)
    assert out.shape == (*shape, D) and out.dtype == dtype
    exact = F.normalize(codebook.float(), dim=-1)[idx]
    if dtype == torch.float32:
        assert _rel(out, exact) <= 1e-6
    else:  # one rounding of the fp32 result; PyTorch normalising in bf16 itself is the yardstick
        torch_err = _rel(F.normalize(codebook, dim=-1)[idx], exact)
        assert _rel(out, exact) <= 2 * torch_err
        # within one bf16 ulp of the reference element-wise (Triton's interpreter truncates fp32 -> bf16
        # instead of rounding to nearest, so exact equality only holds on a GPU)
        ref = vq_lookup_ref(idx, codebook).float()
        ulp = torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(1e-30))) - 7)
        assert ((out.float() - ref).abs() <= ulp).all()


def test_vq_nearest_well_separated(device, poison):
    gen = torch.Generator().manual_seed(0)
    for N, K in [(1, 100), (7, 1000), (341, 1000)]:
        codebook = F.normalize(torch.randn(K, 8, generator=gen), dim=-1)
        want = torch.randint(0, K, (N,), generator=gen)
        z = codebook[want] + 1e-4 * torch.randn(N, 8, generator=gen)
        got = vq_nearest(z.to(device), codebook.to(device)).cpu()
        assert got.dtype == torch.int64
        assert torch.equal(got, want) and torch.equal(got, vq_nearest_ref(z, codebook))


@pytest.mark.parametrize("N,K,D", [(7, 100, 8), (341, 1000, 8), (341, 16384, 8), (33, 300, 3), (20, 200, 24)])
def test_vq_nearest_random(N, K, D, device, poison):
    """On random data, fp32 rounding can flip exact near-ties, so check the chosen code's true distance is minimal."""
    gen = torch.Generator().manual_seed(N * K)
    codebook = torch.randn(K, D, generator=gen)
    z = torch.randn(N, D, generator=gen)
    if D == 8:  # the official rule: both sides normalised
        codebook, z = F.normalize(codebook, dim=-1), F.normalize(z, dim=-1)
    got = vq_nearest(z.to(device), codebook.to(device)).cpu()
    dist = torch.cdist(z.double(), codebook.double()) ** 2  # [N, K]
    chosen = dist.gather(1, got[:, None]).squeeze(1)
    scale = 1 + z.double().pow(2).sum(1) + codebook.double().pow(2).sum(1).max()
    assert ((chosen - dist.min(dim=1).values) / scale).max() <= 1e-5
    assert (got == vq_nearest_ref(z, codebook)).float().mean() >= 0.99


def test_vq_nearest_ties_and_dtypes(device, poison):
    """Small integers make every distance exact in fp32, so exact ties must go to the smallest index."""
    gen = torch.Generator().manual_seed(1)
    z = torch.randint(-2, 3, (50, 8), generator=gen)
    for K0 in (200, 256):  # copies land in other lanes (200) or the same lane of later tiles (256)
        base = torch.randint(-2, 3, (K0, 8), generator=gen)
        codebook = torch.cat([base, base, base])  # every code three times
        want = ((z[:, None] - codebook[None]) ** 2).sum(-1).argmin(dim=1)  # int64 distances; first minimum
        got = vq_nearest(z.float().to(device), codebook.float().to(device)).cpu()
        assert torch.equal(got, want) and (got < K0).all()
    zb = torch.randn(50, 8, generator=gen).to(device).bfloat16()
    cb = torch.randn(300, 8, generator=gen).to(device).bfloat16()
    got = vq_nearest(zb, cb)
    assert torch.equal(got, vq_nearest(zb.float(), cb.float()))  # bf16 inputs are read exactly, as fp32
    dist = torch.cdist(zb.cpu().double(), cb.cpu().double()) ** 2  # and the chosen code is the nearest one
    chosen = dist.gather(1, got.cpu()[:, None]).squeeze(1)
    scale = 1 + zb.cpu().double().pow(2).sum(1) + cb.cpu().double().pow(2).sum(1).max()  # as test_vq_nearest_random
    assert ((chosen - dist.min(dim=1).values) / scale).max() <= 1e-5


def test_vq_misuse_raises(device):
    with pytest.raises(ValueError, match="dim"):
        vq_nearest(torch.randn(4, 8, device=device), torch.randn(10, 7, device=device))
    with pytest.raises(ValueError, match="indices"):
        vq_lookup(torch.zeros(3, device=device), torch.randn(10, 8, device=device))
    with pytest.raises(ValueError, match="contiguous"):
        vq_nearest(torch.randn(8, 4, device=device).t(), torch.randn(10, 8, device=device))
