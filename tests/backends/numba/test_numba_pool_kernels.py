"""The numba pooling kernels against the PyTorch path (``sp.functional.max_pool2d`` /
``avg_pool2d`` with autograd: bit-identical values and gradients) and the dense oracles."""
import pytest
import torch

import spconv2d as sp
from spconv2d import maps
from spconv2d.backends.numba_kernels import maps as nm
from spconv2d.backends.numba_kernels import pool as npool
from spconv2d.backends.numba_kernels import runtime
from spconv2d.testing import at_sites, avg_pool2d_dense, max_pool2d_dense, random_sparse

pytestmark = pytest.mark.numba

GEOMS = [((2, 2), (2, 2), (0, 0), (1, 1)), ((3, 3), (2, 2), (1, 1), (1, 1)), ((3, 3), (1, 1), (1, 1), (1, 1)),
         ((2, 2), (1, 1), (0, 0), (1, 1)), ((3, 3), (3, 3), (0, 0), (1, 1)), ((3, 2), (2, 1), (1, 0), (1, 1)),
         ((5, 5), (2, 2), (2, 2), (1, 1)), ((3, 3), (2, 2), (1, 1), (2, 2))]


def _x(gen, dtype, ties=False, shape=(11, 13), channels=16):
    x = random_sparse(3, channels, shape, 0.4, empty=(1,), dtype=dtype, generator=gen)
    if ties:  # few distinct values: many equal maxima in a window
        x = x.replace(torch.randint(-2, 3, x.features.shape, generator=gen).to(dtype))
    return x


def _torch_path(x, op, k, s, p, r, grad):
    """Values and input gradient on the PyTorch path, on one thread: with more, torch's
    ``index_put_(accumulate=True)`` (the gather's backward) adds in parallel with atomics, in no
    fixed order (measured: last-bit differences from run to run). On one thread it adds the
    offsets in order, as the numba kernels do on any number of threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        f = x.features.detach().clone().requires_grad_(True)
        y = getattr(sp.functional, op)(x.replace(f), k, s, p, r, backend="torch")
        y.features.backward(grad)
    finally:
        torch.set_num_threads(old)
    return y.features.detach(), f.grad


def _run(x, op, k, s, p, r, grad):
    _, kmap = maps.conv_map(x, k, s, p, r)
    if op == "max_pool2d":
        out, arg = npool.max_pool_forward(x.features, kmap.nbr)
        return out, npool.max_pool_backward(grad, arg, kmap.rev)
    out, count = npool.avg_pool_forward(x.features, kmap.nbr)
    return out, npool.avg_pool_backward(grad, count, kmap.rev)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("geom", GEOMS, ids=str)
@pytest.mark.parametrize("op", ["max_pool2d", "avg_pool2d"])
def test_pool_matches_torch_path_bitwise(gen, op, geom, dtype):
    """Bit for bit, except the average's forward values: the kernel adds the offsets in order,
    torch's ``sum(0)`` not always (it depends on the channels and the size; last-bit
    differences), so those are compared within rounding."""
    k, s, p, r = geom
    for ties, channels in ((False, 16), (True, 16), (False, 5)):
        x = _x(gen, dtype, ties, channels=channels)
        n_out = maps.conv_map(x, k, s, p, r)[1].n_out
        grad = torch.randn(n_out, channels, generator=gen, dtype=torch.float64).to(dtype)
        ref_out, ref_grad = _torch_path(x, op, k, s, p, r, grad)
        out, gin = _run(x, op, k, s, p, r, grad)
        assert out.dtype == dtype and gin.dtype == dtype
        if op == "avg_pool2d":
            torch.testing.assert_close(out, ref_out, rtol=8 * torch.finfo(dtype).eps, atol=8 * torch.finfo(dtype).eps)
        else:
            assert torch.equal(out, ref_out)
        assert torch.equal(gin, ref_grad)


@pytest.mark.parametrize("geom", [g for g in GEOMS if g[3] == (1, 1)], ids=str)
def test_pool_dense_oracle(gen, geom):
    k, s, p, r = geom
    x = _x(gen, torch.float64)
    out_cs, kmap = maps.conv_map(x, k, s, p, r)
    out, _ = npool.max_pool_forward(x.features, kmap.nbr)
    torch.testing.assert_close(out, at_sites(max_pool2d_dense(x, k, s, p), out_cs.coords))
    out, _ = npool.avg_pool_forward(x.features, kmap.nbr)
    torch.testing.assert_close(out, at_sites(avg_pool2d_dense(x, k, s, p), out_cs.coords))


def test_max_pool_special_values(gen):
    """NaN wins (first NaN), -inf inputs, ties: the same values and gradients as the torch path."""
    x = _x(gen, torch.float32, ties=True)
    f = x.features.clone()
    f[::7, 0] = float("nan")
    f[::3, 1] = float("-inf")
    f[:, 2] = float("-inf")
    x = x.replace(f)
    k, s, p, r = (3, 3), (2, 2), (1, 1), (1, 1)
    n_out = maps.conv_map(x, k, s, p, r)[1].n_out
    grad = torch.randn(n_out, 16, generator=gen)
    ref_out, ref_grad = _torch_path(x, "max_pool2d", k, s, p, r, grad)
    out, gin = _run(x, "max_pool2d", k, s, p, r, grad)
    assert torch.equal(out.isnan(), ref_out.isnan())
    assert torch.equal(out.nan_to_num(), ref_out.nan_to_num()) and torch.equal(gin, ref_grad)


def test_pool_empty_and_large_kernel(gen):
    e = torch.zeros(0, 4)
    nbr = torch.zeros(9, 0, dtype=torch.int32)
    out, arg = npool.max_pool_forward(e, nbr)
    assert out.shape == (0, 4) and npool.max_pool_backward(out, arg, torch.zeros(9, 0, dtype=torch.int32)).shape == (0, 4)
    out, count = npool.avg_pool_forward(e, nbr)
    assert out.shape == (0, 4) and npool.avg_pool_backward(out, count, torch.zeros(9, 0, dtype=torch.int32)).shape == (0, 4)
    # K > 255: int32 winners
    x = random_sparse(1, 3, (20, 20), 0.3, generator=gen)
    oc, nbr = nm.conv_table(x.coords, 1, (20, 20), (16, 17), 2, 0)
    out, arg = npool.max_pool_forward(x.features, nbr)
    assert arg.dtype == torch.int32
    ref = at_sites(max_pool2d_dense(x, (16, 17), 2, 0), oc)
    torch.testing.assert_close(out, ref)


def test_pool_same_result_on_one_and_two_threads_team_and_pool(gen):
    x = random_sparse(2, 16, (64, 64), 0.3, dtype=torch.float32, generator=gen)
    _, kmap = maps.conv_map(x, (3, 3), (2, 2), (1, 1), (1, 1))
    g = torch.randn(kmap.n_out, 16, generator=gen)
    old, res = torch.get_num_threads(), []
    try:  # one thread, two on PyTorch's OpenMP team, two on numba's pool
        for n, team in ((1, True), (2, True), (2, False)):
            torch.set_num_threads(n)
            runtime.USE_TORCH_TEAM = team
            out, arg = npool.max_pool_forward(x.features, kmap.nbr)
            a, cnt = npool.avg_pool_forward(x.features, kmap.nbr)
            res.append((out, arg, npool.max_pool_backward(g, arg, kmap.rev), a, npool.avg_pool_backward(g, cnt, kmap.rev)))
    finally:
        runtime.USE_TORCH_TEAM = True
        torch.set_num_threads(old)
    assert all(torch.equal(u, v) and torch.equal(v, w) for u, v, w in zip(*res))


def test_rejects_other_dtypes():
    with pytest.raises(TypeError):
        npool.max_pool_forward(torch.zeros(2, 3, dtype=torch.float16), torch.zeros(1, 2, dtype=torch.int32))
