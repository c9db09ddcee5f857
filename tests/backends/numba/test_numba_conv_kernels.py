"""The numba convolution kernels against an inline PyTorch reference.

``out[j] = bias + sum_k x[nbr[k, j]] @ w[k]``, ``grad_in[i] = sum_k g[rev[k, i]] @ w[k].T``,
``grad_w[k] = sum_j x[nbr[k, j]].T (outer) g[j]`` (missing neighbours contribute nothing), on
random maps with missing entries, submanifold maps (identity offset, symmetric), odd channel
counts and empty inputs, in float32 and float64.

Determinism: each kernel's result is bit-identical across two runs and across 1 and 2 threads,
on PyTorch's OpenMP team and on numba's pool (every output element is summed in an order fixed
by the plan and the tile shape; no atomics).
The first run of this file compiles the kernels (cached on disk by numba for the next runs).
"""
import numpy as np
import pytest
import torch

import spconv2d as sp
from spconv2d.backends.numba_kernels import conv as nk
from spconv2d.backends.numba_kernels import runtime
from spconv2d.backends.torch_backend import TorchBackend
from spconv2d.maps import subm_map

pytestmark = pytest.mark.numba

K = 9


# -- reference --------------------------------------------------------------------------------
def ref_conv(x, w, b, nbr):
    out = torch.zeros(nbr.shape[1], w.shape[2], dtype=torch.float64)
    if b is not None:
        out += b.double()
    for k in range(nbr.shape[0]):
        j = (nbr[k] >= 0).nonzero().squeeze(1)
        out[j] += x.double()[nbr[k, j].long()] @ w[k].double()
    return out


def ref_wgrad(x, g, nbr):
    out = torch.zeros(nbr.shape[0], x.shape[1], g.shape[1], dtype=torch.float64)
    for k in range(nbr.shape[0]):
        j = (nbr[k] >= 0).nonzero().squeeze(1)
        out[k] = x.double()[nbr[k, j].long()].T @ g.double()[j]
    return out


def reverse(nbr, n_in):
    rev = torch.full((nbr.shape[0], n_in), -1, dtype=torch.int32)
    k, j = (nbr >= 0).nonzero(as_tuple=True)
    rev[k, nbr[k, j].long()] = j.to(torch.int32)
    return rev


def random_map(gen, n_in, n_out, fill=0.4):
    """Each (offset, output) reads a distinct input row with probability ``fill`` (at most one
    output per (offset, input), as in every convolution map)."""
    nbr = torch.full((K, n_out), -1, dtype=torch.int32)
    for k in range(K):
        if n_in == 0:
            continue
        take = torch.rand(n_out, generator=gen) < fill
        m = min(int(take.sum()), n_in)
        j = take.nonzero().squeeze(1)[:m]
        nbr[k, j] = torch.randperm(n_in, generator=gen)[:m].to(torch.int32)
    return nbr


def tol(dtype, c):
    return dict(rtol=1e-4, atol=1e-4 * max(c, 1) ** 0.5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)


def check(got, ref, dtype, c):
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), ref, **tol(dtype, c))


# -- forward, input gradient, weight gradient on random maps -------------------------------------
CHANNELS = [(1, 3), (3, 1), (5, 17), (17, 5), (64, 64), (130, 130)]


@pytest.mark.parametrize("c_in,c_out", CHANNELS)
def test_random_map_fp32(gen, c_in, c_out):
    n_in, n_out = 700, 500
    nbr = random_map(gen, n_in, n_out)
    x = torch.randn(n_in, c_in, generator=gen)
    w = torch.randn(K, c_in, c_out, generator=gen) / c_in ** 0.5
    b = torch.randn(c_out, generator=gen)
    g = torch.randn(n_out, c_out, generator=gen)
    check(nk.conv_forward(x, w, b, nbr), ref_conv(x, w, b, nbr), torch.float32, c_in)
    rev = reverse(nbr, n_in)
    check(nk.conv_backward_input(g, w, rev), ref_conv(g, w.transpose(1, 2), None, rev), torch.float32, c_out)
    check(nk.conv_backward_weight(x, g, nbr), ref_wgrad(x, g, nbr), torch.float32, n_out)


@pytest.mark.parametrize("c_in,c_out", [(5, 17), (64, 130)])
def test_random_map_fp64(gen, c_in, c_out):
    n_in, n_out = 400, 600
    nbr = random_map(gen, n_in, n_out)
    x = torch.randn(n_in, c_in, generator=gen, dtype=torch.float64)
    w = torch.randn(K, c_in, c_out, generator=gen, dtype=torch.float64)
    g = torch.randn(n_out, c_out, generator=gen, dtype=torch.float64)
    check(nk.conv_forward(x, w, None, nbr), ref_conv(x, w, None, nbr), torch.float64, c_in)
    rev = reverse(nbr, n_in)
    check(nk.conv_backward_input(g, w, rev), ref_conv(g, w.transpose(1, 2), None, rev), torch.float64, c_out)
    check(nk.conv_backward_weight(x, g, nbr), ref_wgrad(x, g, nbr), torch.float64, n_out)


# -- submanifold maps: identity offset, symmetric input gradient -------------------------------
def subm(gen, c, n=(3, 40, 70), density=0.3, dtype=torch.float32):
    B, H, W = n
    mask = torch.rand(B, H, W, generator=gen) < density
    coords = mask.nonzero().to(torch.int32)
    x = sp.SparseTensor(torch.randn(coords.shape[0], c, generator=gen, dtype=dtype), coords, (H, W), B)
    return x.features, subm_map(x, (3, 3), (1, 1), TorchBackend()).kmap


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c", [16, 32])
def test_submanifold_map(gen, dtype, c):
    x, km = subm(gen, c, dtype=dtype)
    assert km.identity_offset == K // 2
    w = torch.randn(K, c, c, generator=gen, dtype=dtype) / c ** 0.5
    b = torch.randn(c, generator=gen, dtype=dtype)
    g = torch.randn(km.n_out, c, generator=gen, dtype=dtype)
    plan = nk.build_plan(km.nbr, km.n_in)
    check(nk.conv_forward(x, w, b, km.nbr, plan), ref_conv(x, w, b, km.nbr), dtype, c)
    # one plan for both directions: rev[k] = nbr[K-1-k]
    ref_in = ref_conv(g, w.transpose(1, 2), None, km.rev)
    check(nk.conv_backward_input(g, w, km.nbr, plan, flip_offsets=True), ref_in, dtype, c)
    check(nk.conv_backward_input(g, w, km.rev), ref_in, dtype, c)
    check(nk.conv_backward_weight(x, g, km.nbr, plan), ref_wgrad(x, g, km.nbr), dtype, km.n_out)
    # the torch path agrees (same formula, different summation order)
    tb = TorchBackend()
    torch.testing.assert_close(nk.conv_forward(x, w, b, km.nbr, plan), tb.conv_forward(x, w, b, km), **tol(dtype, c))


@pytest.mark.parametrize("fill", [0.02, 0.3, 0.9])
def test_plan_layout(gen, fill):
    nbr = random_map(gen, 1300, 1333, fill=fill)
    plan = nk.build_plan(nbr, 1300)
    R = plan.block_rows
    assert nk.MIN_BLOCK_ROWS <= R <= nk.MAX_BLOCK_ROWS
    nb = -(-1333 // R)
    assert plan.cnt.shape == (nb * K,) and plan.src.size == plan.loc.size == nb * K * R
    starts = np.arange(nb * K) * R
    ends = np.array([nk.segment_end(plan.cnt, s, R, plan.pad) for s in range(nb * K)])
    seg_len = ends - starts
    assert (seg_len % plan.pad == 0).all() and (seg_len >= plan.cnt).all() and (seg_len - plan.cnt < plan.pad).all()
    assert (seg_len <= R).all()  # within the segment's room
    for b in range(nb):
        for k in range(K):
            s, c, e = starts[b * K + k], plan.cnt[b * K + k], ends[b * K + k]
            rows = torch.from_numpy(plan.loc[s:s + c]).long() + b * R
            expect = (nbr[k, b * R:(b + 1) * R] >= 0).nonzero().squeeze(1) + b * R
            assert torch.equal(rows, expect)
            assert torch.equal(torch.from_numpy(plan.src[s:s + c]), nbr[k, rows])
            assert (plan.loc[s + c:e] == R).all()
            if e > s + c:
                assert (plan.src[s + c:e] == plan.src[s + c - 1]).all()


# -- empty inputs, 16-bit inputs -------------------------------------------------------------------
def test_empty(gen):
    w = torch.randn(K, 5, 3, generator=gen)
    b = torch.randn(3, generator=gen)
    nbr = torch.empty(K, 0, dtype=torch.int32)
    assert nk.conv_forward(torch.randn(4, 5), w, b, nbr).shape == (0, 3)
    assert nk.conv_backward_weight(torch.randn(4, 5), torch.randn(0, 3), nbr).abs().sum() == 0
    assert nk.conv_backward_input(torch.randn(4, 3), w, torch.full((K, 0), -1, dtype=torch.int32)).shape == (0, 5)
    # outputs without inputs: the bias alone
    nbr = torch.full((K, 6), -1, dtype=torch.int32)
    torch.testing.assert_close(nk.conv_forward(torch.randn(0, 5), w, b, nbr), b.expand(6, 3))
    gw = nk.conv_backward_weight(torch.randn(0, 5), torch.randn(6, 3), nbr)
    assert gw.shape == (K, 5, 3) and gw.abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(gen, dtype):
    nbr = random_map(gen, 200, 150)
    x = torch.randn(200, 17, generator=gen).to(dtype)
    w = (torch.randn(K, 17, 5, generator=gen) / 4).to(dtype)
    b = torch.randn(5, generator=gen).to(dtype)
    g = torch.randn(150, 5, generator=gen).to(dtype)
    out = nk.conv_forward(x, w, b, nbr)
    assert out.dtype == dtype
    # computed in fp32, rounded once
    assert torch.equal(out, nk.conv_forward(x.float(), w.float(), b.float(), nbr).to(dtype))
    gw = nk.conv_backward_weight(x, g, nbr)
    assert gw.dtype == dtype and torch.equal(gw, nk.conv_backward_weight(x.float(), g.float(), nbr).to(dtype))



@pytest.mark.parametrize("n_out", [5003, 20011])
def test_plan_same_on_every_thread_count(gen, n_out):
    """The plan fill's tasks (``PLAN_TASK_ENTRIES // block`` segments each, the last one partial
    here) give the one-thread plan on PyTorch's team and on numba's pool; tables large enough
    to run in parallel (``K * n_out >= PARALLEL_MIN_WORK``)."""
    nbr = random_map(gen, n_out, n_out, fill=0.4)
    assert K * n_out >= runtime.PARALLEL_MIN_WORK
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = nk.build_plan(nbr, n_out)
        per = nk.PLAN_TASK_ENTRIES // one.block_rows
        assert one.cnt.size % per and one.cnt.size > 2 * per  # several tasks, the last partial
        assert one.cnt[-(one.cnt.size % per):].all()  # (and holding pairs)
        torch.set_num_threads(2)
        team = nk.build_plan(nbr, n_out)
        runtime.USE_TORCH_TEAM = False
        pool = nk.build_plan(nbr, n_out)
    finally:
        runtime.USE_TORCH_TEAM = True
        torch.set_num_threads(old)
    ends = [nk.segment_end(one.cnt, s, one.block_rows, one.pad) for s in range(one.cnt.size)]
    for plan in (team, pool):
        assert plan.block_rows == one.block_rows
        for name in ("cnt", "src", "loc"):
            a, b = getattr(one, name), getattr(plan, name)
            if name == "cnt":
                assert np.array_equal(a, b)
            else:  # only the segments' entries are defined (the rest of each room is unused)
                for s, e in enumerate(ends):
                    lo = s * one.block_rows
                    assert np.array_equal(a[lo:e], b[lo:e]), (name, s)


# -- determinism ----------------------------------------------------------------------------------
@pytest.mark.parametrize("c", [16, 64])
def test_bit_identical_runs_and_threads(gen, c):
    x, km = subm(gen, c, n=(2, 64, 96), density=0.5)
    w = torch.randn(K, c, c, generator=gen) / c ** 0.5
    b = torch.randn(c, generator=gen)
    g = torch.randn(km.n_out, c, generator=gen)
    plan = nk.build_plan(km.nbr, km.n_in)

    def run():
        return (nk.conv_forward(x, w, b, km.nbr, plan),
                nk.conv_backward_input(g, w, km.nbr, plan, flip_offsets=True),
                nk.conv_backward_weight(x, g, km.nbr, plan))

    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two, again = run(), run()  # on PyTorch's OpenMP team where there is one
        runtime.USE_TORCH_TEAM = False
        pool = run()  # the parallel=True compilations on numba's pool
    finally:
        runtime.USE_TORCH_TEAM = True
        torch.set_num_threads(old)
    for a, b_, c_, d in zip(one, two, again, pool):
        assert torch.equal(a, b_) and torch.equal(b_, c_) and torch.equal(c_, d)


# -- the tile shapes used without AVX-512 (correctness only on this machine) ---------------------
def test_avx2_tile_shapes(gen, monkeypatch):
    monkeypatch.setattr(nk, "_isa", lambda: "avx2")
    nbr = random_map(gen, 300, 260)
    x = torch.randn(300, 17, generator=gen)
    w = torch.randn(K, 17, 20, generator=gen) / 4
    g = torch.randn(260, 20, generator=gen)
    check(nk.conv_forward(x, w, None, nbr), ref_conv(x, w, None, nbr), torch.float32, 17)
    check(nk.conv_backward_weight(x, g, nbr), ref_wgrad(x, g, nbr), torch.float32, 260)


# -- the weight gradient's packed form (wide channels, AVX2 tile table) ----------------------------
@pytest.mark.parametrize("c_in,c_out", [(3, 400), (70, 33), (130, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_packed_weight_gradient_equals_gathered(gen, monkeypatch, c_in, c_out, dtype):
    """The packed form (``C_in * C_out`` from ``wgrad_packed_from``) gives the gathered form's
    bits: the same pairs in the same order per element. The map's segments are longer than a
    pack (full rows; a 1-row input under 3 rows of tiles; an overlapping last tile)."""
    monkeypatch.setattr(nk, "_isa", lambda: "avx2")
    nbr = random_map(gen, 900, 1100, fill=0.9)
    x = torch.randn(900, c_in, generator=gen, dtype=dtype)
    g = torch.randn(1100, c_out, generator=gen, dtype=dtype)
    packed = nk.conv_backward_weight(x, g, nbr)
    check(packed, ref_wgrad(x, g, nbr), dtype, 1100)
    tiles = dict(nk._TILES["avx2"], wgrad_packed_from=1 << 62)
    monkeypatch.setitem(nk._TILES, "avx2", tiles)
    assert torch.equal(packed, nk.conv_backward_weight(x, g, nbr))


@pytest.mark.parametrize("shape,NR", [((9, 128, 128), 32), ((9, 17, 5), 8), ((9, 64, 100), 32), ((1, 3, 40), 8),
                                      ((4, 8, 8), 8), ((9, 130, 7), 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_padded_weight_of_a_transposed_view(gen, shape, NR, dtype):
    """The input gradient's weight, ``W[k].T`` (offsets reversed for ``flip``) padded to whole
    blocks of ``NR`` output channels with zeros: the blocked transposition equals PyTorch's copy,
    remainders of the 8 x 8 blocks included."""
    w = torch.randn(*shape, generator=gen, dtype=dtype)
    for flip in (False, True):
        got = nk._padded_weight(w.transpose(1, 2), NR, dtype, flip)
        ref = (w.flip(0) if flip else w).transpose(1, 2)
        assert got.is_contiguous() and got.shape[2] % NR == 0
        assert torch.equal(got[:, :, :ref.shape[2]], ref) and not got[:, :, ref.shape[2]:].any()
