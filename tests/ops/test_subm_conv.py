"""SubMConv2d against its dense oracle on every backend case (``backend_case``, tests/conftest.py):
random sites in shuffled row order, odd sizes, several batch items (one empty), forward and
backward; the index strategies; the dense fallback of the PyTorch path."""
import pytest
import torch
import torch.nn.functional as F

import spconv2d as sp
from spconv2d.testing import at_sites, check_against_oracle, random_sparse


@pytest.mark.parametrize("k,r", [(1, 1), (3, 1), (3, 2), (5, 1), ((3, 5), (2, 1))])
@pytest.mark.parametrize("bias", [True, False])
def test_subm_conv2d_oracle(k, r, bias, backend_case, gen):
    x = random_sparse(3, 5, (11, 13), 0.3, empty=[1], generator=gen)
    k2, r2 = (k, k) if isinstance(k, int) else k, (r, r) if isinstance(r, int) else r
    w = torch.randn(4, 5, *k2, generator=gen, dtype=torch.float64)
    params = [w] + ([torch.randn(4, generator=gen, dtype=torch.float64)] if bias else [])
    pad = (r2[0] * (k2[0] // 2), r2[1] * (k2[1] // 2))
    y = check_against_oracle(
        lambda t, w, b=None: sp.functional.subm_conv2d(t, w, b, r),
        lambda d, w, b=None: F.conv2d(d, w, b, padding=pad, dilation=r2),
        x, params, backend=backend_case.backend, device=backend_case.device, dtype=backend_case.dtype,
        rtol=backend_case.rtol, atol=backend_case.atol, generator=gen)
    assert torch.equal(y.coords.cpu(), x.coords) and y.stride == (1, 1)


@pytest.mark.parametrize("strategy", ["sort", "grid", "hash"])
def test_subm_conv2d_every_index_strategy(strategy, backend_case, gen):
    x = random_sparse(3, 5, (11, 13), 0.3, empty=[1], generator=gen)
    w = torch.randn(6, 5, 3, 3, generator=gen, dtype=torch.float64) * 0.3
    check_against_oracle(
        lambda t, w: sp.functional.subm_conv2d(t, w, None, 2, index=strategy),
        lambda d, w: F.conv2d(d, w, None, padding=2, dilation=2),
        x, [w], backend=backend_case.backend, device=backend_case.device, dtype=backend_case.dtype,
        rtol=backend_case.rtol, atol=backend_case.atol, generator=gen)


@pytest.mark.parametrize("gather", ["pairs", "table", "auto"])
@pytest.mark.parametrize("dense_fallback", [True, False])
def test_subm_dense_fallback_and_sparse_maps_agree(dense_fallback, gather, gen):
    """Above a density threshold the PyTorch path runs SubMConv2d through F.conv2d; both
    routes equal the oracle, forward and backward."""
    be = sp.backends.create_backend("torch", gather=gather, dense_fallback=dense_fallback,
                                    dense_thresholds=((None, 0.5),))
    x = random_sparse(3, 4, (9, 10), 0.9, empty=[2], generator=gen, requires_grad=True)
    assert be.prefers_dense_subm(x.density, 4, 4) == dense_fallback
    w = torch.randn(5, 4, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    y = sp.functional.subm_conv2d(x, w, b, backend=be)
    assert x.coordinate_manager.builds == (0 if dense_fallback else 1)
    feats = x.features.detach().clone().requires_grad_()
    ref = at_sites(F.conv2d(x.replace(feats).to_dense(), w, b, padding=1), x.coords)
    torch.testing.assert_close(y.features, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(y.features, [x.features, w, b], g)
    exp = torch.autograd.grad(ref, [feats, w, b], g)
    for a, e in zip(got, exp):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)


def test_subm_rejects_even_kernels_and_mixed_dtypes(gen):
    x = random_sparse(1, 3, (5, 5), 0.5, dtype=torch.float32, generator=gen)
    with pytest.raises(ValueError, match="odd"):
        sp.nn.SubMConv2d(3, 3, 2)
    with pytest.raises(ValueError, match="odd"):
        sp.functional.subm_conv2d(x, torch.randn(3, 3, 2, 2))
    with pytest.raises(TypeError, match="float32.*float64"):
        sp.nn.SubMConv2d(3, 3, 3).double()(x)
