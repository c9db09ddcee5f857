"""The seam between the core library and its compute backends.

A backend does the things whose speed depends on the hardware: the coordinate index, the
neighbour table, and the three convolution products. Everything else (coordinate
bookkeeping, output-coordinate generation, caching, autograd) lives in the core and is shared.
Backends are instances: their options are constructor arguments (``TorchBackend(gather=
"table")``), selected with ``sp.backend(...)`` (see :mod:`spconv2d.backends`).

Conventions every backend follows
---------------------------------
* Packed keys: ``key = (b * H + y) * W + x``, int32 when ``B*H*W < 2**31`` else int64.
* A *kernel map* (:class:`spconv2d.kernel_map.KernelMap`) holds ``nbr[K, N_out]`` int32: for
  output row ``j`` and kernel offset ``k`` (``k = ky * kw + kx``), the input row that feeds
  it, or -1.
* Weights arrive re-laid-out as ``[K, C_in, C_out]`` (one GEMM operand per offset):
  ``out[j] = bias + sum_k features[nbr[k, j]] @ weight[k]``.
* The neighbour rule is affine (:func:`affine_neighbor_keys`): for output site ``(b, oy, ox)``
  and offset ``k`` the input site is ``iy = (oy * scale_y + offsets[k, 0]) / divisor_y``
  (likewise x), missing when the division is inexact or the site lies outside
  ``[0, H_in) x [0, W_in)``. This one rule covers submanifold (scale 1, divisor 1), strided
  (scale = stride) and transposed (divisor = stride) convolutions.
* Derived structures a backend caches on a map go through ``kmap.cached(name, fn)``; a name
  that depends on the backend's options includes them.
"""
from __future__ import annotations

import abc
from typing import Any, ClassVar, Dict, Optional, Protocol, Tuple

import torch

Table = torch.Tensor  # nbr [K, N_out] int32


class CoordIndex(Protocol):
    """Maps packed keys to row numbers of one coordinate set."""

    strategy: str

    def lookup(self, query_keys: torch.Tensor) -> torch.Tensor:
        """int32 rows for ``query_keys`` (any shape), -1 where absent; negative queries are absent."""


def affine_neighbor_keys(out_coords: torch.Tensor, in_shape: Tuple[int, int], scale: Tuple[int, int],
                         offset: Tuple[int, int], divisor: Tuple[int, int]) -> torch.Tensor:
    """int64 packed input keys ``[N_out]`` of one kernel offset under the affine rule (-1 where
    the neighbour lies outside the input grid or the division is inexact), in torch ops."""
    H, W = int(in_shape[0]), int(in_shape[1])
    b, oy, ox = out_coords.long().unbind(1)
    qy, qx = oy * int(scale[0]) + int(offset[0]), ox * int(scale[1]) + int(offset[1])
    valid = None
    if divisor[0] != 1:
        valid = torch.remainder(qy, divisor[0]) == 0
        qy = torch.div(qy, divisor[0], rounding_mode="floor")
    if divisor[1] != 1:
        vx = torch.remainder(qx, divisor[1]) == 0
        valid = vx if valid is None else valid & vx
        qx = torch.div(qx, divisor[1], rounding_mode="floor")
    inside = (qy >= 0) & (qy < H) & (qx >= 0) & (qx < W)
    valid = inside if valid is None else valid & inside
    return ((b * H + qy) * W + qx).masked_fill_(~valid, -1)


class Backend(abc.ABC):
    """A compute backend. Subclasses implement the abstract methods; the optional hooks have
    defaults here, so the core calls them unconditionally."""

    name: ClassVar[str]

    # -- options ---------------------------------------------------------------------------
    def options(self) -> Dict[str, Any]:
        """The constructor arguments that make this instance (for ``repr``)."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({args})"

    # -- coordinate checks (optional: None = SparseTensor's own torch-op checks) ------------------
    def check_coords(self, coords: torch.Tensor, batch_size: int,
                     spatial_shape: Tuple[int, int]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """``SparseTensor(check=True)``'s range and duplicate checks on CPU coordinates in one
        fused pass: ``(coords int32 [N, 3] contiguous, keys)`` with the keys ``pack_keys`` gives
        (dtype ``key_dtype``), raising the very ``ValueError`` the torch-op checks raise; or None
        (then those run)."""
        return None

    def sites_from_dense(self, images: torch.Tensor,
                         mask: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``SparseTensor.from_dense``'s sites in one fused pass: ``(coords int32 [N, 3],
        features [N, C], keys)`` where ``mask [B, H, W]`` (bool) is true, raster order, keys as
        ``pack_keys`` gives them; or None (then the torch ops run). Called without autograd
        only (no gradient to ``images`` is needed)."""
        return None

    # -- coordinate index and neighbour tables ------------------------------------------------
    def default_index_strategy(self, key_space: int, n_keys: Optional[int] = None) -> str:
        """The strategy ``auto`` resolves to for a set of ``n_keys`` keys in ``[0, key_space)``."""
        return "sort"

    @abc.abstractmethod
    def build_index(self, keys: torch.Tensor, key_space: int, strategy: str) -> CoordIndex:
        """Index over ``keys`` (unique, any order) with ``0 <= key < key_space``."""

    @abc.abstractmethod
    def neighbor_table(self, index: CoordIndex, out_coords: torch.Tensor, in_shape: Tuple[int, int],
                       scale: Tuple[int, int], offsets: torch.Tensor, divisor: Tuple[int, int]) -> torch.Tensor:
        """``nbr[K, N_out]`` int32 by the affine rule; ``offsets`` is int64 ``[K, 2]``."""

    def full_subm_lookup(self, index: CoordIndex) -> bool:
        """True when looking every offset of a submanifold map up with ``index`` is cheaper than
        looking half of them up and mirroring the rest."""
        return False

    # -- fused map builds (optional: None = the core's generic builder in ``spconv2d.maps``) --
    # ``cs`` is the input ``CoordSet``; ``strategy`` the resolved index strategy. A result must
    # equal the generic builder's exactly (same table, output sites in raster order).
    def build_subm_table(self, cs, kernel_size, dilation, strategy: str) -> Optional[Table]:
        """The submanifold table ``nbr [K, N]`` (centre = identity), or None."""
        return None

    def build_conv_table(self, cs, kernel_size, stride, padding, dilation) -> Optional[Tuple[torch.Tensor, Table]]:
        """``(out_coords [M, 3] raster order, nbr [K, M])`` of a strided conv / pool, or None."""
        return None

    def build_conv_transpose_table(self, cs, kernel_size, stride, padding, dilation,
                                   output_padding) -> Optional[Tuple[torch.Tensor, Table]]:
        """``(out_coords, nbr)`` of a generative transposed conv, or None."""
        return None

    def build_lookup_table(self, cs, out_coords: torch.Tensor, scale, offsets: torch.Tensor, divisor,
                           strategy: str) -> Optional[Table]:
        """``nbr [K, N_out]`` by the affine rule from ``cs`` (the input set) to ``out_coords``, or
        None (then ``build_index`` + ``neighbor_table``)."""
        return None

    def reverse_table(self, kmap) -> torch.Tensor:
        """``kmap.rev`` (``rev[k, i] = j <=> nbr[k, j] = i``), built and cached on the map by this
        backend when it has a faster build (``KernelMap.transpose`` of a strided conv's map)."""
        return kmap.rev

    # -- pooling (defaults: PyTorch ops, differentiable by autograd) ----------------------------
    def max_pool(self, features: torch.Tensor, kmap) -> torch.Tensor:
        """``[N_out, C]``: max over each output's valid neighbours (``kmap.nbr``)."""
        idx = torch.where(kmap.nbr >= 0, kmap.nbr, features.shape[0]).long()  # missing -> the fill row
        padded = torch.cat((features, features.new_full((1, features.shape[1]), float("-inf"))), 0)
        return padded[idx].max(0).values

    def avg_pool(self, features: torch.Tensor, kmap) -> torch.Tensor:
        """``[N_out, C]``: mean over each output's valid neighbours (``kmap.nbr``)."""
        idx = torch.where(kmap.nbr >= 0, kmap.nbr, features.shape[0]).long()
        padded = torch.cat((features, features.new_zeros(1, features.shape[1])), 0)
        count = (kmap.nbr >= 0).sum(0).clamp_(min=1).unsqueeze(1).to(features.dtype)
        return padded[idx].sum(0) / count

    # -- convolution ---------------------------------------------------------------------------
    def prefers_dense_subm(self, density: float, c_in: int, c_out: int) -> bool:
        """True when a submanifold conv at this density should run as ``F.conv2d`` on the
        densified input (then be read at the active sites) instead of on the kernel map."""
        return False

    @abc.abstractmethod
    def conv_forward(self, features: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     kmap) -> torch.Tensor:
        """``[N_out, C_out]`` = ``bias + sum_k features[nbr[k]] @ weight[k]``."""

    def conv_forward_relu(self, features: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          kmap) -> torch.Tensor:
        """``max(conv_forward(...), 0)`` (inference: no autograd). A backend with an epilogue
        overrides it to clamp the outputs as it writes them; by default a pass after."""
        return self.conv_forward(features, weight, bias, kmap).relu_()

    @abc.abstractmethod
    def conv_backward_input(self, grad_out: torch.Tensor, weight: torch.Tensor, kmap) -> torch.Tensor:
        """``[N_in, C_in]``: ``grad_in[i] = sum_{k, j: nbr[k, j] = i} grad_out[j] @ weight[k].T``."""

    @abc.abstractmethod
    def conv_backward_weight(self, features: torch.Tensor, grad_out: torch.Tensor, kmap) -> torch.Tensor:
        """``[K, C_in, C_out]`` fp32-accumulated: ``sum_{j} features[nbr[k, j]].T @ grad_out[j]``."""
