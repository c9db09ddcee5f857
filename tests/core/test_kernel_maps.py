"""Kernel maps and their cache: built once per geometry and shared, symmetric submanifold maps,
transposed maps sharing tables, the CSR pair lists, every build path giving the same map."""
import pytest
import torch

import spconv2d as sp
from spconv2d import backends, maps
from spconv2d.coords import MapKey
from spconv2d.kernel_map import KernelMap, pair_lists
from spconv2d.testing import random_sparse


def _fresh(x):
    """The same sites on a fresh coordinate manager (an empty map cache)."""
    return sp.SparseTensor(x.features, x.coords, x.spatial_shape, x.batch_size)


def test_maps_are_built_once_and_shared(gen):
    x = random_sparse(2, 4, (16, 16), 0.3, generator=gen)
    a, b = sp.nn.SubMConv2d(4, 4, 3).double(), sp.nn.SubMConv2d(4, 4, 3).double()
    down, up = sp.nn.SparseConv2d(4, 4, 2, 2).double(), sp.nn.SparseConvTranspose2d(4, 4, 2, 2).double()
    mgr = x.coordinate_manager
    with sp.backend("torch", dense_fallback=False):
        y = b(a(x))
    assert mgr.builds == 1  # both SubMConv2d layers share one map
    z = down(y)
    d1 = down(y)  # same geometry, same sites: cached
    assert torch.equal(d1.coords, z.coords) and mgr.builds == 2
    u = up(z, output=x)
    assert mgr.builds == 3
    u.features.sum().backward()
    assert mgr.builds == 3  # backward reuses every map
    # the up map is the down map transposed: it shares the down map's tables
    cs, zs = x.coord_set, z.coord_set
    built_up = mgr.cached_map(MapKey("convT_to", zs.name, (2, 2), (2, 2), (0, 0), (1, 1), target=cs.name))
    built_down = mgr.cached_map(MapKey("conv", cs.name, (2, 2), (2, 2), (0, 0), (1, 1)))
    assert built_up.kmap.rev is built_down.kmap.nbr and built_down.out is zs and built_up.out is cs


def test_every_builder_returns_a_built_map(gen):
    x = random_sparse(2, 3, (9, 10), 0.4, generator=gen)
    be = backends.resolve(x.device, "torch")
    for built in (maps.subm_map(x, (3, 3), (1, 1), be), maps.conv_map(x, (3, 3), (2, 2), (1, 1), (1, 1)),
                  maps.conv_transpose_map(x, (2, 2), (2, 2), (0, 0), (1, 1))):
        assert isinstance(built, maps.BuiltMap) and isinstance(built.kmap, KernelMap)
        assert built.kmap.n_in == x.num_active and built.kmap.n_out == built.out.num
    low = maps.conv_map(x, (3, 3), (2, 2), (1, 1), (1, 1))
    to = maps.conv_transpose_to_map(x.derive(torch.zeros(low.out.num, 3, dtype=x.dtype), low.out), x, (3, 3),
                                    (2, 2), (1, 1), (1, 1), be)
    assert isinstance(to, maps.BuiltMap) and to.out is x.coord_set


def test_submanifold_map_is_symmetric(gen):
    x = random_sparse(3, 2, (13, 9), 0.4, empty=[1], generator=gen)
    kmap = maps.subm_map(x, (3, 5), (2, 1), backends.resolve(x.device, "torch")).kmap
    assert kmap.symmetric and kmap.identity_offset == 7
    K = kmap.kernel_volume
    k, j = (kmap.nbr >= 0).nonzero(as_tuple=True)
    assert torch.equal(kmap.nbr[K - 1 - k, kmap.nbr[k, j].long()], j.to(torch.int32))
    assert torch.equal(kmap.rev, kmap.nbr.flip(0))


def test_pair_lists(gen):
    nbr = torch.randint(0, 50, (5, 30), generator=gen, dtype=torch.int32)
    nbr[torch.rand(5, 30, generator=gen) < 0.5] = -1
    ptr, in_idx, out_idx = pair_lists(nbr)
    assert len(ptr) == 6 and ptr[-1] == int((nbr >= 0).sum())
    for k in range(5):
        j = torch.nonzero(nbr[k] >= 0).flatten()
        assert torch.equal(out_idx[ptr[k]:ptr[k + 1]].long(), j)
        assert torch.equal(in_idx[ptr[k]:ptr[k + 1]], nbr[k, j].long())
    kmap = KernelMap(nbr, 50, (1, 5))
    assert kmap.num_pairs == ptr[-1] and kmap.pairs[0] == ptr


def test_transpose_hands_over_directional_derivations(gen):
    nbr = torch.randint(-1, 20, (4, 25), generator=gen, dtype=torch.int32)
    kmap = KernelMap(nbr, 20, (2, 2))
    marker = object()
    kmap.cached("plan@nbr", lambda: marker)
    kmap.cached("undirected", lambda: 1)
    t = kmap.transpose()
    assert t.nbr is kmap.rev and t.rev is kmap.nbr
    assert t.cached("plan@rev", lambda: None) is marker
    assert "undirected" not in t.cached_names()


@pytest.mark.parametrize("strategy", ["sort", "grid", "hash"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_every_backend_and_index_strategy_builds_the_same_map(backend, strategy, gen, triton_device):
    x = random_sparse(3, 2, (17, 9), 0.3, empty=[1], generator=gen, dtype=torch.float32)
    ref = maps.subm_map(x, (3, 5), (2, 1), backends.resolve(x.device, "torch"), "sort").kmap.nbr
    device = "cpu" if backend == "torch" else triton_device
    y = sp.SparseTensor(x.features.to(device), x.coords.to(device), x.spatial_shape, x.batch_size)
    nbr = maps.subm_map(y, (3, 5), (2, 1), backends.resolve(y.device, backend), strategy).kmap.nbr
    assert torch.equal(nbr.cpu(), ref)


@pytest.mark.parametrize("shape", [(17, 9), (16, 10)])
def test_strided_map_occupancy_path_equals_sort_path(shape, gen):
    x = random_sparse(3, 2, shape, 0.3, empty=[1], generator=gen)
    fast = maps.conv_map(x, (2, 2), (2, 2), (0, 0), (1, 1))
    ref = maps.conv_map(_fresh(x), (2, 2), (2, 2), (0, 0), (1, 1), occupancy_max_keys=0)  # unique() path
    assert torch.equal(fast.out.coords, ref.out.coords) and torch.equal(fast.kmap.nbr, ref.kmap.nbr)


def test_single_pair_forms_apply_to_k_eq_s_maps_only(gen):
    """k == s maps of an even-sized grid have a single pair per row (the up map's outputs, the
    down map's inputs: the gather-after-GEMM form, whose values the oracle tests check); an odd
    size (an input row outside every window), overlapping windows and submanifold maps do not."""
    single = backends.TorchBackend.single_source_rows
    x = random_sparse(3, 4, (12, 10), 0.3, empty=[1], generator=gen)
    down = maps.conv_map(x, (2, 2), (2, 2), (0, 0), (1, 1)).kmap
    assert single(down, reverse=True) is not None and single(down, reverse=False) is None
    up = down.transpose()
    assert single(up, reverse=False) is not None and single(up, reverse=True) is None
    assert torch.equal(single(up, reverse=False), single(down, reverse=True))
    odd = random_sparse(2, 4, (13, 11), 0.9, generator=gen)
    assert single(maps.conv_map(odd, (2, 2), (2, 2), (0, 0), (1, 1)).kmap, reverse=True) is None
    assert single(maps.conv_map(x, (3, 3), (2, 2), (1, 1), (1, 1)).kmap, reverse=True) is None
    subm = maps.subm_map(x, (3, 3), (1, 1), backends.resolve(x.device)).kmap
    assert single(subm, reverse=False) is None and single(subm, reverse=True) is None
