"""SparseConv2d (strided) against its dense oracle on every backend case: output sites, shape,
stride, values, gradients; empty inputs through every conv; a gradcheck of a conv chain."""
import pytest
import torch
import torch.nn.functional as F

import spconv2d as sp
from spconv2d.testing import check_against_oracle, conv2d_sites, random_sparse, sites, sort_rows

GEOMETRIES = [  # kernel, stride, padding, dilation
    (2, 2, 0, 1), (3, 2, 1, 1), (3, 1, 0, 1), (3, 2, 0, 2), ((2, 3), (2, 1), (0, 1), 1), (5, 3, 2, 1), (4, 2, 1, 1),
    (3, 3, 0, 1),
]


@pytest.mark.parametrize("k,s,p,r", GEOMETRIES)
def test_sparse_conv2d_oracle(k, s, p, r, backend_case, gen):
    x = random_sparse(3, 3, (13, 10), 0.25, empty=[0], generator=gen)
    k2 = (k, k) if isinstance(k, int) else k
    w = torch.randn(6, 3, *k2, generator=gen, dtype=torch.float64) * 0.3
    b = torch.randn(6, generator=gen, dtype=torch.float64)
    y = check_against_oracle(
        lambda t, w, b: sp.functional.conv2d(t, w, b, s, p, r), lambda d, w, b: F.conv2d(d, w, b, s, p, r),
        x, [w, b], backend=backend_case.backend, device=backend_case.device, dtype=backend_case.dtype,
        rtol=backend_case.rtol, atol=backend_case.atol, generator=gen)
    site_mask = conv2d_sites(x, k, s, p, r)
    assert y.spatial_shape == tuple(site_mask.shape[2:])
    coords, _ = sort_rows(y)
    assert torch.equal(coords.cpu(), sites(site_mask)), "output sites differ from the dense oracle's"
    assert y.stride == tuple(v * sv for v, sv in zip(x.stride, (s, s) if isinstance(s, int) else s))


def test_sparse_conv2d_module_equals_dense_module(gen):
    x = random_sparse(2, 3, (9, 8), 0.4, generator=gen, requires_grad=True)
    conv = sp.nn.SparseConv2d(3, 6, 3, 2, 1).double()
    dense = torch.nn.Conv2d(3, 6, 3, 2, 1).double()
    dense.load_state_dict(conv.state_dict())
    y = conv(x)
    ref = dense(x.to_dense())
    c = y.coords.long()
    torch.testing.assert_close(y.features, ref[c[:, 0], :, c[:, 1], c[:, 2]], rtol=1e-10, atol=1e-10)


def test_empty_input_every_conv(backend_case, gen):
    dev, dt = backend_case.device, backend_case.dtype
    x = random_sparse(2, 3, (8, 8), 0.0, dtype=dt, generator=gen, device=dev, requires_grad=True)
    assert x.num_active == 0
    with sp.backend(backend_case.backend):
        y = sp.nn.SubMConv2d(3, 4, 3).to(dev, dt)(x)
        z = sp.nn.SparseConv2d(4, 5, 3, 2, 1).to(dev, dt)(y)
        u = sp.nn.SparseConvTranspose2d(5, 4, 3, 2, 1).to(dev, dt)(z, output=y)
        g = sp.nn.SparseConvTranspose2d(5, 2, 2, 2).to(dev, dt)(z)
    assert y.features.shape == (0, 4) and z.features.shape == (0, 5) and u.features.shape == (0, 4)
    assert g.features.shape == (0, 2) and z.spatial_shape == (4, 4)
    (u.features.sum() + g.features.sum()).backward()
    assert x.features.grad.shape == (0, 3)


@pytest.mark.parametrize("gather", ["pairs", "table", "im2col", "auto"])
def test_gradcheck_tiny(gather, gen):
    x = random_sparse(2, 2, (5, 4), 0.5, generator=gen, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, generator=gen, requires_grad=True)
    w2 = torch.randn(3, 3, 3, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    wt = torch.randn(3, 2, 3, 3, dtype=torch.float64, generator=gen, requires_grad=True)

    def f(feats, w, b, w2, wt):
        t = x.replace(feats)
        y = sp.functional.subm_conv2d(t, w, b)
        z = sp.functional.conv2d(y, w2, b, stride=2, padding=1)
        u = sp.functional.conv_transpose2d(z, wt, None, stride=2, padding=1, output=y)
        return u.features

    with sp.backend("torch", gather=gather):
        assert torch.autograd.gradcheck(f, (x.features, w, b, w2, wt))


def test_wrong_channels_and_too_small_inputs_are_rejected(gen):
    x = random_sparse(1, 3, (5, 5), 0.5, generator=gen)
    with pytest.raises(ValueError, match="3 channels"):
        sp.nn.SubMConv2d(4, 3, 3).double()(x)
    with pytest.raises(ValueError, match="too small"):
        sp.nn.SparseConv2d(3, 3, 7).double()(x)
