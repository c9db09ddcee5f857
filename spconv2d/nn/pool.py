"""Sparse pooling layers (max / mean over active inputs) and global pools to dense ``[B, C]``."""
from __future__ import annotations

import torch
from torch import nn

from .. import functional as SF
from ..functional.pool import pool_geometry
from ..tensor import SparseTensor


class _SparsePool2d(nn.Module):
    def __init__(self, kernel_size, stride=None, padding=0, dilation=1):
        super().__init__()
        pool_geometry(type(self).__name__, kernel_size, stride, padding, dilation)  # fail at construction
        self.kernel_size, self.stride, self.padding, self.dilation = kernel_size, stride, padding, dilation

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, dilation={self.dilation}"


class SparseMaxPool2d(_SparsePool2d):
    def forward(self, x: SparseTensor) -> SparseTensor:
        return SF.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation)


class SparseAvgPool2d(_SparsePool2d):
    def forward(self, x: SparseTensor) -> SparseTensor:
        return SF.avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation)


class SparseGlobalAvgPool(nn.Module):
    def forward(self, x: SparseTensor) -> torch.Tensor:
        return SF.global_avg_pool(x)


class SparseGlobalMaxPool(nn.Module):
    def forward(self, x: SparseTensor) -> torch.Tensor:
        return SF.global_max_pool(x)
