"""The fused CPU backend: the PyTorch path with numba kernels where they pay.

``NumbaBackend`` is a :class:`~spconv2d.backends.torch_backend.TorchBackend` (same options, same
fallbacks) whose convolutions (forward, input and weight gradients), poolings and kernel-map
builds run as the JIT-compiled kernels of :mod:`spconv2d.backends.numba_kernels`:

* convolutions: output-stationary gathered GEMMs in register tiles over a per-map plan
  (``kmap.cached("numba_plan@nbr")`` / ``"@rev"``; a submanifold map's one plan serves both
  directions); every output row written once, no atomics, bit-identical across runs and thread
  counts; fp16 / bf16 are computed in fp32 and rounded once;
* kernel maps: index and neighbour table in one pass per map (a dense grid index while it is
  affordable, sorted keys beyond), identical to the generic builders' tables;
* max / avg pooling over the map (backward over the reverse table, no atomics).

Options (``sp.backend("numba", **options)``): every ``TorchBackend`` option, plus
``grid_max_keys`` / ``grid_keys_per_site`` for the fused builders' grid index and
``torch_conv_fill``: a conv whose widest channel side is at least ``torch_conv_channels`` and
whose map's fill is below this runs on the PyTorch path instead (measured: see
docs/ARCHITECTURE.md, "Measured choices"). The dense fallback of submanifold convs keeps its
meaning, but by default it is off here: the fused convolution (map cached) beat the dense
fallback at every density measured, up to 95 % (16 to 64 channels).

Requires the ``cpu`` extra (``pip install spconv2d[cpu]``, numba). Kernels compile lazily on
first use and are cached on disk (numba's ``__pycache__`` next to the kernels, or numba's user
cache directory where that is not writable).
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, Optional

import torch

from numba.core import errors as numba_errors

from .numba_kernels import conv as nk
from .numba_kernels import maps as nm
from .numba_kernels import pool as npool
from .torch_backend import Steps, TorchBackend

# Defaults (docs/ARCHITECTURE.md, "Measured choices").
NUMBA_DENSE_SUBM_THRESHOLDS = ((None, 2.0),)  # never: the fused conv beats F.conv2d at every density measured
TORCH_CONV_CHANNELS = 64
TORCH_CONV_FILL = 0.0


def _cpu32(t: torch.Tensor) -> torch.Tensor:
    """float32 / float64 as they are; 16-bit floats computed in float32."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


class _Pool(torch.autograd.Function):
    """Max or average pooling over ``kmap`` with the numba kernels: ``forward_kernel(x, nbr)``
    gives ``(out, saved)`` (the arg-max rows or the neighbour counts), ``backward_kernel(grad,
    saved, rev)`` the input gradient over the reverse table (no atomics)."""

    @staticmethod
    def forward(ctx, features, kmap, forward_kernel, backward_kernel):
        out, saved = forward_kernel(_cpu32(features.detach()), kmap.nbr)
        ctx.save_for_backward(saved)
        ctx.kmap, ctx.dtype, ctx.backward_kernel = kmap, features.dtype, backward_kernel
        return out.to(features.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (saved,) = ctx.saved_tensors
        grad = ctx.backward_kernel(_cpu32(grad_out), saved, _rev(ctx.kmap)).to(ctx.dtype)
        return grad, None, None, None


def _rev(kmap) -> torch.Tensor:
    """The reverse table, built by the fused kernel when the map has none yet."""
    if kmap.symmetric:
        return kmap.rev
    return kmap.cached("rev", lambda: nm.reverse_table(kmap.nbr, kmap.n_in))


class NumbaBackend(TorchBackend):
    """The PyTorch path with fused numba kernels (see the module docstring)."""

    name = "numba"

    def __init__(self, *, grid_max_keys: int = nm.GRID_MAX_KEYS, grid_keys_per_site: int = nm.GRID_KEYS_PER_SITE,
                 torch_conv_channels: int = TORCH_CONV_CHANNELS, torch_conv_fill: float = TORCH_CONV_FILL,
                 dense_thresholds: Steps = NUMBA_DENSE_SUBM_THRESHOLDS, **torch_options):
        super().__init__(dense_thresholds=dense_thresholds, grid_max_keys=grid_max_keys, **torch_options)
        self.grid_keys_per_site = int(grid_keys_per_site)
        self.torch_conv_channels = int(torch_conv_channels)
        self.torch_conv_fill = float(torch_conv_fill)
        self._failed: Optional[str] = None  # set when a kernel failed to compile: PyTorch from then on

    def _fused(self, kernel: Callable, fallback: Callable):
        """``kernel()``; if numba cannot compile it here, warn once and use ``fallback()`` (the
        PyTorch path) from then on. Errors of the arguments are not compile failures: those are
        raised before (validation) or are the PyTorch path's too."""
        if self._failed is None:
            try:
                return kernel()
            except (numba_errors.NumbaError, numba_errors.LoweringError, RuntimeError) as e:
                if isinstance(e, RuntimeError) and "LLVM" not in str(e) and "numba" not in str(e).lower():
                    raise
                self._failed = f"{type(e).__name__}: {e}"
                warnings.warn(f"spconv2d: the numba kernels failed to compile on this machine ({self._failed}); "
                              f"using the PyTorch path instead", RuntimeWarning, stacklevel=3)
        return fallback()

    def options(self) -> Dict[str, Any]:
        return dict(super().options(), grid_keys_per_site=self.grid_keys_per_site,
                    torch_conv_channels=self.torch_conv_channels, torch_conv_fill=self.torch_conv_fill)

    # -- coordinate checks ---------------------------------------------------------------------
    def check_coords(self, coords, batch_size, spatial_shape):
        if coords.device.type != "cpu":
            return None
        return self._fused(lambda: nm.check_coords(coords, batch_size, spatial_shape,
                                                   **self._grid_options("auto")), lambda: None)

    def sites_from_dense(self, images, mask):
        if images.device.type != "cpu" or images.dtype not in (torch.float32, torch.float64):
            return None
        return self._fused(lambda: nm.sites_from_dense(images, mask), lambda: None)

    # -- index: ``auto`` lets the fused builders choose grid or sorted keys -------------------
    def _grid_options(self, strategy: str) -> Dict[str, int]:
        if strategy == "grid":
            return dict(grid_max_keys=self.grid_max_keys, grid_keys_per_site=1 << 62)
        if strategy in ("sort", "hash"):
            return dict(grid_max_keys=0, grid_keys_per_site=0)
        return dict(grid_max_keys=self.grid_max_keys, grid_keys_per_site=self.grid_keys_per_site)

    def default_index_strategy(self, key_space: int, n_keys: Optional[int] = None) -> str:
        return "auto"

    def build_index(self, keys: torch.Tensor, key_space: int, strategy: str):
        if strategy == "auto":
            strategy = super().default_index_strategy(key_space, keys.numel())
        return super().build_index(keys, key_space, strategy)

    # -- fused map builds ---------------------------------------------------------------------
    @staticmethod
    def _applies(cs) -> bool:
        return cs.coords.device.type == "cpu"

    def build_subm_table(self, cs, kernel_size, dilation, strategy: str):
        if not self._applies(cs):
            return None
        return self._fused(lambda: nm.subm_table(cs.coords, cs.batch_size, cs.spatial_shape, kernel_size, dilation,
                                                 **self._grid_options(strategy)), lambda: None)

    def build_conv_table(self, cs, kernel_size, stride, padding, dilation):
        if not self._applies(cs):
            return None
        return self._fused(lambda: nm.conv_table(cs.coords, cs.batch_size, cs.spatial_shape, kernel_size, stride,
                                                 padding, dilation, **self._grid_options("auto")), lambda: None)

    def build_conv_transpose_table(self, cs, kernel_size, stride, padding, dilation, output_padding):
        if not self._applies(cs):
            return None
        return self._fused(lambda: nm.conv_transpose_table(cs.coords, cs.batch_size, cs.spatial_shape, kernel_size,
                                                           stride, padding, dilation, output_padding,
                                                           **self._grid_options("auto")), lambda: None)

    def build_lookup_table(self, cs, out_coords, scale, offsets, divisor, strategy: str):
        if not self._applies(cs):
            return None
        return self._fused(lambda: nm.lookup_table(cs.coords, cs.batch_size, cs.spatial_shape, out_coords, scale,
                                                   offsets, divisor, **self._grid_options(strategy)), lambda: None)

    def reverse_table(self, kmap) -> torch.Tensor:
        if kmap.device.type != "cpu":
            return kmap.rev
        return _rev(kmap)  # one pass over the table (the core's build is a nonzero + scatter)

    # -- convolution ----------------------------------------------------------------------
    def _on_torch(self, kmap, c_in: int, c_out: int, n_dst: int) -> bool:
        if max(c_in, c_out) < self.torch_conv_channels or self.torch_conv_fill <= 0:
            return False  # (the default fill 0 never chooses PyTorch: no pair count, a pass over the table)
        return kmap.num_pairs < self.torch_conv_fill * kmap.kernel_volume * max(1, n_dst)

    @staticmethod
    def _plan(kmap, reverse: bool):
        if reverse:
            return kmap.cached("numba_plan@rev", lambda: nk.build_plan(_rev(kmap), kmap.n_out))
        return kmap.cached("numba_plan@nbr", lambda: nk.build_plan(kmap.nbr, kmap.n_in))

    def conv_forward(self, features, weight, bias, kmap, relu: bool = False) -> torch.Tensor:
        def fallback():
            out = super(NumbaBackend, self).conv_forward(features, weight, bias, kmap)
            return out.relu_() if relu else out

        if features.device.type != "cpu" or self._on_torch(kmap, weight.shape[1], weight.shape[2], kmap.n_out):
            return fallback()
        return self._fused(lambda: nk.conv_forward(features.detach(), weight.detach(),
                                                   None if bias is None else bias.detach(), kmap.nbr,
                                                   self._plan(kmap, reverse=False), relu=relu), fallback)

    def conv_forward_relu(self, features, weight, bias, kmap) -> torch.Tensor:
        return self.conv_forward(features, weight, bias, kmap, relu=True)  # clamped as written

    def conv_backward_input(self, grad_out, weight, kmap) -> torch.Tensor:
        fallback = lambda: super(NumbaBackend, self).conv_backward_input(grad_out, weight, kmap)  # noqa: E731
        if grad_out.device.type != "cpu" or self._on_torch(kmap, weight.shape[1], weight.shape[2], kmap.n_in):
            return fallback()
        if kmap.symmetric:  # rev[k] = nbr[K-1-k]: the forward plan serves, offsets flipped
            return self._fused(lambda: nk.conv_backward_input(grad_out, weight.detach(), kmap.nbr,
                                                              self._plan(kmap, reverse=False), flip_offsets=True),
                               fallback)
        return self._fused(lambda: nk.conv_backward_input(grad_out, weight.detach(), _rev(kmap),
                                                          self._plan(kmap, reverse=True)), fallback)

    def conv_backward_weight(self, features, grad_out, kmap) -> torch.Tensor:
        fallback = lambda: super(NumbaBackend, self).conv_backward_weight(features, grad_out, kmap)  # noqa: E731
        if features.device.type != "cpu" or self._on_torch(kmap, features.shape[1], grad_out.shape[1], kmap.n_out):
            return fallback()
        return self._fused(lambda: nk.conv_backward_weight(features.detach(), grad_out, kmap.nbr,
                                                           self._plan(kmap, reverse=False)), fallback)

    # -- pooling ----------------------------------------------------------------------------
    def max_pool(self, features: torch.Tensor, kmap) -> torch.Tensor:
        fallback = lambda: super(NumbaBackend, self).max_pool(features, kmap)  # noqa: E731
        if features.device.type != "cpu":
            return fallback()
        return self._fused(lambda: _Pool.apply(features, kmap, npool.max_pool_forward, npool.max_pool_backward), fallback)

    def avg_pool(self, features: torch.Tensor, kmap) -> torch.Tensor:
        fallback = lambda: super(NumbaBackend, self).avg_pool(features, kmap)  # noqa: E731
        if features.device.type != "cpu":
            return fallback()
        return self._fused(lambda: _Pool.apply(features, kmap, npool.avg_pool_forward, npool.avg_pool_backward), fallback)
