"""``SparseTensor``: the active pixels of a batch of images and their feature vectors."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from .coords import CoordinateManager, CoordSet, check_in_grid, check_unique, key_dtype, pack_keys
from .geometry import integer, pair

_REDUCTIONS = ("sum", "mean", "max", "min")
INT32_MAX = 2**31 - 1  # coordinates are stored as int32: every coordinate and grid size fits it
_COORD_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
# below this many rows the torch-op checks cost microseconds: no backend dispatch
_FUSED_CHECK_MIN_ROWS = 4096
_FUSED_SITES_MIN_PIXELS = 4096


def _check_features(features) -> None:
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if not features.is_floating_point():
        raise TypeError(f"features must be a floating-point tensor, got {features.dtype}")
    if features.dim() != 2:
        raise ValueError(f"features must have shape [N, C], got {tuple(features.shape)}")


def _check_coords(coords, n: int, device) -> torch.Tensor:
    if not isinstance(coords, torch.Tensor):
        raise TypeError(f"coords must be a torch.Tensor, got {type(coords).__name__}")
    if coords.dtype not in _COORD_DTYPES:
        raise TypeError(f"coords must be an integer tensor (int32 preferred), got {coords.dtype}")
    if coords.dim() != 2 or coords.shape[1] != 3:
        raise ValueError(f"coords must have shape [N, 3] with rows (b, y, x), got {tuple(coords.shape)}")
    if coords.shape[0] != n:
        raise ValueError(f"features has {n} rows but coords has {coords.shape[0]}: they must match")
    if coords.device != device:
        raise ValueError(f"coords are on {coords.device} but features are on {device}")
    return coords


def _check_grid(spatial_shape, batch_size, inferred: bool = False) -> Tuple[Tuple[int, int], int]:
    """``spatial_shape`` a pair of integers in ``[1, 2**31)``, ``batch_size`` an integer in
    ``[1, 2**31)`` (never truncated)."""
    spatial_shape = pair(spatial_shape, "spatial_shape", 1)
    if max(spatial_shape) > INT32_MAX:
        raise ValueError(f"spatial_shape must fit int32 coordinates (<= {INT32_MAX}), got {spatial_shape}")
    what = "batch_size (one more than the largest batch index in coords)" if inferred else "batch_size"
    batch_size = integer(batch_size, what, 1)
    if batch_size > INT32_MAX:
        raise ValueError(f"{what} must fit int32 coordinates (<= {INT32_MAX}), got {batch_size}")
    return spatial_shape, batch_size


def _infer_batch_size(coords: torch.Tensor) -> int:
    return int(coords[:, 0].max()) + 1 if coords.shape[0] else 1


def _fused_sites(images: torch.Tensor, mask: torch.Tensor):
    """The backend in force's one-pass ``from_dense`` (``Backend.sites_from_dense``), or None:
    on a CPU, from ``_FUSED_SITES_MIN_PIXELS`` pixels on, when no gradient to ``images`` is
    needed (the torch ops are differentiable)."""
    if images.device.type != "cpu" or mask.numel() < _FUSED_SITES_MIN_PIXELS \
            or (images.requires_grad and torch.is_grad_enabled()):
        return None
    from .backends import resolve  # the backends sit above the tensor type

    return resolve(images.device).sites_from_dense(images, mask)


def _fused_check(coords: torch.Tensor, batch_size: int, spatial_shape) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """The backend in force's fused coordinate check (``Backend.check_coords``), or None."""
    if coords.device.type != "cpu" or coords.dtype not in (torch.int32, torch.int64) \
            or coords.shape[0] < _FUSED_CHECK_MIN_ROWS:
        return None
    from .backends import resolve  # the backends sit above the tensor type

    return resolve(coords.device).check_coords(coords, batch_size, spatial_shape)


def at_sites(dense: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """``dense [B, C, H, W]`` read at ``coords`` rows ``(b, y, x)`` -> ``[N, C]`` (``sp.at_sites``).

    The inverse of ``SparseTensor.to_dense`` at the active sites: ``at_sites(x.to_dense(),
    x.coords) == x.features``. Differentiable w.r.t. ``dense``; any memory format."""
    c = coords.long()
    B, C, H, W = dense.shape
    if C > 1 and dense.is_contiguous(memory_format=torch.channels_last):
        # pixel rows are a view: one row gather (docs/ARCHITECTURE.md, "Measured choices")
        return dense.permute(0, 2, 3, 1).reshape(-1, C).index_select(0, (c[:, 0] * H + c[:, 1]) * W + c[:, 2])
    return dense[c[:, 0], :, c[:, 1], c[:, 2]]


class SparseTensor:
    """Active sites ``coords`` (int32 ``[N, 3]``, rows ``(b, y, x)``) with ``features [N, C]``.

    ``spatial_shape`` is the ``(H, W)`` grid the coordinates live on, ``stride`` that grid's
    stride w.r.t. the network input. Rows keep the order they were given in (``from_dense``
    and every strided op produce raster order). Tensors derived from one another share a
    ``CoordinateManager`` that caches coordinates and kernel maps; ``replace`` makes a new
    tensor on the same sites.

    Validation, before anything is cast: ``features`` a floating-point ``[N, C]`` tensor;
    ``coords`` an integer ``[N, 3]`` tensor on the features' device; ``spatial_shape`` and
    ``batch_size`` integers in ``[1, 2**31)`` (``batch_size`` None: one more than the largest
    batch index); ``stride`` integers >= 1. With ``check=True`` (default) every coordinate must
    lie inside the grid (checked in the coordinates' own dtype, so nothing wraps around when
    they are stored as int32) and no site may repeat (``coalesce`` merges duplicates);
    ``check=False`` skips those two scans: the caller guarantees them. Errors are ``TypeError``
    for types and dtypes, ``ValueError`` for values and shapes, naming the argument.
    """

    __slots__ = ("features", "_cs", "_manager")

    def __init__(
        self,
        features: torch.Tensor,
        coords: torch.Tensor,
        spatial_shape: Sequence[int],
        batch_size: Optional[int] = None,
        *,
        stride: Union[int, Sequence[int]] = 1,
        check: bool = True,
    ):
        _check_features(features)
        coords = _check_coords(coords, features.shape[0], features.device)
        inferred = batch_size is None
        spatial_shape, batch_size = _check_grid(spatial_shape, _infer_batch_size(coords) if inferred else batch_size,
                                                inferred)
        stride = pair(stride, "stride", 1)
        keys = None
        checked = _fused_check(coords, batch_size, spatial_shape) if check else None
        if checked is not None:  # the CPU backend's one-pass check (same errors)
            coords, keys = checked
        else:
            if check:
                check_in_grid(coords, spatial_shape, batch_size)  # before the narrowing cast
            coords = coords.to(torch.int32).contiguous()
            if check:
                keys = pack_keys(coords, spatial_shape, key_dtype(batch_size, spatial_shape))
                check_unique(keys, coords)
        self._attach(features, CoordSet(coords, spatial_shape, batch_size, stride, keys=keys))

    def _attach(self, features: torch.Tensor, coord_set: CoordSet) -> None:
        """Hold ``features`` on ``coord_set``, the first set of a new coordinate manager."""
        self.features = features
        self._manager = CoordinateManager()
        self._cs = self._manager.add(coord_set)

    # -- construction ------------------------------------------------------------------
    def derive(self, features: torch.Tensor, coord_set: CoordSet) -> "SparseTensor":
        """A tensor with ``features`` on ``coord_set``, a set of this tensor's coordinate manager
        (how an op returns its output; internal API, no checks)."""
        obj = SparseTensor.__new__(SparseTensor)
        obj.features = features
        obj._cs = coord_set
        obj._manager = self._manager
        return obj

    @classmethod
    def from_dense(cls, images: torch.Tensor, mask: Optional[torch.Tensor] = None) -> "SparseTensor":
        """Active sites of ``images [B, C, H, W]``: where ``mask [B, H, W]`` is true, or (mask
        None) where any channel is non-zero. Differentiable w.r.t. ``images``."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 4:
            raise ValueError(f"images must be a [B, C, H, W] tensor, got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"images must be floating point, got {images.dtype}")
        B, C, H, W = images.shape
        if mask is None:
            mask = images.ne(0).any(1)
        else:
            if not isinstance(mask, torch.Tensor):
                raise TypeError(f"mask must be a bool torch.Tensor [B, H, W], got {type(mask).__name__}")
            if mask.dtype != torch.bool:
                raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
            if tuple(mask.shape) != (B, H, W):
                raise ValueError(f"mask must have shape {(B, H, W)}, got {tuple(mask.shape)}")
            if mask.device != images.device:
                raise ValueError(f"mask is on {mask.device} but images are on {images.device}")
        _check_grid((H, W), B)
        sites = _fused_sites(images, mask)
        if sites is None:
            coords = mask.nonzero().to(torch.int32)  # raster order: sorted by key
            features, keys = at_sites(images.contiguous(memory_format=torch.channels_last), coords), None
        else:
            coords, features, keys = sites
        obj = cls.__new__(cls)  # (validated above: the constructor's checks would repeat them)
        obj._attach(features, CoordSet(coords, (H, W), B, (1, 1), keys=keys))
        return obj

    @classmethod
    def coalesce(
        cls,
        features: torch.Tensor,
        coords: torch.Tensor,
        spatial_shape: Sequence[int],
        batch_size: Optional[int] = None,
        reduce: str = "sum",
    ) -> "SparseTensor":
        """Build a tensor from coordinates that may repeat, merging the features of equal
        coordinates with ``reduce`` (``sum``, ``mean``, ``max`` or ``min``). Rows come out in
        raster order."""
        _check_features(features)
        coords = _check_coords(coords, features.shape[0], features.device)
        if reduce not in _REDUCTIONS:
            raise ValueError(f"reduce must be one of {_REDUCTIONS}, got {reduce!r}")
        inferred = batch_size is None
        spatial_shape, batch_size = _check_grid(spatial_shape, _infer_batch_size(coords) if inferred else batch_size,
                                                inferred)
        check_in_grid(coords, spatial_shape, batch_size)
        keys = pack_keys(coords, spatial_shape, torch.int64)
        uniq, inv = torch.unique(keys, return_inverse=True)
        out = features.new_zeros(uniq.numel(), features.shape[1])
        index = inv.unsqueeze(1).expand_as(features)
        out = out.scatter_reduce(0, index, features, {"sum": "sum", "mean": "mean", "max": "amax", "min": "amin"}[reduce],
                                 include_self=False)
        H, W = spatial_shape
        ucoords = torch.stack((uniq // (H * W), (uniq // W) % H, uniq % W), 1).to(torch.int32)
        return cls(out, ucoords, spatial_shape, batch_size, check=False)

    def replace(self, features: torch.Tensor) -> "SparseTensor":
        """Same sites (and cached maps), new ``features [N, C']``."""
        _check_features(features)
        if features.shape[0] != self.num_active:
            raise ValueError(f"replace: features has {features.shape[0]} rows, the tensor has {self.num_active} sites")
        if features.device != self.device:
            raise ValueError(f"replace: features are on {features.device}, the tensor's coords on {self.device}")
        return self.derive(features, self._cs)

    def to(self, *args, **kwargs) -> "SparseTensor":
        """Like ``Tensor.to``: a dtype applies to the features; a new device moves both (the
        kernel-map cache starts afresh there)."""
        features = self.features.to(*args, **kwargs)
        if features.device == self.device:
            return self.replace(features)
        cs = self._cs
        return SparseTensor(features, cs.coords.to(features.device), cs.spatial_shape, cs.batch_size,
                            stride=cs.stride, check=False)

    def cpu(self) -> "SparseTensor":
        return self.to("cpu")

    def cuda(self, device=None) -> "SparseTensor":
        return self.to("cuda" if device is None else device)

    def half(self) -> "SparseTensor":
        return self.to(torch.float16)

    def float(self) -> "SparseTensor":
        return self.to(torch.float32)

    def double(self) -> "SparseTensor":
        return self.to(torch.float64)

    def detach(self) -> "SparseTensor":
        return self.replace(self.features.detach())

    # -- views -------------------------------------------------------------------------
    @property
    def coords(self) -> torch.Tensor:
        return self._cs.coords

    @property
    def spatial_shape(self) -> Tuple[int, int]:
        return self._cs.spatial_shape

    @property
    def batch_size(self) -> int:
        return self._cs.batch_size

    @property
    def stride(self) -> Tuple[int, int]:
        return self._cs.stride

    @property
    def coordinate_manager(self) -> CoordinateManager:
        """The manager shared by every tensor derived from the same input (caches the maps)."""
        return self._manager

    @property
    def coord_set(self) -> CoordSet:
        """The immutable coordinate set (coords, keys, lookup index) behind this tensor
        (internal API: ``spconv2d.coords.CoordSet``)."""
        return self._cs

    @property
    def num_active(self) -> int:
        return self.features.shape[0]

    @property
    def num_channels(self) -> int:
        return self.features.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.features.dtype

    @property
    def device(self) -> torch.device:
        return self.features.device

    @property
    def requires_grad(self) -> bool:
        return self.features.requires_grad

    @property
    def density(self) -> float:
        """Fraction of the ``batch_size * H * W`` grid that is active."""
        return self.num_active / self._cs.key_space

    def to_dense(self, memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        """``[B, C, H, W]`` with zeros at inactive sites. Differentiable. ``memory_format=
        torch.channels_last`` returns the pixel-row layout the scatter writes (no copy)."""
        B, (H, W), C = self.batch_size, self.spatial_shape, self.num_channels
        if memory_format == torch.channels_last:
            dense = self.features.new_zeros(B * H * W, C).index_copy_(0, self._cs.keys.long(), self.features)
            return dense.view(B, H, W, C).permute(0, 3, 1, 2)
        # written in place into a zeroed [B, C, H*W] (no pixel-row copy to transpose afterwards)
        dense = self.features.new_zeros(B, C, H * W)
        c = self.coords.long()
        dense.transpose(1, 2).index_put_((c[:, 0], c[:, 1] * W + c[:, 2]), self.features)
        dense = dense.view(B, C, H, W)
        return dense if memory_format == torch.contiguous_format else dense.contiguous(memory_format=memory_format)

    def same_sites(self, other: "SparseTensor") -> bool:
        """True when ``other`` has exactly these coordinates in the same row order."""
        if self._cs is other._cs:
            return True
        return (
            self.spatial_shape == other.spatial_shape
            and self.batch_size == other.batch_size
            and self.coords.shape == other.coords.shape
            and self.coords.device == other.coords.device
            and torch.equal(self.coords, other.coords)
        )

    # -- arithmetic --------------------------------------------------------------------
    def __add__(self, other):
        from .functional.basic import add

        return add(self, other)

    __radd__ = __add__

    def __mul__(self, other):
        if isinstance(other, (int, float)) or (isinstance(other, torch.Tensor) and other.dim() <= 1):
            return self.replace(self.features * other)
        return NotImplemented

    __rmul__ = __mul__

    def __neg__(self):
        return self.replace(-self.features)

    def __len__(self) -> int:
        return self.num_active

    def __repr__(self) -> str:
        return (
            f"SparseTensor(active={self.num_active}, channels={self.num_channels}, "
            f"batch_size={self.batch_size}, spatial_shape={self.spatial_shape}, stride={self.stride}, "
            f"density={self.density:.2%}, dtype={self.dtype}, device={self.device})"
        )
