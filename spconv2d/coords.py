"""Coordinate sets and the coordinate manager.

A ``CoordSet`` is one immutable set of active sites ``(b, y, x)`` on a ``spatial_shape`` grid
at a ``stride`` w.r.t. the network input, with its packed keys and (lazily) its lookup index.
A ``CoordinateManager`` is shared by every tensor derived from one input: it owns the coordinate
sets of every resolution and caches every kernel map by ``(op, input set, geometry)``, so a
U-Net builds each map once per batch and reuses it in every layer, forward and backward.
"""
from __future__ import annotations

from typing import Callable, Dict, Hashable, Tuple

import torch


def key_dtype(batch_size: int, spatial_shape: Tuple[int, int]) -> torch.dtype:
    """int32 whenever ``B*H*W < 2**31`` (always for images), else int64."""
    H, W = spatial_shape
    return torch.int32 if batch_size * H * W < 2**31 else torch.int64


def pack_keys(coords: torch.Tensor, spatial_shape: Tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """``key = (b*H + y)*W + x`` in ``dtype`` (computed in int64 to avoid overflow)."""
    H, W = spatial_shape
    c = coords.long()
    return ((c[:, 0] * H + c[:, 1]) * W + c[:, 2]).to(dtype)


def unpack_keys(keys: torch.Tensor, spatial_shape: Tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`pack_keys`: int32 ``[N, 3]`` rows ``(b, y, x)``."""
    H, W = spatial_shape
    k = keys.long()
    x = k % W
    by = k // W
    return torch.stack((by // H, by % H, x), 1).to(torch.int32)


class CoordSet:
    """Active sites of one resolution. Treat as immutable."""

    def __init__(self, coords, spatial_shape, batch_size, stride, keys=None, name: Hashable = "input"):
        self.coords = coords
        self.spatial_shape = (int(spatial_shape[0]), int(spatial_shape[1]))
        self.batch_size = int(batch_size)
        self.stride = (int(stride[0]), int(stride[1]))
        self.name = name  # its key in the manager
        self.key_dtype = key_dtype(self.batch_size, self.spatial_shape)
        self._keys = keys
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
    """Shared by all tensors derived from one input; caches coordinate sets and kernel maps."""

    def __init__(self):
        self.coord_sets: Dict[Hashable, CoordSet] = {}
        self.maps: Dict[Hashable, object] = {}
        self.builds = 0  # how many maps were built (tests use it to check the caching)

    def add(self, cs: CoordSet) -> CoordSet:
        self.coord_sets.setdefault(cs.name, cs)
        return self.coord_sets[cs.name]

    def get_or_build(self, key: Hashable, build: Callable[[], object]):
        value = self.maps.get(key)
        if value is None:
            value = build()
            self.maps[key] = value
            self.builds += 1
        return value

    def __repr__(self) -> str:
        return f"CoordinateManager({len(self.coord_sets)} coordinate sets, {len(self.maps)} maps)"
