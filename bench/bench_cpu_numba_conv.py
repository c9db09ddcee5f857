"""CPU: the numba kernels (``spconv2d.backends.numba_kernels.conv``) against the PyTorch path,
dense ``F.conv2d`` and the machine's GEMM rate, side by side in one run on the same inputs.

Kernel map and plan prebuilt (another engineer's job; shared by every layer on the same
sites); inside the timed call only the kernel launch and its output allocation.

Groups
  (a) ``a-subm64-d{5,25,50}``: SubMConv2d 3x3, 64 -> 64, one 512x1024 image, random pixels,
      forward: ``numba``, ``torch`` (``TorchBackend().conv_forward``), ``dense-nchw`` and
      ``dense-channels_last`` (``F.conv2d`` on the whole image), ``gemm`` (one square fp32
      ``torch.mm`` of ``n x n`` with ``n^3`` = the conv's multiply-adds, ``pairs * 64 * 64``).
  (b) ``b-zoo-c{16,32}-d{30,63}-{fwd,bwi,wgrad}``: the model zoo's shapes, a batch of 16
      images of 64x128: ``numba`` and ``torch`` (and ``gemm`` of the same multiply-adds) for the
      forward, the input gradient and the weight gradient separately.
  (c) ``c-c{1..128}-d{1..90}-{fwd,bwi,wgrad}``: channels x density sweep on a batch of 4 of
      64x128, ``numba`` and ``torch``: the "never slower than the torch path" check.
  (d) ``d-team-c{16,32,64}-{fwd,wgrad}``: where the numba kernels' threads come from, inside a
      model: ``team`` (PyTorch's own OpenMP threads, ``runtime.TeamKernel``) and ``pool``
      (numba's ``workqueue`` pool, the fallback), each call right after a parallel PyTorch op
      (a ReLU over a U-Net activation, untimed), at the U-Net's levels (16 ch at 30 % of 64x128,
      32 ch at 45 % of 32x64, 64 ch at 64 % of 16x32, batch 16). ``alt_ratio_pool_vs_team`` =
      pool time / team time. Meaningful with ``BENCH_THREADS=2`` (one thread runs neither).
  (e) ``e-subm1x1``: a 1x1 submanifold conv (the U-Net's head: 16 -> 19 channels at 30 % of a
      batch of 16 of 64x128, a fresh tensor as in a forward): ``linear`` (what ``subm_conv2d``
      runs: one GEMM on the features) vs ``map+kernel`` (the identity map built, then the
      gathered kernel). ``alt_ratio_map_vs_linear`` = map+kernel time / linear time.

Timings: pytest-benchmark's own rounds per implementation (``stats``), and, because the machine
is shared and its speed drifts, every case is also run ``ALT_ROUNDS`` times alternating the
implementations round by round; ``extra_info`` holds those medians (``alt_median_s``) and the
ratio ``alt_ratio_vs_torch`` (torch path time / this time; >1 = faster than the torch path) and
``alt_ratio_vs_gemm`` (this time / GEMM time), with threads, density, channels, CPU model.

    BENCH_THREADS=1 python -m pytest bench/bench_cpu_numba_conv.py \\
        --benchmark-json=bench/results/cpu_numba_conv_1thread.json
    BENCH_THREADS=2 python -m pytest bench/bench_cpu_numba_conv.py \\
        --benchmark-json=bench/results/cpu_numba_conv_2thread.json
    python bench/report.py bench/results/cpu_numba_conv_2thread.json --ours numba --baseline torch

``-k test_a_subm64`` / ``test_b_zoo`` / ``test_c_sweep`` select one family; test ids carry the
channels, density, op and implementation (e.g. ``-k "test_c_sweep and c64 and d10"``).
"""
import time

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("numba")

import spconv2d as sp  # noqa: E402
from spconv2d.backends.numba_kernels import conv as nk  # noqa: E402
from spconv2d.backends.numba_kernels import runtime  # noqa: E402
from spconv2d.backends.torch_backend import TorchBackend  # noqa: E402
from spconv2d.maps import subm_map  # noqa: E402
from spconv2d.zoo.study import cpu_model  # noqa: E402

ROUNDS = 7
ALT_ROUNDS = 9
K = 9


CPU = cpu_model()


# -- cases ----------------------------------------------------------------------------------------
class Case:
    """One map, its inputs and every implementation's callable for one op."""

    def __init__(self, shape, c, density, op, dense=False, gemm=False):
        B, H, W = shape
        g = torch.Generator().manual_seed(0)
        mask = torch.rand(B, H, W, generator=g) < density
        coords = mask.nonzero().to(torch.int32)
        feats = torch.randn(coords.shape[0], c, generator=g)
        x = sp.SparseTensor(feats, coords, (H, W), B)
        tb = TorchBackend()
        km = subm_map(x, (3, 3), (1, 1), tb).kmap
        plan = nk.build_plan(km.nbr, km.n_in)
        weight = torch.randn(c, c, 3, 3, generator=g) * (1.0 / (9 * c) ** 0.5)  # nn.Conv2d layout
        w_kio = weight.permute(2, 3, 1, 0).reshape(K, c, c).contiguous()
        bias = torch.randn(c, generator=g)
        grad = torch.randn(coords.shape[0], c, generator=g)
        # the torch path's derived structures, built once as in a model
        tb.conv_forward(feats, w_kio, bias, km), tb.conv_backward_input(grad, w_kio, km)
        tb.conv_backward_weight(feats, grad, km)
        self.info = dict(shape=list(shape), channels=c, density=density, op=op, active=int(coords.shape[0]),
                         pairs=int((km.nbr >= 0).sum()), cpu=CPU)
        self.fns = {}
        if op == "fwd":
            self.fns["numba"] = lambda: nk.conv_forward(feats, w_kio, bias, km.nbr, plan)
            self.fns["torch"] = lambda: tb.conv_forward(feats, w_kio, bias, km)
        elif op == "bwi":
            self.fns["numba"] = lambda: nk.conv_backward_input(grad, w_kio, km.nbr, plan, flip_offsets=True)
            self.fns["torch"] = lambda: tb.conv_backward_input(grad, w_kio, km)
        else:
            self.fns["numba"] = lambda: nk.conv_backward_weight(feats, grad, km.nbr, plan)
            self.fns["torch"] = lambda: tb.conv_backward_weight(feats, grad, km)
        if dense:
            d = x.to_dense()
            dcl, wcl = d.to(memory_format=torch.channels_last), weight.to(memory_format=torch.channels_last)
            self.fns["dense-nchw"] = lambda: F.conv2d(d, weight, bias, padding=1)
            self.fns["dense-channels_last"] = lambda: F.conv2d(dcl, wcl, bias, padding=1)
        if gemm:
            n = max(1, round((self.info["pairs"] * c * c) ** (1 / 3)))
            a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
            self.info["gemm_n"] = n
            self.fns["gemm"] = lambda: torch.mm(a, b)
        self._alt = None

    def alternating(self):
        """Median wall time of every implementation over ``ALT_ROUNDS`` rounds, the
        implementations alternating within each round (after one warm-up call each)."""
        if self._alt is None:
            with torch.no_grad():
                for f in self.fns.values():
                    f()
                times = {k: [] for k in self.fns}
                for _ in range(ALT_ROUNDS):
                    for k, f in self.fns.items():
                        t = time.perf_counter()
                        f()
                        times[k].append(time.perf_counter() - t)
            self._alt = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        return self._alt


_CASES = {}


def _case(key, *args, **kw):
    if key not in _CASES:
        _CASES.clear()  # one case alive at a time (the 512x1024 inputs are large)
        _CASES[key] = Case(*args, **kw)
    return _CASES[key]


def _run(benchmark, case, group, impl):
    alt = case.alternating()
    benchmark.group = group
    benchmark.name = impl
    benchmark.extra_info.update(case.info, impl=impl, threads=torch.get_num_threads(),
                                alt_median_s=alt[impl], alt_ratio_vs_torch=alt["torch"] / alt[impl])
    if "gemm" in alt:
        benchmark.extra_info["alt_ratio_vs_gemm"] = alt[impl] / alt["gemm"]
    with torch.no_grad():
        benchmark.pedantic(case.fns[impl], rounds=ROUNDS, warmup_rounds=1)


# -- (a) SubMConv2d 3x3, 64 -> 64, one 512x1024 image ---------------------------------------------
A_IMPLS = ["numba", "torch", "dense-nchw", "dense-channels_last", "gemm"]


@pytest.mark.parametrize("impl", A_IMPLS)
@pytest.mark.parametrize("density", [0.05, 0.25, 0.50], ids=lambda d: f"d{round(d * 100)}")
def test_a_subm64(benchmark, density, impl):
    case = _case(("a", density), (1, 512, 1024), 64, density, "fwd", dense=True, gemm=True)
    _run(benchmark, case, f"a-subm64-d{round(density * 100)}", impl)


# -- (b) the zoo's shapes -------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["numba", "torch", "gemm"])
@pytest.mark.parametrize("op", ["fwd", "bwi", "wgrad"])
@pytest.mark.parametrize("density", [0.30, 0.63], ids=lambda d: f"d{round(d * 100)}")
@pytest.mark.parametrize("c", [16, 32], ids=lambda c: f"c{c}")
def test_b_zoo(benchmark, c, density, op, impl):
    case = _case(("b", c, density, op), (16, 64, 128), c, density, op, gemm=True)
    _run(benchmark, case, f"b-zoo-c{c}-d{round(density * 100)}-{op}", impl)


# -- (c) channels x density sweep ----------------------------------------------------------------
@pytest.mark.parametrize("impl", ["numba", "torch"])
@pytest.mark.parametrize("op", ["fwd", "bwi", "wgrad"])
@pytest.mark.parametrize("density", [0.01, 0.10, 0.30, 0.60, 0.90], ids=lambda d: f"d{round(d * 100)}")
@pytest.mark.parametrize("c", [1, 3, 8, 16, 32, 64, 128], ids=lambda c: f"c{c}")
def test_c_sweep(benchmark, c, density, op, impl):
    case = _case(("c", c, density, op), (4, 64, 128), c, density, op)
    _run(benchmark, case, f"c-c{c}-d{round(density * 100)}-{op}", impl)


# -- (d) PyTorch's OpenMP team vs numba's pool, after a PyTorch op ---------------------------------
TEAM_LEVELS = {16: ((16, 64, 128), 0.30), 32: ((16, 32, 64), 0.45), 64: ((16, 16, 32), 0.64)}


def _team_case(c, op):
    key = ("d", c, op)
    if key not in _CASES:
        shape, density = TEAM_LEVELS[c]
        case = _case(key, shape, c, density, op)
        activation = torch.randn(16, 16, 64, 128)
        kernel = case.fns["numba"]

        def after_torch_op(team):
            def call():
                runtime.USE_TORCH_TEAM = team
                try:
                    return kernel()
                finally:
                    runtime.USE_TORCH_TEAM = True
            return call

        case.fns = {"team": after_torch_op(True), "pool": after_torch_op(False)}
        times = {k: [] for k in case.fns}
        with torch.no_grad():
            for f in case.fns.values():
                f()
            for _ in range(3 * ALT_ROUNDS):
                for k, f in case.fns.items():
                    activation.relu_()  # PyTorch's threads now wait for work (untimed)
                    t = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t)
        case.alt = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        case.activation = activation
    return _CASES[key]


@pytest.mark.parametrize("impl", ["team", "pool"])
@pytest.mark.parametrize("op", ["fwd", "wgrad"])
@pytest.mark.parametrize("c", [16, 32, 64], ids=lambda c: f"c{c}")
def test_d_team(benchmark, c, op, impl):
    case = _team_case(c, op)
    benchmark.group = f"d-team-c{c}-{op}"
    benchmark.name = impl
    benchmark.extra_info.update(case.info, impl=impl, threads=torch.get_num_threads(),
                                alt_median_s=case.alt[impl],
                                alt_ratio_pool_vs_team=case.alt["pool"] / case.alt["team"])
    fn = case.fns[impl]

    def after_op():
        case.activation.relu_()
        return (), {}

    with torch.no_grad():
        benchmark.pedantic(fn, setup=after_op, rounds=3 * ROUNDS, warmup_rounds=1)


# -- (e) a 1x1 submanifold conv: one GEMM vs a map and the gathered kernel -------------------------
@pytest.mark.parametrize("impl", ["linear", "map+kernel"])
def test_e_subm1x1(benchmark, impl):
    from spconv2d import backends, maps

    g = torch.Generator().manual_seed(0)
    mask = torch.rand(16, 64, 128, generator=g) < 0.3
    dense = torch.randn(16, 16, 64, 128, generator=g)
    w, b = torch.randn(19, 16, 1, 1, generator=g), torch.randn(19, generator=g)
    fresh = lambda: sp.SparseTensor.from_dense(dense, mask)  # noqa: E731  (no map cached)

    w_kio = w[:, :, 0, 0].t().unsqueeze(0).contiguous()  # [K = 1, C_in, C_out]

    def via_map(x):
        be = backends.resolve(x.device, None)
        return be.conv_forward(x.features, w_kio, b, maps.subm_map(x, (1, 1), (1, 1), be).kmap)

    fns = {"linear": lambda x: F.linear(x.features, w[:, :, 0, 0], b), "map+kernel": via_map}
    times = {k: [] for k in fns}
    with torch.no_grad():
        for _ in range(3 * ALT_ROUNDS):
            for k, f in fns.items():
                x = fresh()
                t = time.perf_counter()
                f(x)
                times[k].append(time.perf_counter() - t)
    alt = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    benchmark.group = "e-subm1x1"
    benchmark.name = impl
    benchmark.extra_info.update(impl=impl, threads=torch.get_num_threads(), cpu=CPU, alt_median_s=alt[impl],
                                alt_ratio_map_vs_linear=alt["map+kernel"] / alt["linear"])
    with torch.no_grad():
        benchmark.pedantic(fns[impl], setup=lambda: ((fresh(),), {}), rounds=3 * ROUNDS, warmup_rounds=1)
