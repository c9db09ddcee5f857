"""Coordinate-index strategies on the PyTorch path: build + submanifold 3x3 map, per strategy.

    python -m pytest bench/bench_index.py --benchmark-json=bench/results/cpu_index.json

Justifies ``TorchBackend.default_index_strategy``: a dense ``grid`` table while the key space is
small (one gather per lookup), ``sort`` (searchsorted) beyond ``grid_max_keys``.
"""
import pytest
import torch

import spconv2d as sp
from spconv2d import backends, maps

CASES = [((1, 512, 1024), 0.05), ((1, 512, 1024), 0.5), ((8, 512, 1024), 0.05), ((1, 64, 64), 0.3)]


@pytest.mark.parametrize("shape,density", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("strategy", ["sort", "grid"])
def test_subm_map_build(benchmark, shape, density, strategy):
    B, H, W = shape
    g = torch.Generator().manual_seed(0)
    coords = (torch.rand(B, H, W, generator=g) < density).nonzero().to(torch.int32)
    feats = torch.zeros(coords.shape[0], 1)
    be = backends.resolve(torch.device("cpu"), "torch")

    def fn():
        x = sp.SparseTensor(feats, coords, (H, W), B, check=False)
        return maps.subm_map(x, (3, 3), (1, 1), be, strategy).kmap.nbr

    benchmark.group = f"index-B{B}-{H}x{W}-d{density}"
    benchmark.name = strategy
    benchmark.extra_info.update(impl=strategy, active=coords.shape[0], key_space=B * H * W)
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
