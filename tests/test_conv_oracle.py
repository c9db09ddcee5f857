"""Every convolution against its dense oracle (DESIGN §2) in float64, forward and backward:
random sites in shuffled row order, odd sizes, several batch items (one empty), N = 0.
Each test runs with each form of the PyTorch path's convolution forced (pair lists, neighbour
table) and with ``auto`` (which also picks the gather-after-GEMM form of k == s maps)."""
import pytest
import torch
import torch.nn.functional as F

import spconv2d as sp
from spconv2d.testing import at_sites, conv2d_sites, conv_transpose2d_sites, random_sparse, sites, sort_rows


@pytest.fixture(autouse=True, params=["pairs", "table", "auto"])
def gather_form(request, monkeypatch):
    from spconv2d.backends import torch_backend

    monkeypatch.setattr(torch_backend.TorchBackend, "gather", request.param)
    return request.param


def _check_backward(out_sparse, out_dense_sites, leaves_sparse, leaves_dense, gen):
    g = torch.randn(out_sparse.shape, generator=gen, dtype=torch.float64)
    gs = torch.autograd.grad(out_sparse, leaves_sparse, g, allow_unused=True)
    gd = torch.autograd.grad(out_dense_sites, leaves_dense, g, allow_unused=True)
    for a, b in zip(gs, gd):
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("k,r", [(1, 1), (3, 1), (3, 2), (5, 1), ((3, 5), (2, 1))])
@pytest.mark.parametrize("bias", [True, False])
def test_subm_conv2d(k, r, bias, gen):
    x = random_sparse(3, 5, (11, 13), 0.3, empty=[1], generator=gen, requires_grad=True)
    k2, r2 = (k, k) if isinstance(k, int) else k, (r, r) if isinstance(r, int) else r
    w = torch.randn(4, 5, *k2, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True) if bias else None
    y = sp.functional.subm_conv2d(x, w, b, r)
    assert torch.equal(y.coords, x.coords) and y.stride == (1, 1)
    pad = (r2[0] * (k2[0] // 2), r2[1] * (k2[1] // 2))
    feats = x.features.detach().clone().requires_grad_()
    xd = x.replace(feats)
    ref = at_sites(F.conv2d(xd.to_dense(), w, b, padding=pad, dilation=r2), x.coords)
    torch.testing.assert_close(y.features, ref, rtol=1e-10, atol=1e-10)
    leaves = [w] + ([b] if bias else [])
    _check_backward(y.features, ref, [x.features] + leaves, [feats] + leaves, gen)


GEOMETRIES = [  # kernel, stride, padding, dilation
    (2, 2, 0, 1), (3, 2, 1, 1), (3, 1, 0, 1), (3, 2, 0, 2), ((2, 3), (2, 1), (0, 1), 1), (5, 3, 2, 1), (4, 2, 1, 1),
    (3, 3, 0, 1),
]


@pytest.mark.parametrize("k,s,p,r", GEOMETRIES)
def test_sparse_conv2d(k, s, p, r, gen):
    x = random_sparse(3, 3, (13, 10), 0.25, empty=[0], generator=gen, requires_grad=True)
    conv = sp.nn.SparseConv2d(3, 6, k, s, p, r).double()
    dense = torch.nn.Conv2d(3, 6, k, s, p, r).double()
    dense.load_state_dict(conv.state_dict())
    y = conv(x)
    site_mask = conv2d_sites(x, k, s, p, r)
    assert y.spatial_shape == tuple(site_mask.shape[2:])
    coords, feats_y = sort_rows(y)
    assert torch.equal(coords, sites(site_mask)), "output sites differ from the dense oracle's"
    feats = x.features.detach().clone().requires_grad_()
    ref_full = dense(x.replace(feats).to_dense())
    ref = at_sites(ref_full, y.coords)
    torch.testing.assert_close(y.features, ref, rtol=1e-10, atol=1e-10)
    assert y.stride == tuple(v * sv for v, sv in zip(x.stride, (s, s) if isinstance(s, int) else s))
    g = torch.randn(y.features.shape, generator=gen, dtype=torch.float64)
    (y.features * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(x.features.grad, feats.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(conv.weight.grad, dense.weight.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(conv.bias.grad, dense.bias.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("k,s,p,r,op", [(2, 2, 0, 1, 0), (3, 2, 1, 1, 1), (3, 1, 1, 1, 0), (3, 2, 0, 2, 0),
                                        ((3, 2), (1, 2), (1, 0), 1, 0), (4, 3, 1, 1, 2)])
def test_sparse_conv_transpose2d_generative(k, s, p, r, op, gen):
    x = random_sparse(3, 4, (7, 9), 0.3, empty=[2], generator=gen, requires_grad=True)
    up = sp.nn.SparseConvTranspose2d(4, 3, k, s, p, r, output_padding=op).double()
    dense = torch.nn.ConvTranspose2d(4, 3, k, s, p, op, dilation=r).double()
    dense.load_state_dict(up.state_dict())
    y = up(x)
    site_mask = conv_transpose2d_sites(x, k, s, p, r, op)
    assert y.spatial_shape == tuple(site_mask.shape[2:])
    coords, _ = sort_rows(y)
    assert torch.equal(coords, sites(site_mask))
    feats = x.features.detach().clone().requires_grad_()
    ref = at_sites(dense(x.replace(feats).to_dense()), y.coords)
    torch.testing.assert_close(y.features, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn(y.features.shape, generator=gen, dtype=torch.float64)
    (y.features * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(x.features.grad, feats.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(up.weight.grad, dense.weight.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(up.bias.grad, dense.bias.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape,down,up", [
    ((13, 11), (2, 2, 0), (2, 2, 0)),  # the U-Net pair: reuses the down map, transposed
    ((12, 10), (2, 2, 0), (2, 2, 0)),  # even: a single pair per row (gather-after-GEMM form)
    ((13, 11), (3, 2, 1), (3, 2, 1)),  # overlapping windows, same geometry: transposed map again
    ((12, 10), (2, 2, 0), (3, 2, 1)),  # different geometry: neighbour lookup at skip's sites
    ((12, 9), (3, 2, 0), (3, 2, 0)),   # skip's shape implies an output_padding
])
def test_conv_transpose2d_to_skip(shape, down, up, gen):
    skip = random_sparse(3, 4, shape, 0.3, empty=[1], generator=gen, requires_grad=True)
    x = sp.nn.SparseConv2d(4, 5, *down).double()(skip)
    upl = sp.nn.SparseConvTranspose2d(5, 4, *up).double()
    y = upl(x, output=skip)
    assert torch.equal(y.coords, skip.coords) and y.spatial_shape == skip.spatial_shape
    assert y.stride == skip.stride
    xf = x.features.detach().clone().requires_grad_()
    w = upl.weight.detach().clone().requires_grad_()
    k, s, p = up
    opad = tuple(n - ((m - 1) * s - 2 * p + k) for n, m in zip(skip.spatial_shape, x.spatial_shape))
    dense = F.conv_transpose2d(x.replace(xf).to_dense(), w, upl.bias, stride=s, padding=p, output_padding=opad)
    assert tuple(dense.shape[2:]) == skip.spatial_shape
    ref = at_sites(dense, skip.coords)
    torch.testing.assert_close(y.features, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn(y.features.shape, generator=gen, dtype=torch.float64)
    gx, gw = torch.autograd.grad(y.features, [x.features, upl.weight], g)
    rx, rw = torch.autograd.grad(ref, [xf, w], g)
    torch.testing.assert_close(gx, rx, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gw, rw, rtol=1e-9, atol=1e-9)


def test_conv_transpose2d_to_skip_rejects_bad_shapes(gen):
    skip = random_sparse(2, 4, (12, 10), 0.3, generator=gen)
    x = sp.nn.SparseConv2d(4, 5, 2, 2).double()(skip)
    with pytest.raises(ValueError, match="cannot produce"):
        sp.nn.SparseConvTranspose2d(5, 4, 5, 3).double()(x, output=skip)
    other = random_sparse(2, 4, (12, 10), 0.3, generator=gen)
    with pytest.raises(ValueError, match="same input"):
        sp.nn.SparseConvTranspose2d(5, 4, 2, 2).double()(x, output=other)


def test_empty_tensor_every_conv(gen):
    x = random_sparse(2, 3, (8, 8), 0.0, generator=gen, requires_grad=True)
    assert x.num_active == 0
    y = sp.nn.SubMConv2d(3, 4, 3).double()(x)
    z = sp.nn.SparseConv2d(4, 5, 3, 2, 1).double()(y)
    u = sp.nn.SparseConvTranspose2d(5, 4, 3, 2, 1).double()(z, output=y)
    g = sp.nn.SparseConvTranspose2d(5, 2, 2, 2).double()(z)
    assert y.features.shape == (0, 4) and z.features.shape == (0, 5) and u.features.shape == (0, 4)
    assert g.features.shape == (0, 2) and z.spatial_shape == (4, 4)
    (u.features.sum() + g.features.sum()).backward()
    assert x.features.grad.shape == (0, 3)


def test_gradcheck_tiny(gen):
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

    assert torch.autograd.gradcheck(f, (x.features, w, b, w2, wt))


def test_maps_are_built_once_and_shared(gen):
    x = random_sparse(2, 4, (16, 16), 0.3, generator=gen)
    a, b = sp.nn.SubMConv2d(4, 4, 3).double(), sp.nn.SubMConv2d(4, 4, 3).double()
    down, up = sp.nn.SparseConv2d(4, 4, 2, 2).double(), sp.nn.SparseConvTranspose2d(4, 4, 2, 2).double()
    mgr = x.coordinate_manager
    y = b(a(x))
    assert mgr.builds == 1  # both SubMConv2d layers share one map
    z = down(y)
    d1 = down(y)  # same geometry, same sites: cached
    assert torch.equal(d1.coords, z.coords) and mgr.builds == 2
    u = up(z, output=x)
    assert mgr.builds == 3
    u.features.sum().backward()
    assert mgr.builds == 3  # backward reuses every map
    # the up map is the down map transposed: it shares the down map's tables
    kmap_up = mgr.maps[("convT_to", z._cs.name, x._cs.name, (2, 2), (2, 2), (0, 0), (1, 1))]
    kmap_down = mgr.maps[("conv", x._cs.name, (2, 2), (2, 2), (0, 0), (1, 1))][1]
    assert kmap_up.rev is kmap_down.nbr


@pytest.mark.parametrize("dense_fallback", [True, False])
def test_subm_dense_fallback_and_pair_lists_agree(dense_fallback, gen, monkeypatch):
    """Above a density threshold the PyTorch path runs SubMConv2d through F.conv2d; both
    routes equal the oracle, forward and backward."""
    from spconv2d.backends import torch_backend

    monkeypatch.setattr(torch_backend.TorchBackend, "dense_fallback", dense_fallback)
    x = random_sparse(3, 4, (9, 10), 0.9, empty=[2], generator=gen, requires_grad=True)
    assert torch_backend.backend.prefers_dense_subm(x.density, 4, 4) == dense_fallback
    w = torch.randn(5, 4, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    y = sp.functional.subm_conv2d(x, w, b)
    built = x.coordinate_manager.builds
    assert built == (0 if dense_fallback else 1)
    feats = x.features.detach().clone().requires_grad_()
    ref = at_sites(F.conv2d(x.replace(feats).to_dense(), w, b, padding=1), x.coords)
    torch.testing.assert_close(y.features, ref, rtol=1e-10, atol=1e-10)
    _check_backward(y.features, ref, [x.features, w, b], [feats, w, b], gen)
