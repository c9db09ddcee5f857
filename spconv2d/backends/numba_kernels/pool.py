"""Sparse max / average pooling of the fused CPU backend over a kernel map.

Contract
--------
* ``features`` float32 or float64 ``[N_in, C]`` (CPU, made contiguous), ``nbr`` int32
  ``[K, N_out]`` (-1 = missing), ``rev`` int32 ``[K, N_in]`` its reverse table
  (``KernelMap.rev``; ``maps.reverse_table``). Results have the features' dtype.
* Max / mean over the *active* inputs of each window only (DESIGN §2). The values and the
  gradients equal the PyTorch path's (``spconv2d.functional.pool``: a gather with a -inf / 0
  fill row, ``max(0)`` / ``sum(0) / count``, autograd), bit for bit:
  - max: the winner of an output/channel is the first offset ``k`` holding the maximum (a
    missing neighbour counts as -inf), a NaN wins over everything (the first NaN), as
    ``torch.max(dim)`` picks; ``argmax [N_out, C]`` stores that ``k`` (uint8 while
    ``K <= 255``, else int32). The gradient goes to ``nbr[argmax, j]`` when it exists.
  - avg: ``sum / max(count, 1)`` with ``count`` the valid neighbours of the output; the input
    gradient sums ``grad_out[j] / count[j]`` over the outputs that read the input.
  - sums run over ``k`` ascending in the features' dtype, as the PyTorch path's do.
* Deterministic, no atomics: forward is output-stationary (one iteration per output row),
  backward input-stationary over ``rev`` (one iteration per input row). Parallel over tasks of
  ``ROWS_PER_TASK`` rows on ``torch.get_num_threads()`` threads (one for small inputs,
  ``runtime.PARALLEL_MIN_WORK``): PyTorch's OpenMP threads (the team forms), else numba's pool;
  one launch at a time (``runtime.launch``).
* Compiled lazily on first call and cached on disk (``cache=True``).
"""
from __future__ import annotations

import functools
from typing import Tuple

import numpy as np
import torch
from numba import njit, prange

from .runtime import TEAM_ARGS, TEAM_TASKS, TeamKernel, array_arg1, array_arg2, launch, next_task, team_words

_FLOATS = (torch.float32, torch.float64)


def _features(t: torch.Tensor, name: str) -> np.ndarray:
    if t.device.type != "cpu":
        raise ValueError(f"the numba kernels take CPU tensors, got {name} on {t.device}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be [N, C], got {tuple(t.shape)}")
    return t.detach().contiguous().numpy()


def _table(t: torch.Tensor, name: str) -> np.ndarray:
    if t.dtype != torch.int32 or t.dim() != 2:
        raise TypeError(f"{name} must be int32 [K, N], got {t.dtype} {tuple(t.shape)}")
    return t.contiguous().numpy()


# -----------------------------------------------------------------------------------------
# kernels: per task ``ROWS_PER_TASK`` rows; a ``prange`` form and a team form (``runtime``)
# -----------------------------------------------------------------------------------------
ROWS_PER_TASK = 256


def _tasks(n: int) -> int:
    return -(-n // ROWS_PER_TASK)


@njit(inline="always")
def _max_rows(t, f, nbr, out, arg):
    K = nbr.shape[0]
    C = f.shape[1]
    ninf = -np.inf
    for j in range(t * ROWS_PER_TASK, min(nbr.shape[1], (t + 1) * ROWS_PER_TASK)):
        o = out[j]
        a = arg[j]
        for c in range(C):
            o[c] = ninf
            a[c] = 0
        for k in range(K):
            i = nbr[k, j]
            if i < 0:
                continue
            row = f[i]
            for c in range(C):
                v = row[c]
                b = o[c]
                if b == b and (v > b or v != v):  # not NaN yet, and larger or NaN: take it
                    o[c] = v
                    a[c] = k


@njit(inline="always")
def _backward_rows(t, g, arg, count, rev, gin):
    """``gin[i] = sum over (k, j = rev[k, i]) of g[j] / count[j]``, for max pooling only where
    ``arg[j, c] == k`` (``count`` all ones), for average pooling everywhere (``arg`` with no
    columns): one kernel, so both gradients are the same loop in the same order."""
    K = rev.shape[0]
    C = g.shape[1]
    by_arg = arg.shape[1] > 0
    for i in range(t * ROWS_PER_TASK, min(rev.shape[1], (t + 1) * ROWS_PER_TASK)):
        acc = gin[i]
        for c in range(C):
            acc[c] = 0
        for k in range(K):
            j = rev[k, i]
            if j < 0:
                continue
            gj = g[j]
            d = count[j]
            if by_arg:
                aj = arg[j]
                for c in range(C):
                    if aj[c] == k:
                        acc[c] += gj[c] / d
            else:
                for c in range(C):
                    acc[c] += gj[c] / d


@njit(inline="always")
def _avg_rows(t, f, nbr, out, count):
    K = nbr.shape[0]
    C = f.shape[1]
    for j in range(t * ROWS_PER_TASK, min(nbr.shape[1], (t + 1) * ROWS_PER_TASK)):
        o = out[j]
        for c in range(C):
            o[c] = 0
        n = 0
        for k in range(K):
            i = nbr[k, j]
            if i < 0:
                continue
            n += 1
            row = f[i]
            for c in range(C):
                o[c] += row[c]
        count[j] = max(n, 1)  # (stored in the features' dtype: the division below is theirs)
        d = count[j]
        for c in range(C):
            o[c] = o[c] / d


def _max_tasks(f, nbr, out, arg):
    for t in prange((nbr.shape[1] + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        _max_rows(t, f, nbr, out, arg)


def _backward_tasks(g, arg, count, rev, gin):
    for t in prange((rev.shape[1] + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        _backward_rows(t, g, arg, count, rev, gin)


def _avg_tasks(f, nbr, out, count):
    for t in prange((nbr.shape[1] + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        _avg_rows(t, f, nbr, out, count)


# team forms per element type (numpy scalar types: float32 / float64 features, uint8 / int32 argmax)
@functools.lru_cache(maxsize=None)
def _max_forward(fdt, adt) -> TeamKernel:

    def team(data):
        words = team_words(data)
        f, i = array_arg2(words, TEAM_ARGS, fdt)
        nbr, i = array_arg2(words, i, np.int32)
        out, i = array_arg2(words, i, fdt)
        arg, i = array_arg2(words, i, adt)
        t = next_task(words)
        while t < words[TEAM_TASKS]:
            _max_rows(t, f, nbr, out, arg)
            t = next_task(words)

    return TeamKernel(_max_tasks, team, lambda phase, f, nbr, out, arg: _tasks(nbr.shape[1]))


@functools.lru_cache(maxsize=None)
def _pool_backward(fdt, adt) -> TeamKernel:

    def team(data):
        words = team_words(data)
        g, i = array_arg2(words, TEAM_ARGS, fdt)
        arg, i = array_arg2(words, i, adt)
        count, i = array_arg1(words, i, fdt)
        rev, i = array_arg2(words, i, np.int32)
        gin, i = array_arg2(words, i, fdt)
        t = next_task(words)
        while t < words[TEAM_TASKS]:
            _backward_rows(t, g, arg, count, rev, gin)
            t = next_task(words)

    return TeamKernel(_backward_tasks, team, lambda phase, g, arg, count, rev, gin: _tasks(rev.shape[1]))


@functools.lru_cache(maxsize=None)
def _avg_forward(fdt) -> TeamKernel:

    def team(data):
        words = team_words(data)
        f, i = array_arg2(words, TEAM_ARGS, fdt)
        nbr, i = array_arg2(words, i, np.int32)
        out, i = array_arg2(words, i, fdt)
        count, i = array_arg1(words, i, fdt)
        t = next_task(words)
        while t < words[TEAM_TASKS]:
            _avg_rows(t, f, nbr, out, count)
            t = next_task(words)

    return TeamKernel(_avg_tasks, team, lambda phase, f, nbr, out, count: _tasks(nbr.shape[1]))


# -----------------------------------------------------------------------------------------
# launchers
# -----------------------------------------------------------------------------------------
def argmax_dtype(kernel_volume: int) -> torch.dtype:
    return torch.uint8 if kernel_volume <= 255 else torch.int32


def max_pool_forward(features: torch.Tensor, nbr: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out [N_out, C], argmax [N_out, C])``: max over each output's valid neighbours
    (-inf where it has none), ``argmax`` the winning offset ``k``."""
    f, t = _features(features, "features"), _table(nbr, "nbr")
    K, n_out = t.shape
    out = torch.empty((n_out, f.shape[1]), dtype=features.dtype)
    arg = torch.empty((n_out, f.shape[1]), dtype=argmax_dtype(K))
    if n_out and f.shape[1]:
        a = arg.numpy()
        launch(_max_forward(f.dtype.type, a.dtype.type), f, t, out.numpy(), a, work=t.size * f.shape[1])
    return out, arg


def max_pool_backward(grad_out: torch.Tensor, argmax: torch.Tensor, rev: torch.Tensor) -> torch.Tensor:
    """``grad_in [N_in, C]``: each output/channel's gradient to its winning input."""
    g, r = _features(grad_out, "grad_out"), _table(rev, "rev")
    if tuple(argmax.shape) != g.shape:
        raise ValueError(f"argmax has shape {tuple(argmax.shape)}, grad_out {g.shape}")
    gin = torch.empty((r.shape[1], g.shape[1]), dtype=grad_out.dtype)
    if gin.numel():
        a = argmax.contiguous().numpy()
        launch(_pool_backward(g.dtype.type, a.dtype.type), g, a, np.ones(g.shape[0], g.dtype), r, gin.numpy(),
               work=r.size * g.shape[1])
    return gin


def avg_pool_forward(features: torch.Tensor, nbr: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out [N_out, C], count [N_out])``: mean over each output's valid neighbours, ``count``
    their number (at least 1) in the features' dtype (what the backward divides by)."""
    f, t = _features(features, "features"), _table(nbr, "nbr")
    n_out = t.shape[1]
    out = torch.empty((n_out, f.shape[1]), dtype=features.dtype)
    count = torch.empty(n_out, dtype=features.dtype)
    if n_out:
        launch(_avg_forward(f.dtype.type), f, t, out.numpy(), count.numpy(), work=t.size * f.shape[1])
    return out, count


def avg_pool_backward(grad_out: torch.Tensor, count: torch.Tensor, rev: torch.Tensor) -> torch.Tensor:
    """``grad_in [N_in, C]``: ``sum over (k, j) reading input i of grad_out[j] / count[j]``."""
    g, r = _features(grad_out, "grad_out"), _table(rev, "rev")
    gin = torch.empty((r.shape[1], g.shape[1]), dtype=grad_out.dtype)
    if gin.numel():
        launch(_pool_backward(g.dtype.type, np.uint8), g, np.empty((g.shape[0], 0), np.uint8),
               count.to(grad_out.dtype).contiguous().numpy(), r, gin.numpy(), work=r.size * g.shape[1])
    return gin
