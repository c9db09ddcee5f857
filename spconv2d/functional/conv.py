"""Sparse convolutions as functions of explicit weights, with autograd.

Weights use PyTorch's dense layouts (``[out, in, kh, kw]`` for convs, ``[in, out, kh, kw]`` for
transposed convs); they are viewed as ``[K, in, out]`` GEMM operands for the backends. Each op
equals its dense oracle (DESIGN §2) at its output sites, forward and backward.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch

from .. import backends, maps
from ..backends import BackendSpec
from ..geometry import conv_geometry, pair
from ..profiler import Recorder
from ..tensor import SparseTensor, at_sites


class SparseConvFunction(torch.autograd.Function):
    """``out = bias + sum_k features[nbr[k]] @ weight[k]`` over a ``KernelMap``."""

    @staticmethod
    def forward(ctx, features, weight, bias, kmap, be):
        ctx.save_for_backward(features, weight)
        ctx.kmap, ctx.be, ctx.has_bias = kmap, be, bias is not None
        return be.conv_forward(features.contiguous(), weight.contiguous(), bias, kmap)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        features, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_in = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_in = ctx.be.conv_backward_input(grad_out, weight.contiguous(), ctx.kmap)
        if ctx.needs_input_grad[1]:
            grad_w = ctx.be.conv_backward_weight(features.contiguous(), grad_out, ctx.kmap).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(0, dtype=torch.float32 if grad_out.dtype != torch.float64 else None).to(grad_out.dtype)
        return grad_in, grad_w, grad_b, None, None


def _check_weight(x: SparseTensor, weight: torch.Tensor, bias: Optional[torch.Tensor], in_dim: int, op: str):
    """The arguments every conv shares, checked before any dispatch: ``x`` a SparseTensor,
    ``weight`` a floating-point 4-d tensor with kernel sizes >= 1 and ``x``'s channels, ``bias``
    None or ``[out]``; all on ``x``'s device and of ``x``'s dtype (as ``F.conv2d`` requires;
    under ``torch.autocast`` all three are cast to the autocast dtype instead)."""
    if not isinstance(x, SparseTensor):
        raise TypeError(f"{op}: expected a SparseTensor, got {type(x).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{op}: weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 4:
        raise ValueError(f"{op}: weight must be a 4-d tensor, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"{op}: weight must be floating point, got {weight.dtype}")
    if min(weight.shape[2:]) < 1:
        raise ValueError(f"{op}: kernel sizes must be >= 1, got weight shape {tuple(weight.shape)}")
    if weight.shape[in_dim] != x.num_channels:
        raise ValueError(
            f"{op}: input has {x.num_channels} channels but weight {tuple(weight.shape)} expects {weight.shape[in_dim]}"
        )
    if weight.device != x.device:
        raise ValueError(f"{op}: weight is on {weight.device} but the input is on {x.device}")
    out_ch = weight.shape[1 - in_dim]
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"{op}: bias must be None or a torch.Tensor, got {type(bias).__name__}")
        if tuple(bias.shape) != (out_ch,):
            raise ValueError(f"{op}: bias must have shape ({out_ch},), got {tuple(bias.shape)}")
        if bias.device != x.device:
            raise ValueError(f"{op}: bias is on {bias.device} but the input is on {x.device}")
    if not torch.is_autocast_enabled(x.device.type):
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.dtype != x.dtype:
                raise TypeError(f"{op}: features are {x.dtype} but the {name} is {t.dtype}; "
                                f"they must match (or run under torch.autocast)")


def _run(features, weight_kio, bias, kmap, be, relu: bool = False):
    """Apply the conv (``relu``: then ``max(., 0)``) under ``torch.autocast`` rules of
    ``nn.Conv2d`` (lower-precision op)."""
    dev = features.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        features, weight_kio = features.to(dt), weight_kio.to(dt)
        bias = bias.to(dt) if bias is not None else None
        with torch.autocast(dev, enabled=False):
            return _apply(features, weight_kio, bias, kmap, be, relu)
    return _apply(features, weight_kio, bias, kmap, be, relu)


def _apply(features, weight_kio, bias, kmap, be, relu: bool):
    if _records(features, weight_kio, bias):
        out = SparseConvFunction.apply(features, weight_kio, bias, kmap, be)
        return torch.relu(out) if relu else out
    # nothing to record (inference): the backend directly, without the autograd.Function's
    # cost; the ReLU in the backend's epilogue where it has one
    f, w = features.contiguous(), weight_kio.contiguous()
    return be.conv_forward_relu(f, w, bias, kmap) if relu else be.conv_forward(f, w, bias, kmap)


def _records(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _relu(t: torch.Tensor) -> torch.Tensor:
    """``max(t, 0)`` of a fresh result: in place unless autograd records it."""
    return torch.relu(t) if _records(t) else t.relu_()


def check_output_padding(op: str, output_padding, stride, dilation):
    """``output_padding`` as ``nn.ConvTranspose2d`` requires: ``0 <= output_padding <
    max(stride, dilation)`` per dimension (with ``output=`` the target's shape decides it)."""
    output_padding = pair(output_padding, f"{op}: output_padding", 0)
    for d in range(2):
        if output_padding[d] >= max(stride[d], dilation[d]):
            raise ValueError(f"{op}: output_padding {output_padding} must be smaller than stride {stride} "
                             f"or dilation {dilation}")
    return output_padding


#: Weights in the ``[K, in, out]`` layout, contiguous, for calls autograd does not record: per
#: weight tensor, valid while it is the same object with the same version and storage.
_KIO: dict = {}
_KIO_MAX = 256


def _as_kio(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """``[out, in, kh, kw]`` (or ``[in, out, kh, kw]`` if transposed) -> ``[K, in, out]``: a view
    where autograd records the op; else a contiguous copy, kept per weight tensor (the copy is a
    transposition, ~2 ns per element on the development VM: 14 of them took ~0.6 ms of a cProfiled
    ``sparse_unet`` forward). An in-place change of the weight bumps its version (and a new
    tensor is a new object): the copy is made again then."""
    a, b, kh, kw = weight.shape
    perm = (2, 3, 0, 1) if transposed else (2, 3, 1, 0)
    shape = (kh * kw, *((a, b) if transposed else (b, a)))
    if (weight.requires_grad and torch.is_grad_enabled()) or weight.is_inference():
        return weight.permute(*perm).reshape(shape)
    key = (id(weight), transposed)
    hit = _KIO.get(key)
    if hit is not None and hit[0]() is weight and hit[1] == weight._version and hit[2] == weight.data_ptr():
        return hit[3]
    kio = weight.permute(*perm).reshape(shape).contiguous()
    if len(_KIO) >= _KIO_MAX:
        _KIO.pop(next(iter(_KIO)))

    def forget(ref, key=key):  # (the weight is gone: its id may be reused)
        entry = _KIO.get(key)
        if entry is not None and entry[0] is ref:
            del _KIO[key]

    _KIO[key] = (weakref.ref(weight, forget), weight._version, weight.data_ptr(), kio)
    return kio


def subm_conv2d(x: SparseTensor, weight, bias=None, dilation=1, *, relu: bool = False,
                backend: Optional[BackendSpec] = None, index: Optional[str] = None) -> SparseTensor:
    """Submanifold conv: output sites = input sites, values = ``F.conv2d(dense, w, b,
    padding=dilation*(k//2), dilation=dilation)`` there. Odd kernel sizes only. ``relu``: the
    values are ``max(., 0)`` (without autograd, in the backend's epilogue where it has one: the
    numba backend clamps the outputs as it writes them). ``backend``: a name or instance
    (default: the one in force, see ``sp.backend``); ``index``: the coordinate index strategy
    for the map build."""
    _check_weight(x, weight, bias, 1, "subm_conv2d")
    backends.check_index_strategy(index)
    ksize, dilation = tuple(weight.shape[2:]), pair(dilation, "subm_conv2d: dilation", 1)
    if ksize[0] % 2 == 0 or ksize[1] % 2 == 0:
        raise ValueError(f"subm_conv2d needs odd kernel sizes, got {ksize}")
    be = backends.resolve(x.device, backend)
    rec = Recorder.start()
    K, c_in, c_out, grid = ksize[0] * ksize[1], weight.shape[1], weight.shape[0], x.coord_set.key_space
    if be.prefers_dense_subm(x.density, c_in, c_out):
        # Nearly every pixel is active: the dense oracle itself is the fastest exact answer, in
        # channels-last (the scatter's own layout; the output is read back by a row gather).
        pad = (dilation[0] * (ksize[0] // 2), dilation[1] * (ksize[1] // 2))
        dense = torch.nn.functional.conv2d(x.to_dense(torch.channels_last), weight, bias, padding=pad,
                                           dilation=dilation)
        y = x.replace(_relu(at_sites(dense, x.coords)) if relu else at_sites(dense, x.coords))
        rec.done("subm_conv2d", "dense", x, y, c_in, c_out, K, None, grid)
        return y
    if K == 1:
        # a 1x1 conv maps every site to itself: one GEMM on the features, no map (the zoo's
        # heads; faster than building the map and running the gathered kernel, measured in
        # docs/ARCHITECTURE.md, "Measured choices")
        lin = torch.nn.functional.linear(x.features, weight[:, :, 0, 0], bias)
        y = x.replace(_relu(lin) if relu else lin)
        rec.done("subm_conv2d", "sparse", x, y, c_in, c_out, K, x.num_active, grid)
        return y
    kmap = maps.subm_map(x, ksize, dilation, be, index).kmap
    y = x.replace(_run(x.features, _as_kio(weight, False), bias, kmap, be, relu))
    if rec.prof is not None:
        rec.done("subm_conv2d", "sparse", x, y, c_in, c_out, K, kmap.num_pairs, grid)
    return y


def conv2d(x: SparseTensor, weight, bias=None, stride=1, padding=0, dilation=1, *, relu: bool = False,
           backend: Optional[BackendSpec] = None) -> SparseTensor:
    """Strided sparse conv: output sites = positions of ``F.conv2d(dense, ...)`` whose
    receptive field holds an active input; values = that dense conv there (``relu``: as in
    ``subm_conv2d``)."""
    _check_weight(x, weight, bias, 1, "conv2d")
    ksize, stride, padding, dilation = conv_geometry("conv2d", tuple(weight.shape[2:]), stride, padding, dilation)
    be = backends.resolve(x.device, backend)
    rec = Recorder.start()
    built = maps.conv_map(x, ksize, stride, padding, dilation, be)
    y = x.derive(_run(x.features, _as_kio(weight, False), bias, built.kmap, be, relu), built.out)
    if rec.prof is not None:
        rec.done("conv2d", "sparse", x, y, weight.shape[1], weight.shape[0], built.kmap.kernel_volume,
                 built.kmap.num_pairs, built.out.key_space)
    return y


def conv_transpose2d(x: SparseTensor, weight, bias=None, stride=1, padding=0, dilation=1, output_padding=0, *,
                     output: Optional[SparseTensor] = None, relu: bool = False,
                     backend: Optional[BackendSpec] = None, index: Optional[str] = None) -> SparseTensor:
    """Sparse transposed conv. Generative by default (every site of ``F.conv_transpose2d`` that
    receives a contribution); with ``output=skip``, exactly at ``skip``'s sites and shape
    (``relu``: as in ``subm_conv2d``)."""
    _check_weight(x, weight, bias, 0, "conv_transpose2d")
    ksize, stride, padding, dilation = conv_geometry("conv_transpose2d", tuple(weight.shape[2:]), stride, padding,
                                                     dilation)
    output_padding = check_output_padding("conv_transpose2d", output_padding, stride, dilation)
    if output is not None and not isinstance(output, SparseTensor):
        raise TypeError(f"conv_transpose2d: output= must be a SparseTensor, got {type(output).__name__}")
    backends.check_index_strategy(index)
    be = backends.resolve(x.device, backend)
    rec = Recorder.start()
    w = _as_kio(weight, True)
    if output is not None:
        built = maps.conv_transpose_to_map(x, output, ksize, stride, padding, dilation, be, index)
        y = output.replace(_run(x.features, w, bias, built.kmap, be, relu))
    else:
        built = maps.conv_transpose_map(x, ksize, stride, padding, dilation, output_padding, be)
        y = x.derive(_run(x.features, w, bias, built.kmap, be, relu), built.out)
    if rec.prof is not None:
        rec.done("conv_transpose2d", "sparse", x, y, weight.shape[0], weight.shape[1], built.kmap.kernel_volume,
                 built.kmap.num_pairs, x.coord_set.key_space)
    return y
