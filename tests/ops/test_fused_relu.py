"""``relu=True`` on the functional convs: ``max(conv, 0)``, equal to the dense oracle followed by
a ReLU (forward and backward, every backend case), and without autograd the same bits as the
conv followed by ``relu_`` (the numba backend clamps in its epilogue, the others after)."""
import pytest
import torch
import torch.nn.functional as F

import spconv2d as sp
from spconv2d.testing import check_against_oracle, random_sparse

SF = sp.functional


def _geometries(gen):
    """``(name, sparse op(x, w, b, relu), dense oracle(d, w, b), weight shape)``."""
    skip = random_sparse(3, 4, (10, 12), 0.35, empty=[1], generator=gen)
    return [
        ("subm3", lambda x, w, b, relu: SF.subm_conv2d(x, w, b, relu=relu),
         lambda d, w, b: F.conv2d(d, w, b, padding=1), (6, 5, 3, 3)),
        ("subm1", lambda x, w, b, relu: SF.subm_conv2d(x, w, b, relu=relu),
         lambda d, w, b: F.conv2d(d, w, b), (6, 5, 1, 1)),
        ("strided", lambda x, w, b, relu: SF.conv2d(x, w, b, stride=2, padding=1, relu=relu),
         lambda d, w, b: F.conv2d(d, w, b, stride=2, padding=1), (6, 5, 3, 3)),
        ("transposed", lambda x, w, b, relu: SF.conv_transpose2d(x, w, b, stride=2, relu=relu),
         lambda d, w, b: F.conv_transpose2d(d, w, b, stride=2), (5, 6, 2, 2)),
        ("transposed-to", lambda x, w, b, relu: SF.conv_transpose2d(
            SF.conv2d(x, torch.ones(5, 5, 2, 2, dtype=x.dtype, device=x.device) / 8, None, 2), w, b, 2, output=x,
            relu=relu), None, (5, 6, 2, 2)),
    ]


@pytest.mark.parametrize("which", range(4))
def test_relu_equals_the_dense_oracle_then_relu(which, backend_case, gen):
    name, op, dense, shape = _geometries(gen)[which]
    x = random_sparse(3, 5, (10, 12), 0.35, empty=[1], generator=gen)
    w = torch.randn(*shape, generator=gen, dtype=torch.float64) * 0.5
    b = torch.randn(shape[1] if name.startswith("transposed") else shape[0], generator=gen, dtype=torch.float64)
    check_against_oracle(lambda t, w, b: op(t, w, b, True), lambda d, w, b: torch.relu(dense(d, w, b)), x, [w, b],
                         backend=backend_case.backend, device=backend_case.device, dtype=backend_case.dtype,
                         rtol=backend_case.rtol, atol=backend_case.atol, generator=gen)


@pytest.mark.parametrize("which", range(5))
@pytest.mark.parametrize("backend", ["torch", pytest.param("numba", marks=pytest.mark.numba)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_relu_without_autograd_is_the_conv_then_relu_bit_for_bit(which, backend, dtype, gen):
    name, op, _, shape = _geometries(gen)[which]
    x = random_sparse(3, 5, (10, 12), 0.35, empty=[1], generator=gen, dtype=dtype)
    w = torch.randn(*shape, generator=gen, dtype=dtype)
    b = torch.randn(shape[1] if name.startswith("transposed") else shape[0], generator=gen, dtype=dtype)
    with torch.no_grad(), sp.backend(backend):
        fused, plain = op(x, w, b, True), op(x, w, b, False)
    assert (plain.features < 0).any() and (fused.features == 0).any()  # the clamp matters here
    assert torch.equal(fused.features, plain.features.clamp_min(0))
    assert torch.equal(fused.coords, plain.coords)


def test_relu_on_the_dense_fallback(gen):
    """The PyTorch path's dense route (nearly every pixel active) applies it too."""
    be = sp.backends.create_backend("torch", dense_fallback=True, dense_thresholds=((None, 0.5),))
    x = random_sparse(2, 4, (9, 10), 0.9, generator=gen, requires_grad=True)
    assert be.prefers_dense_subm(x.density, 4, 5)
    w = torch.randn(5, 4, 3, 3, generator=gen, dtype=torch.float64)
    y = SF.subm_conv2d(x, w, None, relu=True, backend=be)
    ref = SF.subm_conv2d(x, w, None, backend=be).features.relu()
    torch.testing.assert_close(y.features, ref, rtol=0, atol=0)
    assert y.features.requires_grad


@pytest.mark.parametrize("backend", ["torch", pytest.param("numba", marks=pytest.mark.numba)])
def test_relu_keeps_nan_like_torch_relu(backend, gen):
    """A NaN input row gives NaN outputs where ``relu(conv)`` has them (never a silent 0)."""
    x = random_sparse(2, 5, (8, 9), 0.4, generator=gen, dtype=torch.float32)
    f = x.features.clone()
    f[3] = float("nan")
    x = x.replace(f)
    w, b = torch.randn(6, 5, 3, 3, generator=gen), torch.randn(6, generator=gen)
    with torch.no_grad(), sp.backend(backend):
        fused = SF.subm_conv2d(x, w, b, relu=True).features
        ref = SF.subm_conv2d(x, w, b).features.relu()
    assert torch.isnan(ref).any()
    torch.testing.assert_close(fused, ref, rtol=0, atol=0, equal_nan=True)

