"""The Triton backend: the :class:`~spconv2d.backends.base.Backend` seam over ``spconv2d.kernels``.

Options (constructor arguments of :class:`TritonBackend`; ``sp.backend("triton", **options)``)
    ``sort_rows`` (None: automatic per map), ``allow_tf32`` (None: follow
    ``torch.backends.cuda.matmul``), ``wgrad_splits`` (None: automatic per map), and the
    index choice's limits ``grid_max_keys``, ``grid_max_keys_dense``, ``grid_min_density``.

Index strategies
    ``hash`` (the GPU default for sparse inputs): the Triton hash table of
    ``spconv2d.kernels.hash`` (exact keys, grow-and-retry on overflow, never a silent miss).
    ``grid``: a dense int32 index image over the whole key space built by a scatter (smallest row
    wins for duplicate keys). ``sort`` is not a Triton structure: it is served by a hash table.
    ``auto`` (:meth:`TritonBackend.default_index_strategy`) picks ``grid`` when the key space is
    small (at most ``grid_max_keys`` int32 entries, L2-friendly) or the coordinates are dense
    (``n_keys >= grid_min_density * key_space`` and at most ``grid_max_keys_dense`` entries),
    else ``hash``. ``bench/bench_gpu_conv.py::test_index_strategy`` measures the choice.

Neighbour tables
    One fused launch: affine neighbour rule, key packing and hash probe / grid read.

Convolution
    Forward and input gradient: the output-stationary, atomic-free gather-GEMM kernel of
    ``spconv2d.kernels.conv`` on ``kmap.nbr`` (forward) and ``kmap.rev`` with the per-offset
    transposed weight (input gradient). Each table gets a cached tile plan
    (``kmap.cached("triton_tile_plan_<sort_rows>@<nbr|rev>")``): per-16-row offset masks so a
    tile skips offsets none of its rows uses, and the mask-sorted row order when it pays
    (``sort_rows=None``: automatic, see ``kernels.conv.tile_plan``). Weight gradient: split
    gathered GEMMs over ``kmap.pairs`` with fp32 partials summed by ``torch.sum``
    (``kmap.cached("triton_wgrad_plan_<wgrad_splits>")``). All deterministic, no atomics.

Precision: fp16/bf16 accumulate in fp32; fp32 is exact (IEEE) unless ``allow_tf32=True`` or,
with ``allow_tf32=None``, ``torch.backends.cuda.matmul`` allows TF32.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any, Dict, Optional

import torch

from .base import Backend, affine_neighbor_keys


def import_kernels():
    """``spconv2d.kernels``; from a source checkout (``<repo>/kernels``) when not installed."""
    try:
        return importlib.import_module("spconv2d.kernels")
    except ImportError:
        pass
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(root, "kernels")
    init = os.path.join(path, "__init__.py")
    if not os.path.exists(init):
        raise ImportError("spconv2d.kernels is not installed and no source checkout was found")
    spec = importlib.util.spec_from_file_location("spconv2d.kernels", init,
                                                  submodule_search_locations=[path])
    module = importlib.util.module_from_spec(spec)
    sys.modules["spconv2d.kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop("spconv2d.kernels", None)
        raise
    import spconv2d

    spconv2d.kernels = module
    return module


import_kernels()
from spconv2d.kernels import conv as _conv  # noqa: E402
from spconv2d.kernels import hash as _hash  # noqa: E402
from spconv2d.kernels import neighbors as _nb  # noqa: E402

# Defaults of the ``auto`` index choice (see the module docstring and docs/ARCHITECTURE.md).
TRITON_GRID_MAX_KEYS = 1 << 22        # <= 16 MiB of int32: the grid is cheap to clear and L2-resident
TRITON_GRID_MAX_KEYS_DENSE = 1 << 27  # never a grid beyond 512 MiB
TRITON_GRID_MIN_DENSITY = 0.125       # dense coordinates: the grid beats probing


class HashIndex:
    """Triton hash table over packed keys (``keys[i] -> i``)."""

    strategy = "hash"

    def __init__(self, keys: torch.Tensor, key_space: int, capacity: Optional[int] = None):
        keys = keys.reshape(-1)
        dtype = torch.int32 if key_space <= 2**31 - 1 else torch.int64
        self.key_space = int(key_space)
        self.table = _hash.hash_build(keys.to(dtype), capacity=capacity)

    @property
    def has_duplicates(self) -> bool:
        return self.table.has_duplicates

    def lookup(self, query_keys: torch.Tensor) -> torch.Tensor:
        return _hash.hash_lookup(self.table, query_keys)


class GridIndex:
    """Dense int32 index image over the key space (-1 = empty)."""

    strategy = "grid"

    def __init__(self, keys: torch.Tensor, key_space: int):
        self.key_space = int(key_space)
        self.grid = _nb.grid_build(keys.reshape(-1), key_space)

    def lookup(self, query_keys: torch.Tensor) -> torch.Tensor:
        return _nb.grid_lookup(self.grid, query_keys)


class TritonBackend(Backend):
    """The Triton kernels behind the backend seam (options: see the module docstring)."""

    name = "triton"

    def __init__(self, sort_rows: Optional[bool] = None, allow_tf32: Optional[bool] = None,
                 wgrad_splits: Optional[int] = None, grid_max_keys: int = TRITON_GRID_MAX_KEYS,
                 grid_max_keys_dense: int = TRITON_GRID_MAX_KEYS_DENSE,
                 grid_min_density: float = TRITON_GRID_MIN_DENSITY):
        if wgrad_splits is not None and int(wgrad_splits) < 1:
            raise ValueError(f"TritonBackend: wgrad_splits must be None or >= 1, got {wgrad_splits!r}")
        self.sort_rows = sort_rows
        self.allow_tf32 = allow_tf32
        self.wgrad_splits = None if wgrad_splits is None else int(wgrad_splits)
        self.grid_max_keys = int(grid_max_keys)
        self.grid_max_keys_dense = int(grid_max_keys_dense)
        self.grid_min_density = float(grid_min_density)

    def options(self) -> Dict[str, Any]:
        return dict(sort_rows=self.sort_rows, allow_tf32=self.allow_tf32, wgrad_splits=self.wgrad_splits,
                    grid_max_keys=self.grid_max_keys, grid_max_keys_dense=self.grid_max_keys_dense,
                    grid_min_density=self.grid_min_density)

    # -- coordinate index ---------------------------------------------------------------
    def default_index_strategy(self, key_space: int, n_keys: Optional[int] = None) -> str:
        if key_space <= self.grid_max_keys:
            return "grid"
        if (n_keys is not None and key_space <= self.grid_max_keys_dense
                and n_keys >= self.grid_min_density * key_space):
            return "grid"
        return "hash"

    def build_index(self, keys: torch.Tensor, key_space: int, strategy: str):
        if strategy == "auto":
            strategy = self.default_index_strategy(key_space, keys.numel())
        if strategy == "grid":
            if key_space >= 2**31 - 1:
                return HashIndex(keys, key_space)
            return GridIndex(keys, key_space)
        if strategy in ("hash", "sort"):  # no sorted index in Triton: a hash table serves
            return HashIndex(keys, key_space)
        raise ValueError(f"unknown index strategy {strategy!r}")

    def neighbor_table(self, index, out_coords, in_shape, scale, offsets, divisor) -> torch.Tensor:
        if isinstance(index, HashIndex):
            return _nb.neighbor_table_hash(index.table, out_coords, in_shape, scale, offsets,
                                           divisor, key_space=index.key_space)
        if isinstance(index, GridIndex):
            return _nb.neighbor_table_grid(index.grid, out_coords, in_shape, scale, offsets,
                                           divisor)
        return self._neighbor_table_generic(index, out_coords, in_shape, scale, offsets, divisor)

    @staticmethod
    def _neighbor_table_generic(index, out_coords, in_shape, scale, offsets, divisor):
        """Any ``CoordIndex``: keys by the affine rule in torch ops, then ``index.lookup``."""
        keys = torch.stack([affine_neighbor_keys(out_coords, in_shape, scale, offset, divisor)
                            for offset in offsets.tolist()]) if offsets.shape[0] else \
            torch.empty((0, out_coords.shape[0]), dtype=torch.int64, device=out_coords.device)
        return index.lookup(keys).to(torch.int32)

    # -- derived structures -------------------------------------------------------------
    def tile_plan(self, kmap, which: str = "nbr"):
        table = kmap.nbr if which == "nbr" else kmap.rev
        return kmap.cached(f"triton_tile_plan_{self.sort_rows}@{which}",
                           lambda: _conv.tile_plan(table, sort=self.sort_rows))

    def wgrad_plan(self, kmap):
        def build():
            ptr, in_idx, out_idx = kmap.pairs
            return _conv.wgrad_plan(ptr, in_idx, out_idx, splits=self.wgrad_splits)

        return kmap.cached(f"triton_wgrad_plan_{self.wgrad_splits}", build)

    # -- convolution --------------------------------------------------------------------
    def conv_forward(self, features, weight, bias, kmap) -> torch.Tensor:
        plan = self.tile_plan(kmap, "nbr") if kmap.n_out else None
        return _conv.sparse_conv(features, weight, kmap.nbr, bias, plan, self.allow_tf32)

    def conv_backward_input(self, grad_out, weight, kmap) -> torch.Tensor:
        plan = self.tile_plan(kmap, "rev") if kmap.n_in else None
        return _conv.sparse_conv_backward_input(grad_out, weight, kmap.rev, plan, self.allow_tf32)

    def conv_backward_weight(self, features, grad_out, kmap) -> torch.Tensor:
        return _conv.sparse_conv_weight_grad(features, grad_out, self.wgrad_plan(kmap),
                                             allow_tf32=self.allow_tf32)


__all__ = ["TritonBackend", "HashIndex", "GridIndex", "import_kernels"]
