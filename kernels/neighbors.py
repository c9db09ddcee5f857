"""Fused neighbour lookup and the derived kernel-map structures.

Contract
--------
**Neighbour table** ``nbr[K, N_out]`` int32, -1 = missing (offset-major: one offset's entries are
contiguous, so a tile of output rows reads them with one coalesced load).

For output site ``(b, oy, ox) = out_coords[j]`` and offset ``k`` the input site is::

    ny = oy * scale_y + offsets[k, 0];   iy = ny / divisor_y   (likewise x)

missing when ``ny < 0``, the division is inexact, or ``(iy, ix)`` lies outside
``[0, H_in) x [0, W_in)``. The packed key ``(b * H_in + iy) * W_in + ix`` is then looked up:

* ``neighbor_table_hash``: probing a :mod:`.hash` table (same probe bound as its build, so a
  present key is never missed), or
* ``neighbor_table_grid``: reading a dense int32 index image ``grid[key]`` (-1 = empty) built by
  ``grid_build`` with a scatter (``scatter_reduce`` ``amin``: duplicate keys -> smallest row).

This one rule covers submanifold (scale 1, divisor 1), strided (scale = stride) and transposed
(divisor = stride) geometries; a submanifold caller may look up half of the offsets and mirror
the rest itself. Inputs: ``out_coords`` int32/int64 ``[N_out, 3]`` (any strides), ``offsets``
``[K, 2]`` (any int dtype). One program handles ``BLOCK_N`` output rows of one offset (grid
``(cdiv(N_out, BLOCK_N), K)``). Keys are int32 when the table/grid is int32-keyed
(``key_space <= 2**31``), int64 otherwise. Deterministic; no atomics; no autotuning
(memory-bound, ``BLOCK_N = 128``, 4 warps).

**Derived structures** (torch ops only, no custom-combine reductions; run on any device):

* ``row_offset_masks(nbr)``: int64 ``[N]`` bit ``k`` set iff ``nbr[k, j] >= 0`` (``K <= 64``),
  computed as the sum of distinct powers of two.
* ``mask_sorted_order(masks)``: int32 permutation sorting rows by mask (stable), so that the rows
  of one tile tend to use the same offsets.
* ``subtile_offset_masks(masks, perm, sub=16)``: int64 ``[ceil(N / sub)]``, the OR of the masks of
  ``sub`` consecutive rows (in ``perm`` order), by a log2(sub)-step halving tree of ``|``. A
  convolution tile of ``BLOCK_N`` rows (a multiple of ``sub``) ORs its ``BLOCK_N / sub`` words.
* ``tile_offset_work(masks, perm, block)``: the number of (tile, offset) pairs a kernel with
  ``block``-row tiles executes; the cost proxy used to decide whether the mask-sorted order pays.

The per-offset pair lists (CSR) the weight gradient consumes are built by the core
(``spconv2d.kernel_map.pair_lists``) and passed to ``conv.wgrad_plan``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .hash import HashTable, hash_probe

_BLOCK_N = 128
SUBTILE = 16
MAX_MASK_OFFSETS = 64


@triton.jit
def neighbor_kernel(
    coords_ptr, offsets_ptr, table_keys_ptr, table_vals_ptr, nbr_ptr,
    n_out, H_in, W_in, scale_y, scale_x, div_y, div_x, key_space, capacity_mask, max_probes,
    stride_c_n, stride_c_d, stride_off_k, stride_off_d, stride_nbr_k,
    USE_GRID: tl.constexpr, KEY_INT64: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """nbr[k, j] = row of key((b, (oy*sy + dy_k)/dvy, (ox*sx + dx_k)/dvx)) or -1."""
    pid_n = tl.program_id(0)
    k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_out
    row_ptr = coords_ptr + offs_n.to(tl.int64) * stride_c_n
    b = tl.load(row_ptr, mask=mask_n, other=0).to(tl.int32)
    oy = tl.load(row_ptr + stride_c_d, mask=mask_n, other=0).to(tl.int32)
    ox = tl.load(row_ptr + 2 * stride_c_d, mask=mask_n, other=0).to(tl.int32)
    dy = tl.load(offsets_ptr + k * stride_off_k).to(tl.int32)
    dx = tl.load(offsets_ptr + k * stride_off_k + stride_off_d).to(tl.int32)
    ny = oy * scale_y + dy
    nx = ox * scale_x + dx
    ok = mask_n & (ny >= 0) & (nx >= 0) & (b >= 0)
    ny = tl.where(ok, ny, 0)
    nx = tl.where(ok, nx, 0)
    iy = ny // div_y
    ix = nx // div_x
    ok = ok & (iy * div_y == ny) & (ix * div_x == nx) & (iy < H_in) & (ix < W_in)
    if KEY_INT64:
        key = (b.to(tl.int64) * H_in + iy) * W_in + ix
    else:
        key = (b * H_in + iy) * W_in + ix
    ok = ok & (key < key_space)
    key = tl.where(ok, key, -1)
    if USE_GRID:
        rows = tl.load(table_vals_ptr + key, mask=ok, other=-1)
    else:
        rows = hash_probe(table_keys_ptr, table_vals_ptr, key, ok, capacity_mask, max_probes,
                          KEY_INT64)
    tl.store(nbr_ptr + k.to(tl.int64) * stride_nbr_k + offs_n, rows.to(tl.int32), mask=mask_n)


def _launch_neighbors(out_coords, in_shape, scale, offsets, divisor, table_keys, table_vals,
                      key_space, capacity, max_probes, use_grid, key_int64) -> torch.Tensor:
    device = out_coords.device
    K = int(offsets.shape[0])
    n_out = int(out_coords.shape[0])
    nbr = torch.empty((K, n_out), dtype=torch.int32, device=device)
    if K == 0 or n_out == 0:
        return nbr
    if out_coords.dim() != 2 or out_coords.shape[1] != 3:
        raise ValueError(f"out_coords must be [N, 3], got {tuple(out_coords.shape)}")
    offs = offsets.to(device=device, dtype=torch.int32).contiguous()
    H_in, W_in = int(in_shape[0]), int(in_shape[1])
    grid = (triton.cdiv(n_out, _BLOCK_N), K)
    neighbor_kernel[grid](
        out_coords, offs, table_keys, table_vals, nbr,
        n_out, H_in, W_in, int(scale[0]), int(scale[1]), int(divisor[0]), int(divisor[1]),
        int(key_space), int(capacity) - 1, int(max_probes),
        out_coords.stride(0), out_coords.stride(1), offs.stride(0), offs.stride(1), nbr.stride(0),
        USE_GRID=use_grid, KEY_INT64=key_int64, BLOCK_N=_BLOCK_N, num_warps=4,
    )
    return nbr


def neighbor_table_hash(
    table: HashTable,
    out_coords: torch.Tensor,
    in_shape: Sequence[int],
    scale: Sequence[int],
    offsets: torch.Tensor,
    divisor: Sequence[int],
    key_space: Optional[int] = None,
) -> torch.Tensor:
    """``nbr[K, N_out]`` int32 through a hash table built on the input's packed keys."""
    if key_space is None:
        key_space = 2**63 - 1 if table.key_dtype == torch.int64 else 2**31 - 1
    return _launch_neighbors(
        out_coords, in_shape, scale, offsets, divisor, table.keys, table.values, key_space,
        table.capacity, table.max_probes, False, table.key_dtype == torch.int64,
    )


def grid_build(keys: torch.Tensor, key_space: int) -> torch.Tensor:
    """Dense index image ``grid[key_space]`` int32: ``grid[keys[i]] = i`` (smallest i wins), else -1."""
    if key_space >= 2**31 - 1:
        raise ValueError("grid index needs key_space < 2**31 (use the hash table)")
    grid = torch.full((int(key_space),), -1, dtype=torch.int32, device=keys.device)
    if keys.numel():
        rows = torch.arange(keys.numel(), dtype=torch.int32, device=keys.device)
        grid.scatter_reduce_(0, keys.long().reshape(-1), rows, reduce="amin", include_self=False)
    return grid


def grid_lookup(grid: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """int32 rows for ``query`` (any shape), -1 where absent or out of range."""
    q = query.long()
    ok = (q >= 0) & (q < grid.numel())
    rows = grid[torch.where(ok, q, torch.zeros_like(q))]
    return torch.where(ok, rows, torch.full_like(rows, -1))


def neighbor_table_grid(
    grid: torch.Tensor,
    out_coords: torch.Tensor,
    in_shape: Sequence[int],
    scale: Sequence[int],
    offsets: torch.Tensor,
    divisor: Sequence[int],
) -> torch.Tensor:
    """``nbr[K, N_out]`` int32 through a dense index image from ``grid_build``."""
    return _launch_neighbors(
        out_coords, in_shape, scale, offsets, divisor, grid, grid, grid.numel(), 1, 1, True, False,
    )


# --------------------------------------------------------------------------------------------
# derived structures (torch ops)
# --------------------------------------------------------------------------------------------
def row_offset_masks(nbr: torch.Tensor) -> torch.Tensor:
    """int64 ``[N]``: bit ``k`` set iff ``nbr[k, j] >= 0``. Needs ``K <= 64``."""
    K = nbr.shape[0]
    if K > MAX_MASK_OFFSETS:
        raise ValueError(f"row_offset_masks supports K <= {MAX_MASK_OFFSETS}, got {K}")
    bits = torch.arange(K, device=nbr.device, dtype=torch.int64)[:, None]
    # distinct powers of two: the (wrapping) int64 sum equals the bitwise OR
    return ((nbr >= 0).to(torch.int64) << bits).sum(0)


def mask_sorted_order(masks: torch.Tensor) -> torch.Tensor:
    """int32 permutation of rows sorted (stably) by their offset mask."""
    return torch.sort(masks, stable=True).indices.to(torch.int32)


def subtile_offset_masks(masks: torch.Tensor, perm: Optional[torch.Tensor] = None,
                         sub: int = SUBTILE) -> torch.Tensor:
    """int64 ``[ceil(N / sub)]``: OR of ``masks`` over each ``sub`` consecutive rows of ``perm``."""
    if sub & (sub - 1):
        raise ValueError("sub must be a power of two")
    m = masks if perm is None else masks[perm.long()]
    n = m.numel()
    t = -(-n // sub)
    if t * sub != n:
        m = torch.cat([m, m.new_zeros(t * sub - n)])
    m = m.reshape(t, sub)
    while m.shape[1] > 1:
        h = m.shape[1] // 2
        m = m[:, :h] | m[:, h:]
    return m.reshape(t).contiguous()


def tile_offset_work(masks: torch.Tensor, perm: Optional[torch.Tensor], block: int,
                     n_offsets: int) -> int:
    """Number of (tile, offset) pairs a ``block``-row tiling executes (host sync)."""
    if masks.numel() == 0:
        return 0
    tiles = subtile_offset_masks(masks, perm, sub=block)
    bits = torch.arange(n_offsets, device=masks.device, dtype=torch.int64)
    return int(((tiles[:, None] >> bits) & 1).sum())


__all__ = [
    "neighbor_table_hash", "neighbor_table_grid", "grid_build", "grid_lookup",
    "row_offset_masks", "mask_sorted_order", "subtile_offset_masks", "tile_offset_work",
    "SUBTILE", "MAX_MASK_OFFSETS", "neighbor_kernel",
]
