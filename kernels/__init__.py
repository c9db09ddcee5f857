"""Triton kernels of spconv2d (installed as ``spconv2d.kernels``).

This package imports only ``torch`` and ``triton``; it knows nothing of the core library.
Every module holds one kernel family and opens with its contract:

* :mod:`.hash`       coordinate hash table (open addressing, linear probing, ``atomic_cas``).
* :mod:`.neighbors`  fused neighbour lookup ``nbr[K, N_out]`` through a hash table or a dense
                     index grid, plus the derived structures the convolution kernels consume
                     (per-row offset bitmasks, mask-sorted row order, per-tile offset masks).
* :mod:`.conv`       output-stationary, atomic-free sparse convolution (forward and input
                     gradient) and the split-K gathered-GEMM weight gradient.

Run on CPU tensors with ``TRITON_INTERPRET=1`` (set before triton is imported) to execute the
kernels in Triton's interpreter.
"""
from __future__ import annotations

import os


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


__all__ = ["interpreting"]
