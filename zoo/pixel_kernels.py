"""The numba kernels behind ``zoo.fused`` (imported on first use: importing it imports numba).

``compose_kernel(npdt, K)``: the sparse U-Net's output assembly (bilinear, guided upsampling,
active pixels), in tasks of one row of cells, compiled per class count ``K``.
``refine_kernel(npdt)``: the colour-weighted window mean of the pixels ``idx``, in tasks of
``PIXELS_PER_TASK`` pixels. ``uncertain_kernel(npdt)``: the refinement's candidates (top-2
margins of the inactive pixels of unsure cells).
``energy_kernel(npdt)``: the ``residual`` mask policy's energy; ``select_kernel()``: its threshold
(radix select, float32). Float32 or float64 (``npdt``:
``np.float32`` / ``np.float64``); each output row written by one task, once or accumulated in
a fixed order (deterministic: the same bits on any number of threads). All are
``runtime.TeamKernel`` s (PyTorch's OpenMP threads; numba's pool where PyTorch has no OpenMP
runtime), run with ``runtime.launch``.

Loops over the classes (19 logits) are written with their taps spelled out (four, eight or
nine rows per loop), which LLVM vectorises; ``fast_exp`` is an ``exp`` it can vectorise too.
"""
import functools
import math

import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import types
from numba.extending import intrinsic, overload

from spconv2d.backends.numba_kernels.runtime import (TEAM_ARGS, TEAM_TASKS, TeamKernel, array_arg1, array_arg2,
                                                     array_arg3, array_arg4, next_task, team_words)

PIXELS_PER_TASK = 64


# --------------------------------------------------------------------------------------------
# exp that vectorises
# --------------------------------------------------------------------------------------------
# LLVM has no vector form of ``exp`` without a vector math library (numba uses Intel's SVML
# when the ``icc_rt`` package is installed; the ``cpu`` extra does not install it), so a loop
# of ``math.exp`` runs one element at a time. ``fast_exp`` in float32 is arithmetic only (and a
# bit cast), which the loop vectoriser turns into 8-wide AVX2 code: Cody-Waite range reduction
# ``x = n ln2 + r``, ``|r| <= ln2 / 2``, Cephes' ``expf`` polynomial for ``exp(r)`` (relative
# error ~1e-7, float32's own rounding), ``2^n`` built in the exponent bits. In float64 it is
# ``math.exp``.
_LOG2E = np.float32(1.4426950408889634)
_HALF = np.float32(0.5)
_LN2_HI, _LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)
_EXP_MIN = np.float32(-87.0)  # exp(-87) ~ 1.6e-38: 2^n stays a normal float32
_P0, _P1, _P2 = np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3)
_P3, _P4, _P5 = np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1)
_ONE = np.float32(1.0)


@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the low 32 bits of the integer ``bits``."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = args[0]
        if bits.bitwidth != 32:
            v = builder.trunc(v, ir.IntType(32)) if bits.bitwidth > 32 else builder.zext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def _float32_bits(typingctx, value):
    """The bit pattern of the float32 ``value`` as a non-negative int64 (zero-extended)."""
    if value != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.zext(builder.bitcast(args[0], ir.IntType(32)), ir.IntType(64))

    return types.int64(value), codegen


@intrinsic
def ieee_div(typingctx, a, b):
    """``a / b`` as the IEEE division of two floats of one type (``b = 0`` gives inf or NaN), with
    no zero check: numba guards every ``/`` against a zero divisor (to raise Python's
    ``ZeroDivisionError``), a compare and branch per element that kept the softmax's
    normalisation loop scalar (``perf`` + ``gdb`` on the output assembly). The same bits."""
    if not (isinstance(a, types.Float) and a == b):
        return None

    def codegen(context, builder, sig, args):
        return builder.fdiv(args[0], args[1])

    return a(a, b), codegen


def fast_exp(x):
    """``exp(x)`` for ``x <= 0`` (a softmax's shifted scores; below -87 it returns ~1.6e-38
    instead of a smaller number or 0): vectorisable in float32, ``math.exp`` in float64."""
    return math.exp(x)


@overload(fast_exp, inline="always")
def _fast_exp_overload(x):
    if x == types.float32:
        def impl(x):
            x = max(x, _EXP_MIN)
            n = np.floor(x * _LOG2E + _HALF)
            r = x - n * _LN2_HI - n * _LN2_LO
            p = (((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5) * r * r + r + _ONE
            return p * _float32_from_bits((np.int32(n) + np.int32(127)) << np.int32(23))
        return impl
    if isinstance(x, types.Float):
        return lambda x: math.exp(x)
    return None


# --------------------------------------------------------------------------------------------
# refinement, its candidates, mask energy
# --------------------------------------------------------------------------------------------
TAP_GROUP = 8  # window taps per pass over a refined pixel's logits


@njit(inline="always")
def _refine_pixels(t, rows, images, idx, r, inv2sr2, res):
    """Pixels ``idx[t * PIXELS_PER_TASK ...]``: the window's colour weights (``fast_exp``, one
    vectorised loop; taps outside the image get weight 0 and the pixel's own row), normalised,
    then ``res[i] = sum_q w_q rows[q]`` in passes of ``TAP_GROUP`` taps over the logits (each
    pass one vectorised loop over the classes; taps in window order)."""
    B, C, H, W = images.shape
    K = rows.shape[1]
    side = 2 * r + 1
    n = -(-(side * side) // TAP_GROUP) * TAP_GROUP  # taps, padded with weight-0 ones
    wts = np.empty(n, images.dtype)
    trow = np.empty(n, np.int64)
    a = inv2sr2[0]
    for i in range(t * PIXELS_PER_TASK, min(idx.shape[0], (t + 1) * PIXELS_PER_TASK)):
        p = idx[i]
        b, y, x = p // (H * W), (p // W) % H, p % W
        for q in range(n):
            trow[q] = p
            wts[q] = -np.inf
        for dy in range(-r, r + 1):
            qy = y + dy
            if qy < 0 or qy >= H:
                continue
            for dx in range(-r, r + 1):
                qx = x + dx
                if qx < 0 or qx >= W:
                    continue
                d2 = 0.0
                for c in range(C):
                    diff = images[b, c, y, x] - images[b, c, qy, qx]
                    d2 += diff * diff
                q = (dy + r) * side + dx + r
                trow[q] = (b * H + qy) * W + qx
                wts[q] = -d2 * a
        for q in range(n):
            wts[q] = fast_exp(wts[q]) if wts[q] > -np.inf else 0.0
        total = wts[0]
        for q in range(1, n):
            total += wts[q]
        for q in range(n):
            wts[q] /= total
        dst = res[i]
        for g in range(0, n, TAP_GROUP):
            r0, r1, r2, r3 = rows[trow[g]], rows[trow[g + 1]], rows[trow[g + 2]], rows[trow[g + 3]]
            r4, r5, r6, r7 = rows[trow[g + 4]], rows[trow[g + 5]], rows[trow[g + 6]], rows[trow[g + 7]]
            w0, w1, w2, w3 = wts[g], wts[g + 1], wts[g + 2], wts[g + 3]
            w4, w5, w6, w7 = wts[g + 4], wts[g + 5], wts[g + 6], wts[g + 7]
            if g == 0:
                for k in range(K):
                    dst[k] = (w0 * r0[k] + w1 * r1[k] + w2 * r2[k] + w3 * r3[k]
                              + w4 * r4[k] + w5 * r5[k] + w6 * r6[k] + w7 * r7[k])
            else:
                for k in range(K):
                    dst[k] += (w0 * r0[k] + w1 * r1[k] + w2 * r2[k] + w3 * r3[k]
                               + w4 * r4[k] + w5 * r5[k] + w6 * r6[k] + w7 * r7[k])


def _tasks(n: int) -> int:
    return -(-n // PIXELS_PER_TASK)


def _refine_tasks(rows, images, idx, r, inv2sr2, res):
    for t in prange((idx.shape[0] + PIXELS_PER_TASK - 1) // PIXELS_PER_TASK):
        _refine_pixels(t, rows, images, idx, r, inv2sr2, res)


@functools.lru_cache(maxsize=None)
def refine_kernel(npdt) -> TeamKernel:
    """``res[i] = sum_q w_q rows[q] / sum_q w_q`` over the window of radius ``r`` around pixel
    ``idx[i]``, ``w_q = exp(-|images[p] - images[q]|^2 * inv2sr2[0])``."""
    def team(data):
        words = team_words(data)
        rows, i = array_arg2(words, TEAM_ARGS, npdt)
        images, i = array_arg4(words, i, npdt)
        idx, i = array_arg1(words, i, np.int64)
        r = words[i]
        inv2sr2, i = array_arg1(words, i + 1, np.float64)
        res, i = array_arg2(words, i, npdt)
        t = next_task(words)
        while t < words[TEAM_TASKS]:
            _refine_pixels(t, rows, images, idx, r, inv2sr2, res)
            t = next_task(words)

    return TeamKernel(_refine_tasks, team, lambda phase, rows, images, idx, *rest: _tasks(idx.shape[0]))


IMAGE_ROWS_PER_TASK = 8


@njit(inline="always")
def _row_margin(rows, p):
    """Top-1 minus top-2 of ``rows[p]`` (0 on a tie at the top; +inf with one column)."""
    K = rows.shape[1]
    top1, top2 = rows[p, 0], -math.inf
    for k in range(1, K):  # branch-free: 3x faster than with branches (measured)
        v = rows[p, k]
        top2 = max(top2, min(top1, v))
        top1 = max(top1, v)
    return top1 - top2


@njit(inline="always")
def _uncertain_rows(phase, t, rows, mask, unsure, margin, marg, start, idx, out_marg):
    """Image rows ``t * IMAGE_ROWS_PER_TASK ...``. Phase 0: ``marg[p]`` = the margin of each
    inactive pixel ``p`` of an ``unsure`` cell (+inf elsewhere), ``start[row + 1]`` = how many
    are below ``margin``. Phase 1: those pixels (raster order) into ``idx`` / ``out_marg`` from
    ``start[row]`` on."""
    B, H, W = mask.shape
    h, w = unsure.shape[1], unsure.shape[2]
    cell = H // h
    for row in range(t * IMAGE_ROWS_PER_TASK, min(B * H, (t + 1) * IMAGE_ROWS_PER_TASK)):
        b, y = row // H, row % H
        m, u = mask[b, y], unsure[b, y // cell]
        base = row * W
        if phase == 0:
            n = 0
            for cx in range(w):
                for x in range(cx * cell, (cx + 1) * cell):
                    v = math.inf
                    if u[cx] and not m[x]:
                        v = _row_margin(rows, base + x)
                    marg[base + x] = v
                    n += v < margin
            start[row + 1] = n
        else:
            i = start[row]
            for x in range(W):
                if marg[base + x] < margin:
                    idx[i] = base + x
                    out_marg[i] = marg[base + x]
                    i += 1


def _uncertain_tasks(phase, rows, mask, unsure, margin, marg, start, idx, out_marg):
    for t in prange((mask.shape[0] * mask.shape[1] + IMAGE_ROWS_PER_TASK - 1) // IMAGE_ROWS_PER_TASK):
        _uncertain_rows(phase, t, rows, mask, unsure, margin[0], marg, start, idx, out_marg)


@functools.lru_cache(maxsize=None)
def uncertain_kernel(npdt) -> TeamKernel:
    """The refinement's candidates: ``_uncertain_rows`` (launched once per phase, the prefix sum
    of the counts between the two)."""
    def team(data):
        words = team_words(data)
        phase = words[TEAM_ARGS]
        rows, i = array_arg2(words, TEAM_ARGS + 1, npdt)
        mask, i = array_arg3(words, i, np.uint8)
        unsure, i = array_arg3(words, i, np.uint8)
        margin, i = array_arg1(words, i, npdt)
        marg, i = array_arg1(words, i, npdt)
        start, i = array_arg1(words, i, np.int64)
        idx, i = array_arg1(words, i, np.int64)
        out_marg, i = array_arg1(words, i, npdt)
        t = next_task(words)
        while t < words[TEAM_TASKS]:
            _uncertain_rows(phase, t, rows, mask, unsure, margin[0], marg, start, idx, out_marg)
            t = next_task(words)

    return TeamKernel(_uncertain_tasks, team, lambda _, phase, rows, mask, *rest:
                      -(-(mask.shape[0] * mask.shape[1]) // IMAGE_ROWS_PER_TASK))


ROWS_PER_TASK = 16


@njit(inline="always")
def _ridge_term(v, left, right):
    a = v - left
    b = v - right
    return max(min(a, b), -max(a, b))


@njit(inline="always")
def _energy_rows(t, images, up, out):
    """Image rows ``t * ROWS_PER_TASK ...`` of ``B*H``: ``out[b, y, x] = max(max_c |images - up|,
    ridge)``, ``ridge = max(0, max_{d in 1, 2} max_c max(min(a, b), -max(a, b)))`` with
    ``a = x - x[j-d]``, ``b = x - x[j+d]`` (replicate-clamped): ``masks.residual_energy`` and
    ``masks.ridge_energy`` combined, exactly (only subtractions, min and max, in any order).
    Per row and channel, loops over the columns (the interior without clamping: vectorised)."""
    B, C, H, W = images.shape
    e = np.empty(W, images.dtype)
    for row in range(t * ROWS_PER_TASK, min(B * H, (t + 1) * ROWS_PER_TASK)):
        b, y = row // H, row % H
        for x in range(W):
            e[x] = 0.0  # both energies are >= 0 (|.| and the ridge clamped at 0)
        for c in range(C):
            img = images[b, c, y]
            u = up[b, c, y]
            for x in range(W):
                e[x] = max(e[x], abs(img[x] - u[x]))
            for d in range(1, 3):
                for x in range(min(d, W)):  # left border: replicate
                    e[x] = max(e[x], _ridge_term(img[x], img[0], img[min(x + d, W - 1)]))
                for x in range(d, W - d):
                    e[x] = max(e[x], _ridge_term(img[x], img[x - d], img[x + d]))
                for x in range(max(d, W - d), W):  # right border: replicate
                    e[x] = max(e[x], _ridge_term(img[x], img[max(x - d, 0)], img[W - 1]))
        o = out[b, y]
        for x in range(W):
            o[x] = e[x]


def _energy_tasks(images, up, out):
    B, C, H, W = images.shape
    for t in prange((B * H + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        _energy_rows(t, images, up, out)


@functools.lru_cache(maxsize=None)
def energy_kernel(npdt) -> TeamKernel:
    """``max(masks.residual_energy, masks.ridge_energy)`` from the images and their coarse
    approximation ``up`` (``[B, C, H, W]``), into ``out [B, H, W]``."""
    def team(data):
        words = team_words(data)
        images, i = array_arg4(words, TEAM_ARGS, npdt)
        up, i = array_arg4(words, i, npdt)
        out, i = array_arg3(words, i, npdt)
        t = next_task(words)
        while t < words[TEAM_TASKS]:
            _energy_rows(t, images, up, out)
            t = next_task(words)

    return TeamKernel(_energy_tasks, team,
                      lambda phase, images, up, out: -(-(images.shape[0] * images.shape[2]) // ROWS_PER_TASK))


# --------------------------------------------------------------------------------------------
# the sparse U-Net's output assembly
# --------------------------------------------------------------------------------------------
@njit(inline="always")
def _guided_row_weights(b, cy, images, means, spatial, a, colour, mean_of, score, top):
    """Guided upsampling's softmax weights for every pixel of the ``cy``-th row of cells of image
    ``b``: ``score[j, py, x] = softmax_j(-|images[p] - means[n_j]|^2 a - spatial[j, py, x])``
    for the pixel ``p = (cy * cell + py, x)`` and its cell's 3x3 neighbour cells ``n_j``
    (clamped at the borders). The whole row at once so that every loop runs along the image
    row (unit stride, ``W`` long: vectorised): ``colour [C, cell, W]`` the pixels' colours,
    ``mean_of [C, 9, W]`` each pixel's neighbour cell means, ``spatial [9, cell, W]`` the
    distance term per pixel, ``top [cell, W]`` scratch."""
    C, H, W = images.shape[1], images.shape[2], images.shape[3]
    h, w = means.shape[2], means.shape[3]
    cell = H // h
    for c in range(C):
        for py in range(cell):
            src, dst = images[b, c, cy * cell + py], colour[c, py]
            for x in range(W):
                dst[x] = src[x]
        for j in range(9):
            m, dst = means[b, c, min(max(cy + j // 3 - 1, 0), h - 1)], mean_of[c, j]
            for cx in range(w):  # (no division per pixel: a runtime divisor costs ~25 cycles)
                v = m[min(max(cx + j % 3 - 1, 0), w - 1)]
                for px in range(cell):
                    dst[cx * cell + px] = v
    for j in range(9):
        for py in range(cell):
            sj = score[j, py]
            for x in range(W):
                sj[x] = 0.0
            for c in range(C):
                col, m = colour[c, py], mean_of[c, j]
                for x in range(W):
                    d = col[x] - m[x]
                    sj[x] += d * d
            sp = spatial[j, py]
            for x in range(W):
                sj[x] = -sj[x] * a - sp[x]
    for py in range(cell):
        tp = top[py]
        for x in range(W):
            tp[x] = score[0, py, x]
        for j in range(1, 9):
            sj = score[j, py]
            for x in range(W):
                tp[x] = max(tp[x], sj[x])
        for j in range(9):
            sj = score[j, py]
            for x in range(W):
                sj[x] = fast_exp(sj[x] - tp[x])
        for x in range(W):  # the denominators (top reused)
            tp[x] = score[0, py, x]
        for j in range(1, 9):
            sj = score[j, py]
            for x in range(W):
                tp[x] += sj[x]
        for j in range(9):
            sj = score[j, py]
            for x in range(W):
                sj[x] = ieee_div(sj[x], tp[x])  # (the sum of nine exps is >= 1: never 0)


@njit(inline="always")
def _compose_task(t, images, site, guided, means, rows1, spatial, params, iy, wy, ix, wx, fine, out, K):
    """Task ``t`` of ``compose_kernel``: the pixels of the ``t``-th row of cells (image ``t //
    h``), each written once: an active pixel (``site[b, y, x] = i >= 0``) ``fine[i]`` plus the
    bilinear logits; an inactive one the guided upsampling in the cells ``guided``, the
    bilinear logits elsewhere. ``rows1`` are the coarse logits ``[B*h*w, K]`` flattened.
    Bilinear: per image row the two source rows of cells blended once (``vrow [w*K]``), then
    two taps per pixel (``iy/wy``, ``ix/wx``: ``F.interpolate``'s ``align_corners=False``
    taps); guided: the softmax weights of a row of cells at once (``_guided_row_weights``;
    ``spatial [9, cell, W]`` the distance term per pixel of a row of cells), then per pixel
    the blend of its cell's 3x3 neighbour rows. A fixed order of operations per pixel
    (deterministic). ``K`` (the logits per pixel) is a compile-time constant of the kernel:
    the loops over the classes then vectorise without a runtime trip count (measured: a
    runtime ``K`` made the bilinear pass 1.6x slower).

    The per-pixel loop is one loop body that indexes its arrays in place (``out[p, k]``): no
    row views and no calls of helpers with array arguments, because numba reference-counts
    each such view or argument with an atomic instruction per pixel (for ``vrow``, allocated
    here, even in the team form), which drained the store buffer every pixel: ``perf`` put
    45 % of this kernel's samples on those instructions. Measured against the helper-call form
    (AMD EPYC VM, one thread, a streets batch of 16, the same bits out): 1.26-1.34x faster,
    1.22-1.26x with no guided cells."""
    B, C, H, W = images.shape
    h, w = means.shape[2], means.shape[3]
    cell = H // h
    rows = rows1.reshape((B * h * w, K))
    b, cy = t // h, t % h
    any_guided = False
    for cx in range(w):
        any_guided |= guided[b, cy, cx] != 0
    score = np.empty((9, cell if any_guided else 0, W), images.dtype)  # (read in guided cells only)
    if any_guided:
        top = np.empty((cell, W), images.dtype)
        colour = np.empty((C, cell, W), images.dtype)
        mean_of = np.empty((C, 9, W), images.dtype)
        _guided_row_weights(b, cy, images, means, spatial, params[0], colour, mean_of, score, top)
    vrow = np.empty(w * K, images.dtype)
    y0, y1, y2 = max(cy - 1, 0), cy, min(cy + 1, h - 1)
    for py in range(cell):
        y = cy * cell + py
        o0, o1 = (b * h + iy[y, 0]) * w * K, (b * h + iy[y, 1]) * w * K
        a0, a1 = wy[y, 0], wy[y, 1]
        for q in range(w * K):
            vrow[q] = a0 * rows1[o0 + q] + a1 * rows1[o1 + q]
        for cx in range(w):
            g = guided[b, cy, cx] != 0
            # the 3x3 neighbour cells' rows of ``rows`` (clamped at the borders)
            x0, x1, x2 = max(cx - 1, 0), cx, min(cx + 1, w - 1)
            r0, r1, r2 = (b * h + y0) * w + x0, (b * h + y0) * w + x1, (b * h + y0) * w + x2
            r3, r4, r5 = (b * h + y1) * w + x0, (b * h + y1) * w + x1, (b * h + y1) * w + x2
            r6, r7, r8 = (b * h + y2) * w + x0, (b * h + y2) * w + x1, (b * h + y2) * w + x2
            for x in range(cx * cell, cx * cell + cell):
                p = (b * H + y) * W + x
                i = site[b, y, x]
                if g and i < 0:  # guided: the softmax blend of the neighbour cells' logits
                    w0, w1, w2 = score[0, py, x], score[1, py, x], score[2, py, x]
                    w3, w4, w5 = score[3, py, x], score[4, py, x], score[5, py, x]
                    w6, w7, w8 = score[6, py, x], score[7, py, x], score[8, py, x]
                    for k in range(K):
                        out[p, k] = (w0 * rows[r0, k] + w1 * rows[r1, k] + w2 * rows[r2, k] + w3 * rows[r3, k]
                                     + w4 * rows[r4, k] + w5 * rows[r5, k] + w6 * rows[r6, k] + w7 * rows[r7, k]
                                     + w8 * rows[r8, k])
                    continue
                u0, u1 = wx[x, 0], wx[x, 1]  # bilinear: two taps of the blended row
                p0, p1 = ix[x, 0] * K, ix[x, 1] * K
                if i >= 0:  # an active pixel: the head's correction on top
                    for k in range(K):
                        out[p, k] = (u0 * vrow[p0 + k] + u1 * vrow[p1 + k]) + fine[i, k]
                else:
                    for k in range(K):
                        out[p, k] = u0 * vrow[p0 + k] + u1 * vrow[p1 + k]


@functools.lru_cache(maxsize=None)
def compose_kernel(npdt, K: int) -> TeamKernel:
    """The sparse U-Net's logits at every pixel before refinement (see ``_compose_task``), for
    ``K`` logits per pixel (compiled per class count)."""
    def kernel(images, site, guided, means, rows1, spatial, params, iy, wy, ix, wx, fine, out):
        for t in prange(images.shape[0] * means.shape[2]):
            _compose_task(t, images, site, guided, means, rows1, spatial, params, iy, wy, ix, wx, fine, out, K)

    def team(data):
        words = team_words(data)
        images, i = array_arg4(words, TEAM_ARGS, npdt)
        site, i = array_arg3(words, i, np.int32)
        guided, i = array_arg3(words, i, np.uint8)
        means, i = array_arg4(words, i, npdt)
        rows1, i = array_arg1(words, i, npdt)
        spatial, i = array_arg3(words, i, npdt)
        params, i = array_arg1(words, i, npdt)
        iy, i = array_arg2(words, i, np.int64)
        wy, i = array_arg2(words, i, npdt)
        ix, i = array_arg2(words, i, np.int64)
        wx, i = array_arg2(words, i, npdt)
        fine, i = array_arg2(words, i, npdt)
        out, i = array_arg2(words, i, npdt)
        t = next_task(words)
        while t < words[TEAM_TASKS]:
            _compose_task(t, images, site, guided, means, rows1, spatial, params, iy, wy, ix, wx, fine, out, K)
            t = next_task(words)

    return TeamKernel(kernel, team,
                      lambda phase, images, site, guided, means, rows1, spatial, params, iy, wy, ix, wx, fine, out:
                      images.shape[0] * means.shape[2])


# --------------------------------------------------------------------------------------------
# the mask's threshold: the k-th largest energy of each image (radix select)
# --------------------------------------------------------------------------------------------
SELECT_DIGITS = ((21, 11), (10, 11), (0, 10))  # (shift, bits) of the three passes, top first


@njit(inline="always")
def _order_key(v):
    """A uint32 whose unsigned order is the float32 order of ``v`` (not NaN): the bits with the
    sign flipped for non-negative values, all bits flipped for negative ones."""
    bits = _float32_bits(v)
    return bits ^ 0xFFFFFFFF if bits >= 0x80000000 else bits ^ 0x80000000


@njit(inline="always")
def _select_image(b, energy, k, out, nan):
    """``out[b] = energy[b] >= t``, ``t`` the ``k``-th largest value of ``energy[b]`` (float32,
    flattened): a radix select over ``_order_key`` in three passes of 11, 11 and 10 bits (a
    histogram of the keys that share the digits found so far, then the digit holding the
    ``k``-th largest), the exact value ``kthvalue`` gives; ``nan[b] = 1`` (and ``out[b]``
    untouched) when the image has a NaN."""
    e = energy[b]
    n = e.shape[0]
    for i in range(n):
        if e[i] != e[i]:
            nan[b] = 1
            return
    hist = np.zeros(2048, np.int64)
    prefix, known, remaining = np.int64(0), np.int64(0), np.int64(k)
    for shift, bits in SELECT_DIGITS:
        for d in range(1 << bits):
            hist[d] = 0
        digit_mask = (1 << bits) - 1
        for i in range(n):
            key = _order_key(e[i])
            if key & known == prefix:
                hist[(key >> shift) & digit_mask] += 1
        d = digit_mask
        while hist[d] < remaining:
            remaining -= hist[d]
            d -= 1
        prefix |= np.int64(d) << shift
        known |= np.int64(digit_mask) << shift
    t = e[0]  # the value whose key is ``prefix``
    for i in range(n):
        if _order_key(e[i]) == prefix:
            t = e[i]
            break
    o = out[b]
    for i in range(n):
        o[i] = e[i] >= t


def _select_tasks(energy, k, out, nan):
    for b in prange(energy.shape[0]):
        _select_image(b, energy, k, out, nan)


@functools.lru_cache(maxsize=None)
def select_kernel() -> TeamKernel:
    """``threshold_density``'s selection (``_select_image``), one task per image (float32)."""
    def team(data):
        words = team_words(data)
        energy, i = array_arg2(words, TEAM_ARGS, np.float32)
        k = words[i]
        out, i = array_arg2(words, i + 1, np.uint8)
        nan, i = array_arg1(words, i, np.uint8)
        t = next_task(words)
        while t < words[TEAM_TASKS]:
            _select_image(t, energy, k, out, nan)
            t = next_task(words)

    return TeamKernel(_select_tasks, team, lambda phase, energy, k, out, nan: energy.shape[0])
