"""Coordinate sets and the coordinate manager.

A ``CoordSet`` is one immutable set of active sites ``(b, y, x)`` on a ``spatial_shape`` grid
at a ``stride`` w.r.t. the network input, with its packed keys and (lazily) its lookup index.
A ``CoordinateManager`` is shared by every tensor derived from one input: it owns the coordinate
sets of every resolution and caches every kernel map under a :class:`MapKey` (op, input set,
geometry), so a U-Net builds each map once per batch and reuses it in every layer, forward and
backward. A coordinate set made by an op is named by that op's ``MapKey``; the input's set is
named ``"input"``.

These are internal types: ``SparseTensor.coord_set`` and ``SparseTensor.coordinate_manager``
expose them to the rest of the library (maps, functional ops, tests).
"""
from __future__ import annotations

from typing import Callable, Dict, Hashable, NamedTuple, Optional, Tuple

import torch

INPUT = "input"  # the name of a tensor's own (constructed, not derived) coordinate set


class MapKey(NamedTuple):
    """Cache key of a kernel map (and the name of the coordinate set the op produces).

    ``op``: ``"subm"``, ``"conv"`` (strided conv and pooling), ``"convT"`` (generative
    transposed) or ``"convT_to"`` (transposed onto ``target``'s sites); ``source``/``target``:
    names of the input / target coordinate sets; the geometry as pairs (unused ones ``None``).
    """

    op: str
    source: Hashable
    kernel_size: Tuple[int, int]
    stride: Optional[Tuple[int, int]] = None
    padding: Optional[Tuple[int, int]] = None
    dilation: Optional[Tuple[int, int]] = None
    output_padding: Optional[Tuple[int, int]] = None
    target: Optional[Hashable] = None


def key_dtype(batch_size: int, spatial_shape: Tuple[int, int]) -> torch.dtype:
    """int32 whenever ``B*H*W < 2**31`` (always for images), else int64."""
    H, W = spatial_shape
    return torch.int32 if batch_size * H * W < 2**31 else torch.int64


def pack_keys(coords: torch.Tensor, spatial_shape: Tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """``key = (b*H + y)*W + x`` in ``dtype`` (computed in int64 to avoid overflow)."""
    H, W = spatial_shape
    c = coords.long()
    return ((c[:, 0] * H + c[:, 1]) * W + c[:, 2]).to(dtype)


def check_in_grid(coords: torch.Tensor, spatial_shape, batch_size: int) -> None:
    """``ValueError`` naming the first row of ``coords`` outside the ``B x H x W`` grid, checked in
    the coordinates' own dtype (before any narrowing to int32, so nothing wraps around).
    ``SparseTensor`` and the backends' fused checks raise through it, so the message is one."""
    H, W = spatial_shape
    if coords.shape[0] == 0:
        return
    lo, hi = coords.amin(0).tolist(), coords.amax(0).tolist()
    if min(lo) >= 0 and hi[0] < batch_size and hi[1] < H and hi[2] < W:
        return
    for col, name, hi in ((0, "b", batch_size), (1, "y", H), (2, "x", W)):
        v = coords[:, col].long()
        bad = (v < 0) | (v >= hi)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            what = "batch_size" if col == 0 else "spatial_shape"
            raise ValueError(
                f"coords row {row} = {tuple(coords[row].tolist())} has {name}={int(v[row])} outside "
                f"[0, {hi}) (from {what}); coordinates must be non-negative and inside the grid"
            )


def check_unique(keys: torch.Tensor, coords: torch.Tensor) -> None:
    """``ValueError`` naming the first two rows of ``coords`` whose packed ``keys`` are equal."""
    if keys.numel() < 2:
        return
    sorted_keys, order = torch.sort(keys, stable=True)
    dup = sorted_keys[1:] == sorted_keys[:-1]
    if bool(dup.any()):
        p = int(dup.nonzero()[0, 0])
        a, b = int(order[p]), int(order[p + 1])
        raise ValueError(
            f"duplicate coordinates: rows {a} and {b} are both {tuple(coords[a].tolist())}; "
            f"use SparseTensor.coalesce(...) to merge duplicates"
        )


def unpack_keys(keys: torch.Tensor, spatial_shape: Tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`pack_keys`: int32 ``[N, 3]`` rows ``(b, y, x)``."""
    H, W = spatial_shape
    k = keys.long()
    x = k % W
    by = k // W
    return torch.stack((by // H, by % H, x), 1).to(torch.int32)


class CoordSet:
    """Active sites of one resolution. Treat as immutable."""

    def __init__(self, coords, spatial_shape, batch_size, stride, keys=None, name: Hashable = INPUT):
        """``keys``: the packed keys if the caller has them already (converted to
        :attr:`key_dtype`); ``name``: the set's key in its manager."""
        self.coords = coords
        self.spatial_shape = (int(spatial_shape[0]), int(spatial_shape[1]))
        self.batch_size = int(batch_size)
        self.stride = (int(stride[0]), int(stride[1]))
        self.name = name  # its key in the manager
        self.key_dtype = key_dtype(self.batch_size, self.spatial_shape)
        self._keys = None if keys is None else keys.to(self.key_dtype)
        self._index: Dict[Tuple[str, str], object] = {}

    @property
    def num(self) -> int:
        return self.coords.shape[0]

    @property
    def key_space(self) -> int:
        return self.batch_size * self.spatial_shape[0] * self.spatial_shape[1]

    @property
    def keys(self) -> torch.Tensor:
        if self._keys is None:
            self._keys = pack_keys(self.coords, self.spatial_shape, self.key_dtype)
        return self._keys

    def index(self, backend, strategy: str):
        """The backend's lookup index over these keys, built once per (backend, strategy)."""
        k = (backend.name, strategy)
        idx = self._index.get(k)
        if idx is None:
            idx = backend.build_index(self.keys, self.key_space, strategy)
            self._index[k] = idx
        return idx


class CoordinateManager:
    """Shared by all tensors derived from one input; caches coordinate sets and kernel maps.

    ``builds`` counts the maps built so far (the tests check the caching with it)."""

    def __init__(self):
        self._coord_sets: Dict[Hashable, CoordSet] = {}
        self._maps: Dict[MapKey, object] = {}
        self.builds = 0

    def add(self, cs: CoordSet) -> CoordSet:
        """Register ``cs`` under its name; the set already registered under that name wins."""
        return self._coord_sets.setdefault(cs.name, cs)

    def coord_set(self, name: Hashable) -> Optional[CoordSet]:
        return self._coord_sets.get(name)

    def cached_map(self, key: MapKey):
        """The map cached under ``key``, or None (never builds)."""
        return self._maps.get(key)

    def get_or_build(self, key: MapKey, build: Callable[[], object]):
        """The map cached under ``key``; built by ``build()`` and cached on first use."""
        value = self._maps.get(key)
        if value is None:
            value = build()
            self._maps[key] = value
            self.builds += 1
        return value

    def __len__(self) -> int:
        return len(self._maps)

    def __repr__(self) -> str:
        return f"CoordinateManager({len(self._coord_sets)} coordinate sets, {len(self._maps)} maps)"
