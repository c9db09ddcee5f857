"""How the numba kernels run: the threading layer, the thread count, one launch at a time.

* **Threading layer** (:func:`configure_threading`, the one place this package sets numba
  configuration): ``workqueue``, chosen only when nobody chose a layer (``NUMBA_THREADING_LAYER``
  unset) and before numba starts its pool. Its idle threads block. numba's ``omp`` layer loads
  the system's GNU OpenMP next to PyTorch's own ``libgomp``; its idle threads spin and slowed
  PyTorch's single-threaded ops after every kernel (docs/ARCHITECTURE.md, "Measured choices");
  ``tbb`` is not installed by the ``cpu`` extra.
* **Threads**: each launch uses ``torch.get_num_threads()`` threads (capped by numba's pool,
  ``NUMBA_NUM_THREADS``), one when the kernel has less than ``PARALLEL_MIN_WORK`` elementary
  steps; starting numba's layer can change PyTorch's OpenMP thread count, which is restored.
  So the backend never runs more threads than the user gave PyTorch, and never both at once.
* **One launch at a time**: the ``workqueue`` layer takes one parallel launch per process;
  :func:`launch` and kernels decorated with :func:`parallel_kernel` hold one lock.
* **One thread: no parallel region.** A kernel (:class:`ParallelKernel`) is compiled on demand
  twice: with ``parallel=True`` for several threads, and without for one, where ``prange`` runs
  as ``range`` on the calling thread. Entering a parallel region costs even with one thread;
  the serial compilations ran 1.3-1.5x faster on one thread (``bench/serial_vs_parallel.py``).
  The results are the same (each iteration writes its own outputs, in the same order).
* **Disk cache** (:func:`cached_njit`): compiled kernels are cached where numba can write
  (``__pycache__`` next to the source, else the user's cache folder, or ``NUMBA_CACHE_DIR``).
  Where none is writable (a read-only install and home), the kernels are compiled in every
  process, with a warning once, instead of failing.
"""
from __future__ import annotations

import functools
import threading
import types
import warnings
from typing import Optional

import numba
import torch
from numba import njit

# Below this many elementary steps (lookups, cells, multiply-adds / 64) a kernel runs on one
# thread: a parallel region costs microseconds on an idle machine and milliseconds when the
# second thread waits for a busy core. (Chosen, not tuned.)
PARALLEL_MIN_WORK = 1 << 15

_lock = threading.RLock()
_configured = False
_started = False
_requested = threading.local()


def configure_threading() -> None:
    """Choose the ``workqueue`` layer unless the user chose one or numba's pool runs already."""
    global _configured
    if _configured:
        return
    from numba.np.ufunc import parallel as numba_parallel

    if not numba_parallel._is_initialized and str(numba.config.THREADING_LAYER).lower() == "default":
        numba.config.THREADING_LAYER = "workqueue"
    _configured = True


def _set_threads(n: int) -> None:
    global _started
    configure_threading()
    if not _started:
        t = torch.get_num_threads()
        numba.set_num_threads(1)  # starts the layer
        if torch.get_num_threads() != t:
            torch.set_num_threads(t)
        _started = True
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)


def threads_for(work: Optional[int] = None) -> int:
    """The thread count for a kernel with ``work`` elementary steps (None: no limit)."""
    n = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    return 1 if work is not None and work < PARALLEL_MIN_WORK else n


def request_threads(work: Optional[int] = None) -> None:
    """Set the thread count the next :func:`parallel_kernel` call on this thread uses."""
    _requested.n = threads_for(work)


def launch(kernel: "ParallelKernel", *args, work: Optional[int] = None, dynamic: bool = False):
    """Run a parallel kernel under the lock with ``threads_for(work)`` threads (one: its serial
    compilation); ``dynamic``: its ``prange`` iterations handed out one at a time (for tasks of
    unequal size; which thread runs a task never changes a result)."""
    with _lock:
        n = threads_for(work)
        if n == 1:
            return kernel.compiled(1)(*args)
        _set_threads(n)
        compiled = kernel.compiled(n)
        if not dynamic:
            return compiled(*args)
        old = numba.set_parallel_chunksize(1)
        try:
            return compiled(*args)
        finally:
            numba.set_parallel_chunksize(old)


_warned_no_cache = False


def cached_njit(**options):
    """``numba.njit(cache=True, **options)``; where numba finds no writable cache location it
    raises at decoration ("cannot cache function ...: no locator available"): then the kernel
    is compiled without the disk cache, and a warning says so once per process."""
    def decorate(fn):
        global _warned_no_cache
        try:
            return njit(cache=True, **options)(fn)
        except RuntimeError as e:
            if "cannot cache" not in str(e):
                raise
            if not _warned_no_cache:
                _warned_no_cache = True
                warnings.warn(f"spconv2d: numba has no writable cache location here ({e}); the CPU "
                              f"kernels are compiled in every process. Set NUMBA_CACHE_DIR to a "
                              f"writable folder to keep them.", RuntimeWarning, stacklevel=2)
            return njit(cache=False, **options)(fn)
    return decorate


def _renamed(fn, suffix: str):
    """A copy of ``fn`` whose name ends in ``suffix``: numba names its disk-cache files after the
    function's qualified name and line, and the serial and parallel compilations of one function
    must not share them."""
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + suffix, fn.__defaults__, fn.__closure__)
    copy.__qualname__ = fn.__qualname__ + suffix
    copy.__module__ = fn.__module__
    copy.__doc__ = fn.__doc__
    return copy


class ParallelKernel:
    """A function with ``prange`` loops, compiled on first use for the thread count it gets:
    ``compiled(n)`` is its ``njit(parallel=True)`` dispatcher for ``n > 1`` and its serial
    ``njit`` one (``prange`` as ``range``) for ``n == 1``; both ``cache=True``, ``nogil``."""

    def __init__(self, fn):
        self.fn = fn
        self._parallel = None
        self._serial = None

    def compiled(self, threads: int):
        if threads > 1:
            if self._parallel is None:
                self._parallel = cached_njit(parallel=True, nogil=True)(self.fn)
            return self._parallel
        if self._serial is None:
            self._serial = cached_njit(nogil=True)(_renamed(self.fn, "__serial"))
        return self._serial


def parallel_kernel(fn):
    """A :class:`ParallelKernel` whose calls from Python go through the lock with the thread
    count of the last :func:`request_threads` on this thread (one: the serial compilation)."""
    kernel = ParallelKernel(fn)

    @functools.wraps(fn)
    def call(*args):
        with _lock:
            n = getattr(_requested, "n", None) or threads_for()
            if n == 1:
                return kernel.compiled(1)(*args)
            _set_threads(n)
            return kernel.compiled(n)(*args)

    call.kernel = kernel
    return call
