"""Sparse convolution on the CPU in numba: output-stationary gathered GEMMs with register tiles.

(draft; the contract docstring is completed below once the tile set is measured)
"""
from __future__ import annotations

import functools
import threading
from typing import NamedTuple, Optional

import numpy as np
import torch

import numba
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

#: Output rows per block (one task of the forward / input-gradient kernels, and the unit of the
#: plan). The block's accumulator ``[BLOCK_ROWS, NR]`` lives on the task's stack.
BLOCK_ROWS = 128


# --------------------------------------------------------------------------------------------
# intrinsics
# --------------------------------------------------------------------------------------------
@intrinsic
def _stack_ptr(typingctx, dtype, size):
    """Pointer to ``size`` (a compile-time constant) elements of ``dtype`` on the stack: an
    ``alloca`` in the function's entry block, so LLVM's SROA can keep a constant-indexed tile
    in registers."""
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
class ConvPlan(NamedTuple):
    """A map's pairs grouped per (row block, offset): pairs of block ``b``, offset ``k`` are
    ``bptr[b*K + k] : bptr[b*K + k + 1]``, ordered by output row; ``loc`` is the output row
    within its block, ``src`` the input row. The identity offset (if any) has no pairs here."""

    bptr: torch.Tensor  # int64 [n_blocks * K + 1]
    loc: torch.Tensor   # int32 [pairs]
    src: torch.Tensor   # int32 [pairs]
    n_out: int
    n_in: int
    kernel_volume: int
    identity_offset: int  # -1 when none


def build_plan(nbr: torch.Tensor, n_in: int, identity_offset: Optional[int] = None) -> ConvPlan:
    """The :class:`ConvPlan` of ``nbr [K, N_out]`` (int32, -1 = missing)."""
    K, n_out = nbr.shape
    nb = -(-n_out // BLOCK_ROWS)
    t = torch.full((K, nb * BLOCK_ROWS), -1, dtype=torch.int32)
    t[:, :n_out] = nbr
    t = t.view(K, nb, BLOCK_ROWS).permute(1, 0, 2).contiguous()
    ident = -1 if identity_offset is None else int(identity_offset)
    if ident >= 0:
        t[:, ident] = -1
    valid = t >= 0
    bptr = torch.zeros(nb * K + 1, dtype=torch.int64)
    torch.cumsum(valid.sum(2).view(-1), 0, out=bptr[1:])
    b, k, r = valid.nonzero(as_tuple=True)
    src = t[b, k, r]
    return ConvPlan(bptr, r.to(torch.int32), src, n_out, int(n_in), K, ident)


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
_NP = {"f4": np.float32, "f8": np.float64}


# --------------------------------------------------------------------------------------------
# micro-kernels, written as LLVM IR with explicit vector types
# --------------------------------------------------------------------------------------------
# LLVM's auto-vectorisers do not reliably turn a register tile written as scalar loops into
# vector FMAs: depending on the tile shape they fully unroll first and leave scalar code, or
# SLP-vectorise it into gathers and scatters through memory (measured: 4-14x slower than the
# vectorised shapes). The micro-kernels below emit the vector code directly: the
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


def _mark_wide(builder):
    """Mark the function being generated with ``"prefer-vector-width"="512"`` and
    ``"min-legal-vector-width"="512"`` (what ``clang -mprefer-vector-width=512`` emits): LLVM's
    x86 tuning for Ice Lake and later (this host reports ``rocketlake``) prefers 256-bit
    vectors and would split every 512-bit operation in two, halving an AVX-512 core's FMA
    throughput. Only this function is affected; without AVX-512 the backend splits the
    vectors into what the CPU has. llvmlite only accepts a fixed list of enum attributes, so
    the string attributes go into the attribute set directly (they are printed as they are)."""
    attrs = builder.function.attributes
    set.add(attrs, '"prefer-vector-width"="512"')
    set.add(attrs, '"min-legal-vector-width"="512"')


def _make_conv_tile(M: int, NV: int, VW: int):
    """``acc[lo[r]] += x[xo[r]] @ W`` for ``r < M`` (rows of ``NR = NV * VW`` channels): a loop over
    the ``C_in`` input channels with ``M x NV`` vector accumulators; per channel ``NV`` weight
    vectors are loaded once and each row's input value is broadcast once.

    Arguments: ``x`` (2-D array), ``xo`` (pointer to ``M`` element offsets of the rows in
    ``x``), ``w`` (4-D array), ``wo`` (element offset of the ``[C_in, NR]`` weight block),
    ``acc`` (2-D array), ``lo`` (pointer to ``M`` row numbers of ``acc``)."""
    NR = NV * VW

    @intrinsic
    def tile(typingctx, x, xo, w, wo, acc, lo):
        if not (isinstance(x, types.Array) and isinstance(w, types.Array) and isinstance(acc, types.Array)):
            return None

        def codegen(context, builder, sig, args):
            _mark_wide(builder)
            fty = context.get_value_type(x.dtype)
            vty = _vec_type(fty, VW)
            i64 = ir.IntType(64)
            fma = _fma_fn(builder, vty)
            xa = context.make_array(x)(context, builder, args[0])
            wa = context.make_array(w)(context, builder, args[2])
            aa = context.make_array(acc)(context, builder, args[4])
            xo_p, wo_v, lo_p = args[1], args[3], args[5]
            c_in = builder.extract_value(xa.shape, 1)
            slots = cgutils.alloca_once(builder, ir.ArrayType(vty, M * NV))

            def slot(i):
                return builder.gep(slots, [ir.Constant(i64, 0), ir.Constant(i64, i)], inbounds=True)

            arows = []
            xrows = []
            for r in range(M):
                lo_r = builder.load(builder.gep(lo_p, [ir.Constant(i64, r)]))
                arow = builder.gep(aa.data, [builder.mul(lo_r, ir.Constant(i64, NR))])
                arows.append(arow)
                xrows.append(builder.gep(xa.data, [builder.load(builder.gep(xo_p, [ir.Constant(i64, r)]))]))
                for v in range(NV):
                    ptr = builder.bitcast(builder.gep(arow, [ir.Constant(i64, v * VW)]), vty.as_pointer())
                    builder.store(builder.load(ptr, align=_align(fty)), slot(r * NV + v))
            wbase = builder.gep(wa.data, [wo_v])
            with cgutils.for_range(builder, c_in) as loop:
                ci = loop.index
                wrow = builder.gep(wbase, [builder.mul(ci, ir.Constant(i64, NR))])
                wv = [builder.load(builder.bitcast(builder.gep(wrow, [ir.Constant(i64, v * VW)]),
                                                   vty.as_pointer()), align=_align(fty)) for v in range(NV)]
                for r in range(M):
                    a = _splat(builder, builder.load(builder.gep(xrows[r], [ci])), vty)
                    for v in range(NV):
                        sp = slot(r * NV + v)
                        builder.store(builder.call(fma, [a, wv[v], builder.load(sp)]), sp)
            for r in range(M):
                for v in range(NV):
                    ptr = builder.bitcast(builder.gep(arows[r], [ir.Constant(i64, v * VW)]), vty.as_pointer())
                    builder.store(builder.load(slot(r * NV + v)), ptr, align=_align(fty))
            return context.get_dummy_value()

        return types.none(x, xo, w, wo, acc, lo), codegen

    return tile


def _make_wgrad_tile(M: int, NV: int, VW: int):
    """``accb[ao:] += sum_p x[src_p, cr[:M]].T (outer) g[dst_p, cb-th block]`` over the pairs of
    offset ``k`` in the row blocks ``b0 <= b < b1``, in order (block, pair), with ``M x NV``
    vector accumulators (rows: input channels ``cr[r]``, columns: the block's output
    channels). Implicit (identity) offsets pair every row with itself; otherwise block ``b``'s
    pairs are ``bptr[b*K + k] : bptr[b*K + k + 1]``, input row ``src[p]``, output row
    ``b * BLOCK_ROWS + loc[p]``.

    Arguments: ``x`` (2-D), ``c0`` (first of the ``M`` consecutive input channels), ``g``
    (3-D ``[N_out, ncb, NR]``), ``cb``, ``accb`` (2-D), ``ao``, ``b0``, ``b1``, ``k``, ``K``,
    ``implicit``, ``bptr`` (1-D int64), ``loc``, ``src`` (1-D int32)."""
    NR = NV * VW

    @intrinsic
    def tile(typingctx, x, c0, g, cb, accb, ao, b0, b1, k, K, implicit, bptr, loc, src):
        if not (isinstance(x, types.Array) and isinstance(g, types.Array)):
            return None

        def codegen(context, builder, sig, args):
            _mark_wide(builder)
            fty = context.get_value_type(x.dtype)
            vty = _vec_type(fty, VW)
            i64 = ir.IntType(64)
            fma = _fma_fn(builder, vty)
            xa = context.make_array(x)(context, builder, args[0])
            ga = context.make_array(g)(context, builder, args[2])
            ba = context.make_array(accb)(context, builder, args[4])
            pa = context.make_array(bptr)(context, builder, args[11])
            la = context.make_array(loc)(context, builder, args[12])
            sa = context.make_array(src)(context, builder, args[13])
            c0_v, cb_v, ao_v, b0_v, b1_v, k_v, K, imp_v = args[1], args[3], args[5], args[6], args[7], args[8], args[9], args[10]
            c_in = builder.extract_value(xa.shape, 1)
            n_out = builder.extract_value(ga.shape, 0)
            g_row = builder.mul(builder.extract_value(ga.shape, 1), ir.Constant(i64, NR))
            gcol = builder.mul(cb_v, ir.Constant(i64, NR))
            slots = cgutils.alloca_once(builder, ir.ArrayType(vty, M * NV))

            def slot(i):
                return builder.gep(slots, [ir.Constant(i64, 0), ir.Constant(i64, i)], inbounds=True)

            abase = builder.gep(ba.data, [ao_v])
            for i in range(M * NV):
                ptr = builder.bitcast(builder.gep(abase, [ir.Constant(i64, i * VW)]), vty.as_pointer())
                builder.store(builder.load(ptr, align=_align(fty)), slot(i))
            imp = builder.icmp_unsigned("!=", imp_v, ir.Constant(imp_v.type, 0))
            with cgutils.for_range(builder, b1_v, start=b0_v) as bl:
                b = bl.index
                r0 = builder.mul(b, ir.Constant(i64, BLOCK_ROWS))
                rows = builder.sub(n_out, r0)
                nr = builder.select(builder.icmp_signed("<", rows, ir.Constant(i64, BLOCK_ROWS)),
                                    rows, ir.Constant(i64, BLOCK_ROWS))
                bk = builder.add(builder.mul(b, K), k_v)
                s_e = builder.load(builder.gep(pa.data, [bk]))
                e_e = builder.load(builder.gep(pa.data, [builder.add(bk, ir.Constant(i64, 1))]))
                s_v = builder.select(imp, ir.Constant(i64, 0), s_e)
                e_v = builder.select(imp, nr, e_e)
                with cgutils.for_range(builder, e_v, start=s_v) as loop:
                    p = loop.index
                    ident_row = builder.add(r0, p)
                    xi = builder.select(imp, ident_row,
                                        builder.sext(builder.load(builder.gep(sa.data, [p])), i64))
                    gi = builder.select(imp, ident_row, builder.add(
                        r0, builder.sext(builder.load(builder.gep(la.data, [p])), i64)))
                    xrow = builder.gep(xa.data, [builder.add(builder.mul(xi, c_in), c0_v)])
                    grow = builder.gep(ga.data, [builder.add(builder.mul(gi, g_row), gcol)])
                    gv = [builder.load(builder.bitcast(builder.gep(grow, [ir.Constant(i64, v * VW)]),
                                                       vty.as_pointer()), align=_align(fty))
                          for v in range(NV)]
                    for r in range(M):
                        a = _splat(builder, builder.load(builder.gep(xrow, [ir.Constant(i64, r)])), vty)
                        for v in range(NV):
                            sp = slot(r * NV + v)
                            builder.store(builder.call(fma, [a, gv[v], builder.load(sp)]), sp)
            for i in range(M * NV):
                ptr = builder.bitcast(builder.gep(abase, [ir.Constant(i64, i * VW)]), vty.as_pointer())
                builder.store(builder.load(slot(i)), ptr, align=_align(fty))
            return context.get_dummy_value()

        return types.none(x, c0, g, cb, accb, ao, b0, b1, k, K, implicit, bptr, loc, src), codegen

    return tile


def _vector_width(dt: str, NR: int) -> int:
    """Lanes per vector: 512-bit vectors, or one narrower vector for a narrower block."""
    return min(NR, 16 if dt == "f4" else 8)


@functools.lru_cache(maxsize=None)
def _conv_kernel(dt: str, NR: int, MR: int, MH: int):
    """``out = bias + sum_k x[map_k] @ w[k]`` for ``NR``-wide channel blocks, tiles of ``MR``
    pairs (``MH``-pair tiles for short tails)."""
    npdt = _NP[dt]
    VW = _vector_width(dt, NR)
    tile_full = _make_conv_tile(MR, NR // VW, VW)
    tile_half = _make_conv_tile(MH, NR // VW, VW)
    A = (BLOCK_ROWS + 1) * NR

    @njit(parallel=True, cache=False, nogil=True)
    def kernel(x, w, bias, has_bias, bptr, loc, src, ident, out):
        # x [N_in, C_in]; w [ncb, K, C_in, NR]; bias [ncb, NR]; out [N_out, ncb, NR]
        n_out = out.shape[0]
        C_in = x.shape[1]
        ncb, K = w.shape[0], w.shape[1]
        nblk = (n_out + BLOCK_ROWS - 1) // BLOCK_ROWS
        for task in prange(nblk * ncb):
            b = task // ncb
            cb = task - b * ncb
            r0 = b * BLOCK_ROWS
            nr = min(BLOCK_ROWS, n_out - r0)
            # the block's accumulator; row BLOCK_ROWS takes the rows of a partial tile
            acc = numba.carray(_stack_ptr(npdt, A), (BLOCK_ROWS + 1, NR))
            xo_p = _stack_ptr(np.int64, MR)
            lo_p = _stack_ptr(np.int64, MR)
            xo = numba.carray(xo_p, (MR,))
            lo = numba.carray(lo_p, (MR,))
            for r in range(nr):
                for c in range(NR):
                    acc[r, c] = bias[cb, c] if has_bias else 0.0
            for k in range(K):
                implicit = k == ident
                if implicit:
                    s = 0
                    e = nr
                else:
                    s = bptr[b * K + k]
                    e = bptr[b * K + k + 1]
                wo = ((cb * K + k) * C_in) * NR
                p = s
                while p < e:
                    m = min(MR, e - p)
                    for r in range(MR):
                        q = p + min(r, m - 1)
                        xo[r] = (r0 + q if implicit else np.int64(src[q])) * C_in
                        lo[r] = (p + r if implicit else np.int64(loc[p + r])) if r < m else BLOCK_ROWS
                    if m > MH:
                        tile_full(x, xo_p, w, wo, acc, lo_p)
                    else:
                        tile_half(x, xo_p, w, wo, acc, lo_p)
                    p += MR
            for r in range(nr):
                for c in range(NR):
                    out[r0 + r, cb, c] = acc[r, c]

    return kernel


#: Row chunks of the weight gradient: each chunk's sums go to its own partial
#: ``[K, C_in, C_out]`` and the partials are summed in chunk order. The count depends on the
#: map and the channels only (never on the threads): results are the same at any thread count.
WG_MAX_CHUNKS = 16
#: Cap on the partials' memory (bytes); fewer chunks above it.
WG_PARTIAL_BYTES = 1 << 24
#: Row blocks whose pairs a weight-gradient task streams for every offset and channel tile
#: before moving on: their gathered rows stay in L2 for all of them.
WG_CHUNK_BLOCKS = 8


@functools.lru_cache(maxsize=None)
def _wgrad_kernel(dt: str, NR: int, MR: int):
    """Partial sums ``part[ch, k, cb, tile rows] = sum_{pairs of chunk ch} x[src, tile].T
    (outer) g[dst, block cb]`` in ``MR x NR`` register tiles (rows: input channels, columns:
    output channels)."""
    VW = _vector_width(dt, NR)
    wtile = _make_wgrad_tile(MR, NR // VW, VW)

    @njit(parallel=True, cache=False, nogil=True)
    def kernel(x, g, bptr, loc, src, ident, chunk_blocks, part):
        # x [N_in, C_in]; g [N_out, ncb, NR] (padded); part [nchunk, K, ncb, n_tiles * MR, NR]
        nchunk, K, ncb, TR = part.shape[0], part.shape[1], part.shape[2], part.shape[3]
        C_in = x.shape[1]
        n_out = g.shape[0]
        nblk = (n_out + BLOCK_ROWS - 1) // BLOCK_ROWS
        n_tiles = TR // MR
        for task in prange(nchunk * ncb):
            ch = task // ncb
            cb = task - ch * ncb
            for k in range(K):
                for i in range(TR):
                    for c in range(NR):
                        part[ch, k, cb, i, c] = 0.0
            bs = ch * chunk_blocks
            be = min(nblk, bs + chunk_blocks)
            for b0 in range(bs, be, WG_CHUNK_BLOCKS):
                b1 = min(be, b0 + WG_CHUNK_BLOCKS)
                for k in range(K):
                    for tile in range(n_tiles):
                        # the last tile ends at C_in, overlapping its neighbour in channels
                        # (not in storage): both compute the same sums
                        c0 = min(tile * MR, C_in - MR)
                        ao = (((ch * K + k) * ncb + cb) * TR + tile * MR) * NR
                        wtile(x, c0, g, cb, part, ao, b0, b1, k, K, k == ident, bptr, loc, src)

    return kernel


@functools.lru_cache(maxsize=None)
def _wgrad_reduce_kernel(dt: str, NR: int, MR: int):
    """``out[k, ci, co] = sum_ch part[ch, k, cb, row(ci), c]`` in chunk order."""

    @njit(parallel=True, cache=False, nogil=True)
    def kernel(part, out):
        nchunk, K, ncb, TR = part.shape[0], part.shape[1], part.shape[2], part.shape[3]
        C_in, C_out = out.shape[1], out.shape[2]
        n_tiles = TR // MR
        for task in prange(K * C_in):
            k = task // C_in
            ci = task - k * C_in
            tile = min(ci // MR, n_tiles - 1)
            row = tile * MR + ci - min(tile * MR, C_in - MR)
            for cb in range(ncb):
                cw = min(NR, C_out - cb * NR)
                for c in range(cw):
                    acc = part[0, k, cb, row, c]
                    for ch in range(1, nchunk):
                        acc += part[ch, k, cb, row, c]
                    out[k, ci, cb * NR + c] = acc

    return kernel


# --------------------------------------------------------------------------------------------
# tile choice
# --------------------------------------------------------------------------------------------
# (dtype, NR) -> (MR, MH) of the forward / input-gradient kernel; NR -> MR of the weight gradient
_CONV_TILES = {
    ("f4", 8): (12, 4), ("f4", 16): (12, 4), ("f4", 32): (8, 4), ("f4", 64): (6, 3),
    ("f8", 4): (12, 4), ("f8", 8): (12, 4), ("f8", 16): (8, 4), ("f8", 32): (6, 3),
}
_WGRAD_TILES = {
    ("f4", 8): 16, ("f4", 16): 16, ("f4", 32): 12, ("f4", 64): 6,
    ("f8", 4): 16, ("f8", 8): 16, ("f8", 16): 12, ("f8", 32): 6,
}


def _dt(dtype: torch.dtype) -> str:
    return "f8" if dtype == torch.float64 else "f4"


def _block_width(dt: str, channels: int) -> int:
    """Channel block ``NR`` for ``channels`` output channels: the smallest of the tile widths
    that holds them, else the widest (blocks of it, the last one padded)."""
    widths = (8, 16, 32, 64) if dt == "f4" else (4, 8, 16, 32)
    for w in widths:
        if channels <= w:
            return w
    return widths[-1]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_launch_lock = threading.Lock()
_configured = False


def _configure_threading() -> None:
    """The one place this package sets numba configuration: the threading layer, before numba
    starts its thread pool, and only when nobody chose one (``NUMBA_THREADING_LAYER`` unset
    and no parallel numba code has run yet).

    ``workqueue``: its idle threads block. numba's ``omp`` layer loads the system's GNU
    OpenMP, a second runtime next to PyTorch's own ``libgomp``; its idle threads spin
    (``GOMP_SPINCOUNT``) and, on this 2-core VM where ``pause`` is slow, kept a core busy for
    ~0.3 s after every kernel, making single-threaded ``index_add_`` calls 15-30x slower.
    ``tbb`` is not installed by the ``cpu`` extra. ``workqueue`` is not thread-safe: launches
    are serialised by ``_launch_lock``."""
    global _configured
    if _configured:
        return
    from numba.np.ufunc import parallel as _parallel

    if not _parallel._is_initialized and str(numba.config.THREADING_LAYER).lower() == "default":
        numba.config.THREADING_LAYER = "workqueue"
    _configured = True


def _set_threads() -> int:
    """numba's threads for the next parallel region: torch's setting, capped by the pool."""
    _configure_threading()
    n = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)
    return n


def _blocked_weight(weight: torch.Tensor, NR: int, cdt: torch.dtype, flip: bool) -> torch.Tensor:
    """``[K, C_in, C_out]`` -> ``[ncb, K, C_in, NR]`` contiguous, zero-padded to the block width."""
    K, c_in, c_out = weight.shape
    ncb = -(-c_out // NR)
    w = weight.flip(0) if flip else weight
    wb = torch.zeros(K, c_in, ncb * NR, dtype=cdt)
    wb[:, :, :c_out] = w
    return wb.view(K, c_in, ncb, NR).permute(2, 0, 1, 3).contiguous()


def _launch(kernel, *args) -> None:
    """Run a parallel kernel with torch's thread count, tasks handed out one at a time
    (dynamic scheduling; which thread runs a task never changes a result). Hold
    ``_launch_lock``."""
    _set_threads()
    old = numba.set_parallel_chunksize(1)
    try:
        kernel(*args)
    finally:
        numba.set_parallel_chunksize(old)


def _run_conv(src: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
              plan: ConvPlan, flip: bool) -> torch.Tensor:
    dtype = src.dtype
    cdt = _compute_dtype(dtype)
    K, c_in, c_out = weight.shape
    n_dst = plan.n_out
    if n_dst == 0:
        return src.new_zeros(0, c_out)
    dt = _dt(cdt)
    NR = _block_width(dt, c_out)
    MR, MH = _CONV_TILES[(dt, NR)]
    x = src.to(cdt).contiguous()
    w = _blocked_weight(weight.to(cdt), NR, cdt, flip)
    ncb = w.shape[0]
    b = torch.zeros(ncb * NR, dtype=cdt)
    if bias is not None:
        b[:c_out] = bias.to(cdt)
    out = torch.empty(n_dst, ncb, NR, dtype=cdt)
    kernel = _conv_kernel(dt, NR, MR, MH)
    with _launch_lock:
        _launch(kernel, x.numpy(), w.numpy(), b.view(ncb, NR).numpy(), bias is not None,
                plan.bptr.numpy(), plan.loc.numpy(), plan.src.numpy(), plan.identity_offset,
                out.numpy())
    out = out.view(n_dst, ncb * NR)
    if ncb * NR != c_out:  # padded channel block: one copy, only for such channel counts
        out = out[:, :c_out].contiguous()
    return out if cdt == dtype else out.to(dtype)


def _plan(plan: Optional[ConvPlan], table: torch.Tensor, n_src: int, identity_offset) -> ConvPlan:
    if plan is None:
        return build_plan(table, n_src, identity_offset)
    if plan.n_out != table.shape[1] or plan.kernel_volume != table.shape[0]:
        raise ValueError("plan does not match the map")
    return plan


def conv_forward(features: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 nbr: torch.Tensor, identity_offset: Optional[int] = None,
                 plan: Optional[ConvPlan] = None) -> torch.Tensor:
    """``out[j] = bias + sum_k features[nbr[k, j]] @ weight[k]`` -> ``[N_out, C_out]``."""
    plan = _plan(plan, nbr, features.shape[0], identity_offset)
    return _run_conv(features, weight, bias, plan, flip=False)


def conv_backward_input(grad_out: torch.Tensor, weight: torch.Tensor, rev: torch.Tensor,
                        identity_offset: Optional[int] = None, plan: Optional[ConvPlan] = None,
                        flip_offsets: bool = False) -> torch.Tensor:
    """``grad_in[i] = sum_k grad_out[rev[k, i]] @ weight[k].T`` -> ``[N_in, C_in]``.

    ``flip_offsets=True`` reads offset ``k`` of ``rev`` (and of ``plan``) as offset ``K-1-k``:
    for a symmetric (submanifold) map pass its ``nbr`` and forward plan, since then
    ``rev[k] = nbr[K-1-k]``."""
    plan = _plan(plan, rev, grad_out.shape[0], identity_offset)
    return _run_conv(grad_out, weight.transpose(1, 2), None, plan, flip=flip_offsets)


def conv_backward_weight(features: torch.Tensor, grad_out: torch.Tensor, nbr: torch.Tensor,
                         identity_offset: Optional[int] = None,
                         plan: Optional[ConvPlan] = None) -> torch.Tensor:
    """``grad_w[k] = sum_j features[nbr[k, j]].T (outer) grad_out[j]`` -> ``[K, C_in, C_out]``
    in the features' dtype (fp32 accumulation for 16-bit inputs)."""
    plan = _plan(plan, nbr, features.shape[0], identity_offset)
    dtype = features.dtype
    cdt = _compute_dtype(dtype)
    K = plan.kernel_volume
    c_in, c_out = features.shape[1], grad_out.shape[1]
    if plan.n_out == 0 or features.shape[0] == 0:
        return torch.zeros(K, c_in, c_out, dtype=dtype)
    dt = _dt(cdt)
    NR = _block_width(dt, c_out)
    MR = _WGRAD_TILES[(dt, NR)]
    ncb = -(-c_out // NR)
    x = features.to(cdt).contiguous()
    if c_in < MR:  # a tile spans MR input channels: zero columns up to MR (sliced off below)
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
    nblk = -(-plan.n_out // BLOCK_ROWS)
    nchunk = max(1, min(nblk, WG_MAX_CHUNKS,
                        WG_PARTIAL_BYTES // (K * n_tiles * MR * ncb * NR * x.element_size())))
    chunk_blocks = -(-nblk // nchunk)
    nchunk = -(-nblk // chunk_blocks)
    part = torch.empty(nchunk, K, ncb, n_tiles * MR, NR, dtype=cdt)
    out = torch.empty(K, ci_k, c_out, dtype=cdt)
    kernel = _wgrad_kernel(dt, NR, MR)
    reduce = _wgrad_reduce_kernel(dt, NR, MR)
    with _launch_lock:
        _launch(kernel, x.numpy(), g.view(plan.n_out, ncb, NR).numpy(), plan.bptr.numpy(),
                plan.loc.numpy(), plan.src.numpy(), plan.identity_offset, chunk_blocks,
                part.numpy())
        _launch(reduce, part.numpy(), out.numpy())
    if ci_k != c_in:
        out = out[:, :c_in].contiguous()
    return out if cdt == dtype else out.to(dtype)
