"""The numba kernel-map builders against the PyTorch path's builders (``spconv2d.maps`` with the
``torch`` backend) and the dense oracle's output sites: identical ``nbr`` and output rows."""
import itertools

import pytest
import torch

import spconv2d as sp
from spconv2d import backends, maps
from spconv2d.backends.numba_kernels import maps as nm
from spconv2d.backends.numba_kernels.runtime import PARALLEL_MIN_WORK
from spconv2d.testing import conv2d_sites, conv_transpose2d_sites, random_sparse, sites

pytestmark = pytest.mark.numba

BE = backends.resolve(torch.device("cpu"), "torch")
# grid_max_keys=0 forces the sorted-key path
PATHS = {"grid": {}, "sorted": {"grid_max_keys": 0}}


def _x(gen, shape=(11, 13), density=0.3, batch=3, empty=(1,)):
    return random_sparse(batch, 1, shape, density, empty=empty, generator=gen)


def _fresh(x):
    """Same sites, a new coordinate manager (no cached maps)."""
    return sp.SparseTensor(x.features, x.coords, x.spatial_shape, x.batch_size)


# -- submanifold ----------------------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("ksize,dilation", [((1, 1), (1, 1)), ((3, 3), (1, 1)), ((3, 3), (2, 2)), ((5, 5), (1, 1)),
                                            ((5, 5), (2, 1)), ((3, 5), (1, 2)), ((1, 3), (1, 1)), ((5, 1), (2, 2))])
def test_subm_matches_torch_path(gen, path, ksize, dilation):
    x = _x(gen)
    ref = maps.subm_map(x, ksize, dilation, BE).kmap.nbr
    got = nm.subm_table(x.coords, x.batch_size, x.spatial_shape, ksize, dilation, **PATHS[path])
    assert got.dtype == torch.int32 and torch.equal(got, ref)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("density", [0.02, 0.5, 1.0])
def test_subm_densities_and_index_strategies(gen, path, density):
    x = _x(gen, (17, 9), density, batch=2, empty=())
    got = nm.subm_table(x.coords, x.batch_size, x.spatial_shape, 3, 1, **PATHS[path])
    for strategy in ("grid", "sort"):
        assert torch.equal(got, maps.subm_map(_fresh(x), (3, 3), (1, 1), BE, strategy).kmap.nbr)


def test_subm_raster_order_input(gen):
    x = random_sparse(2, 1, (8, 10), 0.4, shuffle=False, generator=gen)
    for kw in PATHS.values():
        assert torch.equal(nm.subm_table(x.coords, 2, (8, 10), 3, **kw), maps.subm_map(x, (3, 3), (1, 1), BE).kmap.nbr)


@pytest.mark.parametrize("path", PATHS)
def test_subm_empty(path):
    got = nm.subm_table(torch.zeros(0, 3, dtype=torch.int32), 2, (5, 7), 3, **PATHS[path])
    assert got.shape == (9, 0) and got.dtype == torch.int32


@pytest.mark.parametrize("path", PATHS)
def test_subm_duplicates_raise(path):
    c = torch.tensor([[0, 1, 1], [1, 2, 3], [0, 4, 4], [1, 2, 3]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"rows 1 and 3"):
        nm.subm_table(c, 2, (5, 6), 3, **PATHS[path])


def test_subm_even_kernel_rejected():
    with pytest.raises(ValueError):
        nm.subm_table(torch.zeros(1, 3, dtype=torch.int32), 1, (4, 4), 2)


def test_int64_keys(gen):
    """B*H*W >= 2**31: keys are int64 and only the sorted path applies."""
    H, W = 70_001, 40_003
    assert 2 * H * W >= 2**31
    c = torch.stack((torch.randint(0, 2, (300,), generator=gen), torch.randint(0, 6, (300,), generator=gen) + H - 8,
                     torch.randint(0, 6, (300,), generator=gen) + W - 8), 1)
    c = torch.unique(c, dim=0)
    c = c[torch.randperm(c.shape[0], generator=gen)].to(torch.int32)
    x = sp.SparseTensor(torch.zeros(c.shape[0], 1), c, (H, W), 2)
    assert x.coord_set.keys.dtype == torch.int64
    assert nm.key_dtype(2, (H, W)) is not None and not nm.use_grid(2 * H * W, c.shape[0])
    assert torch.equal(nm.subm_table(c, 2, (H, W), 3), maps.subm_map(x, (3, 3), (1, 1), BE).kmap.nbr)
    oc, nbr = nm.conv_table(c, 2, (H, W), 3, 2, 1)
    cs, km = maps.conv_map(x, (3, 3), (2, 2), (1, 1), (1, 1))
    assert torch.equal(oc, cs.coords) and torch.equal(nbr, km.nbr)
    oc, nbr = nm.conv_transpose_table(c, 2, (H, W), 3, 2, 1)
    cs, km = maps.conv_transpose_map(x, (3, 3), (2, 2), (1, 1), (1, 1))
    assert torch.equal(oc, cs.coords) and torch.equal(nbr, km.nbr)


# -- strided convolution / pooling -------------------------------------------------------------
def _conv_geometries():
    out = []
    for k, s, r in itertools.product((1, 2, 3, 4, 5), (1, 2, 3), (1, 2)):
        for p in sorted({0, k // 2}):
            out.append(((k, k), (s, s), (p, p), (r, r)))
    # rectangular kernels, mixed strides / paddings / dilations
    out += [((2, 3), (2, 1), (0, 1), (1, 1)), ((3, 2), (1, 2), (1, 0), (2, 1)), ((1, 5), (3, 2), (0, 2), (1, 2)),
            ((4, 2), (2, 2), (2, 1), (1, 1)), ((3, 3), (2, 3), (1, 0), (1, 1)), ((3, 2), (3, 2), (0, 0), (1, 1))]
    return out


@pytest.mark.parametrize("geom", _conv_geometries(), ids=str)
def test_conv_matches_torch_path_and_oracle(gen, geom):
    k, s, p, r = geom
    x = _x(gen)
    cs, km = maps.conv_map(x, k, s, p, r)
    want_sites = sites(conv2d_sites(x, k, s, p, r))
    for kw in PATHS.values():
        oc, nbr = nm.conv_table(x.coords, x.batch_size, x.spatial_shape, k, s, p, r, **kw)
        assert torch.equal(oc, want_sites)
        assert torch.equal(oc, cs.coords) and torch.equal(nbr, km.nbr)


@pytest.mark.parametrize("k,shape", [(2, (64, 128)), (2, (11, 13)), (3, (10, 12)), (3, (11, 14))])
def test_conv_non_overlapping_fast_path(gen, k, shape):
    """k == s, p == 0, r == 1 (one output per input), incl. sizes not divisible by the stride."""
    x = _x(gen, shape, 0.3, batch=4, empty=(2,))
    cs, km = maps.conv_map(x, (k, k), (k, k), (0, 0), (1, 1))
    for kw in PATHS.values():
        oc, nbr = nm.conv_table(x.coords, x.batch_size, x.spatial_shape, k, k, 0, 1, **kw)
        assert torch.equal(oc, cs.coords) and torch.equal(nbr, km.nbr)


@pytest.mark.parametrize("path", PATHS)
def test_conv_empty_and_too_small(path):
    oc, nbr = nm.conv_table(torch.zeros(0, 3, dtype=torch.int32), 2, (9, 9), 3, 2, 1, **PATHS[path])
    assert oc.shape == (0, 3) and nbr.shape == (9, 0)
    with pytest.raises(ValueError, match="too small"):
        nm.conv_table(torch.zeros(0, 3, dtype=torch.int32), 1, (2, 2), 5, 1, 0)


# -- transposed convolution ---------------------------------------------------------------------
def _transpose_geometries():
    out = []
    for k, s, r in itertools.product((1, 2, 3, 4, 5), (1, 2, 3), (1, 2)):
        for p in sorted({0, k // 2}):
            for op in sorted({0, max(s, r) - 1}):
                out.append(((k, k), (s, s), (p, p), (r, r), (op, op)))
    out += [((2, 3), (2, 1), (0, 1), (1, 1), (1, 0)), ((3, 2), (1, 2), (1, 0), (2, 1), (0, 1)),
            ((1, 5), (3, 2), (0, 2), (1, 2), (2, 1))]
    return out


@pytest.mark.parametrize("geom", _transpose_geometries(), ids=str)
def test_conv_transpose_matches_torch_path_and_oracle(gen, geom):
    k, s, p, r, op = geom
    x = _x(gen, (7, 9))
    cs, km = maps.conv_transpose_map(x, k, s, p, r, op)
    want_sites = sites(conv_transpose2d_sites(x, k, s, p, r, op))
    for kw in PATHS.values():
        oc, nbr = nm.conv_transpose_table(x.coords, x.batch_size, x.spatial_shape, k, s, p, r, op, **kw)
        assert torch.equal(oc, want_sites)
        assert torch.equal(oc, cs.coords) and torch.equal(nbr, km.nbr)


# -- lookup onto given sites -----------------------------------------------------------------------
def _transposed_offsets(k, p, r):
    ky, kx = torch.meshgrid(torch.arange(k[0]), torch.arange(k[1]), indexing="ij")
    return torch.stack((p[0] - ky.reshape(-1) * r[0], p[1] - kx.reshape(-1) * r[1]), 1)


@pytest.mark.parametrize("geom", [((2, 2), (2, 2), (0, 0), (1, 1)), ((3, 3), (2, 2), (1, 1), (1, 1)),
                                  ((3, 3), (1, 1), (1, 1), (2, 2)), ((4, 2), (3, 2), (1, 0), (1, 1)),
                                  ((5, 3), (2, 3), (2, 1), (2, 1))], ids=str)
def test_lookup_transposed_onto_target(gen, geom):
    """Transposed conv onto a target's sites (``conv_transpose_to_map``): (a) x made from the
    target by the conv of the same geometry (the torch path transposes the down map), (b) x an
    unrelated coarse set in the same manager (the torch path looks the target's sites up)."""
    k, s, p, r = geom
    target = _x(gen, (13, 11))
    offsets = _transposed_offsets(k, p, r)
    down_cs, _ = maps.conv_map(target, k, s, p, r)
    coarse = random_sparse(3, 1, down_cs.spatial_shape, 0.5, empty=(2,), generator=gen).coord_set
    coarse.name = ("unrelated", geom)
    for cs in (down_cs, target.coordinate_manager.add(coarse)):
        x = target.derive(torch.zeros(cs.num, 1, dtype=torch.float64), cs)
        ref = maps.conv_transpose_to_map(x, target, k, s, p, r, BE).kmap.nbr
        for kw in PATHS.values():
            got = nm.lookup_table(x.coords, 3, x.spatial_shape, target.coords, (1, 1), offsets, s, **kw)
            assert torch.equal(got, ref)


@pytest.mark.parametrize("scale,divisor", [((1, 1), (1, 1)), ((2, 2), (1, 1)), ((1, 1), (2, 3)), ((3, 1), (2, 2))])
@pytest.mark.parametrize("strategy", ["grid", "sort"])
def test_lookup_matches_neighbor_table(gen, scale, divisor, strategy):
    """The general affine rule against ``TorchBackend.neighbor_table`` (both torch indexes)."""
    x = _x(gen, (9, 12))
    out = random_sparse(3, 1, (14, 10), 0.4, empty=(0,), generator=gen)
    offsets = torch.randint(-5, 6, (7, 2), generator=gen)
    idx = x.coord_set.index(BE, strategy)
    ref = BE.neighbor_table(idx, out.coords, x.spatial_shape, scale, offsets, divisor)
    for kw in PATHS.values():
        got = nm.lookup_table(x.coords, 3, x.spatial_shape, out.coords, scale, offsets, divisor, **kw)
        assert torch.equal(got, ref)


def test_lookup_empty(gen):
    x = _x(gen)
    e = torch.zeros(0, 3, dtype=torch.int32)
    assert nm.lookup_table(x.coords, 3, x.spatial_shape, e, 1, torch.zeros(4, 2, dtype=torch.long), 1).shape == (4, 0)
    got = nm.lookup_table(e, 3, x.spatial_shape, x.coords, 1, torch.zeros(4, 2, dtype=torch.long), 1)
    assert got.shape == (4, x.num_active) and bool((got == -1).all())


# -- derived tables, threads -----------------------------------------------------------------------
def test_reverse_table(gen):
    x = _x(gen)
    _, km = maps.conv_map(x, (3, 3), (2, 2), (1, 1), (1, 1))
    assert torch.equal(nm.reverse_table(km.nbr, x.num_active), km.rev)


def test_same_result_on_one_and_two_threads(gen):
    x = _x(gen, (128, 192), 0.3, batch=2, empty=())
    assert x.num_active * 9 >= PARALLEL_MIN_WORK  # (two threads do run)
    old = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append((nm.subm_table(x.coords, 2, (128, 192), 3),
                            nm.subm_table(x.coords, 2, (128, 192), 3, grid_max_keys=0),
                            *nm.conv_table(x.coords, 2, (128, 192), 3, 2, 1),
                            *nm.conv_table(x.coords, 2, (128, 192), 3, 2, 1, grid_max_keys=0),
                            *nm.conv_transpose_table(x.coords, 2, (128, 192), 3, 2, 1)))
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(a, b) for a, b in zip(*results))


# -- fused validation -------------------------------------------------------------------------------
def _error(fn):
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize("path", PATHS)
def test_check_coords_valid(gen, path):
    from spconv2d.coords import key_dtype, pack_keys
    mask = torch.rand(3, 9, 11, generator=gen) < 0.4
    mask[1] = False
    nz = mask.nonzero()  # int64, column-major strides
    for c in (nz, nz.to(torch.int32), nz[torch.randperm(nz.shape[0], generator=gen)].to(torch.int32)):
        out, keys = nm.check_coords(c, 3, (9, 11), **PATHS[path])
        assert out.dtype == torch.int32 and out.is_contiguous() and torch.equal(out, c.to(torch.int32))
        assert torch.equal(keys, pack_keys(c, (9, 11), key_dtype(3, (9, 11))))
    out, keys = nm.check_coords(torch.zeros(0, 3, dtype=torch.int32), 2, (4, 4), **PATHS[path])
    assert out.shape == (0, 3) and keys.shape == (0,)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("row,col,value", [(4, 0, 3), (2, 1, 9), (6, 2, 11), (0, 1, -1), (5, 0, -2)])
def test_check_coords_errors_match_sparse_tensor(gen, path, row, col, value):
    c = (torch.rand(3, 9, 11, generator=gen) < 0.4).nonzero()
    c = c[torch.randperm(c.shape[0], generator=gen)]
    bad = c.clone()
    bad[row, col] = value
    dup = torch.cat([c[:9], c[3:4], c[9:]])
    for coords in (bad, dup):
        want = _error(lambda: sp.SparseTensor(torch.zeros(coords.shape[0], 1), coords, (9, 11), 3))
        assert want is not None
        assert _error(lambda: nm.check_coords(coords, 3, (9, 11), **PATHS[path])) == want


def test_check_coords_range_before_narrowing():
    """int64 coordinates are range-checked before the int32 copy. (``SparseTensor`` narrows
    first: x = 2**32 + 3 wraps to 3 and passes its check.)"""
    c = torch.tensor([[0, 1, 1], [0, 2, 2**32 + 3]])
    err = _error(lambda: nm.check_coords(c, 1, (9, 11)))
    assert err is not None and f"x={2**32 + 3} outside [0, 11)" in err


def test_check_coords_int64_keys(gen):
    H, W = 70_001, 40_003
    c = torch.tensor([[1, H - 1, W - 1], [0, 5, 7], [1, 0, 0]])
    out, keys = nm.check_coords(c, 2, (H, W))
    assert keys.dtype == torch.int64 and keys.tolist() == [(H + H - 1) * W + W - 1, 5 * W + 7, H * W]
    assert _error(lambda: nm.check_coords(torch.cat([c, c[:1]]), 2, (H, W))).startswith("duplicate coordinates")


def test_scratch_grid_left_clean(gen):
    """Every grid kernel leaves the per-thread scratch buffer all -1 (also after a duplicate)."""
    x = _x(gen, (40, 60), 0.3)
    nm.subm_table(x.coords, 3, (40, 60), 5, 2)
    nm.conv_table(x.coords, 3, (40, 60), 3, 2, 1)
    nm.conv_table(x.coords, 3, (40, 60), 2, 2, 0)
    nm.conv_transpose_table(x.coords, 3, (40, 60), 3, 2, 1)
    nm.lookup_table(x.coords, 3, (40, 60), x.coords, 2, torch.ones(3, 2, dtype=torch.long), 3)
    nm.check_coords(x.coords, 3, (40, 60))
    dup = torch.cat([x.coords, x.coords[:5]])
    with pytest.raises(ValueError):
        nm.subm_table(dup, 3, (40, 60), 3)
    with pytest.raises(ValueError):
        nm.check_coords(dup, 3, (40, 60))
    assert nm.scratch_size() > 0 and nm.scratch_is_clear()
    nm.release_scratch()
    assert nm.scratch_size() == 0


def test_one_thread_never_starts_numba_threads():
    """With one torch thread every kernel runs its serial compilation: numba's threading layer is
    never started (``numba.threading_layer()`` raises until it is) and torch's thread count is
    untouched. Fresh process, so nothing started the layer before."""
    import subprocess
    import sys
    code = ("import numba, torch; torch.set_num_threads(1)\n"
            "from spconv2d.backends.numba_kernels import maps as nm\n"
            "c = (torch.rand(1, 200, 200) < 0.5).nonzero().to(torch.int32)  # parallel-sized work\n"
            "nm.subm_table(c, 1, (200, 200), 3)\n"
            "try:\n"
            "    layer = numba.threading_layer()\n"
            "except ValueError:\n"
            "    layer = 'not started'\n"
            "print(torch.get_num_threads(), layer)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1 not started"


# -- the sites of a dense tensor (SparseTensor.from_dense) ----------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1), (7, 130), (64, 128)])
def test_sites_from_dense_matches_nonzero_and_gather(gen, dtype, shape):
    """Raster-order coordinates, keys and features as ``mask.nonzero()`` and a gather give them;
    an image without active pixels, all-active rows, a lone pixel."""
    B, C = 3, 5
    images = torch.rand(B, C, *shape, generator=gen, dtype=dtype)
    mask = torch.rand(B, *shape, generator=gen) < 0.3
    mask[1] = False
    mask[2, 0] = True
    coords, features, keys = nm.sites_from_dense(images, mask)
    ref = mask.nonzero()
    assert coords.dtype == torch.int32 and torch.equal(coords, ref.to(torch.int32))
    assert features.dtype == dtype and torch.equal(features, images.permute(0, 2, 3, 1)[mask])
    assert torch.equal(keys.long(), (ref[:, 0] * shape[0] + ref[:, 1]) * shape[1] + ref[:, 2])


def test_from_dense_runs_the_fused_pass_without_autograd_only(gen, monkeypatch):
    """``SparseTensor.from_dense`` on a CPU: the one-pass kernel (same tensor as the torch ops)
    when no gradient is needed; the torch ops, which carry the gradient, otherwise."""
    images = torch.rand(2, 3, 64, 96, generator=gen)
    mask = torch.rand(2, 64, 96, generator=gen) < 0.4
    calls = []
    real = nm.sites_from_dense
    monkeypatch.setattr(nm, "sites_from_dense", lambda *a: calls.append(1) or real(*a))
    with sp.backend("numba"):
        x = sp.SparseTensor.from_dense(images, mask)
        assert calls and torch.equal(x.coords, mask.nonzero().to(torch.int32))
        assert torch.equal(x.features, images.permute(0, 2, 3, 1)[mask])
        calls.clear()
        g = images.clone().requires_grad_()
        y = sp.SparseTensor.from_dense(g, mask)
        assert not calls and torch.equal(y.features.detach(), x.features)
        y.features.sum().backward()
        assert torch.equal(g.grad, mask[:, None].expand_as(g).to(g.dtype))


def test_sites_from_dense_same_on_one_and_two_threads(gen):
    images = torch.rand(16, 3, 128, 128, generator=gen)
    mask = torch.rand(16, 128, 128, generator=gen) < 0.3
    assert 16 * 128 * 128 // 8 >= PARALLEL_MIN_WORK  # (two threads do run)
    old, results = torch.get_num_threads(), []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(nm.sites_from_dense(images, mask))
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(a, b) for a, b in zip(*results))
