"""Pooling against its dense oracle (max / mean over active inputs), global pools, batch norm,
feature-wise wrappers."""
import pytest
import torch

import spconv2d as sp
from spconv2d.testing import (at_sites, avg_pool2d_dense, conv2d_sites, max_pool2d_dense, random_sparse, sites,
                              sort_rows)


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
    assert a._cs is b._cs  # one coordinate set, one map
    assert x.coordinate_manager.builds == 1


def test_global_pools(gen):
    x = random_sparse(3, 4, (6, 7), 0.4, empty=[1], generator=gen, requires_grad=True)
    avg = sp.nn.SparseGlobalAvgPool()(x)
    mx = sp.nn.SparseGlobalMaxPool()(x)
    assert avg.shape == (3, 4) and mx.shape == (3, 4)
    for b in range(3):
        rows = x.features[x.coords[:, 0] == b]
        if rows.shape[0] == 0:
            assert torch.all(avg[b] == 0) and torch.all(mx[b] == 0)
        else:
            torch.testing.assert_close(avg[b], rows.mean(0))
            torch.testing.assert_close(mx[b], rows.max(0).values)
    (avg.sum() + mx.sum()).backward()
    assert x.features.grad.shape == x.features.shape


def test_batch_norm_matches_features_and_dense_state_dict(gen):
    x = random_sparse(2, 5, (8, 8), 0.5, generator=gen)
    bn = sp.nn.SparseBatchNorm2d(5).double()
    ref = torch.nn.BatchNorm1d(5).double()
    y = bn(x)
    torch.testing.assert_close(y.features, ref(x.features))
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    dense = torch.nn.BatchNorm2d(5).double()
    dense.load_state_dict(bn.state_dict())
    bn.load_state_dict(dense.state_dict())
    bn.eval()
    torch.testing.assert_close(bn(x).features, torch.nn.functional.batch_norm(
        x.features, dense.running_mean, dense.running_var, dense.weight, dense.bias))


def test_batch_norm_handles_empty_and_single(gen):
    bn = sp.nn.SparseBatchNorm2d(3).double()
    for density in (0.0, None):
        if density is None:
            x = sp.SparseTensor(torch.randn(1, 3, dtype=torch.float64), torch.tensor([[0, 1, 1]]), (4, 4))
        else:
            x = random_sparse(2, 3, (4, 4), density, generator=gen)
        y = bn(x)
        assert y.features.shape == x.features.shape and torch.isfinite(y.features).all()


def test_featurewise_wrappers(gen):
    x = random_sparse(2, 4, (6, 6), 0.5, generator=gen)
    lin = torch.nn.Linear(4, 3).double()
    fw = sp.nn.FeatureWise(lin)
    torch.testing.assert_close(fw(x).features, lin(x.features))
    assert set(fw.state_dict()) == {"weight", "bias"}  # the wrapped module's names, no prefix
    seq = torch.nn.Sequential(torch.nn.Identity(), sp.nn.FeatureWise(torch.nn.Linear(4, 3))).double()
    dense = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(4, 3)).double()
    seq.load_state_dict(dense.state_dict())
    torch.testing.assert_close(seq[1].module.weight, dense[1].weight)
    dense.load_state_dict(seq.state_dict())
    torch.testing.assert_close(sp.nn.SparseReLU()(x).features, x.features.clamp(min=0))
    torch.testing.assert_close(sp.nn.SparseLeakyReLU(0.2)(x).features, torch.nn.functional.leaky_relu(x.features, 0.2))
    torch.testing.assert_close(sp.functional.apply(x, torch.tanh).features, torch.tanh(x.features))
    seq = torch.nn.Sequential(sp.nn.SubMConv2d(4, 4, 3), sp.nn.SparseBatchNorm2d(4), sp.nn.SparseReLU()).double()
    assert seq(x).num_channels == 4
