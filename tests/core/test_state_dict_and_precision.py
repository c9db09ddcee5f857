"""Dense <-> sparse state_dict exchange; fp32 / fp16 / bf16 / autocast on the PyTorch path."""
import pytest
import torch

import spconv2d as sp
from spconv2d.testing import at_sites, random_sparse

PAIRS = [
    (lambda: torch.nn.Conv2d(3, 5, 3, padding=1), lambda: sp.nn.SubMConv2d(3, 5, 3)),
    (lambda: torch.nn.Conv2d(3, 5, 3, 2, 1, bias=False), lambda: sp.nn.SparseConv2d(3, 5, 3, 2, 1, bias=False)),
    (lambda: torch.nn.ConvTranspose2d(3, 5, 2, 2), lambda: sp.nn.SparseConvTranspose2d(3, 5, 2, 2)),
    (lambda: torch.nn.BatchNorm2d(3), lambda: sp.nn.SparseBatchNorm2d(3)),
]


@pytest.mark.parametrize("make_dense,make_sparse", PAIRS)
def test_state_dict_round_trip(make_dense, make_sparse):
    dense, sparse = make_dense(), make_sparse()
    assert set(dense.state_dict()) == set(sparse.state_dict())
    sparse.load_state_dict(dense.state_dict())
    for k, v in dense.state_dict().items():
        assert torch.equal(sparse.state_dict()[k], v)
    fresh = make_dense()
    fresh.load_state_dict(sparse.state_dict())
    for k, v in sparse.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)


def test_init_matches_dense_distribution():
    torch.manual_seed(0)
    d = torch.nn.Conv2d(16, 32, 3)
    torch.manual_seed(0)
    s = sp.nn.SparseConv2d(16, 32, 3)
    assert torch.equal(d.weight, s.weight) and torch.equal(d.bias, s.bias)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-2), (torch.bfloat16, 5e-2)])
def test_low_precision_matches_float64(dtype, tol, gen):
    x64 = random_sparse(2, 8, (9, 12), 0.4, generator=gen)
    conv = sp.nn.SubMConv2d(8, 6, 3).double()
    down = sp.nn.SparseConv2d(6, 4, 3, 2, 1).double()
    ref = down(conv(x64)).features
    x = x64.to(dtype).replace(x64.features.to(dtype).requires_grad_())
    conv_l, down_l = conv.to(dtype), down.to(dtype)
    out = down_l(conv_l(x))
    assert out.dtype == dtype
    torch.testing.assert_close(out.features.double(), ref, rtol=tol, atol=tol * 4)
    out.features.float().sum().backward()
    assert x.features.grad.dtype == dtype and conv_l.weight.grad.dtype == dtype


def test_autocast_runs_convs_in_lower_precision(gen):
    x = random_sparse(2, 8, (9, 12), 0.4, dtype=torch.float32, generator=gen)
    conv = sp.nn.SubMConv2d(8, 6, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
        dense = torch.nn.functional.conv2d(x.to_dense(), conv.weight, conv.bias, padding=1)
    assert y.dtype == torch.bfloat16 == dense.dtype  # the same policy as nn.Conv2d
    torch.testing.assert_close(y.features.float(), at_sites(dense, x.coords).float(), rtol=2e-2, atol=5e-2)
    y.features.float().sum().backward()
    assert conv.weight.grad.dtype == torch.float32


def test_mixed_dtypes_are_rejected(gen):
    x = random_sparse(1, 3, (5, 5), 0.5, dtype=torch.float32, generator=gen)
    conv = sp.nn.SubMConv2d(3, 3, 3).double()
    with pytest.raises(TypeError, match="float32.*float64"):
        conv(x)


def test_wrong_channels_and_kernel_are_rejected(gen):
    x = random_sparse(1, 3, (5, 5), 0.5, generator=gen)
    with pytest.raises(ValueError, match="3 channels"):
        sp.nn.SubMConv2d(4, 3, 3).double()(x)
    with pytest.raises(ValueError, match="odd"):
        sp.nn.SubMConv2d(3, 3, 2)
    with pytest.raises(ValueError, match="too small"):
        sp.nn.SparseConv2d(3, 3, 7).double()(x)
