"""SparseConvTranspose2d against its dense oracle on every backend case: generative (every
site that receives a contribution) and onto a skip tensor's sites (the U-Net decoder), with
each index strategy for the lookup path."""
import pytest
import torch
import torch.nn.functional as F

import spconv2d as sp
from spconv2d.testing import at_sites, check_against_oracle, conv_transpose2d_sites, random_sparse, sites, sort_rows


@pytest.mark.parametrize("k,s,p,r,op", [(2, 2, 0, 1, 0), (3, 2, 1, 1, 1), (3, 1, 1, 1, 0), (3, 2, 0, 2, 0),
                                        ((3, 2), (1, 2), (1, 0), 1, 0), (4, 3, 1, 1, 2)])
def test_conv_transpose2d_generative_oracle(k, s, p, r, op, backend_case, gen):
    x = random_sparse(3, 4, (7, 9), 0.3, empty=[2], generator=gen)
    k2 = (k, k) if isinstance(k, int) else k
    w = torch.randn(4, 3, *k2, generator=gen, dtype=torch.float64) * 0.3
    b = torch.randn(3, generator=gen, dtype=torch.float64)
    y = check_against_oracle(
        lambda t, w, b: sp.functional.conv_transpose2d(t, w, b, s, p, r, op),
        lambda d, w, b: F.conv_transpose2d(d, w, b, s, p, op, dilation=r),
        x, [w, b], backend=backend_case.backend, device=backend_case.device, dtype=backend_case.dtype,
        rtol=backend_case.rtol, atol=backend_case.atol, generator=gen)
    site_mask = conv_transpose2d_sites(x, k, s, p, r, op)
    assert y.spatial_shape == tuple(site_mask.shape[2:])
    coords, _ = sort_rows(y)
    assert torch.equal(coords.cpu(), sites(site_mask))


def test_conv_transpose2d_module_equals_dense_module(gen):
    x = random_sparse(2, 4, (6, 7), 0.4, generator=gen)
    up = sp.nn.SparseConvTranspose2d(4, 3, 3, 2, 1, output_padding=1).double()
    dense = torch.nn.ConvTranspose2d(4, 3, 3, 2, 1, 1).double()
    dense.load_state_dict(up.state_dict())
    y = up(x)
    torch.testing.assert_close(y.features, at_sites(dense(x.to_dense()), y.coords), rtol=1e-10, atol=1e-10)


TO_SKIP = [
    ((13, 11), (2, 2, 0), (2, 2, 0)),  # the U-Net pair: reuses the down map, transposed
    ((12, 10), (2, 2, 0), (2, 2, 0)),  # even: a single pair per row (gather-after-GEMM form)
    ((13, 11), (3, 2, 1), (3, 2, 1)),  # overlapping windows, same geometry: transposed map again
    ((12, 10), (2, 2, 0), (3, 2, 1)),  # different geometry: neighbour lookup at skip's sites
    ((12, 9), (3, 2, 0), (3, 2, 0)),   # skip's shape implies an output_padding
]


# every case with the automatic index; the lookup case (different geometry) with each strategy
CASES = [(*case, "auto") for case in TO_SKIP] + [(*TO_SKIP[3], strategy) for strategy in ("sort", "grid", "hash")]


@pytest.mark.parametrize("shape,down,up,strategy", CASES)
def test_conv_transpose2d_to_skip_oracle(shape, down, up, strategy, backend_case, gen):
    dev, dt = backend_case.device, backend_case.dtype
    skip64 = random_sparse(3, 4, shape, 0.3, empty=[1], generator=gen)
    x64 = sp.nn.SparseConv2d(4, 5, *down).double()(skip64)  # the coarse sites, float64 features
    w = torch.randn(5, 4, up[0], up[0], generator=gen, dtype=torch.float64) * 0.3
    bias = torch.randn(4, generator=gen, dtype=torch.float64)
    skip = sp.SparseTensor(skip64.features.to(dev, dt), skip64.coords.to(dev), skip64.spatial_shape, 3)
    feats = x64.features.detach().to(dev, dt).requires_grad_()
    wt, bt = w.to(dev, dt).requires_grad_(), bias.to(dev, dt).requires_grad_()
    with sp.backend(backend_case.backend), sp.index_strategy(strategy):
        low = sp.functional.conv2d(skip, torch.zeros(5, 4, down[0], down[0], device=dev, dtype=dt), None,
                                   down[1], down[2])
        y = sp.functional.conv_transpose2d(low.replace(feats), wt, bt, up[1], up[2], output=skip)
    assert torch.equal(y.coords.cpu(), skip64.coords) and y.spatial_shape == skip64.spatial_shape
    assert y.stride == skip.stride
    k, s, p = up
    opad = tuple(n - ((m - 1) * s - 2 * p + k) for n, m in zip(skip64.spatial_shape, x64.spatial_shape))
    f64, w64, b64 = (t.detach().clone().requires_grad_() for t in (x64.features, w, bias))
    dense = F.conv_transpose2d(x64.replace(f64).to_dense(), w64, b64, stride=s, padding=p, output_padding=opad)
    assert tuple(dense.shape[2:]) == skip64.spatial_shape
    ref = at_sites(dense, skip64.coords)
    tol = dict(rtol=backend_case.rtol, atol=backend_case.atol)
    torch.testing.assert_close(y.features.detach().double().cpu(), ref, **tol)
    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(y.features, [feats, wt, bt], g.to(dev, dt))
    exp = torch.autograd.grad(ref, [f64, w64, b64], g)
    for a, e in zip(got, exp):
        scale = 1.0 if dt == torch.float64 else max(1.0, float(e.abs().max()))
        grad_tol = dict(rtol=10 * tol["rtol"], atol=10 * tol["atol"]) if dt == torch.float64 else tol
        torch.testing.assert_close(a.double().cpu() / scale, e / scale, **grad_tol)


def test_conv_transpose2d_to_skip_rejects_bad_shapes(gen):
    skip = random_sparse(2, 4, (12, 10), 0.3, generator=gen)
    x = sp.nn.SparseConv2d(4, 5, 2, 2).double()(skip)
    with pytest.raises(ValueError, match="cannot produce"):
        sp.nn.SparseConvTranspose2d(5, 4, 5, 3).double()(x, output=skip)
    other = random_sparse(2, 4, (12, 10), 0.3, generator=gen)
    with pytest.raises(ValueError, match="same input"):
        sp.nn.SparseConvTranspose2d(5, 4, 2, 2).double()(x, output=other)
