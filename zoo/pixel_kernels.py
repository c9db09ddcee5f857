"""The numba kernels behind ``zoo.fused`` (imported on first use: importing it imports numba).

``refine_kernel(npdt)``: the colour-weighted window mean of the pixels ``idx``, in tasks of
``PIXELS_PER_TASK`` pixels, each output row written once in a fixed summation order
(deterministic), float32 or float64 (``npdt``: ``np.float32`` / ``np.float64``).
``margins_kernel(npdt)``: the top-2 margins of the rows ``idx``. ``energy_kernel(npdt)``: the
``residual`` mask policy's energy. All three are ``runtime.TeamKernel`` s (PyTorch's OpenMP
threads; numba's pool where PyTorch has no OpenMP runtime), run with ``runtime.launch``.
"""
import functools
import math

import numpy as np
from numba import njit, prange

from spconv2d.backends.numba_kernels.runtime import (TEAM_ARGS, TEAM_TASKS, TeamKernel, array_arg1, array_arg2,
                                                     array_arg3, array_arg4, next_task, team_words)

PIXELS_PER_TASK = 64


@njit(inline="always")
def _refine_pixels(t, rows, images, idx, r, inv2sr2, res):
    B, C, H, W = images.shape
    K = rows.shape[1]
    for i in range(t * PIXELS_PER_TASK, min(idx.shape[0], (t + 1) * PIXELS_PER_TASK)):
        p = idx[i]
        b, y, x = p // (H * W), (p // W) % H, p % W
        for k in range(K):
            res[i, k] = 0.0
        total = 0.0
        for qy in range(max(0, y - r), min(H, y + r + 1)):
            for qx in range(max(0, x - r), min(W, x + r + 1)):
                d2 = 0.0
                for c in range(C):
                    diff = images[b, c, y, x] - images[b, c, qy, qx]
                    d2 += diff * diff
                wq = math.exp(-d2 * inv2sr2[0])
                total += wq
                q = (b * H + qy) * W + qx
                for k in range(K):
                    res[i, k] += wq * rows[q, k]
        for k in range(K):
            res[i, k] /= total


def _tasks(n: int) -> int:
    return -(-n // PIXELS_PER_TASK)


def _refine_tasks(rows, images, idx, r, inv2sr2, res):
    for t in prange((idx.shape[0] + PIXELS_PER_TASK - 1) // PIXELS_PER_TASK):
        _refine_pixels(t, rows, images, idx, r, inv2sr2, res)


@functools.lru_cache(maxsize=None)
def refine_kernel(npdt) -> TeamKernel:
    """``res[i] = sum_q w_q rows[q] / sum_q w_q`` over the window of radius ``r`` around pixel
    ``idx[i]``, ``w_q = exp(-|images[p] - images[q]|^2 * inv2sr2[0])``."""
    def team(data):
        words = team_words(data)
        rows, i = array_arg2(words, TEAM_ARGS, npdt)
        images, i = array_arg4(words, i, npdt)
        idx, i = array_arg1(words, i, np.int64)
        r = words[i]
        inv2sr2, i = array_arg1(words, i + 1, np.float64)
        res, i = array_arg2(words, i, npdt)
        t = next_task(words)
        while t < words[TEAM_TASKS]:
            _refine_pixels(t, rows, images, idx, r, inv2sr2, res)
            t = next_task(words)

    return TeamKernel(_refine_tasks, team, lambda phase, rows, images, idx, *rest: _tasks(idx.shape[0]))


@njit(inline="always")
def _margin_pixels(t, rows, idx, out):
    """``out[i]``: top-1 minus top-2 of ``rows[idx[i]]`` (0 on a tie at the top; +inf with one
    column), one pass over the row."""
    K = rows.shape[1]
    for i in range(t * PIXELS_PER_TASK, min(idx.shape[0], (t + 1) * PIXELS_PER_TASK)):
        p = idx[i]
        top1, top2 = rows[p, 0], -math.inf
        for k in range(1, K):
            v = rows[p, k]
            if v > top1:
                top2, top1 = top1, v
            elif v > top2:
                top2 = v
        out[i] = top1 - top2


def _margin_tasks(rows, idx, out):
    for t in prange((idx.shape[0] + PIXELS_PER_TASK - 1) // PIXELS_PER_TASK):
        _margin_pixels(t, rows, idx, out)


@functools.lru_cache(maxsize=None)
def margins_kernel(npdt) -> TeamKernel:
    """``out[i]`` = the top-2 margin of ``rows[idx[i]]``."""
    def team(data):
        words = team_words(data)
        rows, i = array_arg2(words, TEAM_ARGS, npdt)
        idx, i = array_arg1(words, i, np.int64)
        out, i = array_arg1(words, i, npdt)
        t = next_task(words)
        while t < words[TEAM_TASKS]:
            _margin_pixels(t, rows, idx, out)
            t = next_task(words)

    return TeamKernel(_margin_tasks, team, lambda phase, rows, idx, out: _tasks(idx.shape[0]))


ROWS_PER_TASK = 16


@njit(inline="always")
def _ridge_term(v, left, right):
    a = v - left
    b = v - right
    return max(min(a, b), -max(a, b))


@njit(inline="always")
def _energy_rows(t, images, up, out):
    """Image rows ``t * ROWS_PER_TASK ...`` of ``B*H``: ``out[b, y, x] = max(max_c |images - up|,
    ridge)``, ``ridge = max(0, max_{d in 1, 2} max_c max(min(a, b), -max(a, b)))`` with
    ``a = x - x[j-d]``, ``b = x - x[j+d]`` (replicate-clamped): ``masks.residual_energy`` and
    ``masks.ridge_energy`` combined, exactly (only subtractions, min and max, in any order).
    Per row and channel, loops over the columns (the interior without clamping: vectorised)."""
    B, C, H, W = images.shape
    e = np.empty(W, images.dtype)
    for row in range(t * ROWS_PER_TASK, min(B * H, (t + 1) * ROWS_PER_TASK)):
        b, y = row // H, row % H
        for x in range(W):
            e[x] = 0.0  # both energies are >= 0 (|.| and the ridge clamped at 0)
        for c in range(C):
            img = images[b, c, y]
            u = up[b, c, y]
            for x in range(W):
                e[x] = max(e[x], abs(img[x] - u[x]))
            for d in range(1, 3):
                for x in range(min(d, W)):  # left border: replicate
                    e[x] = max(e[x], _ridge_term(img[x], img[0], img[min(x + d, W - 1)]))
                for x in range(d, W - d):
                    e[x] = max(e[x], _ridge_term(img[x], img[x - d], img[x + d]))
                for x in range(max(d, W - d), W):  # right border: replicate
                    e[x] = max(e[x], _ridge_term(img[x], img[max(x - d, 0)], img[W - 1]))
        o = out[b, y]
        for x in range(W):
            o[x] = e[x]


def _energy_tasks(images, up, out):
    B, C, H, W = images.shape
    for t in prange((B * H + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        _energy_rows(t, images, up, out)


@functools.lru_cache(maxsize=None)
def energy_kernel(npdt) -> TeamKernel:
    """``max(masks.residual_energy, masks.ridge_energy)`` from the images and their coarse
    approximation ``up`` (``[B, C, H, W]``), into ``out [B, H, W]``."""
    def team(data):
        words = team_words(data)
        images, i = array_arg4(words, TEAM_ARGS, npdt)
        up, i = array_arg4(words, i, npdt)
        out, i = array_arg3(words, i, npdt)
        t = next_task(words)
        while t < words[TEAM_TASKS]:
            _energy_rows(t, images, up, out)
            t = next_task(words)

    return TeamKernel(_energy_tasks, team,
                      lambda phase, images, up, out: -(-(images.shape[0] * images.shape[2]) // ROWS_PER_TASK))
