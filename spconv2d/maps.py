"""Kernel-map builders: output coordinates and ``nbr`` tables for every convolution geometry.

Every builder returns a :class:`BuiltMap` ``(out, kmap)``: the output coordinate set and the
kernel map from the input's set to it. Each is cached in the tensor's ``CoordinateManager``
under a :class:`~spconv2d.coords.MapKey` naming the op, the input coordinate set and the
geometry, so every layer with the same geometry on the same sites shares one map (and its
derived tables), forward and backward. A derived output set is named by that key.

Geometry: :mod:`spconv2d.geometry` (the dense oracle's cross-correlation); a submanifold conv is
the conv with ``s = 1, p = r*(k//2)`` whose output sites are the input sites.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import backends
from .backends.base import Backend
from .coords import CoordSet, MapKey, unpack_keys
from .geometry import Pair, conv_output_size, conv_transpose_output_size, kernel_offsets
from .kernel_map import KernelMap
from .tensor import SparseTensor


class BuiltMap(NamedTuple):
    """The result of every builder: the output coordinate set and the kernel map into it."""

    out: CoordSet
    kmap: KernelMap

# Non-overlapping strided maps (k == s) find their output sites on an occupancy grid over the
# output key space (no sort) while it has at most this many keys per input site, or this many
# keys in all (``occupancy_limit``); beyond, ``unique`` over the candidates.
OCCUPANCY_KEYS_PER_SITE = 8
OCCUPANCY_MIN_KEYS = 1 << 16


def occupancy_limit(n_sites: int) -> int:
    """The largest output key space a k == s map finds its sites in by an occupancy grid."""
    return max(OCCUPANCY_KEYS_PER_SITE * n_sites, OCCUPANCY_MIN_KEYS)


def _strategy(cs: CoordSet, be: Backend, index: Optional[str] = None) -> str:
    return backends.resolve_index_strategy(be, cs.key_space, index, cs.num)


def _index(cs: CoordSet, be: Backend, index: Optional[str] = None):
    return cs.index(be, _strategy(cs, be, index))


def _mirror_fill(nbr: torch.Tensor, half: int) -> None:
    """Fill offsets ``K-1-k`` (k < half) of a symmetric map from offsets ``k``."""
    K = nbr.shape[0]
    k, j = (nbr[:half] >= 0).nonzero(as_tuple=True)
    nbr[K - 1 - k, nbr[k, j].long()] = j.to(torch.int32)


# -- submanifold --------------------------------------------------------------------------
def subm_map(x: SparseTensor, ksize: Pair, dilation: Pair, be: Backend, index: Optional[str] = None) -> BuiltMap:
    """Submanifold map: output sites = input sites (``out`` is ``x``'s own set)."""
    cs = x.coord_set
    key = MapKey("subm", cs.name, ksize, dilation=dilation)

    def build() -> BuiltMap:
        K, n = ksize[0] * ksize[1], cs.num
        c = K // 2
        device = cs.coords.device
        if c > 0:
            fused = be.build_subm_table(cs, ksize, dilation, _strategy(cs, be, index))
            if fused is not None:
                return BuiltMap(cs, KernelMap(fused, n, ksize, symmetric=True, identity_offset=c))
        offsets = (kernel_offsets(ksize, device) - torch.tensor([ksize[0] // 2, ksize[1] // 2], device=device)) \
            * torch.tensor(dilation, device=device)
        index_ = _index(cs, be, index) if c > 0 else None  # (a 1x1 map needs no lookup at all)
        if c > 0 and be.full_subm_lookup(index_):
            # every offset in one gather each beats half of them plus the mirror scatter
            nbr = be.neighbor_table(index_, cs.coords, cs.spatial_shape, (1, 1), offsets, (1, 1))
            return BuiltMap(cs, KernelMap(nbr, n, ksize, symmetric=True, identity_offset=c))
        nbr = torch.empty((K, n), dtype=torch.int32, device=cs.coords.device)
        if c > 0:
            # Look up half the offsets; the map is symmetric, so the mirror half is a scatter.
            nbr[:c] = be.neighbor_table(index_, cs.coords, cs.spatial_shape, (1, 1), offsets[:c], (1, 1))
            nbr[c + 1:] = -1
            _mirror_fill(nbr, c)
        nbr[c] = torch.arange(n, dtype=torch.int32, device=nbr.device)
        return BuiltMap(cs, KernelMap(nbr, n, ksize, symmetric=True, identity_offset=c))

    return x.coordinate_manager.get_or_build(key, build)


# -- strided convolution ------------------------------------------------------------------
def _scatter_candidates(cand_keys, valid, K, device):
    """Unique output keys from candidate ``[K, N_in]`` keys and the ``nbr`` table they imply."""
    k_idx, i_idx = valid.nonzero(as_tuple=True)
    keys = cand_keys[k_idx, i_idx]
    out_keys, inv = torch.unique(keys, return_inverse=True)
    nbr = torch.full((K, out_keys.numel()), -1, dtype=torch.int32, device=device)
    nbr[k_idx, inv] = i_idx.to(torch.int32)
    return out_keys, nbr


def conv_map(x: SparseTensor, ksize: Pair, stride: Pair, padding: Pair, dilation: Pair, be: Optional[Backend] = None,
             *, occupancy_max_keys: Optional[int] = None) -> BuiltMap:
    """Strided conv / pool: output sites = every output position whose receptive field holds an
    active input (DESIGN §2), in raster order. ``be``: a backend whose fused builder is used
    when it has one (None: the generic builder). ``occupancy_max_keys``: the largest output key
    space a k == s map is built on an occupancy grid for (default :func:`occupancy_limit`;
    ``unique`` over the candidates beyond; both give the same map)."""
    cs = x.coord_set
    key = MapKey("conv", cs.name, ksize, stride, padding, dilation)

    def build() -> BuiltMap:
        H, W = cs.spatial_shape
        Ho = conv_output_size(H, ksize[0], stride[0], padding[0], dilation[0])
        Wo = conv_output_size(W, ksize[1], stride[1], padding[1], dilation[1])
        if Ho < 1 or Wo < 1:
            raise ValueError(
                f"input spatial_shape {cs.spatial_shape} is too small for kernel_size={ksize}, "
                f"stride={stride}, padding={padding}, dilation={dilation} (output would be {(Ho, Wo)})"
            )
        out_shape = (Ho, Wo)
        fused = None if be is None else be.build_conv_table(cs, ksize, stride, padding, dilation)
        if fused is not None:
            return _strided_out(x, key, None, out_shape, stride, fused[1], ksize, out_coords=fused[0])
        device = cs.coords.device
        K = ksize[0] * ksize[1]
        c = cs.coords.long()
        b, iy, ix = c[:, 0], c[:, 1], c[:, 2]
        if tuple(ksize) == tuple(stride) and padding == (0, 0) and dilation == (1, 1):
            # Non-overlapping windows (the k=2, s=2 down-sampling case): one output per
            # input, found by integer division; the remainder is the kernel offset.
            oy, ox = iy // stride[0], ix // stride[1]
            k = (iy % stride[0]) * ksize[1] + (ix % stride[1])
            valid = (oy < Ho) & (ox < Wo)
            okeys = (b * Ho + oy) * Wo + ox
            key_space = cs.batch_size * Ho * Wo
            limit = occupancy_limit(cs.num) if occupancy_max_keys is None else occupancy_max_keys
            if key_space <= limit:
                # Occupancy over the output grid: its non-zeros are the sorted unique output
                # keys and its running count their rows, with no sort of the candidates.
                src = None if bool(valid.all()) else valid.nonzero().squeeze(1)  # all: H, W even
                if src is not None:
                    k, okeys = k.index_select(0, src), okeys.index_select(0, src)
                occupied = torch.zeros(key_space, dtype=torch.bool, device=device)
                occupied[okeys] = True
                out_keys = occupied.nonzero().squeeze(1)
                row = torch.cumsum(occupied, 0) - 1
                nbr = torch.full((K, out_keys.numel()), -1, dtype=torch.int32, device=device)
                rows = torch.arange(cs.num, dtype=torch.int32, device=device) if src is None else src.to(torch.int32)
                nbr[k, row.index_select(0, okeys)] = rows
                return _strided_out(x, key, out_keys, out_shape, stride, nbr, ksize)
            cand = torch.full((K, cs.num), -1, dtype=torch.long, device=device)
            vmask = torch.zeros((K, cs.num), dtype=torch.bool, device=device)
            rows = torch.arange(cs.num, device=device)
            cand[k, rows] = okeys
            vmask[k, rows] = valid
        else:
            offs = kernel_offsets(ksize, device)
            qy = iy.unsqueeze(0) + padding[0] - offs[:, 0:1] * dilation[0]  # = oy * s
            qx = ix.unsqueeze(0) + padding[1] - offs[:, 1:2] * dilation[1]
            oy = torch.div(qy, stride[0], rounding_mode="floor")
            ox = torch.div(qx, stride[1], rounding_mode="floor")
            vmask = (oy * stride[0] == qy) & (ox * stride[1] == qx) & (oy >= 0) & (oy < Ho) & (ox >= 0) & (ox < Wo)
            cand = (b.unsqueeze(0) * Ho + oy) * Wo + ox
        out_keys, nbr = _scatter_candidates(cand, vmask, K, device)
        return _strided_out(x, key, out_keys, out_shape, stride, nbr, ksize)

    return x.coordinate_manager.get_or_build(key, build)


def _strided_out(x: SparseTensor, key: MapKey, out_keys, out_shape, stride, nbr, ksize, out_coords=None) -> BuiltMap:
    """The output set (registered with the manager) and the map of a strided conv / pool from
    its sorted unique output keys (or its raster-ordered output coordinates)."""
    cs = x.coord_set
    out_cs = CoordSet(
        unpack_keys(out_keys, out_shape) if out_coords is None else out_coords, out_shape, cs.batch_size,
        (cs.stride[0] * stride[0], cs.stride[1] * stride[1]), keys=out_keys, name=key,
    )
    return BuiltMap(x.coordinate_manager.add(out_cs), KernelMap(nbr, cs.num, ksize))


# -- transposed convolution ---------------------------------------------------------------
def conv_transpose_map(x: SparseTensor, ksize: Pair, stride: Pair, padding: Pair, dilation: Pair,
                       output_padding: Pair = (0, 0), be: Optional[Backend] = None) -> BuiltMap:
    """Generative transposed conv: every output site that receives a contribution, raster order
    (``be``: as in :func:`conv_map`)."""
    cs = x.coord_set
    key = MapKey("convT", cs.name, ksize, stride, padding, dilation, output_padding)

    def build() -> BuiltMap:
        H, W = cs.spatial_shape
        Ho = conv_transpose_output_size(H, ksize[0], stride[0], padding[0], dilation[0], output_padding[0])
        Wo = conv_transpose_output_size(W, ksize[1], stride[1], padding[1], dilation[1], output_padding[1])
        if Ho < 1 or Wo < 1:
            raise ValueError(f"transposed conv output size {(Ho, Wo)} is empty for input {cs.spatial_shape}")
        out_shape = (Ho, Wo)
        out_stride = (max(1, cs.stride[0] // stride[0]), max(1, cs.stride[1] // stride[1]))
        fused = None if be is None else be.build_conv_transpose_table(cs, ksize, stride, padding, dilation,
                                                                       output_padding)
        if fused is not None:
            out_cs = CoordSet(fused[0], out_shape, cs.batch_size, out_stride, name=key)
            return BuiltMap(x.coordinate_manager.add(out_cs), KernelMap(fused[1], cs.num, ksize))
        device = cs.coords.device
        K = ksize[0] * ksize[1]
        c = cs.coords.long()
        offs = kernel_offsets(ksize, device)
        oy = c[:, 1].unsqueeze(0) * stride[0] - padding[0] + offs[:, 0:1] * dilation[0]
        ox = c[:, 2].unsqueeze(0) * stride[1] - padding[1] + offs[:, 1:2] * dilation[1]
        vmask = (oy >= 0) & (oy < Ho) & (ox >= 0) & (ox < Wo)
        cand = (c[:, 0].unsqueeze(0) * Ho + oy) * Wo + ox
        out_keys, nbr = _scatter_candidates(cand, vmask, K, device)
        out_cs = CoordSet(unpack_keys(out_keys, out_shape), out_shape, cs.batch_size, out_stride, keys=out_keys,
                          name=key)
        return BuiltMap(x.coordinate_manager.add(out_cs), KernelMap(nbr, cs.num, ksize))

    return x.coordinate_manager.get_or_build(key, build)


def conv_transpose_to_map(x: SparseTensor, target: SparseTensor, ksize: Pair, stride: Pair, padding: Pair,
                          dilation: Pair, be: Backend, index: Optional[str] = None) -> BuiltMap:
    """Transposed conv evaluated exactly at ``target``'s sites (the U-Net decoder case); ``out``
    is ``target``'s set.

    When ``x``'s sites were produced from ``target``'s by the conv of the same geometry, the
    map is that conv's map transposed (no lookup at all)."""
    manager = x.coordinate_manager
    if manager is not target.coordinate_manager:
        raise ValueError(
            "output= must be a tensor derived from the same input as x (they share a coordinate manager)"
        )
    cs, ts = x.coord_set, target.coord_set
    if cs.batch_size != ts.batch_size:
        raise ValueError(f"output= has batch_size {ts.batch_size}, x has {cs.batch_size}")
    for d, (n_in, n_t) in enumerate(zip(cs.spatial_shape, ts.spatial_shape)):
        natural = conv_transpose_output_size(n_in, ksize[d], stride[d], padding[d], dilation[d])
        if not 0 <= n_t - natural < max(stride[d], dilation[d]):
            raise ValueError(
                f"output= has spatial_shape {ts.spatial_shape}, which this transposed conv cannot produce from "
                f"{cs.spatial_shape} (kernel_size={ksize}, stride={stride}, padding={padding}, dilation={dilation})"
            )
    key = MapKey("convT_to", cs.name, ksize, stride, padding, dilation, target=ts.name)

    def build() -> BuiltMap:
        down = manager.cached_map(MapKey("conv", ts.name, ksize, stride, padding, dilation))
        if down is not None and down.out is cs:
            return BuiltMap(ts, down.kmap.transpose(be.reverse_table(down.kmap)))
        offs = kernel_offsets(ksize, cs.coords.device)
        offsets = torch.stack((padding[0] - offs[:, 0] * dilation[0], padding[1] - offs[:, 1] * dilation[1]), 1)
        nbr = be.build_lookup_table(cs, ts.coords, (1, 1), offsets, stride, _strategy(cs, be, index))
        if nbr is None:
            nbr = be.neighbor_table(_index(cs, be, index), ts.coords, cs.spatial_shape, (1, 1), offsets, stride)
        return BuiltMap(ts, KernelMap(nbr, cs.num, ksize))

    return manager.get_or_build(key, build)
