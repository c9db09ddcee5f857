"""Sparse convolution layers with ``nn.Conv2d`` / ``nn.ConvTranspose2d`` parameter layouts,
so ``sparse.load_state_dict(dense.state_dict())`` works both ways."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .. import functional as SF
from ..functional.conv import check_output_padding
from ..geometry import conv_geometry, integer, pair
from ..tensor import SparseTensor


class _SparseConvNd(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, bias, transposed,
                 device=None, dtype=None):
        super().__init__()
        op = type(self).__name__
        self.in_channels = integer(in_channels, f"{op}: in_channels", 1)
        self.out_channels = integer(out_channels, f"{op}: out_channels", 1)
        self.kernel_size, self.stride, self.padding, self.dilation = conv_geometry(op, kernel_size, stride, padding,
                                                                                   dilation)
        shape = (in_channels, out_channels) if transposed else (out_channels, in_channels)
        self.weight = nn.Parameter(torch.empty(*shape, *self.kernel_size, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The same initialisation as torch.nn.Conv2d / ConvTranspose2d.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.weight.shape[2] * self.weight.shape[3]  # as torch computes it
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
        if self.stride != (1, 1):
            s += f", stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        return s + ("" if self.bias is not None else ", bias=False")


class SubMConv2d(_SparseConvNd):
    """Submanifold conv: same sites in and out; equals ``nn.Conv2d(padding=dilation*(k//2))``
    on the densified input at those sites. Odd kernel sizes."""

    def __init__(self, in_channels, out_channels, kernel_size, dilation=1, bias=True, device=None, dtype=None):
        k = pair(kernel_size, "SubMConv2d: kernel_size", 1)
        if k[0] % 2 == 0 or k[1] % 2 == 0:
            raise ValueError(f"SubMConv2d needs odd kernel sizes, got {k}")
        r = pair(dilation, "SubMConv2d: dilation", 1)
        super().__init__(in_channels, out_channels, k, 1, (r[0] * (k[0] // 2), r[1] * (k[1] // 2)), r, bias,
                         False, device, dtype)

    def forward(self, x: SparseTensor) -> SparseTensor:
        return self.forward_with(x, self.weight, self.bias)

    def forward_with(self, x: SparseTensor, weight: torch.Tensor, bias: Optional[torch.Tensor], *,
                     relu: bool = False) -> SparseTensor:
        """This layer's op with ``weight`` and ``bias`` (same layouts) in place of its own
        parameters (e.g. weights with a batch norm folded in); ``relu``: followed by a ReLU
        (fused into the kernel without autograd, see ``sp.functional.subm_conv2d``)."""
        return SF.subm_conv2d(x, weight, bias, self.dilation, relu=relu)


class SparseConv2d(_SparseConvNd):
    """Strided sparse conv: the sites and values of ``nn.Conv2d`` on the densified input where
    the receptive field holds an active pixel."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, bias=True,
                 device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, bias, False, device, dtype)

    def forward(self, x: SparseTensor) -> SparseTensor:
        return self.forward_with(x, self.weight, self.bias)

    def forward_with(self, x: SparseTensor, weight: torch.Tensor, bias: Optional[torch.Tensor], *,
                     relu: bool = False) -> SparseTensor:
        """This layer's op with ``weight`` and ``bias`` in place of its own parameters (``relu``:
        as in ``SubMConv2d.forward_with``)."""
        return SF.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, relu=relu)


class SparseConvTranspose2d(_SparseConvNd):
    """Sparse transposed conv; ``up(x)`` is generative, ``up(x, output=skip)`` computes exactly
    at ``skip``'s sites (the U-Net decoder)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, bias=True,
                 output_padding=0, device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, bias, True, device, dtype)
        self.output_padding = check_output_padding("SparseConvTranspose2d", output_padding, self.stride, self.dilation)

    def forward(self, x: SparseTensor, output: Optional[SparseTensor] = None) -> SparseTensor:
        return self.forward_with(x, self.weight, self.bias, output)

    def forward_with(self, x: SparseTensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     output: Optional[SparseTensor] = None, *, relu: bool = False) -> SparseTensor:
        """This layer's op with ``weight`` and ``bias`` in place of its own parameters (``relu``:
        as in ``SubMConv2d.forward_with``)."""
        return SF.conv_transpose2d(x, weight, bias, self.stride, self.padding, self.dilation, self.output_padding,
                                   output=output, relu=relu)
