"""The seam between the core library and its compute backends.

A backend does the four things whose speed depends on the hardware; everything else
(coordinate bookkeeping, output-coordinate generation, caching, autograd) lives in the
core and is shared. Two backends exist: ``torch`` (pure PyTorch, any device; the CPU path
and the reference) and ``triton`` (the kernels of ``spconv2d.kernels``).

Conventions every backend follows
---------------------------------
* Packed keys: ``key = (b * H + y) * W + x``, int32 when ``B*H*W < 2**31`` else int64.
* A *kernel map* (``spconv2d.kmap.KernelMap``) holds ``nbr[K, N_out]`` int32: for output row
  ``j`` and kernel offset ``k`` (``k = ky * kw + kx``), the input row that feeds it, or -1.
* Weights arrive re-laid-out as ``[K, C_in, C_out]`` (one GEMM operand per offset):
  ``out[j] = bias + sum_k features[nbr[k, j]] @ weight[k]``.
* The neighbour rule is affine: for output site ``(b, oy, ox)`` and offset ``k`` the input
  site is ``iy = (oy * scale_y + offsets[k, 0]) / divisor_y`` (likewise x), missing when the
  division is inexact or the site lies outside ``[0, H_in) x [0, W_in)``. This one rule
  covers submanifold (scale 1, divisor 1), strided (scale = stride) and transposed
  (divisor = stride) convolutions.
"""
from __future__ import annotations

from typing import Optional, Protocol, Tuple

import torch


class CoordIndex(Protocol):
    """Maps packed keys to row numbers of one coordinate set."""

    strategy: str

    def lookup(self, query_keys: torch.Tensor) -> torch.Tensor:
        """int32 rows for ``query_keys`` (any shape), -1 where absent; negative queries are absent."""


class Backend(Protocol):
    name: str

    def default_index_strategy(self, key_space: int, n_keys: Optional[int] = None) -> str:
        """Optional: the strategy ``auto`` resolves to (``hash`` when absent)."""

    def full_subm_lookup(self, index: CoordIndex) -> bool:
        """Optional: True when looking every offset of a submanifold map up with ``index`` is
        cheaper than looking half of them up and mirroring (False when absent)."""

    def build_index(self, keys: torch.Tensor, key_space: int, strategy: str) -> CoordIndex:
        """Index over ``keys`` (unique, any order) with ``0 <= key < key_space``."""

    def neighbor_table(
        self,
        index: CoordIndex,
        out_coords: torch.Tensor,
        in_shape: Tuple[int, int],
        scale: Tuple[int, int],
        offsets: torch.Tensor,
        divisor: Tuple[int, int],
    ) -> torch.Tensor:
        """``nbr[K, N_out]`` int32 by the affine rule above; ``offsets`` is int64 ``[K, 2]``."""

    def conv_forward(self, features, weight, bias: Optional[torch.Tensor], kmap) -> torch.Tensor:
        """``[N_out, C_out]`` = ``bias + sum_k features[nbr[k]] @ weight[k]``."""

    def conv_backward_input(self, grad_out, weight, kmap) -> torch.Tensor:
        """``[N_in, C_in]``: ``grad_in[i] = sum_{k, j: nbr[k, j] = i} grad_out[j] @ weight[k].T``."""

    def conv_backward_weight(self, features, grad_out, kmap) -> torch.Tensor:
        """``[K, C_in, C_out]`` fp32-accumulated: ``sum_{j} features[nbr[k, j]].T @ grad_out[j]``."""
