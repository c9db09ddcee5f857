"""Kernel-map builders of the fused CPU backend: index and neighbour table in one pass per map.

Contract
--------
* Inputs are torch CPU tensors: ``coords`` int32 ``[N, 3]`` rows ``(b, y, x)`` inside
  ``[0, batch_size) x [0, H) x [0, W)``, unique, in any row order. Outputs are torch CPU
  tensors: ``nbr`` int32 ``[K, N_out]`` (-1 = missing, offset ``k = ky * kw + kx``), output
  coordinates int32 ``[M, 3]`` in raster (key) order. Every result is identical to the PyTorch
  path's builder of the same geometry (``spconv2d.maps``).
* Geometry (``F.conv2d`` / ``F.conv_transpose2d`` cross-correlation, per axis):
  submanifold ``in = out + (k - kh // 2) * r``; strided conv ``out = (in + p - k*r) / s``;
  transposed ``out = in*s - p + k*r``; lookup onto given sites
  ``in = (out * scale + offsets[k]) / divisor``; a division must be exact, every site inside
  its grid.
* Index: a dense int32 grid over the key space (``(b*H + y)*W + x``) when it is affordable
  (``grid_max_keys`` and ``grid_keys_per_site``, arguments with module defaults), else sorted
  keys (int32 when ``B*H*W < 2**31``, int64 beyond) and binary search. The grid is a per-thread
  scratch buffer kept all -1 between calls (each kernel clears exactly the cells it wrote), so
  a build costs O(sites), not O(key space), once the buffer exists (``SCRATCH_MAX_KEYS``;
  ``release_scratch()`` frees it).
* Deterministic: every output entry is written by exactly one iteration; the only shared
  writes are occupancy marks of the same value. Parallel loops (``prange``) use
  ``min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)`` threads, one below
  ``runtime.PARALLEL_MIN_WORK`` elementary steps, one launch at a time (``runtime``).
* Compiled lazily on first call and cached on disk (``cache=True``); importing this module
  compiles nothing and touches no environment variable.
"""
from __future__ import annotations

import functools
import threading
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from numba import njit, prange

from ...coords import check_in_grid, check_unique
from ...geometry import pair
from .runtime import (TEAM_ARGS, TEAM_PHASE, TEAM_TASKS, TeamKernel, array_arg1, array_arg2, array_arg3, array_arg4,
                      cached_njit, launch, next_task, parallel_kernel, request_threads, team_words, threads_for)

Pair = Tuple[int, int]

# A dense grid index costs 4 bytes per cell of the key space: allocated and filled once (a
# memset and page faults), or a scan of every cell (the strided builds' row numbering); a
# sorted index costs a sort and ~log2(N) probes per lookup. The grid is used while the key
# space has at most ``grid_keys_per_site`` cells per site (or at most ``GRID_MIN_KEYS`` cells),
# or, for lookups, fits the thread's existing scratch buffer (then it costs nothing), and never
# beyond ``grid_max_keys`` cells (256 MiB of int32 at the default). Measured on a 2-core
# "Intel(R) Xeon(R) Processor" (KVM), one thread, random sites on 512x1024 and 2048x2048
# images, alternating medians: 3x3 s2 conv maps, sorted / grid time 2.7, 1.7, 0.97, 0.58 at
# 64, 256, 1024, 4096 input cells per site (the output grid has a quarter of them: 256 output
# cells per site is the break-even); 3x3 submanifold maps with the scratch grid in place,
# 3.3, 2.6, 1.7, 1.1 (the grid wins throughout once its buffer exists).
GRID_MAX_KEYS = 1 << 26
GRID_KEYS_PER_SITE = 256
GRID_MIN_KEYS = 1 << 16
# The per-thread scratch grid is kept (all -1) up to this many cells (32 MiB); larger grids
# are allocated per call.
SCRATCH_MAX_KEYS = 1 << 23

_scratch = threading.local()


def _scratch_grid(size: int) -> np.ndarray:
    """An int32 array of at least ``size`` cells, all -1; the caller's kernel must leave it so."""
    if size > SCRATCH_MAX_KEYS:
        return np.full(size, -1, np.int32)
    buf = getattr(_scratch, "grid", None)
    if buf is None or buf.shape[0] < size:
        buf = None
        _scratch.grid = buf = np.full(min(SCRATCH_MAX_KEYS, 1 << max(16, (size - 1).bit_length())), -1, np.int32)
    return buf


def scratch_size() -> int:
    """Cells of this thread's scratch grid (0: none)."""
    buf = getattr(_scratch, "grid", None)
    return 0 if buf is None else buf.shape[0]


def scratch_is_clear() -> bool:
    """True when this thread's scratch grid is absent or all -1 (the invariant between calls)."""
    buf = getattr(_scratch, "grid", None)
    return buf is None or bool((buf == -1).all())


def release_scratch() -> None:
    """Free this thread's scratch grid."""
    _scratch.grid = None


def _np_coords(coords: torch.Tensor) -> np.ndarray:
    if coords.device.type != "cpu":
        raise ValueError(f"the numba kernels take CPU tensors, got coords on {coords.device}")
    if coords.dim() != 2 or coords.shape[1] != 3:
        raise ValueError(f"coords must have shape [N, 3], got {tuple(coords.shape)}")
    return coords.to(torch.int32).contiguous().numpy()


def key_dtype(batch_size: int, spatial_shape: Pair):
    H, W = spatial_shape
    return np.int32 if batch_size * H * W < 2**31 else np.int64


def use_grid(key_space: int, n: int, grid_max_keys: int = GRID_MAX_KEYS,
             grid_keys_per_site: int = GRID_KEYS_PER_SITE) -> bool:
    """Whether a dense grid over ``key_space`` cells is the index for ``n`` sites (by size alone)."""
    return key_space <= grid_max_keys and key_space <= max(grid_keys_per_site * n, GRID_MIN_KEYS)


def _lookup_grid_ok(key_space: int, n: int, grid_max_keys: int, grid_keys_per_site: int) -> bool:
    """``use_grid``, or a lookup that fits the scratch buffer this thread already holds."""
    return use_grid(key_space, n, grid_max_keys, grid_keys_per_site) or (
        key_space <= grid_max_keys and key_space <= min(scratch_size(), SCRATCH_MAX_KEYS))


# -----------------------------------------------------------------------------------------
# kernels: indexes
# -----------------------------------------------------------------------------------------
@parallel_kernel
def _pack_keys(coords, H, W, keys):
    for i in prange(coords.shape[0]):
        keys[i] = (coords[i, 0] * H + coords[i, 1]) * W + coords[i, 2]


@cached_njit(nogil=True)
def _is_sorted(keys):
    for i in range(1, keys.shape[0]):
        if keys[i] <= keys[i - 1]:
            return False
    return True


@cached_njit(nogil=True)
def _first_duplicate(skeys):
    """Position p with ``skeys[p] == skeys[p + 1]`` (sorted keys), or -1."""
    for i in range(1, skeys.shape[0]):
        if skeys[i] == skeys[i - 1]:
            return i - 1
    return -1


@njit(inline="always")
def _lower_bound(skeys, q, lo):
    """The first position ``>= lo`` whose key is not below ``q`` (binary search)."""
    hi = skeys.shape[0]
    while lo < hi:
        mid = (lo + hi) >> 1
        if skeys[mid] < q:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(inline="always")
def _find(skeys, q):
    """The position of key ``q`` in the sorted ``skeys``, or -1."""
    lo = _lower_bound(skeys, q, 0)
    if lo < skeys.shape[0] and skeys[lo] == q:
        return lo
    return -1


def _sorted_index(coords: np.ndarray, batch_size: int, spatial_shape: Pair):
    """``(sorted keys, perm or None)``: ``perm[p]`` is the row of the p-th smallest key."""
    H, W = spatial_shape
    keys = np.empty(coords.shape[0], key_dtype(batch_size, spatial_shape))
    if coords.shape[0]:
        _pack_keys(coords, H, W, keys)
    if _is_sorted(keys):
        return keys, None
    order = torch.sort(torch.from_numpy(keys)).indices  # (torch's sort: multi-threaded, fast)
    return keys[order.numpy()], order.to(torch.int32).numpy()


# -----------------------------------------------------------------------------------------
# kernels: validation (what ``SparseTensor(check=True)`` does: range, keys, duplicates)
# -----------------------------------------------------------------------------------------
@parallel_kernel
def _validate(coords, B, H, W, out, keys):
    """Contiguous int32 copy of ``coords`` (any strides, int32 or int64) and their keys; returns
    how many rows lie outside the grid (their keys are left -1)."""
    bad = 0
    for i in prange(coords.shape[0]):
        b = coords[i, 0]
        y = coords[i, 1]
        x = coords[i, 2]
        if b < 0 or b >= B or y < 0 or y >= H or x < 0 or x >= W:
            bad += 1
            keys[i] = -1
        else:
            keys[i] = (np.int64(b) * H + y) * W + x
        out[i, 0] = b
        out[i, 1] = y
        out[i, 2] = x
    return bad


@parallel_kernel
def _count_duplicates_grid(keys, grid):
    """Rows whose key another row also holds (scatter every row, then check it stuck: exact and
    deterministic although which duplicate wins the scatter is not). ``grid`` (all -1) is left
    all -1."""
    for i in prange(keys.shape[0]):
        grid[keys[i]] = i
    dup = 0
    for i in prange(keys.shape[0]):
        if grid[keys[i]] != i:
            dup += 1
    for i in prange(keys.shape[0]):
        grid[keys[i]] = -1
    return dup


def check_coords(coords: torch.Tensor, batch_size: int, spatial_shape: Sequence[int], *,
                 grid_max_keys: int = GRID_MAX_KEYS, grid_keys_per_site: int = GRID_KEYS_PER_SITE):
    """``SparseTensor(check=True)``'s validation fused: ``(coords int32 [N, 3] contiguous, keys)``
    with keys as ``spconv2d.coords.pack_keys`` gives them (int32 when ``B*H*W < 2**31``).

    One pass checks the range, packs the keys and copies the rows (any strides, e.g. the
    column-major result of ``nonzero()``); duplicates are found with a grid (scatter, then
    check every row stuck) or, beyond ``use_grid``, by sorting. On failure the same
    ``ValueError`` as ``SparseTensor`` is raised (its own checks produce the message)."""
    if coords.dtype not in (torch.int32, torch.int64) or coords.dim() != 2 or coords.shape[1] != 3:
        raise TypeError(f"coords must be int32 / int64 [N, 3], got {coords.dtype} {tuple(coords.shape)}")
    H, W = pair(spatial_shape, "spatial_shape")
    n = coords.shape[0]
    out = torch.empty((n, 3), dtype=torch.int32)
    keys = np.empty(n, key_dtype(batch_size, (H, W)))
    if n == 0:
        return out, torch.from_numpy(keys)
    key_space = batch_size * H * W
    grid = _lookup_grid_ok(key_space, n, grid_max_keys, grid_keys_per_site)
    request_threads(n)
    if _validate(coords.numpy(), batch_size, H, W, out.numpy(), keys):
        check_in_grid(coords, (H, W), batch_size)  # raises with the first bad row
        raise AssertionError("unreachable: a row is out of range")
    if grid:
        dup = _count_duplicates_grid(keys, _scratch_grid(key_space))
    else:
        dup = _first_duplicate(torch.sort(torch.from_numpy(keys)).values.numpy()) >= 0
    if dup:
        check_unique(torch.from_numpy(keys), out)  # raises naming the duplicate rows
        raise AssertionError("unreachable: duplicate coordinates")
    return out, torch.from_numpy(keys)


# -----------------------------------------------------------------------------------------
# kernels: the active sites of a dense tensor (``SparseTensor.from_dense``)
# -----------------------------------------------------------------------------------------
#: Image rows per task of ``sites_from_dense``.
DENSE_ROWS_PER_TASK = 16


@njit(inline="always")
def _count_row_sites(t, mask, counts):
    """``counts[row + 1]`` = the active pixels of image rows ``t * DENSE_ROWS_PER_TASK ...``."""
    B, H, W = mask.shape
    for row in range(t * DENSE_ROWS_PER_TASK, min(B * H, (t + 1) * DENSE_ROWS_PER_TASK)):
        m = mask[row // H, row % H]
        n = 0
        for x in range(W):
            n += m[x] != 0
        counts[row + 1] = n


def _count_row_sites_tasks(mask, counts):
    for t in prange((mask.shape[0] * mask.shape[1] + DENSE_ROWS_PER_TASK - 1) // DENSE_ROWS_PER_TASK):
        _count_row_sites(t, mask, counts)


def _count_row_sites_team(data):
    words = team_words(data)
    mask, i = array_arg3(words, TEAM_ARGS, np.uint8)
    counts, i = array_arg1(words, i, np.int64)
    t = next_task(words)
    while t < words[TEAM_TASKS]:
        _count_row_sites(t, mask, counts)
        t = next_task(words)


def _row_tasks(mask, *rest):
    return -(-(mask.shape[0] * mask.shape[1]) // DENSE_ROWS_PER_TASK)


_count_sites = TeamKernel(_count_row_sites_tasks, _count_row_sites_team, lambda phase, mask, counts: _row_tasks(mask))


@njit(inline="always")
def _fill_row_sites(t, mask, images, start, coords, keys, features):
    """The active pixels of image rows ``t * DENSE_ROWS_PER_TASK ...`` in raster order from row
    ``start[row]`` on: ``coords`` ``(b, y, x)``, ``keys`` ``(b*H + y)*W + x``, ``features``
    the pixel's channels."""
    B, C, H, W = images.shape
    for row in range(t * DENSE_ROWS_PER_TASK, min(B * H, (t + 1) * DENSE_ROWS_PER_TASK)):
        b, y = row // H, row % H
        m = mask[b, y]
        i = np.uint64(start[row])  # (unsigned: no wrap-around)
        for x in range(W):
            if m[x]:
                coords[i, 0], coords[i, 1], coords[i, 2] = b, y, x
                keys[i] = row * W + x
                for c in range(C):
                    features[i, c] = images[b, c, y, x]
                i += np.uint64(1)


def _fill_row_sites_tasks(mask, images, start, coords, keys, features):
    for t in prange((mask.shape[0] * mask.shape[1] + DENSE_ROWS_PER_TASK - 1) // DENSE_ROWS_PER_TASK):
        _fill_row_sites(t, mask, images, start, coords, keys, features)


@functools.lru_cache(maxsize=None)
def _fill_sites(feature_type, key_type) -> TeamKernel:
    """``_fill_row_sites`` for ``feature_type`` images (``np.float32`` / ``np.float64``) and
    ``key_type`` keys (``np.int32`` / ``np.int64``)."""
    def team(data):
        words = team_words(data)
        mask, i = array_arg3(words, TEAM_ARGS, np.uint8)
        images, i = array_arg4(words, i, feature_type)
        start, i = array_arg1(words, i, np.int64)
        coords, i = array_arg2(words, i, np.int32)
        keys, i = array_arg1(words, i, key_type)
        features, i = array_arg2(words, i, feature_type)
        t = next_task(words)
        while t < words[TEAM_TASKS]:
            _fill_row_sites(t, mask, images, start, coords, keys, features)
            t = next_task(words)

    return TeamKernel(_fill_row_sites_tasks, team, lambda phase, mask, *rest: _row_tasks(mask))


def sites_from_dense(images: torch.Tensor, mask: torch.Tensor):
    """``SparseTensor.from_dense``'s sites: ``(coords int32 [N, 3], features [N, C], keys)`` of
    ``images [B, C, H, W]`` (float32 / float64, CPU) where ``mask [B, H, W]`` (bool) is true, in
    raster order (what ``mask.nonzero()`` and a gather give), keys as ``pack_keys`` gives them.
    Two passes over the mask: count per image row, then fill each row's slice."""
    B, C, H, W = images.shape
    m = mask.contiguous().view(torch.uint8).numpy()
    im = images.contiguous().numpy()
    counts = np.zeros(B * H + 1, np.int64)
    launch(_count_sites, m, counts, work=B * H * W // 8)
    start = np.cumsum(counts)
    n = int(start[-1])
    coords = np.empty((n, 3), np.int32)
    keys = np.empty(n, key_dtype(B, (H, W)))
    features = np.empty((n, C), im.dtype)
    if n:
        launch(_fill_sites(im.dtype.type, keys.dtype.type), m, im, start, coords, keys, features,
               work=B * H * W // 8 + n * C)
    return torch.from_numpy(coords), torch.from_numpy(features), torch.from_numpy(keys)


# -----------------------------------------------------------------------------------------
# kernels: submanifold
# -----------------------------------------------------------------------------------------
#: Rows per task of the chunked map kernels (``_subm_grid``).
ROWS_PER_TASK = 2048


@njit(inline="always")
def _subm_grid_rows(phase, lo, hi, coords, Hp, Wp, py, px, delta, centre, grid, nbr):
    """Rows ``lo:hi`` of phase 0 (``grid[key] = row``), 1 (the lookups ``nbr[k, row] =
    grid[key + delta[k]]``; returns how many rows the grid does not map back to themselves) or
    2 (``grid[key] = -1``). The grid and table indices are unsigned (every key is inside the
    padded grid): a signed index gets numba's negative-index wrap-around at every access
    (measured: the table 1.7x slower, 39k sites, one thread, AMD EPYC VM)."""
    bad = 0
    for i in range(lo, hi):
        key = (coords[i, 0] * Hp + coords[i, 1] + py) * Wp + coords[i, 2] + px
        ui = np.uint64(i)
        if phase == 0:
            grid[np.uint64(key)] = i
        elif phase == 1:
            for k in range(delta.shape[0]):
                nbr[k, ui] = grid[np.uint64(key + delta[k])]
            if nbr[centre, ui] != i:
                bad += 1
                nbr[centre, ui] = i
        else:
            grid[np.uint64(key)] = -1
    return bad


def _subm_grid_tasks(coords, Hp, Wp, py, px, delta, centre, grid, nbr, bad):
    n = coords.shape[0]
    for phase in range(3):
        for t in prange(bad.shape[0]):
            bad[t] += _subm_grid_rows(phase, t * ROWS_PER_TASK, min(n, (t + 1) * ROWS_PER_TASK), coords, Hp, Wp,
                                      py, px, delta, centre, grid, nbr)


def _subm_grid_team(data):
    words = team_words(data)
    coords, i = array_arg2(words, TEAM_ARGS, np.int32)
    Hp, Wp, py, px = words[i], words[i + 1], words[i + 2], words[i + 3]
    delta, i = array_arg1(words, i + 4, np.int64)
    centre = words[i]
    grid, i = array_arg1(words, i + 1, np.int32)
    nbr, i = array_arg2(words, i, np.int32)
    bad, i = array_arg1(words, i, np.int64)
    n, phase = coords.shape[0], words[TEAM_PHASE]
    t = next_task(words)
    while t < words[TEAM_TASKS]:
        bad[t] += _subm_grid_rows(phase, t * ROWS_PER_TASK, min(n, (t + 1) * ROWS_PER_TASK), coords, Hp, Wp, py,
                                  px, delta, centre, grid, nbr)
        t = next_task(words)


#: Submanifold table from a grid padded by ``(py, px)`` cells of -1 on each side, so every
#: neighbour is one unchecked load ``grid[key + delta[k]]``: three passes over the rows in tasks
#: of ``ROWS_PER_TASK`` (write the grid, look up, clear it again); ``bad[task]`` counts the rows
#: the grid does not map back to themselves (duplicate coordinates). ``grid`` (all -1, at least
#: ``B * Hp * Wp`` cells) is left all -1.
_subm_grid = TeamKernel(_subm_grid_tasks, _subm_grid_team,
                        lambda phase, coords, Hp, Wp, py, px, delta, centre, grid, nbr, bad: bad.shape[0], phases=3)


@parallel_kernel
def _subm_sorted(coords, skeys, perm, has_perm, H, W, kh, kw, ry, rx, nbr):
    """Submanifold table from sorted keys: one binary search per kernel row, then a forward
    scan over that image row for the ``kw`` offsets (their keys ascend)."""
    n = skeys.shape[0]
    centre = (kh * kw) // 2
    for j in prange(coords.shape[0]):
        b = np.int64(coords[j, 0])
        y = coords[j, 1]
        x = coords[j, 2]
        x0 = x - (kw // 2) * rx
        for a in range(kh):
            yy = y + (a - kh // 2) * ry
            if yy < 0 or yy >= H:
                for c in range(kw):
                    nbr[a * kw + c, j] = -1
                continue
            row = (b * H + yy) * W
            pos = _lower_bound(skeys, row + max(x0, 0), 0)
            for c in range(kw):
                xx = x0 + c * rx
                r = -1
                if xx >= 0 and xx < W:
                    q = row + xx
                    while pos < n and skeys[pos] < q:
                        pos += 1
                    if pos < n and skeys[pos] == q:
                        r = perm[pos] if has_perm else pos
                nbr[a * kw + c, j] = r
        nbr[centre, j] = j


def _raise_duplicate(coords: np.ndarray, batch_size: int, spatial_shape: Pair) -> None:
    keys, perm = _sorted_index(coords, batch_size, spatial_shape)
    p = _first_duplicate(keys)
    a, b = (p, p + 1) if perm is None else sorted((int(perm[p]), int(perm[p + 1])))
    raise ValueError(
        f"duplicate coordinates: rows {a} and {b} are both {tuple(int(v) for v in coords[a])}; "
        f"use SparseTensor.coalesce(...) to merge duplicates"
    )


@functools.lru_cache(maxsize=256)
def _grid_deltas(kh: int, kw: int, ry: int, rx: int, Wp: int) -> np.ndarray:
    """The key offsets ``(ky - kh//2) * ry * Wp + (kx - kw//2) * rx`` of a submanifold window on
    a grid of rows ``Wp`` cells wide, in offset order (read-only: shared between calls)."""
    ky, kx = np.meshgrid(np.arange(kh), np.arange(kw), indexing="ij")
    d = ((ky.ravel() - kh // 2) * ry * Wp + (kx.ravel() - kw // 2) * rx).astype(np.int64)
    d.flags.writeable = False
    return d


def subm_table(coords: torch.Tensor, batch_size: int, spatial_shape: Sequence[int], kernel_size,
               dilation=1, *, grid_max_keys: int = GRID_MAX_KEYS,
               grid_keys_per_site: int = GRID_KEYS_PER_SITE) -> torch.Tensor:
    """Submanifold neighbour table ``nbr [K, N]`` int32 of ``coords`` (any row order).

    Offset ``k = ky * kw + kx`` reads the site ``(y + (ky - kh//2) * ry, x + (kx - kw//2) * rx)``;
    the centre is the identity. Raises ``ValueError`` on duplicate coordinates (found for free
    by the lookups)."""
    kh, kw = pair(kernel_size, "kernel_size")
    ry, rx = pair(dilation, "dilation")
    if kh % 2 == 0 or kw % 2 == 0 or kh < 1 or kw < 1 or ry < 1 or rx < 1:
        raise ValueError(f"submanifold maps need odd kernel sizes and positive dilation, got {(kh, kw)}, {(ry, rx)}")
    H, W = pair(spatial_shape, "spatial_shape")
    c = _np_coords(coords)
    n, K = c.shape[0], kh * kw
    centre = K // 2
    if n == 0:
        return torch.zeros((K, 0), dtype=torch.int32)
    py, px = (kh // 2) * ry, (kw // 2) * rx
    grid_size = batch_size * (H + 2 * py) * (W + 2 * px)
    if _lookup_grid_ok(grid_size, n, grid_max_keys, grid_keys_per_site):
        nbr = np.empty((K, n), np.int32)
        bad = np.zeros(-(-n // ROWS_PER_TASK), np.int64)
        launch(_subm_grid, c, H + 2 * py, W + 2 * px, py, px, _grid_deltas(kh, kw, ry, rx, W + 2 * px),
               centre, _scratch_grid(grid_size), nbr, bad, work=n * K)
        if bad.any():
            _raise_duplicate(c, batch_size, (H, W))
    else:
        request_threads(n * K)
        nbr = np.empty((K, n), np.int32)
        skeys, perm = _sorted_index(c, batch_size, (H, W))
        if _first_duplicate(skeys) >= 0:
            _raise_duplicate(c, batch_size, (H, W))
        _subm_sorted(c, skeys, perm if perm is not None else np.empty(0, np.int32), perm is not None,
                     H, W, kh, kw, ry, rx, nbr)
    return torch.from_numpy(nbr)


# -----------------------------------------------------------------------------------------
# kernels: lookup onto given output sites (the affine rule)
# -----------------------------------------------------------------------------------------
@njit(inline="always")
def _affine(o, scale, off, div, size):
    """Input coordinate of output coordinate ``o`` (-1 when inexact or outside)."""
    q = o * scale + off
    if div != 1:
        if q % div != 0:
            return -1
        q = q // div
    if q < 0 or q >= size:
        return -1
    return q


@njit(inline="always")
def _affine_key(b, y, x, sy, sx, off_y, off_x, dy, dx, H, W):
    """The key ``(b * H + y') * W + x'`` of the site the affine rule (``_affine`` per axis)
    takes ``(y, x)`` to, or -1 when it is inexact or outside the ``H x W`` grid."""
    yy = _affine(y, sy, off_y, dy, H)
    if yy < 0:
        return -1
    xx = _affine(x, sx, off_x, dx, W)
    if xx < 0:
        return -1
    return (np.int64(b) * H + yy) * W + xx


@parallel_kernel
def _lookup_grid(in_coords, H, W, out_coords, sy, sx, offs, dy, dx, nbr, grid):
    """``grid`` (all -1, at least ``B * H * W`` cells) is left all -1."""
    K = offs.shape[0]
    for i in prange(in_coords.shape[0]):
        grid[(in_coords[i, 0] * H + in_coords[i, 1]) * W + in_coords[i, 2]] = i
    for j in prange(out_coords.shape[0]):
        b = out_coords[j, 0]
        oy = out_coords[j, 1]
        ox = out_coords[j, 2]
        for k in range(K):
            key = _affine_key(b, oy, ox, sy, sx, offs[k, 0], offs[k, 1], dy, dx, H, W)
            nbr[k, j] = grid[key] if key >= 0 else -1
    for i in prange(in_coords.shape[0]):
        grid[(in_coords[i, 0] * H + in_coords[i, 1]) * W + in_coords[i, 2]] = -1


@parallel_kernel
def _lookup_sorted(skeys, perm, has_perm, H, W, out_coords, sy, sx, offs, dy, dx, nbr):
    K = offs.shape[0]
    for j in prange(out_coords.shape[0]):
        b = np.int64(out_coords[j, 0])
        oy = out_coords[j, 1]
        ox = out_coords[j, 2]
        for k in range(K):
            key = _affine_key(b, oy, ox, sy, sx, offs[k, 0], offs[k, 1], dy, dx, H, W)
            p = _find(skeys, key) if key >= 0 else -1
            nbr[k, j] = -1 if p < 0 else (perm[p] if has_perm else p)


def lookup_table(in_coords: torch.Tensor, in_batch: int, in_shape: Sequence[int], out_coords: torch.Tensor,
                 scale, offsets, divisor, *, grid_max_keys: int = GRID_MAX_KEYS,
                 grid_keys_per_site: int = GRID_KEYS_PER_SITE) -> torch.Tensor:
    """``nbr [K, N_out]`` int32 by the affine rule ``in = (out * scale + offsets[k]) / divisor``
    (exact division, inside ``in_shape``), looked up among ``in_coords`` (any order).

    The transposed conv ``(k, s, p, r)`` onto a target's sites is ``scale = 1``,
    ``offsets[k] = (p - ky*r, p - kx*r)``, ``divisor = s`` (``spconv2d.maps.conv_transpose_to_map``)."""
    H, W = pair(in_shape, "in_shape")
    sy, sx = pair(scale, "scale")
    dy, dx = pair(divisor, "divisor")
    if min(sy, sx, dy, dx) < 1:
        raise ValueError(f"scale and divisor must be positive, got {(sy, sx)}, {(dy, dx)}")
    c_in, c_out = _np_coords(in_coords), _np_coords(out_coords)
    offs = torch.as_tensor(offsets).to(torch.int64).reshape(-1, 2).contiguous().numpy()
    if c_out.shape[0] == 0 or c_in.shape[0] == 0 or offs.shape[0] == 0:
        return torch.full((offs.shape[0], c_out.shape[0]), -1, dtype=torch.int32)
    nbr = np.empty((offs.shape[0], c_out.shape[0]), np.int32)  # (every entry is written)
    key_space = in_batch * H * W
    work = c_out.shape[0] * offs.shape[0]
    if _lookup_grid_ok(key_space, max(c_in.shape[0], c_out.shape[0]), grid_max_keys, grid_keys_per_site):
        request_threads(work + c_in.shape[0])
        _lookup_grid(c_in, H, W, c_out, sy, sx, offs, dy, dx, nbr, _scratch_grid(key_space))
    else:
        request_threads(work)
        skeys, perm = _sorted_index(c_in, in_batch, (H, W))
        _lookup_sorted(skeys, perm if perm is not None else np.empty(0, np.int32), perm is not None,
                       H, W, c_out, sy, sx, offs, dy, dx, nbr)
    return torch.from_numpy(nbr)


# -----------------------------------------------------------------------------------------
# kernels: generated outputs (strided and transposed), ``out = (in * mul + off[k]) / div``
# -----------------------------------------------------------------------------------------
@parallel_kernel
def _mark(coords, Ho, Wo, my, mx, offs, dy, dx, occ):
    """``occ[key] = 0`` (from -1) for every output some input proposes (same-value writes only)."""
    K = offs.shape[0]
    for i in prange(coords.shape[0]):
        b = coords[i, 0]
        iy = coords[i, 1]
        ix = coords[i, 2]
        for k in range(K):
            key = _affine_key(b, iy, ix, my, mx, offs[k, 0], offs[k, 1], dy, dx, Ho, Wo)
            if key >= 0:
                occ[key] = 0


@njit(inline="always")
def _mark_block_rows(t, coords, Ho, Wo, sy, sx, occ):
    for i in range(t * ROWS_PER_TASK, min(coords.shape[0], (t + 1) * ROWS_PER_TASK)):
        oy = coords[i, 1] // sy
        ox = coords[i, 2] // sx
        if oy < Ho and ox < Wo:
            occ[np.uint64((coords[i, 0] * Ho + oy) * Wo + ox)] = 0  # (unsigned: no wrap-around)


def _mark_blocks_tasks(coords, Ho, Wo, sy, sx, occ):
    for t in prange((coords.shape[0] + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        _mark_block_rows(t, coords, Ho, Wo, sy, sx, occ)


def _mark_blocks_team(data):
    words = team_words(data)
    coords, i = array_arg2(words, TEAM_ARGS, np.int32)
    Ho, Wo, sy, sx = words[i], words[i + 1], words[i + 2], words[i + 3]
    occ, i = array_arg1(words, i + 4, np.int32)
    t = next_task(words)
    while t < words[TEAM_TASKS]:
        _mark_block_rows(t, coords, Ho, Wo, sy, sx, occ)
        t = next_task(words)


#: k == s, p == 0, r == 1: each input proposes its block's output only (``occ[key] = 0``).
_mark_blocks = TeamKernel(_mark_blocks_tasks, _mark_blocks_team,
                          lambda phase, coords, *rest: -(-coords.shape[0] // ROWS_PER_TASK))


@njit(inline="always")
def _number_chunk(phase, c, occ, Ho, Wo, chunk, counts, out, nbr):
    """Output rows ``c * chunk ...`` (image rows of the grid): phase 0 counts their occupied
    cells into ``counts[c + 1]``; phase 1 (``counts`` now the exclusive prefix sums) gives each
    occupied cell its raster rank (in place), its output coordinates, and -1 in ``nbr``."""
    rows_total = occ.shape[0] // Wo
    lo, hi = c * chunk, min(rows_total, (c + 1) * chunk)
    if phase == 0:
        cnt = 0
        for o in range(lo * Wo, hi * Wo):
            if occ[o] >= 0:
                cnt += 1
        counts[c + 1] = cnt
        return
    r = np.uint64(counts[c])  # (unsigned indices: no wrap-around)
    for row in range(lo, hi):
        b = row // Ho
        y = row - b * Ho
        base = np.uint64(row * Wo)
        for x in range(Wo):
            o = base + np.uint64(x)
            if occ[o] >= 0:
                occ[o] = r
                out[r, 0] = b
                out[r, 1] = y
                out[r, 2] = x
                for k in range(nbr.shape[0]):
                    nbr[k, r] = -1
                r += np.uint64(1)


def _number_tasks(phase, occ, Ho, Wo, chunk, counts, out, nbr):
    for c in prange(counts.shape[0] - 1):
        _number_chunk(phase, c, occ, Ho, Wo, chunk, counts, out, nbr)


def _number_team(data):
    words = team_words(data)
    phase = words[TEAM_ARGS]
    occ, i = array_arg1(words, TEAM_ARGS + 1, np.int32)
    Ho, Wo, chunk = words[i], words[i + 1], words[i + 2]
    counts, i = array_arg1(words, i + 3, np.int64)
    out, i = array_arg2(words, i, np.int32)
    nbr, i = array_arg2(words, i, np.int32)
    t = next_task(words)
    while t < words[TEAM_TASKS]:
        _number_chunk(phase, t, occ, Ho, Wo, chunk, counts, out, nbr)
        t = next_task(words)


#: Two passes, two launches (the prefix sum of the counts runs between them), so the pass is the
#: kernel's first argument rather than a ``TeamKernel`` phase.
_number = TeamKernel(_number_tasks, _number_team,
                     lambda _phase, step, occ, Ho, Wo, chunk, counts, *rest: counts.shape[0] - 1)


def _number_rows(occ: np.ndarray, B: int, Ho: int, Wo: int, K: int, nchunks: int, work: int):
    """Occupied cells of ``occ`` (the first ``B * Ho * Wo``) -> their raster rank (in place);
    returns the output coordinates ``[M, 3]`` and ``nbr [K, M]`` initialised to -1: counts per
    chunk of grid rows, their prefix sums, then the numbering, each chunk a task."""
    grid = occ[:B * Ho * Wo]
    chunk = -(-(B * Ho) // nchunks)
    nchunks = -(-(B * Ho) // chunk)
    counts = np.zeros(nchunks + 1, np.int64)
    none = np.empty((0, 3), np.int32), np.empty((K, 0), np.int32)
    launch(_number, 0, grid, Ho, Wo, chunk, counts, *none, work=work)
    np.cumsum(counts, out=counts)
    m = int(counts[-1])
    out, nbr = np.empty((m, 3), np.int32), np.empty((K, m), np.int32)
    launch(_number, 1, grid, Ho, Wo, chunk, counts, out, nbr, work=work)
    return out, nbr


@parallel_kernel
def _fill_grid(coords, Ho, Wo, my, mx, offs, dy, dx, rows, nbr, out):
    """``nbr[k, rows[key(out)]] = i``: each (k, output) has one input, so no write collides.
    Then the cells of ``rows`` that ``out`` occupies are reset to -1."""
    K = offs.shape[0]
    for i in prange(coords.shape[0]):
        b = coords[i, 0]
        iy = coords[i, 1]
        ix = coords[i, 2]
        for k in range(K):
            key = _affine_key(b, iy, ix, my, mx, offs[k, 0], offs[k, 1], dy, dx, Ho, Wo)
            if key >= 0:
                nbr[k, rows[key]] = i
    for r in prange(out.shape[0]):
        rows[(out[r, 0] * Ho + out[r, 1]) * Wo + out[r, 2]] = -1


@njit(inline="always")
def _fill_block_rows(phase, t, coords, Ho, Wo, sy, sx, kw, rows, nbr, out):
    """Phase 0, inputs ``t * ROWS_PER_TASK ...``: ``nbr[k, rows[key(out)]] = i``; phase 1,
    outputs ``t * ROWS_PER_TASK ...``: their cells of ``rows`` reset to -1."""
    if phase == 0:
        for i in range(t * ROWS_PER_TASK, min(coords.shape[0], (t + 1) * ROWS_PER_TASK)):
            iy = coords[i, 1]
            ix = coords[i, 2]
            oy = iy // sy
            ox = ix // sx
            if oy < Ho and ox < Wo:  # (unsigned indices: no wrap-around)
                nbr[np.uint64((iy - oy * sy) * kw + (ix - ox * sx)),
                    np.uint64(rows[np.uint64((coords[i, 0] * Ho + oy) * Wo + ox)])] = i
    else:
        for r in range(t * ROWS_PER_TASK, min(out.shape[0], (t + 1) * ROWS_PER_TASK)):
            rows[np.uint64((out[r, 0] * Ho + out[r, 1]) * Wo + out[r, 2])] = -1


def _fill_blocks_tasks(coords, Ho, Wo, sy, sx, kw, rows, nbr, out):
    for phase in range(2):
        n = coords.shape[0] if phase == 0 else out.shape[0]
        for t in prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
            _fill_block_rows(phase, t, coords, Ho, Wo, sy, sx, kw, rows, nbr, out)


def _fill_blocks_team(data):
    words = team_words(data)
    coords, i = array_arg2(words, TEAM_ARGS, np.int32)
    Ho, Wo, sy, sx, kw = words[i], words[i + 1], words[i + 2], words[i + 3], words[i + 4]
    rows, i = array_arg1(words, i + 5, np.int32)
    nbr, i = array_arg2(words, i, np.int32)
    out, i = array_arg2(words, i, np.int32)
    phase = words[TEAM_PHASE]
    t = next_task(words)
    while t < words[TEAM_TASKS]:
        _fill_block_rows(phase, t, coords, Ho, Wo, sy, sx, kw, rows, nbr, out)
        t = next_task(words)


#: k == s blocks: each input is the one entry of its (offset, output); then the grid cells of
#: the outputs are reset to -1.
_fill_blocks = TeamKernel(_fill_blocks_tasks, _fill_blocks_team,
                          lambda phase, coords, Ho, Wo, sy, sx, kw, rows, nbr, out:
                          -(-(coords.shape[0] if phase == 0 else out.shape[0]) // ROWS_PER_TASK), phases=2)


@parallel_kernel
def _count_proposals(coords, Ho, Wo, my, mx, offs, dy, dx, counts):
    K = offs.shape[0]
    for i in prange(coords.shape[0]):
        iy = coords[i, 1]
        ix = coords[i, 2]
        c = 0
        for k in range(K):
            if _affine_key(0, iy, ix, my, mx, offs[k, 0], offs[k, 1], dy, dx, Ho, Wo) >= 0:
                c += 1
        counts[i + 1] = c


@parallel_kernel
def _write_proposals(coords, Ho, Wo, my, mx, offs, dy, dx, start, keys):
    K = offs.shape[0]
    for i in prange(coords.shape[0]):
        b = np.int64(coords[i, 0])
        iy = coords[i, 1]
        ix = coords[i, 2]
        p = start[i]
        for k in range(K):
            key = _affine_key(b, iy, ix, my, mx, offs[k, 0], offs[k, 1], dy, dx, Ho, Wo)
            if key >= 0:
                keys[p] = key
                p += 1


@cached_njit(nogil=True)
def _unique_sorted(skeys):
    n = 0
    for i in range(skeys.shape[0]):
        if i == 0 or skeys[i] != skeys[i - 1]:
            skeys[n] = skeys[i]
            n += 1
    return n


@parallel_kernel
def _fill_sorted(coords, Ho, Wo, my, mx, offs, dy, dx, out_keys, nbr):
    K = offs.shape[0]
    for i in prange(coords.shape[0]):
        b = np.int64(coords[i, 0])
        iy = coords[i, 1]
        ix = coords[i, 2]
        for k in range(K):
            key = _affine_key(b, iy, ix, my, mx, offs[k, 0], offs[k, 1], dy, dx, Ho, Wo)
            if key >= 0:
                nbr[k, _find(out_keys, key)] = i


@parallel_kernel
def _unpack(keys, Ho, Wo, K):
    """Output coordinates of sorted unique keys and ``nbr [K, M]`` initialised to -1."""
    m = keys.shape[0]
    out = np.empty((m, 3), np.int32)
    nbr = np.empty((K, m), np.int32)
    for r in prange(m):
        key = np.int64(keys[r])
        by = key // Wo
        out[r, 0] = by // Ho
        out[r, 1] = by % Ho
        out[r, 2] = key - by * Wo
        for k in range(K):
            nbr[k, r] = -1
    return out, nbr


def _generate(c: np.ndarray, batch_size: int, out_shape: Pair, K: int, mul: Pair, offs: np.ndarray, div: Pair,
              blocks: Optional[Tuple[int, int, int]], grid_max_keys: int, grid_keys_per_site: int):
    """Output sites proposed by the inputs (raster order) and the table that proposes them."""
    Ho, Wo = out_shape
    n = c.shape[0]
    if n == 0:
        return torch.zeros((0, 3), dtype=torch.int32), torch.zeros((K, 0), dtype=torch.int32)
    key_space = batch_size * Ho * Wo
    if use_grid(key_space, n, grid_max_keys, grid_keys_per_site):
        work = max(n * K, key_space)
        occ = _scratch_grid(key_space)  # all -1; marked cells are reset by the fill
        if blocks is not None:
            launch(_mark_blocks, c, Ho, Wo, blocks[0], blocks[1], occ, work=work)
        else:
            request_threads(work)
            _mark(c, Ho, Wo, mul[0], mul[1], offs, div[0], div[1], occ)
        out, nbr = _number_rows(occ, batch_size, Ho, Wo, K, min(batch_size * Ho, 8 * threads_for(work)), work)
        if blocks is not None:
            launch(_fill_blocks, c, Ho, Wo, blocks[0], blocks[1], blocks[2], occ, nbr, out, work=work)
        else:
            request_threads(work)
            _fill_grid(c, Ho, Wo, mul[0], mul[1], offs, div[0], div[1], occ, nbr, out)
        return torch.from_numpy(out), torch.from_numpy(nbr)
    request_threads(n * K)
    counts = np.zeros(n + 1, np.int64)
    _count_proposals(c, Ho, Wo, mul[0], mul[1], offs, div[0], div[1], counts)
    start = np.cumsum(counts)
    keys = np.empty(int(start[-1]), key_dtype(batch_size, out_shape))
    _write_proposals(c, Ho, Wo, mul[0], mul[1], offs, div[0], div[1], start, keys)
    keys = torch.sort(torch.from_numpy(keys)).values.numpy()
    m = _unique_sorted(keys)
    out_keys = keys[:m]
    out, nbr = _unpack(out_keys, Ho, Wo, K)
    _fill_sorted(c, Ho, Wo, mul[0], mul[1], offs, div[0], div[1], out_keys, nbr)
    return torch.from_numpy(out), torch.from_numpy(nbr)


def conv_output_size(size: int, k: int, s: int, p: int, r: int) -> int:
    return (size + 2 * p - r * (k - 1) - 1) // s + 1


def conv_transpose_output_size(size: int, k: int, s: int, p: int, r: int, output_padding: int = 0) -> int:
    return (size - 1) * s - 2 * p + r * (k - 1) + output_padding + 1


def _geometry(kernel_size, stride, padding, dilation):
    k = pair(kernel_size, "kernel_size")
    s, p, r = pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
    if min(k) < 1 or min(s) < 1 or min(r) < 1 or min(p) < 0:
        raise ValueError(f"invalid geometry kernel_size={k}, stride={s}, padding={p}, dilation={r}")
    return k, s, p, r


def _kernel_grid(k: Pair) -> Tuple[np.ndarray, np.ndarray]:
    ky, kx = np.meshgrid(np.arange(k[0]), np.arange(k[1]), indexing="ij")
    return ky.ravel().astype(np.int64), kx.ravel().astype(np.int64)


def conv_table(coords: torch.Tensor, batch_size: int, spatial_shape: Sequence[int], kernel_size, stride=1,
               padding=0, dilation=1, *, grid_max_keys: int = GRID_MAX_KEYS,
               grid_keys_per_site: int = GRID_KEYS_PER_SITE):
    """Strided conv / pool map: ``(out_coords [M, 3] int32 in raster order, nbr [K, M] int32)``.

    Output sites: every position of the dense conv's output (``conv_output_size`` per axis) whose
    receptive field holds an active input (DESIGN §2); ``nbr[k, j]`` is the input at
    ``out * s - p + k * r``. ``k == s, p == 0, r == 1``: one output per input (no division)."""
    k, s, p, r = _geometry(kernel_size, stride, padding, dilation)
    H, W = pair(spatial_shape, "spatial_shape")
    Ho, Wo = (conv_output_size(H, k[0], s[0], p[0], r[0]), conv_output_size(W, k[1], s[1], p[1], r[1]))
    if Ho < 1 or Wo < 1:
        raise ValueError(
            f"input spatial_shape {(H, W)} is too small for kernel_size={k}, stride={s}, padding={p}, "
            f"dilation={r} (output would be {(Ho, Wo)})"
        )
    ky, kx = _kernel_grid(k)
    offs = np.stack((p[0] - ky * r[0], p[1] - kx * r[1]), 1)
    blocks = (s[0], s[1], k[1]) if k == s and p == (0, 0) and r == (1, 1) else None
    return _generate(_np_coords(coords), batch_size, (Ho, Wo), k[0] * k[1], (1, 1), offs, s, blocks,
                     grid_max_keys, grid_keys_per_site)


def conv_transpose_table(coords: torch.Tensor, batch_size: int, spatial_shape: Sequence[int], kernel_size,
                         stride=1, padding=0, dilation=1, output_padding=0, *,
                         grid_max_keys: int = GRID_MAX_KEYS, grid_keys_per_site: int = GRID_KEYS_PER_SITE):
    """Generative transposed conv map: ``(out_coords [M, 3] raster order, nbr [K, M])``; output
    sites are those receiving a contribution ``out = in * s - p + k * r`` inside the output
    shape (``conv_transpose_output_size`` per axis)."""
    k, s, p, r = _geometry(kernel_size, stride, padding, dilation)
    op = pair(output_padding, "output_padding")
    H, W = pair(spatial_shape, "spatial_shape")
    Ho = conv_transpose_output_size(H, k[0], s[0], p[0], r[0], op[0])
    Wo = conv_transpose_output_size(W, k[1], s[1], p[1], r[1], op[1])
    if Ho < 1 or Wo < 1:
        raise ValueError(f"transposed conv output size {(Ho, Wo)} is empty for input {(H, W)}")
    ky, kx = _kernel_grid(k)
    offs = np.stack((ky * r[0] - p[0], kx * r[1] - p[1]), 1)
    return _generate(_np_coords(coords), batch_size, (Ho, Wo), k[0] * k[1], s, offs, (1, 1), None,
                     grid_max_keys, grid_keys_per_site)


# -----------------------------------------------------------------------------------------
# derived tables
# -----------------------------------------------------------------------------------------
@njit(inline="always")
def _reverse_offset(k, nbr, rev):
    for j in range(nbr.shape[1]):
        i = nbr[k, j]
        if i >= 0:
            rev[k, np.uint64(i)] = j  # (unsigned: no wrap-around)


def _reverse_tasks(nbr, rev):
    for k in prange(nbr.shape[0]):
        _reverse_offset(k, nbr, rev)


def _reverse_team(data):
    words = team_words(data)
    nbr, i = array_arg2(words, TEAM_ARGS, np.int32)
    rev, i = array_arg2(words, i, np.int32)
    k = next_task(words)
    while k < words[TEAM_TASKS]:
        _reverse_offset(k, nbr, rev)
        k = next_task(words)


#: ``rev[k, nbr[k, j]] = j``: one task per offset.
_reverse = TeamKernel(_reverse_tasks, _reverse_team, lambda phase, nbr, rev: nbr.shape[0])


def reverse_table(nbr: torch.Tensor, n_in: int) -> torch.Tensor:
    """``rev [K, n_in]``: ``rev[k, i] = j <=> nbr[k, j] = i`` (``KernelMap.rev``)."""
    a = nbr.to(torch.int32).contiguous().numpy()
    rev = np.full((a.shape[0], n_in), -1, np.int32)
    if a.size:
        launch(_reverse, a, rev, work=a.size)
    return torch.from_numpy(rev)
