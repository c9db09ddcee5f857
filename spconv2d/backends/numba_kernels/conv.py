"""Sparse convolution on the CPU in numba: output-stationary gathered GEMMs in register tiles.

Contract
--------
Shapes: ``features [N_in, C_in]``, ``weight [K, C_in, C_out]`` (any strides), ``bias [C_out]``
or None, ``nbr [K, N_out]`` int32 (-1 = missing; at most one output per (offset, input), as in
every convolution map). Torch CPU tensors in, a new torch tensor out. ``N = 0`` and any channel
count from 1 up are handled.

**Forward** (:func:`conv_forward`)::

    out[j, :] = bias + sum_k  features[nbr[k, j], :] @ weight[k]      (missing terms are 0)

**Input gradient** (:func:`conv_backward_input`): the same kernel on the reverse table ``rev
[K, N_in]`` (``rev[k, i] = j <=> nbr[k, j] = i``) with the weight transposed per offset::

    grad_in[i, :] = sum_k grad_out[rev[k, i], :] @ weight[k].T

A symmetric (submanifold) map has ``rev[k] = nbr[K-1-k]``: pass ``nbr`` and its plan with
``flip_offsets=True`` (the weight's offsets are reversed instead): one plan for both.

**Weight gradient** (:func:`conv_backward_weight`)::

    grad_w[k] = sum_j  features[nbr[k, j]].T (outer) grad_out[j]       -> [K, C_in, C_out]

Plan (:func:`build_plan`; cache it on the map: ``kmap.cached("numba_plan@nbr", lambda:
build_plan(kmap.nbr, kmap.n_in))``, and ``"numba_plan@rev"`` = ``build_plan(kmap.rev,
kmap.n_out)`` for the input gradient of a map that is not symmetric; ``transpose()`` hands
them over): the output rows in blocks of ``block_rows`` (128..512, chosen per map from its
fill); per (block, offset) the pairs of that block compacted into one segment (``src`` input
row, ``loc`` row in the block), padded to a multiple of ``PAD = 4`` with entries that go to a
scratch row. Work follows the pairs: a missing neighbour costs nothing but padding. A
submanifold map's identity offset needs no special case: its segments are the block's own
rows, read contiguously like a dense GEMM's, in the same kernel and the same tiles.

Kernels
-------
Forward / input gradient, output-stationary: one task = one row block x one block of ``NR``
output channels; its accumulator ``[block_rows + 1, NR]`` lives on the task's stack, starts
at the bias, and the block's output rows are written once, at the end. Per offset, the
segment runs in tiles of ``MR`` gathered rows (then tiles of ``PAD`` rows): a micro-kernel
loads the tile's ``MR x NR`` accumulators into registers, loops over the input channels
(``NR / VW`` weight vectors loaded and each row's input value broadcast once per channel, one
vector FMA per accumulator) and stores them back. Before each tile the input rows
``PREFETCH_PAIRS`` pairs further down the segment are prefetched (the hardware prefetchers do
not follow a gather: maps whose input rows are each read once, the strided and transposed ones,
stalled on every tile's first loads), and the accumulator is filled from the bias and written
out (clamped for ``relu``) in vector loads and stores.

Weight gradient, output-stationary on partial sums: the rows are split into at most
``WG_MAX_CHUNKS`` chunks (how many depends on the map and the channels only, never on the
threads); one task = one chunk x one channel block, writing its own partial ``[K, C_in, NR]``
in ``MR x NR`` register tiles (rows: input channels, columns: output channels; per pair
``NR / VW`` output-gradient vectors loaded and each input value broadcast once), the pairs
streamed in passes that stay in L2 and in pair chunks that stay in L1 for every channel tile.
Wide channels (``C_in * C_out`` from ``wgrad_packed_from`` of the tile table; AVX2 only) pack
the pairs instead, as a GEMM packs its operands: one task = one chunk (all channel blocks);
per offset up to ``pairs`` pairs at a time, each pair's input row is copied into one panel per
channel tile (``MR`` values per pair) and its output-gradient row into one panel per channel
block, then every (block, tile) runs over the panels with sequential loads and no index loads
(``_wgrad_packed_tile``): the gathered tiles spent two index loads and an address computation
per pair per tile, and their row loads missed without the FMAs of other tiles to hide behind.
Both forms sum every element's pairs in the same (block, pair) order: the same bits.
The partials are then summed in chunk order and each output element written once; a single
chunk of a single channel block is the output itself (the task accumulates there in place).
The forward and the input gradient write each output row once.

The micro-kernels are LLVM IR with explicit vector types (``_conv_tile``, ``_wgrad_tile``):
the same tiles written as scalar numba loops were vectorised by LLVM for some tile shapes
only (for others it left scalar code, or SLP-vectorised them into gathers and scatters through
memory: 4-14x slower than the torch path), so the vector code is emitted directly:
``<VW x float>`` accumulators in an ``alloca`` with constant indices (SROA keeps them in
registers) and ``llvm.fma``. Functions using 512-bit vectors carry
``"prefer-vector-width"="512"``: LLVM's tuning for this host (reported as ``rocketlake``)
prefers 256-bit vectors and would split every one. No ``fastmath``; numba's SLP setting is
left alone (off, as shipped).

Specialisations (compiled lazily, one per (dtype, NR, MR) in use; table ``_TILES``): ``NR`` =
the smallest of 8/16/32/64 fp32 (4/8/16/32 fp64) channels that holds ``C_out`` (wider: blocks
of 64 / 32, the last one zero-padded); ``MR`` so that the accumulators take at most 24 of the
32 AVX-512 registers: 8x16 (ymm), 16x12, 32x12, 64x4 fp32 forward tiles (fp64: 4x16, 8x12,
16x8, 32x4); weight-gradient heights 16 (NR <= 16), 12 or 8 (NR = 32), 6 or 4 (NR = 64), a
height that divides ``C_in`` preferred. Measured side by side on this machine: 64x4 and 64x6
within noise, 64x8 spills (-30%), 16x8 -10% vs 16x12..24, ``PAD = 2`` tails -25%, software
prefetch of the next tile's rows -0..5% (too near; ``PREFETCH_PAIRS`` has the distance that
pays), block rows 64/128/256 within 5% at 25% density, 512 rows 10-20% faster than 128 at
1-10%. Without AVX-512 the 256-bit shapes in ``_TILES`` apply:
forward 8x12, 16x4 and 32x2 (measured on an AMD EPYC VM, see ``_TILES``), weight gradient sized
by the register rule (not measured). The tile shape is a literal argument of
module-level intrinsics, so numba's on-disk cache keys stay stable across processes.

Determinism: no atomics; every output element is summed in an order fixed by the plan and the
tile shape (forward: bias, then the offsets in order, each a fixed FMA chain over the input
channels; weight gradient: pairs in (block, row) order within a chunk, then chunks in order).
Which thread runs which task never matters: results are bit-identical across runs and across
thread counts (tested at 1 and 2 threads).

Precision: float32 and float64 compute in their own precision with fused multiply-adds (the
torch path's results differ by rounding). float16 / bfloat16 are converted to float32 by the
launcher and the result is rounded once. Index arithmetic (``row * channels``) is 64-bit.

Threads: each launch uses ``torch.get_num_threads()`` threads, tasks handed out dynamically,
through ``runtime.launch``: PyTorch's own OpenMP threads (the kernels' team forms,
``runtime.TeamKernel``), else numba's ``workqueue`` pool (capped by ``NUMBA_NUM_THREADS``); one
launch at a time; one thread runs the serial compilation (see ``runtime``).

Compilation: nothing compiles at import; each specialisation compiles on first use and is
cached on disk (``cache=True``: numba's ``__pycache__`` next to this file, or numba's user cache
directory where that is not writable).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import numpy as np
import torch

import numba
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .runtime import (TEAM_ARGS, TEAM_PHASE, TEAM_TASKS, TeamKernel, array_arg1, array_arg2, array_arg3, array_arg5,
                      cached_njit, launch, next_task, team_words)

#: Output rows per block (one task of the forward / input-gradient kernels, the unit of the
#: plan): chosen per map between these bounds so that an offset's segment of a block holds
#: about ``SEGMENT_PAIRS`` pairs (denser maps: smaller blocks, more tasks; sparser maps:
#: larger blocks, less tile padding). The block's accumulator ``[rows + 1, NR]`` lives on the
#: task's stack, sized for ``MAX_BLOCK_ROWS``.
MIN_BLOCK_ROWS = 128
MAX_BLOCK_ROWS = 512
SEGMENT_PAIRS = 32
#: The forward / input-gradient tiles prefetch the input rows of the pairs this far ahead in
#: their segment (clamped to its last tile; 0: no prefetch, kept to measure it). Measured on the
#: AMD EPYC VM (Zen 3, AVX2), the sparse U-Net's convolutions at batch 16, one process,
#: alternating: prefetch alone strided (k2 s2) 16->32 1.4-1.6x, transposed 32->16 1.05-1.1x
#: faster (1 thread); with the vector fill / write-out (``_copy_rows``), against neither,
#: strided 1.6-2.0x, transposed 1.3-1.5x, submanifold 0.9-1.3x (1 / 2 threads); 8 and 32 pairs
#: ahead within noise of 16. The whole model 1.04-1.05x (``bench/ab_zoo.py``,
#: docs/ARCHITECTURE.md).
PREFETCH_PAIRS = 16


# --------------------------------------------------------------------------------------------
# intrinsics
# --------------------------------------------------------------------------------------------
@intrinsic
def _stack_ptr(typingctx, dtype, size):
    """Pointer to ``size`` (a compile-time constant) elements of ``dtype`` on the stack: an
    ``alloca`` in the entry block of the function being generated (for a ``prange`` body: of
    its outlined task function, so one buffer per thread, reused by its tasks). Holds a forward
    task's block accumulator."""
    if not isinstance(size, types.IntegerLiteral):
        return None
    n = size.literal_value
    dt = dtype.dtype

    def codegen(context, builder, sig, args):
        ty = context.get_value_type(dt)
        return cgutils.alloca_once(builder, ty, size=ir.Constant(ir.IntType(64), n))

    return types.CPointer(dt)(dtype, size), codegen


# --------------------------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------------------------
#: Each (row block, offset) segment of a plan is padded to a multiple of ``PAD`` entries (input
#: row repeated, output row = the block accumulator's scratch row), so the forward kernel runs
#: whole tiles only: tiles of ``MR`` rows (a multiple of ``PAD``) and then of ``PAD`` rows.
PAD = 4


class ConvPlan(NamedTuple):
    """A map's pairs grouped by (row block of ``block_rows`` output rows, offset). Segment ``s =
    b * K + k`` (block ``b``, offset ``k``) has a room of ``block_rows`` entries starting at
    ``s * block_rows`` and holds ``cnt[s]`` pairs (input row ``src``, output row ``b *
    block_rows + loc``) in output-row order, then padding up to a multiple of ``pad`` (``loc =
    block_rows``, the scratch row; ``src`` = the segment's last input row): its entries end at
    ``s * block_rows + ceil(cnt[s] / pad) * pad`` (:func:`segment_end`); the rest of its room is
    unused. The identity offset of a submanifold map is an ordinary offset here
    (its segments are the block's own rows)."""

    cnt: np.ndarray   # int32 [n_blocks * K]
    src: np.ndarray   # int32 [n_blocks * K * block_rows]
    loc: np.ndarray   # int32 [n_blocks * K * block_rows]
    n_out: int
    n_in: int
    kernel_volume: int
    pad: int
    block_rows: int


@njit(inline="always")
def segment_end(cnt, s, block, pad):
    """End of segment ``s``'s entries (its pairs and padding; it starts at ``s * block``)."""
    return s * block + (cnt[s] + pad - 1) // pad * pad


@njit(inline="always")
def _fill_segment(s, nbr, block, pad, cnt, src, loc):
    """Segment ``s``'s pairs in row order, then its padding, in one pass over the table: every
    entry is written at the cursor, which advances on a pair only (branch-free: a random
    table's branches mispredicted and took 2x as long; the segment's room of ``block`` entries
    holds the cursor's last write). The cursor and the row index are unsigned: a signed index
    gets numba's negative-index wrap-around, three of them per entry here (measured 2.2x
    slower, a submanifold table of 39k sites, one thread, AMD EPYC VM)."""
    K, n_out = nbr.shape
    b, k = s // K, s % K
    base = b * block
    row = nbr[k]
    ub, p0 = np.uint64(base), np.uint64(s * block)
    c, one, zero = np.uint64(0), np.uint64(1), np.uint64(0)
    for j in range(min(block, n_out - base)):
        i = row[ub + np.uint64(j)]
        src[p0 + c] = i
        loc[p0 + c] = j
        c += one if i >= 0 else zero
    cnt[s] = c
    n = np.int64(c)
    last = src[p0 + c - one] if n > 0 else 0
    for q in range(s * block + n, s * block + (n + pad - 1) // pad * pad):
        src[q] = last
        loc[q] = block


#: Table entries per task of the plan fill (``per = PLAN_TASK_ENTRIES // block`` segments): one
#: segment a task (a few hundred entries, well under a microsecond) left two threads contending
#: for the shared task counter; the plans of a batch of 16 took longer on two threads than on
#: one (3.2 against 2.3 ms, the seven maps of `sparse_unet`'s batch, AMD EPYC VM, throwaway A/B;
#: with tasks of 16 segments 2.2 ms, of 4096 entries 2.3 ms on one thread and on two).
PLAN_TASK_ENTRIES = 4096


@njit(inline="always")
def _fill_segments(t, per, nbr, block, pad, cnt, src, loc):
    for s in range(t * per, min(cnt.shape[0], (t + 1) * per)):
        _fill_segment(s, nbr, block, pad, cnt, src, loc)


def _plan_fill_tasks(nbr, block, pad, per, cnt, src, loc):
    for t in prange((cnt.shape[0] + per - 1) // per):
        _fill_segments(t, per, nbr, block, pad, cnt, src, loc)


def _plan_fill_team(data):
    words = team_words(data)
    nbr, i = array_arg2(words, TEAM_ARGS, np.int32)
    block, pad, per = words[i], words[i + 1], words[i + 2]
    cnt, i = array_arg1(words, i + 3, np.int32)
    src, i = array_arg1(words, i, np.int32)
    loc, i = array_arg1(words, i, np.int32)
    t = next_task(words)
    while t < words[TEAM_TASKS]:
        _fill_segments(t, per, nbr, block, pad, cnt, src, loc)
        t = next_task(words)


_plan_fill = TeamKernel(_plan_fill_tasks, _plan_fill_team,
                        lambda phase, nbr, block, pad, per, cnt, src, loc: -(-cnt.shape[0] // per))


@cached_njit(nogil=True)
def _pairs_per_offset(nbr):
    """``counts[k]`` = the entries ``>= 0`` of ``nbr[k]`` (one vectorised pass; numpy's
    ``count_nonzero(t >= 0, axis=1)`` made a boolean copy first: 0.3-0.6 ms for a [9, 39k]
    table against ~0.1, one thread, throwaway timings)."""
    K, n = nbr.shape
    counts = np.zeros(K, np.int64)
    for k in range(K):
        c = 0
        for j in range(n):
            c += nbr[k, j] >= 0
        counts[k] = c
    return counts


def build_plan(nbr: torch.Tensor, n_in: int, pad: int = PAD) -> ConvPlan:
    """The :class:`ConvPlan` of ``nbr [K, N_out]`` (int32, -1 = missing) for ``n_in`` input
    rows. Cache it on the map (``kmap.cached("numba_plan@nbr", ...)``): every layer on the map
    and the input gradient of a symmetric map reuse it. The block size from the offsets' pair
    counts (one vectorised count), then one parallel pass over the table; deterministic."""
    K, n_out = nbr.shape
    t = nbr.to(torch.int32).contiguous().numpy()
    # the pairs of an offset per output row, the fullest offset (a submanifold map's identity)
    # left out: blocks of about SEGMENT_PAIRS / fill rows
    counts = _pairs_per_offset(t) if n_out else np.zeros(K, np.int64)
    fill = float(counts.sum() - counts.max()) / max(1, (K - 1) * n_out) if K > 1 else 1.0
    block = MIN_BLOCK_ROWS
    while block < MAX_BLOCK_ROWS and block * fill < SEGMENT_PAIRS:
        block *= 2
    if block % pad:
        raise ValueError(f"pad {pad} must divide the block rows {block}")
    nb = -(-n_out // block)
    cnt = np.zeros(nb * K, np.int32)
    src = np.empty(nb * K * block, np.int32)
    loc = np.empty(nb * K * block, np.int32)
    if cnt.size:
        launch(_plan_fill, t, block, pad, max(1, PLAN_TASK_ENTRIES // block), cnt, src, loc, work=K * n_out)
    return ConvPlan(cnt, src, loc, n_out, int(n_in), K, pad, block)


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
_NP = {"f4": np.float32, "f8": np.float64}


# --------------------------------------------------------------------------------------------
# micro-kernels, written as LLVM IR with explicit vector types
# --------------------------------------------------------------------------------------------
# LLVM's auto-vectorisers do not reliably turn a register tile written as scalar loops into
# vector FMAs: depending on the tile shape they fully unroll first and leave scalar code, or
# SLP-vectorise it into gathers and scatters through memory (measured: those kernels were
# 4-14x slower than the torch path). The micro-kernels below emit the vector code directly: the
# accumulators are an array of ``<VW x float>`` in an ``alloca`` with constant indices, which
# SROA turns into registers, and every multiply-add is one ``llvm.fma`` (a fixed order of
# fused multiply-adds: deterministic, and no ``fastmath`` needed).


def _vec_type(fty, VW):
    return ir.VectorType(fty, VW)


def _align(fty) -> int:
    return 8 if isinstance(fty, ir.DoubleType) else 4


def _fma_fn(builder, vty):
    name = f"llvm.fma.v{vty.count}f{32 if isinstance(vty.element, ir.FloatType) else 64}"
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty, vty, vty]), name)


def _splat(builder, value, vty):
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined),
                                  ir.Constant(ir.VectorType(ir.IntType(32), vty.count), [0] * vty.count))


def _mark_wide(builder, vty):
    """Mark the function being generated with ``"prefer-vector-width"="512"`` and
    ``"min-legal-vector-width"="512"`` (what ``clang -mprefer-vector-width=512`` emits): LLVM's
    x86 tuning for Ice Lake and later (this host reports ``rocketlake``) prefers 256-bit
    vectors and would split every 512-bit operation in two, halving an AVX-512 core's FMA
    throughput. Only this function is affected; without AVX-512 the backend splits the
    vectors into what the CPU has. llvmlite only accepts a fixed list of enum attributes, so
    the string attributes go into the attribute set directly (they are printed as they are)."""
    bits = vty.count * (64 if isinstance(vty.element, ir.DoubleType) else 32)
    if bits < 512:
        return
    attrs = builder.function.attributes
    set.add(attrs, '"prefer-vector-width"="512"')
    set.add(attrs, '"min-legal-vector-width"="512"')


def _literal_tile(M_, NV_, VW_, arrays):
    """``(M, NV, VW)`` when the tile shape is literal and every array argument is an array; else
    None (the intrinsic does not apply to these argument types)."""
    if not all(isinstance(a, types.IntegerLiteral) for a in (M_, NV_, VW_)):
        return None
    if not all(isinstance(a, types.Array) for a in arrays):
        return None
    return M_.literal_value, NV_.literal_value, VW_.literal_value


class _TileIR:
    """What every micro-kernel's codegen uses: the ``VW``-wide vector type of ``dtype`` (the
    function marked for wide vectors), its alignment, ``i64``, its ``llvm.fma``, and ``n``
    accumulator vectors in one ``alloca`` (``slot(i)``); ``vptr(base, off)`` is the vector
    pointer ``off`` elements past ``base``."""

    def __init__(self, context, builder, dtype, VW: int, n: int):
        fty = context.get_value_type(dtype)
        self.builder = builder
        self.vty = _vec_type(fty, VW)
        _mark_wide(builder, self.vty)
        self.al = _align(fty)
        self.i64 = ir.IntType(64)
        self.fma = _fma_fn(builder, self.vty)
        self.slots = cgutils.alloca_once(builder, ir.ArrayType(self.vty, n))

    def slot(self, i: int):
        return self.builder.gep(self.slots, [ir.Constant(self.i64, 0), ir.Constant(self.i64, i)], inbounds=True)

    def vptr(self, base, off):
        return self.builder.bitcast(self.builder.gep(base, [ir.Constant(self.i64, off)]), self.vty.as_pointer())


@intrinsic(prefer_literal=True)
def _conv_tile(typingctx, x, w, wo, acc, src, loc, p, M_, NV_, VW_):
    """``acc[loc[p + r]] += x[src[p + r]] @ W`` for ``r < M`` (rows of ``NR = NV * VW``
    channels): a loop over the ``C_in`` input channels with ``M x NV`` vector accumulators,
    loaded from and stored back to the block accumulator; per input channel ``NV`` weight
    vectors are loaded once and each row's input value is broadcast once.

    Arguments: ``x`` (2-D, C-contiguous), ``w`` (3-D ``[K, C_in, Cp]``, C-contiguous), ``wo``
    (element offset of the ``[C_in, NR]`` weight block, rows ``Cp`` apart), ``acc`` (2-D
    ``[rows, NR]``), ``src``, ``loc`` (1-D int32), ``p``, and the literal tile shape ``M``,
    ``NV``, ``VW``."""
    shape = _literal_tile(M_, NV_, VW_, (x, w, acc, src, loc))
    if shape is None:
        return None
    M, NV, VW = shape
    NR = NV * VW

    def codegen(context, builder, sig, args):
        tile = _TileIR(context, builder, x.dtype, VW, M * NV)
        vty, al, i64, fma, slot, vptr = tile.vty, tile.al, tile.i64, tile.fma, tile.slot, tile.vptr
        xa, wa, aa, sa, la = (context.make_array(t)(context, builder, v) for t, v in (
            (x, args[0]), (w, args[1]), (acc, args[3]), (src, args[4]), (loc, args[5])))
        wo_v, p_v = args[2], args[6]
        c_in = builder.extract_value(xa.shape, 1)
        w_row = builder.extract_value(wa.shape, 2)

        arows, xrows = [], []
        for r in range(M):
            q = builder.add(p_v, ir.Constant(i64, r))
            srow = builder.sext(builder.load(builder.gep(sa.data, [q])), i64)
            lrow = builder.sext(builder.load(builder.gep(la.data, [q])), i64)
            xrows.append(builder.gep(xa.data, [builder.mul(srow, c_in)]))
            arows.append(builder.gep(aa.data, [builder.mul(lrow, ir.Constant(i64, NR))]))
            for v in range(NV):
                builder.store(builder.load(vptr(arows[r], v * VW), align=al), slot(r * NV + v))
        wbase = builder.gep(wa.data, [wo_v])
        with cgutils.for_range(builder, c_in) as loop:
            ci = loop.index
            wrow = builder.gep(wbase, [builder.mul(ci, w_row)])
            wv = [builder.load(vptr(wrow, v * VW), align=al) for v in range(NV)]
            for r in range(M):
                a = _splat(builder, builder.load(builder.gep(xrows[r], [ci])), vty)
                for v in range(NV):
                    sp = slot(r * NV + v)
                    builder.store(builder.call(fma, [a, wv[v], builder.load(sp)]), sp)
        for r in range(M):
            for v in range(NV):
                builder.store(builder.load(slot(r * NV + v)), vptr(arows[r], v * VW), align=al)
        return context.get_dummy_value()

    return types.none(x, w, wo, acc, src, loc, p, M_, NV_, VW_), codegen


@intrinsic(prefer_literal=True)
def _prefetch_rows(typingctx, x, src, q, M_):
    """Prefetch (into every cache level) the rows ``x[src[q + r]]``, ``r < M``: every cache line
    of each row. (A hint: it never faults, and the result does not depend on it.)"""
    if not isinstance(M_, types.IntegerLiteral) or not all(isinstance(a, types.Array) for a in (x, src)):
        return None
    M = M_.literal_value

    def codegen(context, builder, sig, args):
        i8p = ir.IntType(8).as_pointer()
        i32, i64 = ir.IntType(32), ir.IntType(64)
        pf = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                            "llvm.prefetch.p0i8")
        xa, sa = (context.make_array(t)(context, builder, v) for t, v in ((x, args[0]), (src, args[1])))
        c_in = builder.extract_value(xa.shape, 1)
        esize = context.get_abi_sizeof(context.get_value_type(x.dtype))
        nbytes = builder.mul(c_in, ir.Constant(i64, esize))
        for r in range(M):
            qr = builder.add(args[2], ir.Constant(i64, r))
            srow = builder.sext(builder.load(builder.gep(sa.data, [qr])), i64)
            base = builder.bitcast(builder.gep(xa.data, [builder.mul(srow, c_in)]), i8p)
            with cgutils.for_range_slice(builder, ir.Constant(i64, 0), nbytes, ir.Constant(i64, 64)) as (off, _):
                builder.call(pf, [builder.gep(base, [off]), ir.Constant(i32, 0), ir.Constant(i32, 3),
                                  ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.none(x, src, q, M_), codegen


@intrinsic(prefer_literal=True)
def _copy_rows(typingctx, a, ao, a_step, b, bo, b_step, nr, relu, NV_, VW_):
    """``b.flat[bo + r * b_step :][:NR] = a.flat[ao + r * a_step :][:NR]`` for ``r < nr`` (``NR
    = NV * VW`` elements; ``relu``: clamped at 0 with NaN kept, as Python's ``max(v, 0.0)``), in
    ``NV`` vector loads and stores per row (numba leaves LLVM's SLP vectoriser off: the same
    loops in numba stayed scalar, and the scalar stores stalled the forward kernel). Fills a
    block accumulator from the bias (``a_step = 0``) and writes it out."""
    if not (all(isinstance(t, types.IntegerLiteral) for t in (NV_, VW_))
            and all(isinstance(t, types.Array) for t in (a, b))):
        return None
    NV, VW = NV_.literal_value, VW_.literal_value

    def codegen(context, builder, sig, args):
        tile = _TileIR(context, builder, a.dtype, VW, 1)
        aa, ba = (context.make_array(t)(context, builder, v) for t, v in ((a, args[0]), (b, args[3])))
        ao_v, as_v, bo_v, bs_v, nr_v, relu_v = args[1], args[2], args[4], args[5], args[6], args[7]
        zero = ir.Constant(tile.vty, None)
        with cgutils.for_range(builder, nr_v) as loop:
            r = loop.index
            arow = builder.gep(aa.data, [builder.add(ao_v, builder.mul(r, as_v))])
            brow = builder.gep(ba.data, [builder.add(bo_v, builder.mul(r, bs_v))])
            for v in range(NV):
                x = builder.load(tile.vptr(arow, v * VW), align=tile.al)
                clamped = builder.select(builder.fcmp_ordered("<", x, zero), zero, x)
                builder.store(builder.select(relu_v, clamped, x), tile.vptr(brow, v * VW), align=tile.al)
        return context.get_dummy_value()

    return types.none(a, ao, a_step, b, bo, b_step, nr, relu, NV_, VW_), codegen


def _emit_outer_tile(tile: "_TileIR", abase, start, end, rows, M: int, NV: int) -> None:
    """The weight gradient's micro-kernel body: the ``M x NV`` vector accumulators loaded from
    ``abase``, then for ``start <= p < end`` (``rows(p)``: the pair's input-row and
    output-gradient-row pointers) ``NV`` output-gradient vectors loaded, each of the ``M`` input
    values broadcast once and one FMA per accumulator, the pairs in order; stored back."""
    builder, vty, al, i64, fma, slot, vptr = (tile.builder, tile.vty, tile.al, tile.i64, tile.fma, tile.slot,
                                              tile.vptr)
    VW = vty.count
    for i in range(M * NV):
        builder.store(builder.load(vptr(abase, i * VW), align=al), slot(i))
    with cgutils.for_range(builder, end, start=start) as loop:
        xrow, grow = rows(loop.index)
        gv = [builder.load(vptr(grow, v * VW), align=al) for v in range(NV)]
        for r in range(M):
            a = _splat(builder, builder.load(builder.gep(xrow, [ir.Constant(i64, r)])), vty)
            for v in range(NV):
                sp = slot(r * NV + v)
                builder.store(builder.call(fma, [a, gv[v], builder.load(sp)]), sp)
    for i in range(M * NV):
        builder.store(builder.load(slot(i)), vptr(abase, i * VW), align=al)


@intrinsic(prefer_literal=True)
def _wgrad_tile(typingctx, x, c0, g, cb, part, ao, ps, pe, r0, src, loc, M_, NV_, VW_):
    """``part[ao:] += sum_{ps <= p < pe} x[src[p], c0 : c0 + M].T (outer) g[r0 + loc[p], cb-th
    block]``, the pairs in order, with ``M x NV`` vector accumulators (rows: input channels,
    columns: the block's output channels) loaded from and stored back to ``part`` at element
    offset ``ao``; per pair ``NV`` output-gradient vectors are loaded once and each input
    value is broadcast once.

    Arguments: ``x`` (2-D, C-contiguous), ``c0``, ``g`` (3-D ``[N_out, ncb, NR]``), ``cb``,
    ``part`` (C-contiguous), ``ao``, ``ps``, ``pe``, ``r0``, ``src``, ``loc`` (1-D int32), and
    the literal tile shape ``M``, ``NV``, ``VW``."""
    shape = _literal_tile(M_, NV_, VW_, (x, g, part, src, loc))
    if shape is None:
        return None
    M, NV, VW = shape
    NR = NV * VW

    def codegen(context, builder, sig, args):
        tile = _TileIR(context, builder, x.dtype, VW, M * NV)
        i64 = tile.i64
        xa, ga, pa, sa, la = (context.make_array(t)(context, builder, v) for t, v in (
            (x, args[0]), (g, args[2]), (part, args[4]), (src, args[9]), (loc, args[10])))
        c0_v, cb_v, ao_v, ps_v, pe_v, r0_v = args[1], args[3], args[5], args[6], args[7], args[8]
        c_in = builder.extract_value(xa.shape, 1)
        g_row = builder.mul(builder.extract_value(ga.shape, 1), ir.Constant(i64, NR))
        gcol = builder.mul(cb_v, ir.Constant(i64, NR))

        def rows(p):
            xi = builder.sext(builder.load(builder.gep(sa.data, [p])), i64)
            gi = builder.add(r0_v, builder.sext(builder.load(builder.gep(la.data, [p])), i64))
            return (builder.gep(xa.data, [builder.add(builder.mul(xi, c_in), c0_v)]),
                    builder.gep(ga.data, [builder.add(builder.mul(gi, g_row), gcol)]))

        _emit_outer_tile(tile, builder.gep(pa.data, [ao_v]), ps_v, pe_v, rows, M, NV)
        return context.get_dummy_value()

    return types.none(x, c0, g, cb, part, ao, ps, pe, r0, src, loc, M_, NV_, VW_), codegen


@intrinsic(prefer_literal=True)
def _wgrad_packed_tile(typingctx, xp, xo, gp, go, part, ao, n, M_, NV_, VW_):
    """``part[ao:] += sum_{q < n} xp[xo + q * M : + M].T (outer) gp[go + q * NR : + NR]`` on packed
    pairs, in order, with ``M x NV`` vector accumulators (rows: input channels, columns: the
    block's output channels) loaded from and stored back to ``part`` at element offset ``ao``;
    per pair ``NV`` output-gradient vectors are loaded once and each input value is broadcast
    once. Both operands are read sequentially (no index loads in the loop).

    Arguments: ``xp``, ``gp``, ``part`` (1-D / C-contiguous), ``xo``, ``go``, ``ao``, ``n``, and the
    literal tile shape ``M``, ``NV``, ``VW``."""
    shape = _literal_tile(M_, NV_, VW_, (xp, gp, part))
    if shape is None:
        return None
    M, NV, VW = shape
    NR = NV * VW

    def codegen(context, builder, sig, args):
        tile = _TileIR(context, builder, xp.dtype, VW, M * NV)
        i64 = tile.i64
        xa, ga, pa = (context.make_array(t)(context, builder, v) for t, v in (
            (xp, args[0]), (gp, args[2]), (part, args[4])))
        xo_v, go_v, ao_v, n_v = args[1], args[3], args[5], args[6]
        xbase = builder.gep(xa.data, [xo_v])
        gbase = builder.gep(ga.data, [go_v])

        def rows(q):
            return (builder.gep(xbase, [builder.mul(q, ir.Constant(i64, M))]),
                    builder.gep(gbase, [builder.mul(q, ir.Constant(i64, NR))]))

        _emit_outer_tile(tile, builder.gep(pa.data, [ao_v]), ir.Constant(i64, 0), n_v, rows, M, NV)
        return context.get_dummy_value()

    return types.none(xp, xo, gp, go, part, ao, n, M_, NV_, VW_), codegen


@njit(inline="always")
def _conv_task(t, x, w, bias, relu, block, cnt, src, loc, out, NR, NV, VW, MR, P, A, PF):
    """Task ``t`` of the forward kernel: row block ``t // ncb`` x channel block ``t % ncb``
    (``relu``: the outputs clamped at 0 as they are written; NaN stays NaN). (Module level, its
    tile shape in arguments that the callers pass as constants: a closure capturing a jitted
    function would change numba's disk-cache key in every process.)"""
    # x [N_in, C_in]; w [K, C_in, ncb * NR]; bias [ncb, NR]; out [N_out, C_out]
    n_out, C_out = out.shape
    C_in = x.shape[1]
    K, Cp = w.shape[0], w.shape[2]
    ncb = Cp // NR
    b = t // ncb
    cb = t - b * ncb
    r0 = b * block
    nr = min(block, n_out - r0)
    # the block's accumulator; row `block` takes the padding entries
    acc = numba.carray(_stack_ptr(out.dtype, A), (MAX_BLOCK_ROWS + 1, NR))
    _copy_rows(bias, cb * NR, 0, acc, 0, NR, nr, False, NV, VW)  # (no bias: zeros)
    for k in range(K):
        e = segment_end(cnt, b * K + k, block, P)
        wo = k * C_in * Cp + cb * NR
        p = (b * K + k) * block
        while e - p >= MR:
            if PF > 0:
                _prefetch_rows(x, src, min(p + PF, e - MR), MR)
            _conv_tile(x, w, wo, acc, src, loc, p, MR, NV, VW)
            p += MR
        while p < e:
            _conv_tile(x, w, wo, acc, src, loc, p, P, NV, VW)
            p += P
    co0 = cb * NR
    if co0 + NR <= C_out:
        _copy_rows(acc, 0, NR, out, r0 * C_out + co0, C_out, nr, relu, NV, VW)
    else:  # the last block of a channel count that is not a multiple of NR
        for r in range(nr):
            for c in range(C_out - co0):
                out[r0 + r, co0 + c] = max(acc[r, c], 0.0) if relu else acc[r, c]


@functools.lru_cache(maxsize=None)
def _conv_kernel(dt: str, NR: int, VW: int, MR: int, P: int, PF: int):
    """``out = bias + sum_k x[map_k] @ w[k]`` for ``NR``-wide channel blocks: per task one row
    block x one channel block, its accumulator on the stack, the plan's segments in tiles of
    ``MR`` rows, then of ``PAD`` rows. Tasks: ``prange`` (numba's pool, or one thread) or the
    team form (PyTorch's OpenMP threads, ``runtime.TeamKernel``); the same task code."""
    npdt = _NP[dt]
    NV = NR // VW
    A = (MAX_BLOCK_ROWS + 1) * NR

    def kernel(x, w, bias, relu, block, cnt, src, loc, out):
        n_tasks = (out.shape[0] + block - 1) // block * (w.shape[2] // NR)
        for t in prange(n_tasks):
            _conv_task(t, x, w, bias, relu, block, cnt, src, loc, out, NR, NV, VW, MR, P, A, PF)

    def team(data):
        words = team_words(data)
        x, i = array_arg2(words, TEAM_ARGS, npdt)
        w, i = array_arg3(words, i, npdt)
        bias, i = array_arg2(words, i, npdt)
        relu, block = words[i] != 0, words[i + 1]
        cnt, i = array_arg1(words, i + 2, np.int32)
        src, i = array_arg1(words, i, np.int32)
        loc, i = array_arg1(words, i, np.int32)
        out, i = array_arg2(words, i, npdt)
        t = next_task(words)
        while t < words[TEAM_TASKS]:
            _conv_task(t, x, w, bias, relu, block, cnt, src, loc, out, NR, NV, VW, MR, P, A, PF)
            t = next_task(words)

    def tasks(phase, x, w, bias, relu, block, cnt, src, loc, out):
        return -(-out.shape[0] // block) * (w.shape[2] // NR)

    return TeamKernel(kernel, team, tasks)


#: Row chunks of the weight gradient: each chunk's sums go to its own partial
#: ``[K, C_in, C_out]`` and the partials are summed in chunk order. The count depends on the
#: map and the channels only (never on the threads): results are the same at any thread count.
WG_MAX_CHUNKS = 16
#: Output rows per chunk at least (a small map is one chunk: no partials to sum).
WG_MIN_CHUNK_ROWS = 512
#: Pairs per offset per chunk at least, on average: a chunk's partial has ``K * C_in * C_out``
#: elements, zeroed and summed at memory speed (~1.4 ns each, ~35 multiply-adds' time at 128
#: channels). 256: the sweep's 128 channels at 10 % (5,764 pairs: 6 -> 2 chunks) 1.6x faster on
#: one thread, 1.2x on two (AMD EPYC VM, 2026-12-01; 128 and 512 measured too).
WG_MIN_CHUNK_PAIRS = 256
#: Partial elements up to which the calling thread sums them itself; ranges of rows in that
#: many parallel tasks above.
WG_SERIAL_REDUCE = 1 << 16
WG_REDUCE_TASKS = 32
#: Cap on the partials' memory (bytes); fewer chunks above it.
WG_PARTIAL_BYTES = 1 << 24
#: Bytes of input and output-gradient rows of the pairs every channel tile of a weight-gradient
#: task runs over before the next pairs (they stay in L1 for all tiles; narrow channels).
WG_CHUNK_BYTES = 24 << 10
#: Input channels above which a packed weight gradient takes the tallest tile (the overlap of
#: its last tile costs less than the shorter tiles' extra loads and flushes).
WG_PACKED_TALL_FROM = 64
#: Packed pairs of a weight-gradient task: at most this many bytes of output-gradient rows (the
#: block's channels; they stay in L1 while every channel tile streams over them) ...
WG_PACK_G_BYTES = 8 << 10
#: ... and of input rows (one panel per channel tile; they stay in L2).
WG_PACK_X_BYTES = 192 << 10
#: Elements between the packed panels beyond their pairs (panels a multiple of 4 KiB apart
#: alias in the load/store unit).
WG_PANEL_SKEW = 16
#: Bytes of input and output-gradient rows a weight-gradient task streams for every offset and
#: channel tile before moving on (whole row blocks, at least one): they stay in L2 for all.
WG_PASS_BYTES = 1 << 18


@njit(inline="always")
def _wgrad_reduce_rows(part, out, i0, i1, MR):
    """``out[k, ci, :] = sum_ch part[ch, k, cb, row(ci), c]`` (chunks in order) for the flat
    (k, ci) indices ``i0 <= i < i1``; ``row(ci)``: the storage row of ``ci`` (the last tile
    overlaps its neighbour)."""
    nchunk, ncb, TR, NR = part.shape[0], part.shape[2], part.shape[3], part.shape[4]
    C_in, C_out = out.shape[1], out.shape[2]
    n_tiles = TR // MR
    for i in range(i0, i1):
        k = i // C_in
        ci = i - k * C_in
        tile = min(ci // MR, n_tiles - 1)
        row = tile * MR + ci - min(tile * MR, C_in - MR)
        # chunk by chunk over contiguous channels (vectorised; each element's sum in chunk order)
        for cb in range(ncb):
            c0 = np.uint64(cb * NR)
            w = np.uint64(min(NR, C_out - cb * NR))
            for c in range(w):
                out[k, ci, c0 + c] = part[0, k, cb, row, c]
            for ch in range(1, nchunk):
                for c in range(w):
                    out[k, ci, c0 + c] += part[ch, k, cb, row, c]


@njit(inline="always")
def _wgrad_partial_task(task, x, g, block, cnt, src, loc, chunk_blocks, pass_blocks, pair_chunk, part, NR, NV,
                        VW, MR):
    """Task ``task`` of the weight gradient's partial sums: chunk ``task // ncb`` x channel block
    ``task % ncb`` (module level, like ``_conv_task``)."""
    # x [N_in, C_in]; g [N_out, ncb, NR] (padded); part [nchunk, K, ncb, n_tiles * MR, NR]
    K, ncb, TR = part.shape[1], part.shape[2], part.shape[3]
    C_in = x.shape[1]
    nblk = (g.shape[0] + block - 1) // block
    n_tiles = TR // MR
    ch = task // ncb
    cb = task - ch * ncb
    for k in range(K):
        for i in range(TR):
            for c in range(NR):
                part[ch, k, cb, i, c] = 0.0
    bs = ch * chunk_blocks
    be = min(nblk, bs + chunk_blocks)
    # every element sums its pairs in (block, pair) order; the passes and pair chunks only
    # decide when an accumulator tile goes to memory and back (exactly)
    for b0 in range(bs, be, pass_blocks):
        b1 = min(be, b0 + pass_blocks)
        for k in range(K):
            for b in range(b0, b1):
                s = (b * K + k) * block
                e = s + cnt[b * K + k]
                for ps in range(s, e, pair_chunk):
                    pe = min(e, ps + pair_chunk)
                    for tile in range(n_tiles):
                        # the last tile ends at C_in, overlapping its neighbour in channels
                        # (not in storage): both compute the same sums
                        c0 = min(tile * MR, C_in - MR)
                        ao = (((ch * K + k) * ncb + cb) * TR + tile * MR) * NR
                        _wgrad_tile(x, c0, g, cb, part, ao, ps, pe, b * block, src, loc, MR, NV, VW)


@njit(inline="always")
def _wgrad_flush(xp, gp, part, ao, n, pack, ncb, n_tiles, NR, NV, VW, MR):
    """Every (channel block ``cb``, channel tile ``t``) over the ``n`` packed pairs: its
    output-gradient panel at ``cb * gstep``, its input panel at ``t * xstep``, its partial tile
    at ``ao + (cb * TR + t * MR) * NR``."""
    xstep, gstep = pack * MR + WG_PANEL_SKEW, pack * NR + WG_PANEL_SKEW
    TR = n_tiles * MR
    for cb in range(ncb):
        for tile in range(n_tiles):
            _wgrad_packed_tile(xp, tile * xstep, gp, cb * gstep, part, ao + (cb * TR + tile * MR) * NR, n, MR, NV,
                               VW)


@njit(inline="always")
def _wgrad_packed_task(ch, x, g, block, cnt, src, loc, chunk_blocks, pass_blocks, pack, part, NR, NV, VW, MR):
    """Task ``ch`` of the packed weight gradient: the partial sums of chunk ``ch``, every
    channel block (module level, like ``_conv_task``). The pairs of one offset are packed in
    order, ``pack`` at a time: each pair's input row into one panel per channel tile (``MR``
    values per pair; ``xp``) and its output-gradient row into one panel per channel block
    (``NR`` values; ``gp``), each panel ``WG_PANEL_SKEW`` elements longer than its pairs need
    (panels a multiple of 4 KiB apart made the copies' stores and the tiles' loads alias in the
    load/store unit); then every (block, tile) runs over the packed pairs (``_wgrad_flush``)."""
    # x [N_in, C_in]; g [N_out, ncb, NR] (padded); part [nchunk, K, ncb, n_tiles * MR, NR]
    K, ncb, TR = part.shape[1], part.shape[2], part.shape[3]
    C_in = x.shape[1]
    nblk = (g.shape[0] + block - 1) // block
    n_tiles = TR // MR
    n_full = C_in // MR
    for k in range(K):
        for cb in range(ncb):
            for i in range(TR):
                for c in range(np.uint64(NR)):
                    part[ch, k, cb, i, c] = 0.0
    xstep, gstep = pack * MR + WG_PANEL_SKEW, pack * NR + WG_PANEL_SKEW
    xp = np.empty(n_tiles * xstep, x.dtype)
    gp = np.empty(ncb * gstep, x.dtype)
    bs = ch * chunk_blocks
    be = min(nblk, bs + chunk_blocks)
    # every element sums its pairs in (block, pair) order; the passes and packs only decide
    # when an accumulator tile goes to memory and back (exactly)
    for b0 in range(bs, be, pass_blocks):
        b1 = min(be, b0 + pass_blocks)
        for k in range(K):
            ao = (ch * K + k) * ncb * TR * NR
            q, upack = np.uint64(0), np.uint64(pack)
            for b in range(b0, b1):
                s = (b * K + k) * block
                r0 = b * block
                for p in range(s, s + cnt[b * K + k]):
                    xo = src[p] * C_in
                    _copy_rows(g, (r0 + loc[p]) * ncb * NR, NR, gp, q * NR, gstep, ncb, False, NV, VW)
                    _copy_rows(x, xo, MR, xp, q * MR, xstep, n_full, False, 1, MR)
                    if n_full < n_tiles:
                        # the last tile ends at C_in, overlapping its neighbour in channels
                        # (not in storage): both compute the same sums
                        _copy_rows(x, xo + C_in - MR, 0, xp, n_full * xstep + q * MR, 0, 1, False, 1, MR)
                    q += np.uint64(1)
                    if q == upack:
                        _wgrad_flush(xp, gp, part, ao, q, pack, ncb, n_tiles, NR, NV, VW, MR)
                        q = np.uint64(0)
            if q > 0:
                _wgrad_flush(xp, gp, part, ao, q, pack, ncb, n_tiles, NR, NV, VW, MR)


@functools.lru_cache(maxsize=None)
def _wgrad_kernel(dt: str, NR: int, VW: int, MR: int, packed: bool):
    """Partial sums ``part[ch, k, cb, tile rows] = sum_{pairs of chunk ch} x[src, tile].T
    (outer) g[dst, block cb]`` in ``MR x NR`` register tiles (rows: input channels, columns:
    output channels), then ``out = sum_ch part[ch]`` in chunk order. Two passes of tasks
    (partials, then the sum), as ``prange`` loops or in the team form (``runtime.TeamKernel``).
    ``packed``: one task per chunk, its pairs packed (``_wgrad_packed_task``); else one per
    chunk x channel block, the tiles reading the rows through the plan (``_wgrad_partial_task``).
    ``pairs``: the pairs per pack, or per pair chunk."""
    npdt = _NP[dt]
    NV = NR // VW

    def kernel(x, g, block, cnt, src, loc, chunk_blocks, pass_blocks, pairs, part, out, reduce):
        # out [K, C_in, C_out] (not reduce: part is out)
        for task in prange(part.shape[0] if packed else part.shape[0] * part.shape[2]):
            if packed:
                _wgrad_packed_task(task, x, g, block, cnt, src, loc, chunk_blocks, pass_blocks, pairs, part, NR,
                                   NV, VW, MR)
            else:
                _wgrad_partial_task(task, x, g, block, cnt, src, loc, chunk_blocks, pass_blocks, pairs, part, NR,
                                    NV, VW, MR)
        # the ordered sum over chunks: by the calling thread when it is small (a parallel
        # region costs more), else in ranges of (offset, input channel) rows
        n = out.shape[0] * out.shape[1]
        if not reduce:
            pass
        elif part.shape[0] * n * part.shape[2] * NR <= WG_SERIAL_REDUCE:
            _wgrad_reduce_rows(part, out, 0, n, MR)
        else:
            step = (n + WG_REDUCE_TASKS - 1) // WG_REDUCE_TASKS
            for t in prange(WG_REDUCE_TASKS):
                _wgrad_reduce_rows(part, out, min(n, t * step), min(n, (t + 1) * step), MR)

    def team(data):
        words = team_words(data)
        x, i = array_arg2(words, TEAM_ARGS, npdt)
        g, i = array_arg3(words, i, npdt)
        block = words[i]
        cnt, i = array_arg1(words, i + 1, np.int32)
        src, i = array_arg1(words, i, np.int32)
        loc, i = array_arg1(words, i, np.int32)
        chunk_blocks, pass_blocks, pairs = words[i], words[i + 1], words[i + 2]
        part, i = array_arg5(words, i + 3, npdt)
        out, i = array_arg3(words, i, npdt)
        n = out.shape[0] * out.shape[1]
        step = (n + WG_REDUCE_TASKS - 1) // WG_REDUCE_TASKS
        t = next_task(words)
        while t < words[TEAM_TASKS]:
            if words[TEAM_PHASE] != 0:
                _wgrad_reduce_rows(part, out, min(n, t * step), min(n, (t + 1) * step), MR)
            elif packed:
                _wgrad_packed_task(t, x, g, block, cnt, src, loc, chunk_blocks, pass_blocks, pairs, part, NR, NV,
                                   VW, MR)
            else:
                _wgrad_partial_task(t, x, g, block, cnt, src, loc, chunk_blocks, pass_blocks, pairs, part, NR, NV,
                                    VW, MR)
            t = next_task(words)

    def tasks(phase, x, g, block, cnt, src, loc, chunk_blocks, pass_blocks, pairs, part, out, reduce):
        if phase == 0:
            return part.shape[0] if packed else part.shape[0] * part.shape[2]
        return WG_REDUCE_TASKS if reduce else 0  # (on threads already running: small sums too)

    return TeamKernel(kernel, team, tasks, phases=2)


# --------------------------------------------------------------------------------------------
# tile choice
# --------------------------------------------------------------------------------------------
# Per instruction set: the channel-block widths NR (elements), the vector width VW, and per
# (dtype, NR) the rows per tile of the forward / input-gradient kernel (a multiple of PAD) and
# the tile heights (input channels) of the weight gradient, tallest first. Accumulators per
# tile: rows x NR / VW vectors, at most 24 of AVX-512's 32 registers (12 of AVX2's 16).
# ``conv_widths``: the forward / input gradient's block widths where they differ from the weight
# gradient's ``widths``. AVX-512 shapes measured (module docstring). AVX2 forward shapes
# measured on an AMD EPYC (Zen 3) VM, 2026-12-01, on the sparse U-Net's 14 convs (batch 16 of
# streets): 16 x 4 fastest for 16 output channels (8 x 12, 16 x 8 and 32 x 4 slower: 12-140 %);
# 32 x 2 for 32 and more (vs 16 x 4: 32-channel outputs 5-15 % faster, 64 within 3 %; the 14
# convs 62.4 -> 59.3 ms on one thread, 38.6 -> 36.5 ms on two); the weight gradient's AVX2 shapes
# sized by the register rule. ``wgrad_packed_from``: ``C_in * C_out`` from which the weight
# gradient packs its pairs (``_wgrad_packed_task``; same VM, 2026-12-01, against the gathered
# tiles on the benchmark's maps: 1.2-1.7x faster at 64-128 channels, 1.05-1.15x at 32, 0.7-0.8x
# at 16, where copying the rows costs more than it saves); AVX-512: not measured, gathered.
_TILES = {
    "avx512": {
        "widths": {"f4": (8, 16, 32, 64), "f8": (4, 8, 16, 32)},
        "vw": {"f4": 16, "f8": 8},
        "conv": {("f4", 8): 16, ("f4", 16): 12, ("f4", 32): 12, ("f4", 64): 4,
                 ("f8", 4): 16, ("f8", 8): 12, ("f8", 16): 8, ("f8", 32): 4},
        "wgrad": {("f4", 8): (16, 8, 4, 2, 1), ("f4", 16): (16, 8, 4, 2, 1),
                  ("f4", 32): (12, 8, 4, 2, 1), ("f4", 64): (6, 4, 2, 1),
                  ("f8", 4): (16, 8, 4, 2, 1), ("f8", 8): (16, 8, 4, 2, 1),
                  ("f8", 16): (12, 8, 4, 2, 1), ("f8", 32): (6, 4, 2, 1)},
    },
    "avx2": {
        "widths": {"f4": (8, 16), "f8": (4, 8)},
        "conv_widths": {"f4": (8, 16, 32), "f8": (4, 8)},
        "vw": {"f4": 8, "f8": 4},
        "conv": {("f4", 8): 12, ("f4", 16): 4, ("f4", 32): 2, ("f8", 4): 12, ("f8", 8): 4},
        "wgrad": {("f4", 8): (12, 8, 4, 2, 1), ("f4", 16): (6, 4, 2, 1),
                  ("f8", 4): (12, 8, 4, 2, 1), ("f8", 8): (6, 4, 2, 1)},
        "wgrad_packed_from": 1024,
    },
}


@functools.lru_cache(maxsize=None)
def _isa() -> str:
    """``avx512`` when the host (as numba compiles for it) has AVX-512F, else ``avx2``
    (also the shapes used without AVX2: LLVM splits the vectors into what exists)."""
    from numba.core.codegen import get_host_cpu_features

    features = numba.config.CPU_FEATURES or get_host_cpu_features()
    return "avx512" if "+avx512f" in features.split(",") else "avx2"


def _dt(dtype: torch.dtype) -> str:
    return "f8" if dtype == torch.float64 else "f4"


def _block_width(dt: str, channels: int, table: str = "widths") -> int:
    """Channel block ``NR`` for ``channels`` output channels: the smallest of the tile widths
    (``table``: ``"conv_widths"`` for the forward kernel, where the instruction set has them)
    that holds them, else the widest (blocks of it, the last one padded)."""
    tiles = _TILES[_isa()]
    widths = tiles.get(table, tiles["widths"])[dt]
    for w in widths:
        if channels <= w:
            return w
    return widths[-1]


def _vector_width(dt: str, NR: int) -> int:
    """Lanes per vector: the instruction set's widest, or one narrower vector for a narrower
    block."""
    return min(NR, _TILES[_isa()]["vw"][dt])


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@cached_njit(nogil=True)
def _transpose_offsets(src, flip, out):
    """``out[kk, i, o] = src[k, o, i]`` for every offset ``k`` (``kk = K - 1 - k`` when ``flip``)
    and ``o < src.shape[1]`` (``out``'s further columns are left alone), through 8 x 8 blocks
    (a block's reads and writes each stay within 8 cache lines). PyTorch's copy of the
    transposed view took ~1.8 ns per element here (0.27 ms for 9 x 128 x 128, the input
    gradient's weight at 128 channels; one thread, AMD EPYC VM), the blocked copy about half."""
    K, n_o, n_i = src.shape
    buf = np.empty((8, 8), src.dtype)
    for k in range(K):
        s, d = src[k], out[K - 1 - k if flip else k]
        for o0 in range(0, n_o - 7, 8):
            for i0 in range(0, n_i - 7, 8):
                for a in range(8):
                    for b in range(8):
                        buf[b, a] = s[o0 + a, i0 + b]
                for b in range(8):
                    for a in range(8):
                        d[i0 + b, o0 + a] = buf[b, a]
            for i in range(n_i - n_i % 8, n_i):
                for a in range(8):
                    d[i, o0 + a] = s[o0 + a, i]
        for o in range(n_o - n_o % 8, n_o):
            for i in range(n_i):
                d[i, o] = s[o, i]


def _padded_weight(weight: torch.Tensor, NR: int, cdt: torch.dtype, flip: bool) -> torch.Tensor:
    """``[K, C_in, C_out]`` contiguous in ``cdt``, output channels zero-padded to whole blocks of
    ``NR`` (``flip``: offsets in reverse order). No copy when nothing changes; the transposed
    view of a contiguous weight (the input gradient's) copied by :func:`_transpose_offsets`."""
    K, c_in, c_out = weight.shape
    ncb = -(-c_out // NR)
    if weight.dtype == cdt and not weight.is_contiguous() and weight.transpose(1, 2).is_contiguous():
        w = (torch.zeros if ncb * NR != c_out else torch.empty)(K, c_in, ncb * NR, dtype=cdt)
        _transpose_offsets(weight.transpose(1, 2).numpy(), flip, w.numpy())
        return w
    w = weight.to(cdt)
    if flip:
        w = w.flip(0)
    if ncb * NR != c_out:
        w = torch.cat([w, w.new_zeros(K, c_in, ncb * NR - c_out)], 2)
    return w.contiguous()


def _run_conv(src: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
              plan: ConvPlan, flip: bool, relu: bool = False) -> torch.Tensor:
    dtype = src.dtype
    cdt = _compute_dtype(dtype)
    K, c_in, c_out = weight.shape
    if K != plan.kernel_volume or src.shape[0] != plan.n_in or src.shape[1] != c_in:
        raise ValueError("features, weight and plan do not match")
    n_dst = plan.n_out
    if n_dst == 0:
        return src.new_zeros(0, c_out)
    dt = _dt(cdt)
    NR = _block_width(dt, c_out, "conv_widths")
    MR = _TILES[_isa()]["conv"][(dt, NR)]
    ncb = -(-c_out // NR)
    x = src.to(cdt).contiguous()
    w = _padded_weight(weight, NR, cdt, flip)
    if bias is None:
        b = _zeros(ncb * NR, cdt)
    elif ncb * NR == c_out:
        b = bias.to(cdt).contiguous()
    else:
        b = torch.zeros(ncb * NR, dtype=cdt)
        b[:c_out] = bias
    out = torch.empty(n_dst, c_out, dtype=cdt)
    launch(_conv_kernel(dt, NR, _vector_width(dt, NR), MR, plan.pad, PREFETCH_PAIRS), x.numpy(), w.numpy(),
           b.view(ncb, NR).numpy(), relu, plan.block_rows, plan.cnt, plan.src,
           plan.loc, out.numpy(), dynamic=True)
    return out if cdt == dtype else out.to(dtype)


_ZEROS = {}


def _zeros(n: int, dtype: torch.dtype) -> torch.Tensor:
    """A shared read-only zero vector (the bias of a conv without one)."""
    z = _ZEROS.get((n, dtype))
    if z is None:
        z = _ZEROS[(n, dtype)] = torch.zeros(n, dtype=dtype)
    return z


def _plan(plan: Optional[ConvPlan], table: torch.Tensor, n_src: int) -> ConvPlan:
    if plan is None:
        return build_plan(table, n_src)
    if plan.n_out != table.shape[1] or plan.kernel_volume != table.shape[0]:
        raise ValueError("plan does not match the map")
    return plan


def conv_forward(features: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 nbr: torch.Tensor, plan: Optional[ConvPlan] = None, relu: bool = False) -> torch.Tensor:
    """``out[j] = bias + sum_k features[nbr[k, j]] @ weight[k]`` -> ``[N_out, C_out]``
    (``relu``: ``max(out, 0)``, applied as the outputs are written); ``plan`` =
    ``build_plan(nbr, N_in)`` (built here when not given)."""
    plan = _plan(plan, nbr, features.shape[0])
    return _run_conv(features, weight, bias, plan, flip=False, relu=relu)


def conv_backward_input(grad_out: torch.Tensor, weight: torch.Tensor, rev: torch.Tensor,
                        plan: Optional[ConvPlan] = None, flip_offsets: bool = False) -> torch.Tensor:
    """``grad_in[i] = sum_k grad_out[rev[k, i]] @ weight[k].T`` -> ``[N_in, C_in]``;
    ``plan`` = ``build_plan(rev, N_out)``.

    ``flip_offsets=True`` reads offset ``k`` of ``rev`` and ``plan`` as offset ``K-1-k``: for a
    symmetric (submanifold) map pass the map's own ``nbr`` and forward plan (``rev[k] =
    nbr[K-1-k]``), so one plan serves forward and backward."""
    plan = _plan(plan, rev, grad_out.shape[0])
    return _run_conv(grad_out, weight.transpose(1, 2), None, plan, flip=flip_offsets)


def conv_backward_weight(features: torch.Tensor, grad_out: torch.Tensor, nbr: torch.Tensor,
                         plan: Optional[ConvPlan] = None) -> torch.Tensor:
    """``grad_w[k] = sum_j features[nbr[k, j]].T (outer) grad_out[j]`` -> ``[K, C_in, C_out]``
    in the features' dtype (16-bit inputs accumulate in fp32); ``plan`` = ``build_plan(nbr,
    N_in)``."""
    plan = _plan(plan, nbr, features.shape[0])
    dtype = features.dtype
    cdt = _compute_dtype(dtype)
    K = plan.kernel_volume
    c_in, c_out = features.shape[1], grad_out.shape[1]
    if grad_out.shape[0] != plan.n_out or features.shape[0] != plan.n_in:
        raise ValueError("features, grad_out and plan do not match")
    if plan.n_out == 0 or plan.n_in == 0:
        return torch.zeros(K, c_in, c_out, dtype=dtype)
    dt = _dt(cdt)
    NR = _block_width(dt, c_out)
    tiles = _TILES[_isa()]
    packed = c_in * c_out >= tiles.get("wgrad_packed_from", 1 << 62)
    # input channels per tile: the shortest tile that holds them all (zero columns added);
    # else the tallest tile, or a shorter one (at least half as tall) that divides C_in; else
    # (and for packed pairs above WG_PACKED_TALL_FROM channels) the tallest, the last tile
    # overlapping its neighbour
    heights = tiles["wgrad"][(dt, NR)]
    if c_in <= heights[0]:
        MR = min(m for m in heights if m >= c_in)
    elif packed and c_in > WG_PACKED_TALL_FROM:
        MR = heights[0]
    else:
        MR = next((m for m in heights if c_in % m == 0 and 2 * m >= heights[0]), heights[0])
    ncb = -(-c_out // NR)
    x = features.to(cdt).contiguous()
    if c_in < MR:
        x = torch.cat([x, x.new_zeros(x.shape[0], MR - c_in)], 1)
    g = grad_out.to(cdt)
    if ncb * NR != c_out:
        gp = torch.zeros(plan.n_out, ncb * NR, dtype=cdt)
        gp[:, :c_out] = g
        g = gp
    else:
        g = g.contiguous()
    ci_k = x.shape[1]
    n_tiles = -(-ci_k // MR)
    TR = n_tiles * MR
    nblk = -(-plan.n_out // plan.block_rows)
    nchunk = max(1, min(plan.n_out // WG_MIN_CHUNK_ROWS, nblk, WG_MAX_CHUNKS,
                        int(plan.cnt.sum()) // (K * WG_MIN_CHUNK_PAIRS),
                        WG_PARTIAL_BYTES // (K * TR * ncb * NR * x.element_size())))
    chunk_blocks = -(-nblk // nchunk)
    nchunk = -(-nblk // chunk_blocks)
    out = torch.empty(K, ci_k, c_out, dtype=cdt)
    direct = nchunk == 1 and ncb * NR == c_out == NR and TR == ci_k  # the one partial is out
    part = out.view(1, K, 1, TR, NR) if direct else torch.empty(nchunk, K, ncb, TR, NR, dtype=cdt)
    row_bytes = (ci_k + ncb * NR) * x.element_size()
    pass_blocks = max(1, WG_PASS_BYTES // (row_bytes * plan.block_rows))
    el = x.element_size()
    if packed:
        pairs = max(16, min(WG_PACK_G_BYTES // (NR * el), WG_PACK_X_BYTES // (TR * el)))
    else:  # several channel tiles re-read each pair's rows: in chunks that stay in L1 for all
        pairs = max(16, WG_CHUNK_BYTES // row_bytes) if n_tiles * ncb > 1 else 1 << 30
    launch(_wgrad_kernel(dt, NR, _vector_width(dt, NR), MR, packed), x.numpy(),
           g.view(plan.n_out, ncb, NR).numpy(), plan.block_rows, plan.cnt, plan.src,
           plan.loc, chunk_blocks, pass_blocks, pairs, part.numpy(), out.numpy(), not direct,
           dynamic=True)
    if ci_k != c_in:
        out = out[:, :c_in].contiguous()
    return out if cdt == dtype else out.to(dtype)
