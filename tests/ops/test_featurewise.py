"""Feature-wise ops: batch norm over active sites, global pools, activations and wrappers."""
import torch

import spconv2d as sp
from spconv2d.testing import random_sparse


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
