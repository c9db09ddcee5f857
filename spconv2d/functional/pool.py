"""Sparse pooling. Output sites are those of ``conv2d`` with the same geometry (and share its
kernel map); the max / mean runs over *active* inputs only: an inactive pixel is absent, not
zero. Global pools reduce each batch item to one vector (an empty item gives zeros)."""
from __future__ import annotations

from typing import Optional

import torch

from .. import backends, maps
from ..backends import BackendSpec
from ..geometry import conv_geometry
from ..profiler import Recorder
from ..tensor import SparseTensor


def pool_geometry(op: str, kernel_size, stride, padding, dilation):
    """Checked pooling geometry, with ``nn.MaxPool2d``'s rules: ``stride`` None means the kernel
    size; kernel sizes, strides, dilations >= 1, ``0 <= padding <= kernel_size // 2``."""
    k, s, p, r = conv_geometry(op, kernel_size, kernel_size if stride is None else stride, padding, dilation)
    if p[0] > k[0] // 2 or p[1] > k[1] // 2:
        raise ValueError(f"{op}: padding {p} must be at most half the kernel size {k}")
    return k, s, p, r


def _pool(x: SparseTensor, kernel_size, stride, padding, dilation, backend, op: str):
    if not isinstance(x, SparseTensor):
        raise TypeError(f"{op}: expected a SparseTensor, got {type(x).__name__}")
    k, s, p, r = pool_geometry(op, kernel_size, stride, padding, dilation)
    be = backends.resolve(x.device, backend)
    rec = Recorder.start()
    built = maps.conv_map(x, k, s, p, r, be)
    pool = be.max_pool if op == "max_pool2d" else be.avg_pool
    y = x.derive(pool(x.features, built.kmap), built.out)
    if rec.prof is not None:
        rec.done(op, "sparse", x, y, x.num_channels, x.num_channels, built.kmap.kernel_volume,
                 built.kmap.num_pairs, built.out.key_space)
    return y


def max_pool2d(x: SparseTensor, kernel_size, stride=None, padding=0, dilation=1, *,
               backend: Optional[BackendSpec] = None) -> SparseTensor:
    """Max over the *active* inputs of each window; output sites as ``conv2d``'s."""
    return _pool(x, kernel_size, stride, padding, dilation, backend, "max_pool2d")


def avg_pool2d(x: SparseTensor, kernel_size, stride=None, padding=0, dilation=1, *,
               backend: Optional[BackendSpec] = None) -> SparseTensor:
    """Mean over the *active* inputs of each window; output sites as ``conv2d``'s."""
    return _pool(x, kernel_size, stride, padding, dilation, backend, "avg_pool2d")


def _batch_index(x: SparseTensor, op: str) -> torch.Tensor:
    if not isinstance(x, SparseTensor):
        raise TypeError(f"{op}: expected a SparseTensor, got {type(x).__name__}")
    return x.coords[:, 0].long().unsqueeze(1).expand(-1, x.num_channels)


def global_avg_pool(x: SparseTensor) -> torch.Tensor:
    """``[B, C]``: mean of each batch item's active features (zeros for an empty item)."""
    b = _batch_index(x, "global_avg_pool")
    total = x.features.new_zeros(x.batch_size, x.num_channels).scatter_add(0, b, x.features)
    count = torch.bincount(x.coords[:, 0].long(), minlength=x.batch_size).clamp_(min=1)
    return total / count.unsqueeze(1).to(total.dtype)


def global_max_pool(x: SparseTensor) -> torch.Tensor:
    """``[B, C]``: max of each batch item's active features (zeros for an empty item)."""
    b = _batch_index(x, "global_max_pool")
    init = x.features.new_zeros(x.batch_size, x.num_channels)
    return init.scatter_reduce(0, b, x.features, "amax", include_self=False)
