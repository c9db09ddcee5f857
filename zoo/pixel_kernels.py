"""The numba kernels behind ``zoo.fused`` (imported on first use: importing it imports numba).

``guided``: joint bilateral upsampling of the cells ``sel``, one task per cell, the 9 scores
and weights of a pixel in a small per-cell buffer, the output row written once. ``refine``: the
colour-weighted window mean of the pixels ``idx``, one task per pixel. Both deterministic
(fixed summation order per output element), float32 or float64.
"""
import math

import numpy as np
from numba import prange

from spconv2d.backends.numba_kernels.runtime import parallel_kernel


@parallel_kernel
def guided(logits, images, means, sel, cell, inv2sr2, inv2ss2, out_rows):
    B, K, h, w = logits.shape
    C = images.shape[1]
    H, W = h * cell, w * cell
    for t in prange(sel.shape[0]):
        s = sel[t]
        b, cy, cx = s // (h * w), (s // w) % h, s % w
        ny, nx = np.empty(9, np.int64), np.empty(9, np.int64)
        score = np.empty(9, logits.dtype)
        for n in range(9):
            ny[n] = min(max(cy + n // 3 - 1, 0), h - 1)  # replicate padding
            nx[n] = min(max(cx + n % 3 - 1, 0), w - 1)
        for py in range(cell):
            for px in range(cell):
                y, x = cy * cell + py, cx * cell + px
                oy, ox = py + 0.5 - cell / 2, px + 0.5 - cell / 2
                top = -np.inf
                for n in range(9):
                    d2 = 0.0
                    for c in range(C):
                        diff = images[b, c, y, x] - means[b, c, ny[n], nx[n]]
                        d2 += diff * diff
                    dy, dx = (n // 3 - 1) * cell - oy, (n % 3 - 1) * cell - ox
                    score[n] = -d2 * inv2sr2 - (dy * dy + dx * dx) * inv2ss2
                    top = max(top, score[n])
                total = 0.0
                for n in range(9):
                    score[n] = math.exp(score[n] - top)
                    total += score[n]
                row = (b * H + y) * W + x
                for k in range(K):
                    acc = 0.0
                    for n in range(9):
                        acc += score[n] * logits[b, k, ny[n], nx[n]]
                    out_rows[row, k] = acc / total

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
