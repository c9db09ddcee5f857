"""Convolution geometry: argument pairs, output sizes and kernel offsets (one definition each).

Conventions (the dense oracle's: ``F.conv2d`` / ``F.conv_transpose2d`` cross-correlation):

* conv:        output site ``o`` reads input ``i = o*s - p + k*r`` for kernel index ``k``;
* transposed:  output site ``o`` receives input ``i`` where ``o = i*s - p + k*r``;
* offset index ``k = ky * kw + kx`` (row-major over the kernel window).
"""
from __future__ import annotations

import operator
from typing import Optional, Tuple, Union

import torch

Pair = Tuple[int, int]


def integer(value, name: str, minimum: Optional[int] = None) -> int:
    """``value`` as a Python int: integers of any kind (``int``, numpy and integer 0-d torch
    scalars) are accepted, ``bool``, floats and anything else raise ``TypeError`` (never
    truncated); below ``minimum`` raises ``ValueError``."""
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def pair(value: Union[int, Tuple[int, int]], name: str, minimum: Optional[int] = None) -> Pair:
    """``value`` as a pair of Python ints: an integer ``v`` gives ``(v, v)``, a sequence of two
    integers is taken as it is; each must be ``>= minimum`` (``ValueError``). Non-integers raise
    ``TypeError``."""
    if type(value) is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int \
            and (minimum is None or min(value) >= minimum):
        return value  # (the common case, checked in every op: no per-item conversion)
    if isinstance(value, (tuple, list, torch.Size)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an integer or a pair of integers, got {value!r}")
        items = tuple(value)
    elif isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise TypeError(f"{name} must be an integer or a pair of integers, got {value!r} ({type(value).__name__})")
    else:
        items = (value, value)
    try:
        out = tuple(integer(v, name) for v in items)
    except TypeError:
        raise TypeError(f"{name} must be an integer or a pair of integers, got {value!r}") from None
    if minimum is not None and min(out) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return out


def conv_geometry(op: str, kernel_size, stride, padding, dilation) -> Tuple[Pair, Pair, Pair, Pair]:
    """Checked ``(kernel_size, stride, padding, dilation)`` pairs, with ``nn.Conv2d``'s rules:
    kernel sizes, strides and dilations >= 1, paddings >= 0."""
    return (pair(kernel_size, f"{op}: kernel_size", 1), pair(stride, f"{op}: stride", 1),
            pair(padding, f"{op}: padding", 0), pair(dilation, f"{op}: dilation", 1))


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
