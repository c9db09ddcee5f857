"""Backend and index-strategy dispatch; every index strategy builds the same maps."""
import pytest
import torch

import spconv2d as sp
from spconv2d import backends
from spconv2d.testing import random_sparse


def test_default_backend_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv("SPCONV2D_BACKEND", raising=False)
    assert backends.resolve(torch.device("cpu")).name == "torch"


def test_context_manager_and_env(monkeypatch):
    monkeypatch.setenv("SPCONV2D_BACKEND", "torch")
    assert backends.requested_backend() == "torch"
    with sp.backend("triton"):
        assert backends.requested_backend() == "triton"
        with sp.backend("auto"):
            assert backends.requested_backend() == "auto"
        assert backends.requested_backend("torch") == "torch"  # an explicit argument wins
    assert backends.requested_backend() == "torch"
    monkeypatch.setenv("SPCONV2D_BACKEND", "cuda")
    with pytest.raises(ValueError, match="SPCONV2D_BACKEND"):
        backends.requested_backend()
    with pytest.raises(ValueError, match="unknown backend"):
        with sp.backend("fast"):
            pass


@pytest.mark.parametrize("strategy", ["sort", "grid"])
def test_index_strategies_build_identical_maps(strategy, gen):
    x = random_sparse(3, 2, (17, 9), 0.3, empty=[1], generator=gen)
    ref = sp.maps.subm_map(x, (3, 3), (1, 2), backends.resolve(x.device), "sort").nbr
    y = x.replace(x.features)
    y._manager = sp.CoordinateManager()  # fresh cache, same sites
    nbr = sp.maps.subm_map(y, (3, 3), (1, 2), backends.resolve(x.device), strategy).nbr
    assert torch.equal(nbr, ref)


@pytest.mark.parametrize("shape", [(17, 9), (16, 10)])
def test_strided_map_occupancy_path_equals_sort_path(shape, gen, monkeypatch):
    x = random_sparse(3, 2, shape, 0.3, empty=[1], generator=gen)
    fast_cs, fast = sp.maps.conv_map(x, (2, 2), (2, 2), (0, 0), (1, 1))
    monkeypatch.setattr(sp.maps, "OCCUPANCY_KEYS_PER_SITE", 0)
    monkeypatch.setattr(sp.maps, "OCCUPANCY_MIN_KEYS", 0)  # force unique() over the candidates
    y = x.replace(x.features)
    y._manager = sp.CoordinateManager()
    ref_cs, ref = sp.maps.conv_map(y, (2, 2), (2, 2), (0, 0), (1, 1))
    assert torch.equal(fast_cs.coords, ref_cs.coords) and torch.equal(fast.nbr, ref.nbr)


def test_index_strategy_context(monkeypatch):
    be = backends.resolve(torch.device("cpu"))
    monkeypatch.delenv("SPCONV2D_INDEX", raising=False)
    assert backends.resolve_index_strategy(be, 100) == "grid"
    assert backends.resolve_index_strategy(be, 1 << 30) == "sort"
    with sp.index_strategy("sort"):
        assert backends.resolve_index_strategy(be, 100) == "sort"
    monkeypatch.setenv("SPCONV2D_INDEX", "grid")
    assert backends.resolve_index_strategy(be, 1 << 30) == "grid"


def test_single_pair_forms_apply_to_k_eq_s_maps_only(gen):
    """k == s maps of an even-sized grid have a single pair per row (the up map's outputs, the
    down map's inputs: the gather-after-GEMM form, whose values the oracle tests check); an odd
    size (an input row outside every window), overlapping windows and submanifold maps do not."""
    from spconv2d import maps
    from spconv2d.backends.torch_backend import TorchBackend

    single = TorchBackend._single_source
    x = random_sparse(3, 4, (12, 10), 0.3, empty=[1], generator=gen)
    _, down = maps.conv_map(x, (2, 2), (2, 2), (0, 0), (1, 1))
    assert single(down, reverse=True) is not None and single(down, reverse=False) is None
    up = down.transpose()
    assert single(up, reverse=False) is not None and single(up, reverse=True) is None
    assert torch.equal(single(up, reverse=False), single(down, reverse=True))
    odd = random_sparse(2, 4, (13, 11), 0.9, generator=gen)
    assert single(maps.conv_map(odd, (2, 2), (2, 2), (0, 0), (1, 1))[1], reverse=True) is None
    assert single(maps.conv_map(x, (3, 3), (2, 2), (1, 1), (1, 1))[1], reverse=True) is None
    subm = maps.subm_map(x, (3, 3), (1, 1), backends.resolve(x.device))
    assert single(subm, reverse=False) is None and single(subm, reverse=True) is None
