"""Sparse max / avg pooling against the dense oracle (max / mean over *active* inputs only)."""
import pytest
import torch

import spconv2d as sp
from spconv2d.testing import at_sites, avg_pool2d_dense, conv2d_sites, max_pool2d_dense, random_sparse, sites, sort_rows

POOLS = [(2, 2, 0, 1), (3, 2, 1, 1), (3, 1, 1, 1), ((2, 3), (2, 1), (1, 1), 1)]


@pytest.mark.parametrize("kind,k,s,p,r", [("max", *g) for g in POOLS + [(3, 2, 0, 2)]] + [("avg", *g) for g in POOLS])
def test_pool_oracle(k, s, p, r, kind, gen):  # (F.avg_pool2d has no dilation: max only)
    x = random_sparse(3, 4, (11, 9), 0.3, empty=[0], generator=gen, requires_grad=True)
    pool = (sp.nn.SparseMaxPool2d if kind == "max" else sp.nn.SparseAvgPool2d)(k, s, p, r)
    y = pool(x)
    coords, _ = sort_rows(y)
    assert torch.equal(coords, sites(conv2d_sites(x, k, s, p, r)))
    feats = x.features.detach().clone().requires_grad_()
    xr = x.replace(feats)
    dense = max_pool2d_dense(xr, k, s, p, r) if kind == "max" else avg_pool2d_dense(xr, k, s, p)
    ref = at_sites(dense, y.coords)
    torch.testing.assert_close(y.features, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn(y.features.shape, generator=gen, dtype=torch.float64)
    (gx,) = torch.autograd.grad(y.features, [x.features], g)
    (rx,) = torch.autograd.grad(ref, [feats], g)
    torch.testing.assert_close(gx, rx, rtol=1e-9, atol=1e-9)


def test_pool_shares_conv_sites(gen):
    x = random_sparse(2, 4, (10, 10), 0.3, generator=gen)
    a = sp.nn.SparseMaxPool2d(2)(x)
    b = sp.nn.SparseConv2d(4, 4, 2, 2).double()(x)
    assert a.coord_set is b.coord_set  # one coordinate set, one map
    assert x.coordinate_manager.builds == 1
