"""Sparse convolution: output-stationary gather-GEMM (forward, input gradient) and the split
gathered-GEMM weight gradient.

Contract
--------
Shapes: ``features [N_in, C_in]``, ``weight [K, C_in, C_out]`` (any strides), ``nbr [K, N_out]``
int32 (-1 = missing), ``bias [C_out]`` or None.

**Forward** (``sparse_conv``)::

    out[j, :] = bias + sum_k  features[nbr[k, j], :] @ weight[k]      (missing terms are 0)

One program owns ``BLOCK_N`` output rows x ``BLOCK_CO`` output channels, loops over the kernel
offsets its tile uses and over ``BLOCK_CI`` input-channel chunks, gathers input rows through
``nbr`` (masked loads, -1 -> 0), ``tl.dot``s them with the offset's weight chunk into an fp32
accumulator, adds the bias and writes every output row exactly once: **no atomics,
deterministic** (the summation order is fixed by the tile shape). Optional plan (see
:func:`tile_plan`): ``perm`` (int32 ``[N_out]``) processes rows in mask-sorted order, the output
is written through it; ``submasks`` (int64, one offset bitmask per 16 consecutive rows of the
processing order) lets a tile skip the offsets none of its rows uses. Without ``submasks``
(``K > 64``) every offset is visited; the result is identical.

**Input gradient** (``sparse_conv_backward_input``) is the same kernel on the reverse table
``rev [K, N_in]`` (``rev[k, i] = j <=> nbr[k, j] = i``; for a submanifold map ``nbr.flip(0)``)
with the weight transposed per offset (a stride view ``[K, C_out, C_in]``, no copy)::

    grad_in[i, :] = sum_k grad_out[rev[k, i], :] @ weight[k].T

**Weight gradient** (``sparse_conv_weight_grad``), over the per-offset pair lists (CSR ``ptr``,
``in_idx``, ``out_idx``)::

    grad_w[k] = sum_{p in ptr[k]:ptr[k+1]}  features[in_idx[p]].T  (outer)  grad_out[out_idx[p]]

Each offset's pairs are split into ``S`` equal chunks; one program computes one chunk's
``[BLOCK_CI, BLOCK_CO]`` block into an fp32 partial ``[K, S, C_in, C_out]``; the partials are
summed over ``S`` with ``torch.sum`` (no atomics, deterministic). Result fp32, cast to
``out_dtype`` (default: the features' dtype).

Precision: fp16/bf16 operands, fp32 accumulation, output in the input dtype (fp64 operands
accumulate in fp64: meant for the interpreter; untested on GPUs). fp32 operands use
exact ``input_precision="ieee"`` dot products unless TF32 is requested (``allow_tf32=True``) or,
with ``allow_tf32=None``, enabled in PyTorch (``torch.backends.cuda.matmul`` ``fp32_precision ==
"tf32"`` or ``allow_tf32``). The interpreter ignores ``input_precision`` (always exact).
The weight is cast to the features' dtype. Channel tails (any ``C_in``/``C_out``) are masked;
pointer offsets ``row * stride`` are computed in int64. ``N = 0`` returns without launching.

Autotune: keyed on ``C_in``, ``C_out``, ``K`` (and the argument dtypes), never on the row count
(``n_rows`` is also excluded from specialisation); configurations with channel blocks much
larger than the channels are pruned. Under the interpreter (``TRITON_INTERPRET=1``) there is
exactly one configuration, with every tile dim >= 16 (``tl.dot``'s minimum on GPUs).
"""
from __future__ import annotations

import warnings
from typing import List, NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl

from . import interpreting
from .neighbors import (MAX_MASK_OFFSETS, SUBTILE, mask_sorted_order, row_offset_masks,
                        subtile_offset_masks, tile_offset_work)

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def tf32_enabled() -> bool:
    """Whether PyTorch's matmul flags ask for TF32 on fp32 operands."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        matmul = torch.backends.cuda.matmul
        prec = getattr(matmul, "fp32_precision", None)
        if prec == "tf32":
            return True
        if prec == "ieee":
            return False
        return bool(getattr(matmul, "allow_tf32", False))


def input_precision(dtype: torch.dtype, allow_tf32: Optional[bool]) -> str:
    """The ``tl.dot`` ``input_precision`` for operands of ``dtype``: ``"tf32"`` or ``"ieee"`` for
    fp32 (``allow_tf32``, or PyTorch's flags when None), ``"ieee"`` otherwise."""
    if dtype == torch.float32:
        use = tf32_enabled() if allow_tf32 is None else bool(allow_tf32)
        return "tf32" if use else "ieee"
    if dtype == torch.float64:
        return "ieee"
    return "tf32"  # ignored for 16-bit operands


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


# --------------------------------------------------------------------------------------------
# autotune configurations
# --------------------------------------------------------------------------------------------
def conv_configs() -> List[triton.Config]:
    """Autotune configurations of :func:`sparse_conv_kernel` (one under the interpreter)."""
    if interpreting():
        return [triton.Config({"BLOCK_N": 32, "BLOCK_CI": 16, "BLOCK_CO": 16}, num_warps=4,
                              num_stages=1)]
    cfgs = []
    for bn, bci, bco, warps, stages in [
        (32, 16, 16, 4, 2), (64, 16, 16, 4, 2), (64, 16, 32, 4, 3), (128, 16, 32, 4, 3),
        (64, 32, 32, 4, 3), (128, 32, 32, 4, 3), (64, 32, 64, 4, 3), (128, 32, 64, 4, 3),
        (64, 64, 64, 4, 3), (128, 64, 64, 8, 3), (64, 32, 128, 4, 3), (128, 32, 128, 8, 3),
        (64, 64, 128, 8, 3), (128, 64, 128, 8, 3), (256, 32, 64, 8, 3),
    ]:
        cfgs.append(triton.Config({"BLOCK_N": bn, "BLOCK_CI": bci, "BLOCK_CO": bco},
                                  num_warps=warps, num_stages=stages))
    return cfgs


def wgrad_configs() -> List[triton.Config]:
    """Autotune configurations of :func:`sparse_conv_wgrad_kernel` (one under the interpreter)."""
    if interpreting():
        return [triton.Config({"BLOCK_P": 32, "BLOCK_CI": 16, "BLOCK_CO": 16}, num_warps=4,
                              num_stages=1)]
    cfgs = []
    for bp, bci, bco, warps, stages in [
        (32, 16, 16, 4, 2), (64, 16, 32, 4, 3), (64, 32, 32, 4, 3), (64, 32, 64, 4, 3),
        (64, 64, 64, 4, 3), (128, 32, 32, 4, 3), (128, 64, 64, 8, 3), (64, 64, 128, 8, 3),
        (64, 128, 128, 8, 3), (128, 128, 128, 8, 3), (32, 64, 64, 4, 4),
    ]:
        cfgs.append(triton.Config({"BLOCK_P": bp, "BLOCK_CI": bci, "BLOCK_CO": bco},
                                  num_warps=warps, num_stages=stages))
    return cfgs


def _prune_channel_blocks(configs, named_args, **kwargs):
    cap_ci = max(16, _next_pow2(named_args["C_in"]))
    cap_co = max(16, _next_pow2(named_args["C_out"]))
    kept = [c for c in configs
            if c.kwargs["BLOCK_CI"] <= cap_ci and c.kwargs["BLOCK_CO"] <= cap_co]
    return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_CI"], c.kwargs["BLOCK_CO"]))]


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@triton.autotune(configs=conv_configs(), key=["C_in", "C_out", "K"],
                 prune_configs_by={"early_config_prune": _prune_channel_blocks})
@triton.jit(do_not_specialize=["n_rows", "n_sub"])
def sparse_conv_kernel(
    x_ptr, w_ptr, bias_ptr, nbr_ptr, perm_ptr, submask_ptr, out_ptr,
    n_rows, n_sub, C_in, C_out, K,
    stride_x_n, stride_x_c, stride_w_k, stride_w_ci, stride_w_co, stride_nbr_k,
    stride_o_n, stride_o_c,
    HAS_BIAS: tl.constexpr, HAS_PERM: tl.constexpr, HAS_MASKS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr, SUB: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr,
):
    """out[r] = bias + sum_k x[nbr[k, r]] @ w[k], r = perm[tile rows] (or the rows themselves)."""
    pid_n = tl.program_id(0)
    pid_co = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_rows
    if HAS_PERM:
        rows = tl.load(perm_ptr + offs_n, mask=mask_n, other=0)
    else:
        rows = offs_n
    rows64 = rows.to(tl.int64)
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    mask_co = offs_co < C_out
    acc = tl.zeros((BLOCK_N, BLOCK_CO), dtype=ACC_DTYPE)

    if HAS_MASKS:
        tile_mask = tl.zeros((), dtype=tl.int64)
        for s in tl.static_range(BLOCK_N // SUB):
            sub_idx = pid_n * (BLOCK_N // SUB) + s
            tile_mask |= tl.load(submask_ptr + sub_idx, mask=sub_idx < n_sub, other=0)

    for k in range(0, K):
        if HAS_MASKS:
            use = ((tile_mask >> k) & 1) != 0
        else:
            use = k >= 0
        if use:
            k64 = tl.cast(k, tl.int64)
            idx = tl.load(nbr_ptr + k64 * stride_nbr_k + rows64, mask=mask_n, other=-1)
            valid = idx >= 0
            x_rows = x_ptr + idx.to(tl.int64) * stride_x_n
            w_k = w_ptr + k64 * stride_w_k
            for c0 in range(0, C_in, BLOCK_CI):
                offs_ci = c0 + tl.arange(0, BLOCK_CI)
                mask_ci = offs_ci < C_in
                a = tl.load(x_rows[:, None] + offs_ci[None, :] * stride_x_c,
                            mask=valid[:, None] & mask_ci[None, :], other=0.0)
                w = tl.load(w_k + offs_ci[:, None] * stride_w_ci + offs_co[None, :] * stride_w_co,
                            mask=mask_ci[:, None] & mask_co[None, :], other=0.0)
                acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_co, mask=mask_co, other=0.0).to(ACC_DTYPE)
        acc += b[None, :]
    out_ptrs = out_ptr + rows64[:, None] * stride_o_n + offs_co[None, :] * stride_o_c
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_co[None, :])


@triton.autotune(configs=wgrad_configs(), key=["C_in", "C_out"],
                 prune_configs_by={"early_config_prune": _prune_channel_blocks})
@triton.jit
def sparse_conv_wgrad_kernel(
    x_ptr, g_ptr, in_idx_ptr, out_idx_ptr, chunk_start_ptr, chunk_end_ptr, part_ptr,
    C_in, C_out,
    stride_x_n, stride_x_c, stride_g_n, stride_g_c, stride_p_chunk, stride_p_ci, stride_p_co,
    INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr,
):
    """part[c] = sum_{p in chunk c} x[in_idx[p]].T (outer) g[out_idx[p]]  (fp32)."""
    pid_c = tl.program_id(0)
    pid_ci = tl.program_id(1)
    pid_co = tl.program_id(2)
    start = tl.load(chunk_start_ptr + pid_c)
    end = tl.load(chunk_end_ptr + pid_c)
    offs_ci = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    mask_ci = offs_ci < C_in
    mask_co = offs_co < C_out
    acc = tl.zeros((BLOCK_CI, BLOCK_CO), dtype=ACC_DTYPE)
    for p0 in range(start, end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < end
        ii = tl.load(in_idx_ptr + offs_p, mask=mask_p, other=0).to(tl.int64)
        oo = tl.load(out_idx_ptr + offs_p, mask=mask_p, other=0).to(tl.int64)
        a = tl.load(x_ptr + ii[None, :] * stride_x_n + offs_ci[:, None] * stride_x_c,
                    mask=mask_p[None, :] & mask_ci[:, None], other=0.0)       # [CI, P]
        g = tl.load(g_ptr + oo[:, None] * stride_g_n + offs_co[None, :] * stride_g_c,
                    mask=mask_p[:, None] & mask_co[None, :], other=0.0)       # [P, CO]
        acc = tl.dot(a, g, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    p_ptrs = (part_ptr + pid_c.to(tl.int64) * stride_p_chunk
              + offs_ci[:, None] * stride_p_ci + offs_co[None, :] * stride_p_co)
    tl.store(p_ptrs, acc, mask=mask_ci[:, None] & mask_co[None, :])


# --------------------------------------------------------------------------------------------
# plans
# --------------------------------------------------------------------------------------------
class TilePlan(NamedTuple):
    """Row order and per-16-row offset masks for :func:`sparse_conv` (see the module contract)."""

    perm: Optional[torch.Tensor]      # int32 [N] processing order, None = raster (identity)
    submasks: Optional[torch.Tensor]  # int64 [ceil(N / 16)] in processing order, None = no skip
    sorted: bool


def tile_plan(nbr: torch.Tensor, sort: Optional[bool] = None, block: int = 64,
              min_gain: float = 0.25) -> TilePlan:
    """Plan for a map ``nbr [K, N]``.

    ``sort=None`` (auto) uses the mask-sorted row order when it cuts the number of executed
    (tile, offset) pairs of a ``block``-row tiling by at least ``min_gain`` (one host sync).
    Maps with ``K > 64`` get no masks (every offset is visited).
    """
    K, n = nbr.shape
    if K > MAX_MASK_OFFSETS or n == 0:
        return TilePlan(None, None, False)
    masks = row_offset_masks(nbr)
    perm = None
    if sort is None or sort:
        cand = mask_sorted_order(masks)
        if sort is None:
            raster = tile_offset_work(masks, None, block, K)
            by_mask = tile_offset_work(masks, cand, block, K)
            sort = by_mask <= (1.0 - min_gain) * raster
        if sort:
            perm = cand
    return TilePlan(perm, subtile_offset_masks(masks, perm, SUBTILE), perm is not None)


class WgradPlan(NamedTuple):
    """Chunks of the pair lists for :func:`sparse_conv_weight_grad`."""

    in_idx: torch.Tensor       # int32 [P]
    out_idx: torch.Tensor      # int32 [P]
    chunk_start: torch.Tensor  # int32 [K * splits]
    chunk_end: torch.Tensor    # int32 [K * splits]
    n_offsets: int
    splits: int


def wgrad_plan(ptr: Sequence[int], in_idx: torch.Tensor, out_idx: torch.Tensor,
               splits: Optional[int] = None, pairs_per_program: int = 4096,
               max_splits: int = 64) -> WgradPlan:
    """Split each offset's pair range ``ptr[k]:ptr[k+1]`` into ``splits`` equal chunks.

    ``splits=None`` picks ``ceil(max_k count_k / pairs_per_program)`` clamped to
    ``[1, max_splits]``.
    """
    K = len(ptr) - 1
    counts = [ptr[k + 1] - ptr[k] for k in range(K)]
    if splits is None:
        splits = -(-max(counts, default=0) // pairs_per_program)
        splits = max(1, min(int(max_splits), splits))
    starts, ends = [], []
    for k in range(K):
        size = -(-counts[k] // splits)
        for s in range(splits):
            a = min(ptr[k] + s * size, ptr[k + 1])
            starts.append(a)
            ends.append(min(a + size, ptr[k + 1]))
    dev = in_idx.device
    return WgradPlan(
        in_idx.to(torch.int32).contiguous(), out_idx.to(torch.int32).contiguous(),
        torch.tensor(starts, dtype=torch.int32, device=dev),
        torch.tensor(ends, dtype=torch.int32, device=dev), K, int(splits),
    )


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def _check_features(x: torch.Tensor, name: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [N, C], got {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float tensor, got {x.dtype}")


def sparse_conv(
    features: torch.Tensor,
    weight: torch.Tensor,
    nbr: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    plan: Optional[TilePlan] = None,
    allow_tf32: Optional[bool] = None,
) -> torch.Tensor:
    """``out[N_out, C_out] = bias + sum_k features[nbr[k]] @ weight[k]`` (see module docs)."""
    _check_features(features, "features")
    K, n_out = nbr.shape
    if weight.dim() != 3 or weight.shape[0] != K or weight.shape[1] != features.shape[1]:
        raise ValueError(f"weight {tuple(weight.shape)} does not match K={K}, "
                         f"C_in={features.shape[1]}")
    if nbr.dtype != torch.int32:
        raise TypeError("nbr must be int32")
    C_in, C_out = int(weight.shape[1]), int(weight.shape[2])
    out = torch.empty((n_out, C_out), dtype=features.dtype, device=features.device)
    if n_out == 0 or C_out == 0:
        return out
    if C_in == 0 or K == 0 or features.shape[0] == 0:
        out.zero_()
        if bias is not None:
            out += bias.to(out.dtype)
        return out
    w = weight.to(features.dtype)
    nbr = nbr.contiguous()
    if plan is None:
        plan = TilePlan(None, None, False)
    perm, submasks = plan.perm, plan.submasks
    has_masks = submasks is not None and K <= MAX_MASK_OFFSETS
    b = bias.contiguous() if bias is not None else out  # loaded as fp32 in the kernel
    grid = lambda meta: (triton.cdiv(n_out, meta["BLOCK_N"]), triton.cdiv(C_out, meta["BLOCK_CO"]))
    sparse_conv_kernel[grid](
        features, w, b, nbr, perm if perm is not None else nbr,
        submasks if has_masks else nbr, out,
        n_out, submasks.numel() if has_masks else 0, C_in, C_out, K,
        features.stride(0), features.stride(1), w.stride(0), w.stride(1), w.stride(2),
        nbr.stride(0), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, HAS_PERM=perm is not None, HAS_MASKS=has_masks,
        INPUT_PRECISION=input_precision(features.dtype, allow_tf32),
        ACC_DTYPE=_acc_dtype(features.dtype), SUB=SUBTILE,
    )
    return out


def sparse_conv_backward_input(
    grad_out: torch.Tensor,
    weight: torch.Tensor,
    rev: torch.Tensor,
    plan: Optional[TilePlan] = None,
    allow_tf32: Optional[bool] = None,
) -> torch.Tensor:
    """``grad_in[N_in, C_in] = sum_k grad_out[rev[k]] @ weight[k].T`` (``rev [K, N_in]``)."""
    return sparse_conv(grad_out, weight.transpose(1, 2), rev, None, plan, allow_tf32)


def sparse_conv_weight_grad(
    features: torch.Tensor,
    grad_out: torch.Tensor,
    plan: WgradPlan,
    out_dtype: Optional[torch.dtype] = None,
    allow_tf32: Optional[bool] = None,
) -> torch.Tensor:
    """``grad_w[K, C_in, C_out] = sum_pairs features[in].T (outer) grad_out[out]`` (fp32 partials)."""
    _check_features(features, "features")
    _check_features(grad_out, "grad_out")
    if grad_out.dtype != features.dtype:
        grad_out = grad_out.to(features.dtype)
    K, S = plan.n_offsets, plan.splits
    C_in, C_out = int(features.shape[1]), int(grad_out.shape[1])
    out_dtype = features.dtype if out_dtype is None else out_dtype
    n_pairs = plan.in_idx.numel()
    if n_pairs == 0 or C_in == 0 or C_out == 0:
        return torch.zeros((K, C_in, C_out), dtype=out_dtype, device=features.device)
    part_dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    part = torch.empty((K * S, C_in, C_out), dtype=part_dtype, device=features.device)
    grid = lambda meta: (K * S, triton.cdiv(C_in, meta["BLOCK_CI"]),
                         triton.cdiv(C_out, meta["BLOCK_CO"]))
    sparse_conv_wgrad_kernel[grid](
        features, grad_out, plan.in_idx, plan.out_idx, plan.chunk_start, plan.chunk_end, part,
        C_in, C_out,
        features.stride(0), features.stride(1), grad_out.stride(0), grad_out.stride(1),
        part.stride(0), part.stride(1), part.stride(2),
        INPUT_PRECISION=input_precision(features.dtype, allow_tf32),
        ACC_DTYPE=_acc_dtype(features.dtype),
    )
    grad_w = part.view(K, S, C_in, C_out).sum(1) if S > 1 else part
    return grad_w.to(out_dtype)


__all__ = [
    "sparse_conv", "sparse_conv_backward_input", "sparse_conv_weight_grad",
    "tile_plan", "TilePlan", "wgrad_plan", "WgradPlan", "tf32_enabled", "input_precision",
    "sparse_conv_kernel", "sparse_conv_wgrad_kernel", "conv_configs", "wgrad_configs",
]
