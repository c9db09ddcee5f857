"""CPU: the PyTorch path's convolution forms, the numba kernels and dense, side by side.

SubMConv2d 3x3, C -> C channels, a batch of 16 images of 64x128 (the zoo's street scenes), forward
only, map prebuilt (it is shared by every layer on the same sites). Implementations, side by side
on the same inputs: ``pairs`` (per-offset gather-GEMM-scatter over the pair lists), ``table``
(per-offset gather from the neighbour table, zero row for missing neighbours, in-place GEMM,
no scatter), ``im2col`` (chunks of gathered neighbour rows, one GEMM per chunk),
``dense-nchw`` (``F.conv2d`` on the whole batch), ``dense-fallback`` (densify channels-last,
``F.conv2d``, read the sites) and ``numba`` (the fused CPU kernels; needs the ``cpu`` extra).
Masks: uniformly random pixels, and the zoo's ``residual`` policy on ``streets`` scenes
(line-like: active pixels along boundaries, ~0.7 of each active pixel's neighbours active).
The group name carries the mask's *fill* (pairs / (9 x active pixels)), the quantity the
``auto`` form thresholds are set from.

    BENCH_THREADS=1 python -m pytest bench/bench_cpu_forms.py -k "not table" \
        --benchmark-json=bench/results/cpu_forms_1thread.json
    python bench/report.py bench/results/cpu_forms_1thread.json --ours im2col --baseline pairs

``BENCH_THREADS=N`` fixes torch's CPU threads (default: torch's own).
"""

import pytest
import torch
import torch.nn.functional as F

import spconv2d as sp
from spconv2d import maps
from spconv2d.backends.torch_backend import TorchBackend
from spconv2d.zoo.data import build_dataset
from spconv2d.zoo.masks import make_mask

B, H, W = 16, 64, 128
CHANNELS = [16, 32, 64]
MASKS = ["random-0.10", "random-0.30", "random-0.50", "random-0.80", "random-0.90", "residual-0.10", "residual-0.30",
         "residual-0.63"]
ROUNDS = 7


_CACHE = {}


def _mask(name):
    if name not in _CACHE:
        kind, density = name.split("-")
        if kind == "random":
            g = torch.Generator().manual_seed(0)
            _CACHE[name] = torch.rand(B, H, W, generator=g) < float(density)
        else:
            images = build_dataset("streets", "val", num_samples=B).images
            _CACHE[name] = make_mask(images, kind, float(density))
    return _CACHE[name]


def _inputs(mask_name, c):
    g = torch.Generator().manual_seed(1)
    mask = _mask(mask_name)
    x = sp.SparseTensor.from_dense(torch.randn(B, c, H, W, generator=g), mask)
    kmap = maps.subm_map(x, (3, 3), (1, 1), TorchBackend(), None).kmap
    weight = torch.randn(c, c, 3, 3, generator=g) * 0.1
    fill = float((kmap.nbr >= 0).float().mean())
    return x, kmap, weight, fill


def _run(benchmark, fn, mask_name, c, fill, impl, n):
    benchmark.group = f"subm3x3-c{c}-{mask_name}-fill{fill:.2f}"
    benchmark.name = impl
    benchmark.extra_info.update(mask=mask_name, fill=fill, channels=c, active=n, impl=impl,
                                threads=torch.get_num_threads(), shape=[B, H, W])
    with torch.no_grad():
        benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=2)


@pytest.mark.parametrize("c", CHANNELS)
@pytest.mark.parametrize("mask_name", MASKS)
@pytest.mark.parametrize("form", ["pairs", "table", "im2col", "auto"])
def test_sparse_form(benchmark, form, mask_name, c):
    x, kmap, weight, fill = _inputs(mask_name, c)
    be = TorchBackend(gather=form)
    w_kio = weight.permute(2, 3, 1, 0).reshape(9, c, c).contiguous()
    be.conv_forward(x.features, w_kio, None, kmap)  # derived structures built outside the timing
    _run(benchmark, lambda: be.conv_forward(x.features, w_kio, None, kmap),
         mask_name, c, fill, form, x.features.shape[0])


@pytest.mark.parametrize("c", CHANNELS)
@pytest.mark.parametrize("mask_name", MASKS)
def test_dense(benchmark, mask_name, c):
    x, kmap, weight, fill = _inputs(mask_name, c)
    dense = x.to_dense()
    _run(benchmark, lambda: F.conv2d(dense, weight, padding=1), mask_name, c, fill, "dense-nchw",
         x.features.shape[0])


@pytest.mark.parametrize("c", CHANNELS)
@pytest.mark.parametrize("mask_name", MASKS)
def test_dense_fallback(benchmark, mask_name, c):
    """What the torch path's dense fallback costs: densify (channels-last), ``F.conv2d``, read the
    active sites back; the ``auto`` sparse forms above it decide the density threshold."""
    x, kmap, weight, fill = _inputs(mask_name, c)
    be = TorchBackend(dense_thresholds=((None, 0.0),))
    _run(benchmark, lambda: sp.functional.subm_conv2d(x, weight, backend=be), mask_name, c, fill,
         "dense-fallback", x.features.shape[0])


@pytest.mark.parametrize("c", CHANNELS)
@pytest.mark.parametrize("mask_name", MASKS)
def test_numba(benchmark, mask_name, c):
    """The numba kernels (``NumbaBackend``, the CPU default with the ``cpu`` extra) on the same
    map: the row beside ``dense-fallback`` that decides its dense threshold (default: never)."""
    pytest.importorskip("numba")
    from spconv2d.backends.numba_backend import NumbaBackend

    x, kmap, weight, fill = _inputs(mask_name, c)
    be = NumbaBackend()
    w_kio = weight.permute(2, 3, 1, 0).reshape(9, c, c).contiguous()
    be.conv_forward(x.features, w_kio, None, kmap)  # compiled and planned outside the timing
    _run(benchmark, lambda: be.conv_forward(x.features, w_kio, None, kmap),
         mask_name, c, fill, "numba", x.features.shape[0])
