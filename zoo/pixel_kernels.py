"""The numba kernel behind ``zoo.fused`` (imported on first use: importing it imports numba).

``refine``: the colour-weighted window mean of the pixels ``idx``, one task per pixel, each
output row written once in a fixed summation order (deterministic), float32 or float64.
"""
import math

from numba import prange

from spconv2d.backends.numba_kernels.runtime import parallel_kernel


@parallel_kernel
def refine(rows, images, idx, r, inv2sr2, res):
    B, C, H, W = images.shape
    K = rows.shape[1]
    for i in prange(idx.shape[0]):
        p = idx[i]
        b, y, x = p // (H * W), (p // W) % H, p % W
        for k in range(K):
            res[i, k] = 0.0
        total = 0.0
        for qy in range(max(0, y - r), min(H, y + r + 1)):
            for qx in range(max(0, x - r), min(W, x + r + 1)):
                d2 = 0.0
                for c in range(C):
                    diff = images[b, c, y, x] - images[b, c, qy, qx]
                    d2 += diff * diff
                wq = math.exp(-d2 * inv2sr2)
                total += wq
                q = (b * H + qy) * W + qx
                for k in range(K):
                    res[i, k] += wq * rows[q, k]
        for k in range(K):
            res[i, k] /= total


@parallel_kernel
def row_margins(rows, idx, out):
    """``out[i]``: top-1 minus top-2 of ``rows[idx[i]]`` (0 on a tie at the top; +inf with one
    column), one pass over the row."""
    K = rows.shape[1]
    for i in prange(idx.shape[0]):
        p = idx[i]
        top1, top2 = rows[p, 0], -math.inf
        for k in range(1, K):
            v = rows[p, k]
            if v > top1:
                top2, top1 = top1, v
            elif v > top2:
                top2 = v
        out[i] = top1 - top2
