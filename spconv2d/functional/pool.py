"""Sparse pooling. Output sites are those of ``conv2d`` with the same geometry (and share its
kernel map); the max / mean runs over *active* inputs only: an inactive pixel is absent, not
zero. Global pools reduce each batch item to one vector (an empty item gives zeros)."""
from __future__ import annotations

import torch

from .. import maps
from ..geometry import conv_geometry
from ..tensor import SparseTensor


def pool_geometry(op: str, kernel_size, stride, padding, dilation):
    """Checked pooling geometry, with ``nn.MaxPool2d``'s rules: ``stride`` None means the kernel
    size; kernel sizes, strides, dilations >= 1, ``0 <= padding <= kernel_size // 2``."""
    k, s, p, r = conv_geometry(op, kernel_size, kernel_size if stride is None else stride, padding, dilation)
    if p[0] > k[0] // 2 or p[1] > k[1] // 2:
        raise ValueError(f"{op}: padding {p} must be at most half the kernel size {k}")
    return k, s, p, r


def _gather(x: SparseTensor, kernel_size, stride, padding, dilation, fill: float, op: str):
    if not isinstance(x, SparseTensor):
        raise TypeError(f"{op}: expected a SparseTensor, got {type(x).__name__}")
    k, s, p, r = pool_geometry(op, kernel_size, stride, padding, dilation)
    built = maps.conv_map(x, k, s, p, r)
    f = x.features
    padded = torch.cat((f, f.new_full((1, f.shape[1]), fill)), 0)
    idx = torch.where(built.kmap.nbr >= 0, built.kmap.nbr, x.num_active).long()  # missing -> the fill row
    return padded[idx], built  # [K, N_out, C]


def max_pool2d(x: SparseTensor, kernel_size, stride=None, padding=0, dilation=1) -> SparseTensor:
    """Max over the *active* inputs of each window; output sites as ``conv2d``'s."""
    gathered, built = _gather(x, kernel_size, stride, padding, dilation, float("-inf"), "max_pool2d")
    return x.derive(gathered.max(0).values, built.out)


def avg_pool2d(x: SparseTensor, kernel_size, stride=None, padding=0, dilation=1) -> SparseTensor:
    """Mean over the *active* inputs of each window; output sites as ``conv2d``'s."""
    gathered, built = _gather(x, kernel_size, stride, padding, dilation, 0.0, "avg_pool2d")
    count = (built.kmap.nbr >= 0).sum(0).clamp_(min=1).unsqueeze(1).to(gathered.dtype)
    return x.derive(gathered.sum(0) / count, built.out)


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
