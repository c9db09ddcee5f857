"""Kernel-map builders: output coordinates and ``nbr`` tables for every convolution geometry.

Each builder is cached in the tensor's ``CoordinateManager`` under a key naming the op, the
input coordinate set and the geometry, so every layer with the same geometry on the same
sites shares one map (and its derived tables), forward and backward.

Geometry (the dense oracle, ``F.conv2d`` / ``F.conv_transpose2d`` cross-correlation):
  conv        output site o reads input ``i = o*s - p + k*r``
  transposed  output site o receives input i where ``o = i*s - p + k*r``
  submanifold conv with ``s = 1, p = r*(k//2)``, output sites = input sites
"""
from __future__ import annotations

from typing import Tuple

import torch

from . import backends as _dispatch
from .coords import CoordSet, unpack_keys
from .kernel_map import KernelMap
from .tensor import SparseTensor

Pair = Tuple[int, int]

# Non-overlapping strided maps (k == s) find their output sites on an occupancy grid over the
# output key space (no sort) while it has at most this many keys per input site, or this many.
OCCUPANCY_KEYS_PER_SITE = 8
OCCUPANCY_MIN_KEYS = 1 << 16


def conv_output_size(size: int, k: int, s: int, p: int, r: int) -> int:
    return (size + 2 * p - r * (k - 1) - 1) // s + 1


def conv_transpose_output_size(size: int, k: int, s: int, p: int, r: int, output_padding: int = 0) -> int:
    return (size - 1) * s - 2 * p + r * (k - 1) + output_padding + 1


def _kernel_offsets(ksize: Pair, device) -> torch.Tensor:
    """``[K, 2]`` (ky, kx) in row-major order: offset index ``k = ky * kw + kx``."""
    ky, kx = torch.meshgrid(torch.arange(ksize[0]), torch.arange(ksize[1]), indexing="ij")
    return torch.stack((ky.reshape(-1), kx.reshape(-1)), 1).to(device)


def _index(cs: CoordSet, be, index: str = None):
    return cs.index(be, _dispatch.resolve_index_strategy(be, cs.key_space, index, cs.num))


def _mirror_fill(nbr: torch.Tensor, half: int) -> None:
    """Fill offsets ``K-1-k`` (k < half) of a symmetric map from offsets ``k``."""
    K = nbr.shape[0]
    k, j = (nbr[:half] >= 0).nonzero(as_tuple=True)
    nbr[K - 1 - k, nbr[k, j].long()] = j.to(torch.int32)


# -- submanifold --------------------------------------------------------------------------
def subm_map(x: SparseTensor, ksize: Pair, dilation: Pair, be, index: str = None) -> KernelMap:
    cs = x._cs
    key = ("subm", cs.name, ksize, dilation)

    def build() -> KernelMap:
        K, n = ksize[0] * ksize[1], cs.num
        c = K // 2
        offsets = (_kernel_offsets(ksize, cs.coords.device) - torch.tensor([ksize[0] // 2, ksize[1] // 2], device=cs.coords.device)) \
            * torch.tensor(dilation, device=cs.coords.device)
        index_ = _index(cs, be, index) if c > 0 else None  # (a 1x1 map needs no lookup at all)
        if c > 0 and getattr(be, "full_subm_lookup", lambda i: False)(index_):
            # every offset in one gather each beats half of them plus the mirror scatter
            nbr = be.neighbor_table(index_, cs.coords, cs.spatial_shape, (1, 1), offsets, (1, 1))
            return KernelMap(nbr, n, ksize, symmetric=True, identity_offset=c)
        nbr = torch.empty((K, n), dtype=torch.int32, device=cs.coords.device)
        if c > 0:
            # Look up half the offsets; the map is symmetric, so the mirror half is a scatter.
            nbr[:c] = be.neighbor_table(index_, cs.coords, cs.spatial_shape, (1, 1), offsets[:c], (1, 1))
            nbr[c + 1:] = -1
            _mirror_fill(nbr, c)
        nbr[c] = torch.arange(n, dtype=torch.int32, device=nbr.device)
        return KernelMap(nbr, n, ksize, symmetric=True, identity_offset=c)

    return x._manager.get_or_build(key, build)


# -- strided convolution ------------------------------------------------------------------
def _scatter_candidates(cand_keys, valid, out_shape, batch_size, n_in, K, device):
    """Unique output keys from candidate ``[K, N_in]`` keys and the ``nbr`` table they imply."""
    k_idx, i_idx = valid.nonzero(as_tuple=True)
    keys = cand_keys[k_idx, i_idx]
    out_keys, inv = torch.unique(keys, return_inverse=True)
    nbr = torch.full((K, out_keys.numel()), -1, dtype=torch.int32, device=device)
    nbr[k_idx, inv] = i_idx.to(torch.int32)
    return out_keys, nbr


def conv_map(x: SparseTensor, ksize: Pair, stride: Pair, padding: Pair, dilation: Pair):
    """Output ``CoordSet`` and ``KernelMap`` of a strided conv / pool (DESIGN §2 sites)."""
    cs = x._cs
    key = ("conv", cs.name, ksize, stride, padding, dilation)

    def build():
        H, W = cs.spatial_shape
        Ho = conv_output_size(H, ksize[0], stride[0], padding[0], dilation[0])
        Wo = conv_output_size(W, ksize[1], stride[1], padding[1], dilation[1])
        if Ho < 1 or Wo < 1:
            raise ValueError(
                f"input spatial_shape {cs.spatial_shape} is too small for kernel_size={ksize}, "
                f"stride={stride}, padding={padding}, dilation={dilation} (output would be {(Ho, Wo)})"
            )
        out_shape = (Ho, Wo)
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
            if key_space <= max(OCCUPANCY_KEYS_PER_SITE * cs.num, OCCUPANCY_MIN_KEYS):
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
                return _strided_out(x, cs, key, out_keys, out_shape, stride, nbr, ksize)
            cand = torch.full((K, cs.num), -1, dtype=torch.long, device=device)
            vmask = torch.zeros((K, cs.num), dtype=torch.bool, device=device)
            rows = torch.arange(cs.num, device=device)
            cand[k, rows] = okeys
            vmask[k, rows] = valid
        else:
            offs = _kernel_offsets(ksize, device).long()
            qy = iy.unsqueeze(0) + padding[0] - offs[:, 0:1] * dilation[0]  # = oy * s
            qx = ix.unsqueeze(0) + padding[1] - offs[:, 1:2] * dilation[1]
            oy = torch.div(qy, stride[0], rounding_mode="floor")
            ox = torch.div(qx, stride[1], rounding_mode="floor")
            vmask = (oy * stride[0] == qy) & (ox * stride[1] == qx) & (oy >= 0) & (oy < Ho) & (ox >= 0) & (ox < Wo)
            cand = (b.unsqueeze(0) * Ho + oy) * Wo + ox
        out_keys, nbr = _scatter_candidates(cand, vmask, out_shape, cs.batch_size, cs.num, K, device)
        return _strided_out(x, cs, key, out_keys, out_shape, stride, nbr, ksize)

    return x._manager.get_or_build(key, build)


def _strided_out(x, cs, key, out_keys, out_shape, stride, nbr, ksize):
    """The output ``CoordSet`` (registered with the manager) and the ``KernelMap`` of a strided
    conv / pool from its sorted unique output keys."""
    out_cs = CoordSet(
        unpack_keys(out_keys, out_shape), out_shape, cs.batch_size,
        (cs.stride[0] * stride[0], cs.stride[1] * stride[1]), name=key,
    )
    out_cs._keys = out_keys.to(out_cs.key_dtype)
    out_cs = x._manager.add(out_cs)
    return out_cs, KernelMap(nbr, cs.num, ksize)


# -- transposed convolution ---------------------------------------------------------------
def conv_transpose_map(x: SparseTensor, ksize: Pair, stride: Pair, padding: Pair, dilation: Pair,
                       output_padding: Pair = (0, 0)):
    """Generative transposed conv: every output site that receives a contribution."""
    cs = x._cs
    key = ("convT", cs.name, ksize, stride, padding, dilation, output_padding)

    def build():
        H, W = cs.spatial_shape
        Ho = conv_transpose_output_size(H, ksize[0], stride[0], padding[0], dilation[0], output_padding[0])
        Wo = conv_transpose_output_size(W, ksize[1], stride[1], padding[1], dilation[1], output_padding[1])
        if Ho < 1 or Wo < 1:
            raise ValueError(f"transposed conv output size {(Ho, Wo)} is empty for input {cs.spatial_shape}")
        out_shape = (Ho, Wo)
        device = cs.coords.device
        K = ksize[0] * ksize[1]
        c = cs.coords.long()
        offs = _kernel_offsets(ksize, device).long()
        oy = c[:, 1].unsqueeze(0) * stride[0] - padding[0] + offs[:, 0:1] * dilation[0]
        ox = c[:, 2].unsqueeze(0) * stride[1] - padding[1] + offs[:, 1:2] * dilation[1]
        vmask = (oy >= 0) & (oy < Ho) & (ox >= 0) & (ox < Wo)
        cand = (c[:, 0].unsqueeze(0) * Ho + oy) * Wo + ox
        out_keys, nbr = _scatter_candidates(cand, vmask, out_shape, cs.batch_size, cs.num, K, device)
        out_stride = (max(1, cs.stride[0] // stride[0]), max(1, cs.stride[1] // stride[1]))
        out_cs = CoordSet(unpack_keys(out_keys, out_shape), out_shape, cs.batch_size, out_stride, name=key)
        out_cs._keys = out_keys.to(out_cs.key_dtype)
        out_cs = x._manager.add(out_cs)
        return out_cs, KernelMap(nbr, cs.num, ksize)

    return x._manager.get_or_build(key, build)


def conv_transpose_to_map(x: SparseTensor, target: SparseTensor, ksize: Pair, stride: Pair, padding: Pair,
                          dilation: Pair, be, index: str = None) -> KernelMap:
    """Transposed conv evaluated exactly at ``target``'s sites (the U-Net decoder case).

    When ``x``'s sites were produced from ``target``'s by the conv of the same geometry, the
    map is that conv's map transposed (no lookup at all)."""
    if x._manager is not target._manager:
        raise ValueError(
            "output= must be a tensor derived from the same input as x (they share a coordinate manager)"
        )
    cs, ts = x._cs, target._cs
    if cs.batch_size != ts.batch_size:
        raise ValueError(f"output= has batch_size {ts.batch_size}, x has {cs.batch_size}")
    for d, (n_in, n_t) in enumerate(zip(cs.spatial_shape, ts.spatial_shape)):
        natural = conv_transpose_output_size(n_in, ksize[d], stride[d], padding[d], dilation[d])
        if not 0 <= n_t - natural < max(stride[d], dilation[d]):
            raise ValueError(
                f"output= has spatial_shape {ts.spatial_shape}, which this transposed conv cannot produce from "
                f"{cs.spatial_shape} (kernel_size={ksize}, stride={stride}, padding={padding}, dilation={dilation})"
            )
    key = ("convT_to", cs.name, ts.name, ksize, stride, padding, dilation)

    def build() -> KernelMap:
        down = x._manager.maps.get(("conv", ts.name, ksize, stride, padding, dilation))
        if down is not None and down[0] is cs:
            return down[1].transpose()
        offs = _kernel_offsets(ksize, cs.coords.device).long()
        offsets = torch.stack((padding[0] - offs[:, 0] * dilation[0], padding[1] - offs[:, 1] * dilation[1]), 1)
        nbr = be.neighbor_table(_index(cs, be, index), ts.coords, cs.spatial_shape, (1, 1), offsets, stride)
        return KernelMap(nbr, cs.num, ksize)

    return x._manager.get_or_build(key, build)
