"""Fused neighbour lookup and derived kernel-map structures (spconv2d.kernels.neighbors)."""
import pytest
import torch

from spconv2d.kernels import hash as kh
from spconv2d.kernels import neighbors as kn
from spconv2d.testing import triton_device

DEVICE = triton_device() or "cpu"
pytestmark = pytest.mark.triton


def _coords(gen, B, H, W, density):
    m = torch.rand(B, H, W, generator=gen) < density
    m[-1] = False  # one empty batch item
    c = m.nonzero().to(torch.int32)
    return c[torch.randperm(c.shape[0], generator=gen)]  # any order


def _keys(c, H, W, dtype=torch.int64):
    c = c.long()
    return ((c[:, 0] * H + c[:, 1]) * W + c[:, 2]).to(dtype)


def _reference(in_coords, in_shape, out_coords, scale, offsets, divisor):
    """Affine rule + searchsorted on sorted keys (independent of the kernels)."""
    H, W = in_shape
    keys = _keys(in_coords, H, W)
    sk, perm = torch.sort(keys)
    c = out_coords.long()
    off = offsets.long()
    ny = c[None, :, 1] * scale[0] + off[:, 0:1]
    nx = c[None, :, 2] * scale[1] + off[:, 1:2]
    ok = (ny >= 0) & (nx >= 0) & (ny % divisor[0] == 0) & (nx % divisor[1] == 0)
    iy, ix = ny // divisor[0], nx // divisor[1]
    ok &= (iy < H) & (ix < W)
    q = (c[None, :, 0] * H + iy) * W + ix
    if sk.numel() == 0:
        return torch.full(q.shape, -1, dtype=torch.int32)
    pos = torch.searchsorted(sk, q).clamp(max=sk.numel() - 1)
    hit = ok & (sk[pos] == q)
    return torch.where(hit, perm[pos], -1).to(torch.int32)


def _grid_coords(B, Ho, Wo):
    b, y, x = torch.meshgrid(torch.arange(B), torch.arange(Ho), torch.arange(Wo), indexing="ij")
    return torch.stack([b, y, x], -1).reshape(-1, 3).to(torch.int32)


def _offsets(kh_, kw, dil, centre):
    ky, kx = torch.meshgrid(torch.arange(kh_), torch.arange(kw), indexing="ij")
    off = torch.stack([ky.reshape(-1), kx.reshape(-1)], 1) * torch.tensor(dil)
    return off - torch.tensor(centre)


B, H, W = 3, 11, 13


def _geometries():
    # name, out_coords(in_coords), scale, offsets, divisor
    yield "subm3", None, (1, 1), _offsets(3, 3, (1, 1), (1, 1)), (1, 1)
    yield "subm3_dil2_half", None, (1, 1), _offsets(3, 3, (2, 2), (2, 2))[:4], (1, 1)
    yield "subm5x3", None, (1, 1), _offsets(5, 3, (1, 1), (2, 1)), (1, 1)
    # strided conv k=3, s=2, p=1: input = o*s - p + k
    Ho, Wo = (H + 2 - 3) // 2 + 1, (W + 2 - 3) // 2 + 1
    yield "strided", _grid_coords(B, Ho, Wo), (2, 2), _offsets(3, 3, (1, 1), (1, 1)), (1, 1)
    # transposed k=3, s=2, p=1: o = i*s - p + k  ->  i = (o + p - k) / s
    Ho, Wo = (H - 1) * 2 - 2 + 3, (W - 1) * 2 - 2 + 3
    yield "transposed", _grid_coords(B, Ho, Wo), (1, 1), -_offsets(3, 3, (1, 1), (1, 1)), (2, 2)
    # anisotropic stride / divisor
    yield "aniso", _grid_coords(B, 6, 13), (2, 1), _offsets(2, 3, (1, 1), (0, 1)), (1, 1)
    yield "aniso_T", _grid_coords(B, 22, 13), (1, 1), -_offsets(2, 1, (1, 1), (0, 0)), (2, 1)


GEOMS = list(_geometries())


@pytest.mark.parametrize("strategy", ["hash", "grid"])
@pytest.mark.parametrize("geom", GEOMS, ids=[g[0] for g in GEOMS])
def test_neighbor_table_matches_searchsorted_reference(geom, strategy, gen):
    _, out_coords, scale, offsets, divisor = geom
    in_coords = _coords(gen, B, H, W, 0.35)
    if out_coords is None:
        out_coords = in_coords
    expect = _reference(in_coords, (H, W), out_coords, scale, offsets, divisor)
    keys = _keys(in_coords, H, W, torch.int32).to(DEVICE)
    oc, off = out_coords.to(DEVICE), offsets.to(DEVICE)
    if strategy == "hash":
        nbr = kn.neighbor_table_hash(kh.hash_build(keys), oc, (H, W), scale, off, divisor,
                                     key_space=B * H * W)
    else:
        nbr = kn.neighbor_table_grid(kn.grid_build(keys, B * H * W), oc, (H, W), scale, off,
                                     divisor)
    assert nbr.dtype == torch.int32 and nbr.shape == expect.shape
    assert torch.equal(nbr.cpu(), expect)
    assert (expect >= 0).any() and (expect < 0).any()


def test_neighbor_table_int64_keys_and_strided_coords(gen):
    in_coords = _coords(gen, B, H, W, 0.5)
    keys64 = _keys(in_coords, H, W, torch.int64).to(DEVICE)
    table = kh.hash_build(keys64)
    offsets = _offsets(3, 3, (1, 1), (1, 1))
    # a non-contiguous, int64 coordinate view
    big = torch.zeros(in_coords.shape[0], 5, dtype=torch.int64)
    big[:, 1:4] = in_coords
    oc = big[:, 1:4].to(DEVICE)
    assert not oc.is_contiguous()
    nbr = kn.neighbor_table_hash(table, oc, (H, W), (1, 1), offsets.to(DEVICE), (1, 1))
    assert torch.equal(nbr.cpu(), _reference(in_coords, (H, W), in_coords, (1, 1), offsets, (1, 1)))


def test_neighbor_table_empty_inputs(gen):
    in_coords = _coords(gen, B, H, W, 0.3)
    table = kh.hash_build(_keys(in_coords, H, W, torch.int32).to(DEVICE))
    off = _offsets(3, 3, (1, 1), (1, 1)).to(DEVICE)
    empty = torch.empty(0, 3, dtype=torch.int32, device=DEVICE)
    assert kn.neighbor_table_hash(table, empty, (H, W), (1, 1), off, (1, 1)).shape == (9, 0)
    # empty index: everything missing
    t0 = kh.hash_build(torch.empty(0, dtype=torch.int32, device=DEVICE))
    nbr = kn.neighbor_table_hash(t0, in_coords.to(DEVICE), (H, W), (1, 1), off, (1, 1))
    assert (nbr == -1).all()
    g0 = kn.grid_build(torch.empty(0, dtype=torch.int32, device=DEVICE), B * H * W)
    assert (kn.neighbor_table_grid(g0, in_coords.to(DEVICE), (H, W), (1, 1), off, (1, 1)) == -1).all()


def test_grid_duplicates_smallest_row_and_lookup():
    keys = torch.tensor([5, 3, 5, 9, 3], dtype=torch.int32, device=DEVICE)
    grid = kn.grid_build(keys, 12)
    assert grid.cpu().tolist() == [-1, -1, -1, 1, -1, 0, -1, -1, -1, 3, -1, -1]
    q = torch.tensor([[3, 5], [-1, 100]], device=DEVICE)
    assert kn.grid_lookup(grid, q).cpu().tolist() == [[1, 0], [-1, -1]]


# -- derived structures ------------------------------------------------------------------
def _random_nbr(gen, K, n, p_missing=0.5):
    nbr = torch.randint(0, 50, (K, n), generator=gen, dtype=torch.int32)
    nbr[torch.rand(K, n, generator=gen) < p_missing] = -1
    return nbr.to(DEVICE)


def test_row_masks_sorted_order_and_subtile_masks(gen):
    K, n = 9, 150
    nbr = _random_nbr(gen, K, n)
    nbr[:, 40:80] = 7  # a block of rows using every offset
    masks = kn.row_offset_masks(nbr)
    expect = [sum(1 << k for k in range(K) if nbr[k, j] >= 0) for j in range(n)]
    assert masks.dtype == torch.int64 and masks.cpu().tolist() == expect
    perm = kn.mask_sorted_order(masks)
    assert perm.dtype == torch.int32
    assert sorted(perm.cpu().tolist()) == list(range(n))
    assert (masks[perm.long()][1:] >= masks[perm.long()][:-1]).all()
    for p in (None, perm):
        order = list(range(n)) if p is None else p.cpu().tolist()
        sub = kn.subtile_offset_masks(masks, p, 16).cpu().tolist()
        assert len(sub) == -(-n // 16)
        for t, word in enumerate(sub):
            acc = 0
            for j in order[t * 16:(t + 1) * 16]:
                acc |= expect[j]
            assert word == acc
    # sorting never increases the (tile, offset) work, and here strictly reduces it
    raster = kn.tile_offset_work(masks, None, 32, K)
    by_mask = kn.tile_offset_work(masks, perm, 32, K)
    assert by_mask < raster <= K * -(-n // 32)


def test_row_masks_k64_and_limit(gen):
    nbr = _random_nbr(gen, 64, 20)
    masks = kn.row_offset_masks(nbr)
    bits = ((masks[None, :] >> torch.arange(64, device=DEVICE)[:, None]) & 1).bool()
    assert torch.equal(bits, nbr >= 0)
    with pytest.raises(ValueError):
        kn.row_offset_masks(_random_nbr(gen, 65, 4))
