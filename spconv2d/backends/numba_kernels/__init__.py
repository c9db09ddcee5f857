"""Numba kernels of the fused CPU backend (``spconv2d.backends.numba_backend``).

Imported only when the ``numba`` backend is used: ``import spconv2d`` never needs numba.
Every module opens with its contract (inputs, layout, determinism, precision, threads).
"""
