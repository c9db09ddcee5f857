"""Every convolution through each backend (the PyTorch path, and the Triton kernels under the
interpreter or on a GPU) against the dense oracle, in float32 and float16, forward and backward."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import spconv2d as sp  # noqa: E402
from spconv2d.backends import triton_available  # noqa: E402
from spconv2d.testing import at_sites, random_sparse  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not triton_available() or (DEVICE == "cpu" and not INTERPRET), reason="needs triton (interpreter or CUDA)"))]
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-2, atol=2e-2)}


def _case(gen, channels=5, shape=(9, 11), density=0.4):
    """float64 input: 3 batch items (the middle one empty), shuffled rows."""
    return random_sparse(3, channels, shape, density, empty=[1], generator=gen)


def _compare(op, dense_op, x64, params64, backend, dtype, gen):
    """Run ``op`` on ``backend`` in ``dtype`` and ``dense_op`` in float64; compare values and
    the gradients of features and every parameter."""
    feats = x64.features.to(DEVICE, dtype).requires_grad_()
    x = sp.SparseTensor(feats, x64.coords.to(DEVICE), x64.spatial_shape, x64.batch_size)
    params = [p.to(DEVICE, dtype).requires_grad_() for p in params64]
    with sp.backend(backend):
        y = op(x, *params)
    f64 = x64.features.clone().requires_grad_()
    p64 = [p.clone().requires_grad_() for p in params64]
    dense = dense_op(x64.replace(f64).to_dense(), *p64)
    ref = at_sites(dense, y.coords.cpu())
    assert y.features.dtype == dtype
    torch.testing.assert_close(y.features.double().cpu(), ref, **TOL[dtype])
    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(y.features, [feats] + params, g.to(DEVICE, dtype))
    exp = torch.autograd.grad(ref, [f64] + p64, g)
    for a, b in zip(got, exp):
        scale = max(1.0, float(b.abs().max()))
        torch.testing.assert_close(a.double().cpu() / scale, b / scale, **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_subm(backend, dtype, gen):
    x = _case(gen)
    w, b = torch.randn(6, 5, 3, 3, generator=gen, dtype=torch.float64) * 0.3, torch.randn(6, generator=gen, dtype=torch.float64)
    _compare(lambda x, w, b: sp.functional.subm_conv2d(x, w, b), lambda d, w, b: F.conv2d(d, w, b, padding=1),
             x, [w, b], backend, dtype, gen)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k,s,p", [(3, 2, 1), (2, 2, 0)])
def test_strided(backend, dtype, k, s, p, gen):
    x = _case(gen)
    w = torch.randn(6, 5, k, k, generator=gen, dtype=torch.float64) * 0.3
    _compare(lambda x, w: sp.functional.conv2d(x, w, None, s, p), lambda d, w: F.conv2d(d, w, None, s, p),
             x, [w], backend, dtype, gen)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_transposed_generative(backend, dtype, gen):
    x = _case(gen, shape=(5, 6))
    w, b = torch.randn(5, 6, 3, 3, generator=gen, dtype=torch.float64) * 0.3, torch.randn(6, generator=gen, dtype=torch.float64)
    _compare(lambda x, w, b: sp.functional.conv_transpose2d(x, w, b, 2, 1),
             lambda d, w, b: F.conv_transpose2d(d, w, b, 2, 1), x, [w, b], backend, dtype, gen)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k,s,p", [(2, 2, 0), (3, 2, 1)])
def test_transposed_to_skip(backend, dtype, k, s, p, gen):
    """The decoder case: down with k2s2, then back up onto the skip's sites (k, s, p)."""
    skip64 = random_sparse(2, 5, (10, 12), 0.4, empty=[0], generator=gen)
    down = sp.functional.conv2d(skip64, torch.randn(5, 5, 2, 2, generator=gen, dtype=torch.float64), None, 2)
    xs = down.features.detach()
    w = torch.randn(5, 6, k, k, generator=gen, dtype=torch.float64) * 0.3
    opad = tuple(n - ((m - 1) * s - 2 * p + k) for n, m in zip(skip64.spatial_shape, down.spatial_shape))
    # run: x (down's sites) -> up onto skip's sites, on the backend under test
    feats = xs.to(DEVICE, dtype).requires_grad_()
    skip = sp.SparseTensor(skip64.features.to(DEVICE, dtype), skip64.coords.to(DEVICE), skip64.spatial_shape, 2)
    with sp.backend(backend):
        low = sp.functional.conv2d(skip, torch.zeros(5, 5, 2, 2, device=DEVICE, dtype=dtype), None, 2)
        x = low.replace(feats)
        wt = w.to(DEVICE, dtype).requires_grad_()
        y = sp.functional.conv_transpose2d(x, wt, None, s, p, output=skip)
    assert torch.equal(y.coords.cpu(), skip64.coords)
    f64, w64 = xs.clone().requires_grad_(), w.clone().requires_grad_()
    dense = F.conv_transpose2d(down.replace(f64).to_dense(), w64, None, s, p, output_padding=opad)
    ref = at_sites(dense, skip64.coords)
    torch.testing.assert_close(y.features.double().cpu(), ref, **TOL[dtype])
    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(y.features, [feats, wt], g.to(DEVICE, dtype))
    exp = torch.autograd.grad(ref, [f64, w64], g)
    for a, b in zip(got, exp):
        scale = max(1.0, float(b.abs().max()))
        torch.testing.assert_close(a.double().cpu() / scale, b / scale, **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_input(backend, gen):
    x = random_sparse(2, 5, (6, 6), 0.0, dtype=torch.float32, generator=gen, device=DEVICE, requires_grad=True)
    with sp.backend(backend):
        y = sp.nn.SubMConv2d(5, 6, 3).to(DEVICE)(x)
        z = sp.nn.SparseConv2d(6, 4, 3, 2, 1).to(DEVICE)(y)
    assert y.features.shape == (0, 6) and z.features.shape == (0, 4)
    z.features.sum().backward()
    assert x.features.grad.shape == (0, 5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_maps_match_between_backends(backend, gen):
    """Kernel maps built through a backend's index equal the PyTorch path's."""
    x = random_sparse(3, 2, (13, 9), 0.3, empty=[1], generator=gen, dtype=torch.float32)
    ref = sp.maps.subm_map(x, (3, 5), (2, 1), sp.backends.resolve(x.device, "torch"), "sort").nbr
    y = sp.SparseTensor(x.features.to(DEVICE), x.coords.to(DEVICE), x.spatial_shape, x.batch_size)
    with sp.backend(backend):
        be = sp.backends.resolve(y.device)
        nbr = sp.maps.subm_map(y, (3, 5), (2, 1), be).nbr
    assert torch.equal(nbr.cpu(), ref)
