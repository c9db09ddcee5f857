"""spconv2d: sparse convolution for 2D images.

``import spconv2d as sp``; ``sp.SparseTensor``, ``sp.nn``, ``sp.functional``, ``sp.cat``,
``sp.backend(...)``. The Triton kernels (``spconv2d.kernels``) are imported only when a call
dispatches to them, so this package works where Triton is missing.
"""
from . import functional, nn
from .backends import backend, index_strategy
from .coords import CoordinateManager
from .functional.basic import cat
from .kernel_map import KernelMap
from .profiler import profile
from .tensor import SparseTensor, at_sites

coalesce = SparseTensor.coalesce

__version__ = "0.1.0"
__all__ = [
    "SparseTensor", "CoordinateManager", "KernelMap", "nn", "functional", "cat", "coalesce",
    "backend", "index_strategy", "at_sites", "profile",
]
