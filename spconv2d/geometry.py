"""Convolution geometry: argument pairs, output sizes and kernel offsets (one definition each).

Conventions (the dense oracle's: ``F.conv2d`` / ``F.conv_transpose2d`` cross-correlation):

* conv:        output site ``o`` reads input ``i = o*s - p + k*r`` for kernel index ``k``;
* transposed:  output site ``o`` receives input ``i`` where ``o = i*s - p + k*r``;
* offset index ``k = ky * kw + kx`` (row-major over the kernel window).
"""
from __future__ import annotations

from typing import Tuple, Union

import torch

Pair = Tuple[int, int]


def pair(value: Union[int, Tuple[int, int]], name: str) -> Pair:
    """``value`` as a pair of Python ints: an int ``v`` gives ``(v, v)``; a pair is checked."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    try:
        t = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if len(t) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return (int(t[0]), int(t[1]))


def conv_output_size(size: int, k: int, s: int, p: int, r: int) -> int:
    """Output length of ``F.conv2d`` along one dimension."""
    return (size + 2 * p - r * (k - 1) - 1) // s + 1


def conv_transpose_output_size(size: int, k: int, s: int, p: int, r: int, output_padding: int = 0) -> int:
    """Output length of ``F.conv_transpose2d`` along one dimension."""
    return (size - 1) * s - 2 * p + r * (k - 1) + output_padding + 1


def kernel_offsets(kernel_size: Pair, device=None) -> torch.Tensor:
    """int64 ``[K, 2]`` window positions ``(ky, kx)`` in offset order ``k = ky * kw + kx``."""
    ky, kx = torch.meshgrid(torch.arange(kernel_size[0]), torch.arange(kernel_size[1]), indexing="ij")
    return torch.stack((ky.reshape(-1), kx.reshape(-1)), 1).to(device)
