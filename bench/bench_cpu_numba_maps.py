"""CPU: the numba backend's kernel-map builders and pooling kernels against the PyTorch path.

    BENCH_THREADS=1 python -m pytest bench/bench_cpu_numba_maps.py -p no:cacheprovider \
        --benchmark-json=bench/results/cpu_numba_maps_1thread.json
    BENCH_THREADS=2 python -m pytest bench/bench_cpu_numba_maps.py -p no:cacheprovider \
        --benchmark-json=bench/results/cpu_numba_maps_2thread.json
    python bench/report.py bench/results/cpu_numba_maps_1thread.json --ours numba

(The committed results: a shared 2-core "Intel(R) Xeon(R) Processor" (KVM), 1-minute load
average 1.5-2.5 from other jobs during the runs, so single medians are noisy; alt_ratio is the
number to read.)

``BENCH_THREADS=N`` fixes torch's CPU threads (the numba kernels use as many: ``min(torch threads,
NUMBA_NUM_THREADS)``); default: torch's own setting.

Each case is one group; every implementation is one benchmark of that group. On a shared
machine consecutive rounds of one implementation drift with the load, so each benchmark also
times its *peer* (the torch path for numba, numba for the torch path) in pytest-benchmark's
untimed ``setup`` before every round: the two alternate round by round, and ``extra_info``
records the peer's median (``alt_peer_median_s``) and ``alt_ratio`` = peer median / own median
from those alternating rounds. Read speed-ups from ``alt_ratio``.

Cases
  * ``subm3x3-512x1024-d*``: submanifold 3x3 map of one 512x1024 image at 1/5/25/50 % random
    density (raster-ordered coordinates, as ``from_dense`` gives). ``torch``: ``maps.subm_map`` on
    a fresh ``SparseTensor(check=False)``; ``numba``: ``subm_table``; ``*+validate``: with
    ``SparseTensor(check=True)`` (range and duplicate checks) in the call; ``validate``: that
    construction alone; ``check_coords``: the same checks fused in numba
    (``numba_kernels.maps.check_coords``), ``numba+check_coords`` with the map; ``mm-yardstick``: ``torch.mm`` of an n x n pair with
    ``n^3 = pairs * 64 * 64`` (the multiply-adds of SubMConv2d 3x3 64->64 on this map; the fused
    conv is expected at ~1.5x it), ``extra_info['build_over_conv']`` = build / (1.5 x mm).
  * ``zoo-*``: the zoo's shapes, batch 16 of 64x128 at 30 %: the submanifold 3x3 map, the
    k2s2 down map, the transposed k2s2 conv onto the skip's sites (torch path: the transpose of
    the cached down map, i.e. its reverse table; numba: ``reverse_table`` and, for the general
    case, ``lookup_table`` of the skip's sites in the coarse set).
  * ``pool-*``: max pooling 2x2 s2 and 3x3 s2 p1, 32 channels, on the zoo's shapes, map cached
    (the reverse table the numba backward reads is cached with the map too): forward, and
    forward + backward.
"""
import statistics
import time

import pytest
import torch

import spconv2d as sp
from spconv2d import backends, maps
from spconv2d.backends.numba_kernels import maps as nm
from spconv2d.backends.numba_kernels import pool as npool

BE = backends.resolve(torch.device("cpu"), "torch")
ROUNDS = 31
C_CONV = 64


def _coords(B, H, W, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(B, H, W, generator=g) < density).nonzero().to(torch.int32).contiguous()


def _run(benchmark, group, impl, fn, peer=None, **info):
    """Time ``fn``; time ``peer`` in the untimed setup before every round (alternating)."""
    peer_times = []

    def setup():
        if peer is not None:
            t0 = time.perf_counter()
            peer()
            peer_times.append(time.perf_counter() - t0)

    fn()  # warm-up (compile / caches) outside the timing
    if peer is not None:
        peer()
    benchmark.group = group
    benchmark.name = impl
    benchmark.extra_info.update(impl=impl, threads=torch.get_num_threads(), **info)
    benchmark.pedantic(fn, setup=setup, rounds=ROUNDS, warmup_rounds=0)
    if peer_times:
        own = benchmark.stats.stats.median
        peer_med = statistics.median(peer_times)
        benchmark.extra_info.update(alt_peer_median_s=peer_med, alt_ratio=peer_med / own)


# -- submanifold 3x3, one 512x1024 image -----------------------------------------------------------
H, W = 512, 1024
DENSITIES = [0.01, 0.05, 0.25, 0.50]


def _on_torch(fn):
    """``fn()`` with the PyTorch backend in force (``SparseTensor(check=True)`` uses the CPU
    backend's fused check otherwise)."""
    with sp.backend("torch"):
        return fn()


def _subm_impls(coords, B, shape):
    feats = torch.zeros(coords.shape[0], 1)
    return {
        "torch": lambda: maps.subm_map(sp.SparseTensor(feats, coords, shape, B, check=False), (3, 3), (1, 1),
                                       BE).kmap.nbr,
        "numba": lambda: nm.subm_table(coords, B, shape, 3, 1),
        "torch+validate": lambda: _on_torch(lambda: maps.subm_map(sp.SparseTensor(feats, coords, shape, B), (3, 3),
                                                                  (1, 1), BE).kmap.nbr),
        "numba+validate": lambda: nm.subm_table(sp.SparseTensor(feats, coords, shape, B).coords, B, shape, 3, 1),
        "numba+check_coords": lambda: nm.subm_table(nm.check_coords(coords, B, shape)[0], B, shape, 3, 1),
        "validate": lambda: _on_torch(lambda: sp.SparseTensor(feats, coords, shape, B)),
        "check_coords": lambda: nm.check_coords(coords, B, shape),
    }


PEER = {"torch": "numba", "numba": "torch", "torch+validate": "numba+validate", "numba+validate": "torch+validate",
        "numba+check_coords": "torch+validate", "validate": "check_coords", "check_coords": "validate"}


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("impl", list(PEER))
def test_subm_512x1024(benchmark, density, impl):
    coords = _coords(1, H, W, density)
    impls = _subm_impls(coords, 1, (H, W))
    _run(benchmark, f"subm3x3-512x1024-d{density:.2f}", impl, impls[impl], impls[PEER[impl]],
         density=density, active=coords.shape[0])


@pytest.mark.parametrize("density", DENSITIES)
def test_subm_512x1024_yardstick(benchmark, density):
    """torch.mm with the multiply-adds of SubMConv2d 3x3 64->64 on this map."""
    coords = _coords(1, H, W, density)
    nbr = nm.subm_table(coords, 1, (H, W), 3, 1)
    pairs = int((nbr >= 0).sum())
    n = max(1, round((pairs * C_CONV * C_CONV) ** (1 / 3)))
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    build = nm.subm_table
    build_times = []

    def setup():  # the numba build alternates with the yardstick
        t0 = time.perf_counter()
        build(coords, 1, (H, W), 3, 1)
        build_times.append(time.perf_counter() - t0)

    torch.mm(a, b)
    benchmark.group = f"subm3x3-512x1024-d{density:.2f}"
    benchmark.name = "mm-yardstick"
    benchmark.extra_info.update(impl="mm-yardstick", threads=torch.get_num_threads(), density=density,
                                active=coords.shape[0], pairs=pairs, n=n)
    benchmark.pedantic(lambda: torch.mm(a, b), setup=setup, rounds=ROUNDS, warmup_rounds=1)
    mm = benchmark.stats.stats.median
    b_med = statistics.median(build_times)
    benchmark.extra_info.update(alt_build_median_s=b_med, build_over_conv=b_med / (1.5 * mm))


# -- the zoo's shapes: batch 16 of 64x128 at 30 % ---------------------------------------------------
ZB, ZH, ZW, ZD = 16, 64, 128, 0.30


def _zoo():
    coords = _coords(ZB, ZH, ZW, ZD, seed=1)
    return coords, torch.zeros(coords.shape[0], 1)


@pytest.mark.parametrize("impl", ["torch", "numba"])
def test_zoo_subm(benchmark, impl):
    coords, _ = _zoo()  # (16 x 64 x 128, 30 %)
    impls = _subm_impls(coords, ZB, (ZH, ZW))
    _run(benchmark, "zoo-subm3x3", impl, impls[impl], impls[PEER[impl]], active=coords.shape[0])


def _down_impls():
    coords, feats = _zoo()
    return {
        "torch": lambda: maps.conv_map(sp.SparseTensor(feats, coords, (ZH, ZW), ZB, check=False), (2, 2), (2, 2),
                                       (0, 0), (1, 1)),
        "numba": lambda: nm.conv_table(coords, ZB, (ZH, ZW), 2, 2, 0, 1),
    }, coords


@pytest.mark.parametrize("impl", ["torch", "numba"])
def test_zoo_down_k2s2(benchmark, impl):
    impls, coords = _down_impls()
    _run(benchmark, "zoo-down-k2s2", impl, impls[impl], impls[PEER[impl]], active=coords.shape[0])


def _up_impls():
    """Transposed k2s2 onto the skip's sites, the coarse set made from the skip by the k2s2 down."""
    coords, feats = _zoo()
    skip = sp.SparseTensor(feats, coords, (ZH, ZW), ZB)
    coarse_cs, down = maps.conv_map(skip, (2, 2), (2, 2), (0, 0), (1, 1))
    offsets = torch.tensor([[0, 0], [0, -1], [-1, 0], [-1, -1]])  # (p - ky*r, p - kx*r)
    grid_index = BE.build_index(coarse_cs.keys, coarse_cs.key_space, "grid")

    def torch_transpose():  # what conv_transpose_to_map does: the down map's reverse table
        from spconv2d.kernel_map import KernelMap
        return KernelMap(down.nbr, down.n_in, down.kernel_size).transpose().nbr

    return {
        "torch": torch_transpose,
        "numba": lambda: nm.reverse_table(down.nbr, down.n_in),
        "torch-lookup": lambda: BE.neighbor_table(BE.build_index(coarse_cs.keys, coarse_cs.key_space, "grid"),
                                                  skip.coords, coarse_cs.spatial_shape, (1, 1), offsets, (2, 2)),
        "numba-lookup": lambda: nm.lookup_table(coarse_cs.coords, ZB, coarse_cs.spatial_shape, skip.coords, 1,
                                                offsets, 2),
    }, coords, grid_index


UP_PEER = {"torch": "numba", "numba": "torch", "torch-lookup": "numba-lookup", "numba-lookup": "torch-lookup"}


@pytest.mark.parametrize("impl", list(UP_PEER))
def test_zoo_up_onto_skip(benchmark, impl):
    impls, coords, _ = _up_impls()
    assert torch.equal(impls["numba-lookup"](), impls["torch"]())
    _run(benchmark, "zoo-up-k2s2-onto-skip", impl, impls[impl], impls[UP_PEER[impl]], active=coords.shape[0])


# -- max pooling on the zoo's shapes ----------------------------------------------------------------
C_POOL = 32
POOLS = {"2x2s2": ((2, 2), (2, 2), (0, 0)), "3x3s2p1": ((3, 3), (2, 2), (1, 1))}


def _pool_impls(geom, backward):
    k, s, p = POOLS[geom]
    coords, _ = _zoo()
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(coords.shape[0], C_POOL, generator=g)
    x = sp.SparseTensor(feats, coords, (ZH, ZW), ZB)
    _, kmap = maps.conv_map(x, k, s, p, (1, 1))  # cached in x's manager: both paths reuse it
    kmap.rev  # noqa: B018  (cached with the map, as for the convolutions)
    grad = torch.randn(kmap.n_out, C_POOL, generator=g)
    f = feats.clone().requires_grad_(backward)
    xt = x.replace(f)

    def torch_path():
        y = sp.functional.max_pool2d(xt, k, s, p)
        if backward:
            f.grad = None
            y.features.backward(grad)
        return y.features

    def numba_path():
        out, arg = npool.max_pool_forward(feats, kmap.nbr)
        if backward:
            return npool.max_pool_backward(grad, arg, kmap.rev)
        return out

    return {"torch": torch_path, "numba": numba_path}, coords


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("geom", list(POOLS))
@pytest.mark.parametrize("impl", ["torch", "numba"])
def test_zoo_max_pool(benchmark, impl, geom, backward):
    impls, coords = _pool_impls(geom, backward)
    _run(benchmark, f"pool-max{geom}-c{C_POOL}-{'fwd+bwd' if backward else 'fwd'}", impl, impls[impl],
         impls[PEER[impl]], active=coords.shape[0], channels=C_POOL)
