"""CPU: the PyTorch primitives the torch path is built on, each next to its alternatives.

Backs the "Measured choices" of docs/ARCHITECTURE.md that are not whole convolutions:

* ``row-gather``: gathering rows ``src[idx]`` (64 channels, 200k of 500k rows) by
  ``F.embedding`` (the torch path's ``_gather_rows``), ``index_select`` and advanced indexing;
* ``at-sites``: reading a dense ``[16, 32, 64, 128]`` map at 30 % of its pixels, from a
  channels-last map as one row gather (``sp.at_sites``) vs advanced indexing of an NCHW map;
* ``k2s2-sites``: the output sites of a k == s == 2 map (16 x 64 x 128, 30 %) by the occupancy
  grid (``maps.conv_map``'s default) vs ``unique`` over the candidates (``occupancy_max_keys=0``).

    python -m pytest bench/bench_cpu_primitives.py --benchmark-group-by=group \\
        --benchmark-json=bench/results/cpu_primitives.json

``BENCH_THREADS=N`` fixes torch's CPU threads (default: torch's own).
"""
import pytest
import torch
import torch.nn.functional as F

import spconv2d as sp
from spconv2d import maps

ROUNDS = 15


def _run(benchmark, fn, group, name):
    benchmark.group, benchmark.name = group, name
    benchmark.extra_info.update(impl=name, threads=torch.get_num_threads())
    with torch.no_grad():
        benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=2)


@pytest.mark.parametrize("impl", ["embedding", "index_select", "indexing"])
def test_row_gather(benchmark, impl):
    g = torch.Generator().manual_seed(0)
    src = torch.randn(500_000, 64, generator=g)
    idx = torch.randint(0, src.shape[0], (200_000,), generator=g)
    fn = {"embedding": lambda: F.embedding(idx, src), "index_select": lambda: src.index_select(0, idx),
          "indexing": lambda: src[idx]}[impl]
    _run(benchmark, fn, "row-gather-c64", impl)


@pytest.mark.parametrize("impl", ["at_sites-channels_last", "indexing-nchw"])
def test_at_sites(benchmark, impl):
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(16, 32, 64, 128, generator=g)
    coords = (torch.rand(16, 64, 128, generator=g) < 0.3).nonzero().to(torch.int32)
    if impl == "indexing-nchw":
        c = coords.long()
        fn = lambda: dense[c[:, 0], :, c[:, 1], c[:, 2]]  # noqa: E731
    else:
        cl = dense.contiguous(memory_format=torch.channels_last)
        fn = lambda: sp.at_sites(cl, coords)  # noqa: E731
    _run(benchmark, fn, "at-sites-c32", impl)


@pytest.mark.parametrize("impl", ["occupancy", "unique"])
def test_k2s2_sites(benchmark, impl):
    g = torch.Generator().manual_seed(0)
    coords = (torch.rand(16, 64, 128, generator=g) < 0.3).nonzero().to(torch.int32)
    feats = torch.zeros(coords.shape[0], 1)
    limit = None if impl == "occupancy" else 0

    def fn():
        x = sp.SparseTensor(feats, coords, (64, 128), 16, check=False)
        return maps.conv_map(x, (2, 2), (2, 2), (0, 0), (1, 1), occupancy_max_keys=limit)

    _run(benchmark, fn, "k2s2-sites-b16-64x128-d0.30", impl)
