"""How the numba kernels run: on whose threads, how many, one launch at a time.

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
* **PyTorch's own OpenMP team** (:class:`TeamKernel`, :func:`torch_team`): the kernels on the
  hot path of a model (the convolutions' forward, input and weight gradient and their plans,
  the submanifold map build, the strided map build with kernel = stride, max / average pooling
  forward and backward, the reverse table, `from_dense`'s sites, the zoo's output assembly,
  refinement, refinement candidates and mask energy) also
  have a *team* form: a ``cfunc`` that
  reads its arguments from a block of words (:func:`pack_args`) and takes tasks from a shared
  atomic counter (:func:`next_task`), the same task code as the ``prange`` form. With several
  threads it runs through ``GOMP_parallel`` of the OpenMP runtime PyTorch itself uses (found
  under ``torch/lib``, else among the loaded libraries), i.e. on PyTorch's intra-op threads.
  Why: after every parallel PyTorch op those threads keep spinning for a while, waiting for
  more work (GNU OpenMP's default wait policy), and numba's own pool had to share the cores
  with them: inside a model a second thread bought the conv kernels nothing. On PyTorch's
  threads the work starts at once: 1.1-1.6x faster right after a PyTorch op at 2 threads
  (``BENCH_THREADS=2 python -m pytest bench/bench_cpu_numba_conv.py -k test_d_team``). Results
  are bit-identical to the other forms (tested). Where PyTorch has no OpenMP runtime that
  exports ``GOMP_parallel`` (GNU, LLVM and Intel's runtimes do), or :data:`USE_TORCH_TEAM` is
  off, the ``parallel=True`` form runs on numba's pool; the other kernels (map builds of other
  geometries and on sorted keys, the coordinate check) still run there.
* **Disk cache** (:func:`cached_njit`): compiled kernels are cached where numba can write
  (``__pycache__`` next to the source, else the user's cache folder, or ``NUMBA_CACHE_DIR``).
  Where none is writable (a read-only install and home), the kernels are compiled in every
  process, with a warning once, instead of failing.
"""
from __future__ import annotations

import ctypes
import functools
import glob
import os
import threading
import types
import warnings
from typing import Optional

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit
from numba import types as nbtypes
from numba.extending import intrinsic

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
    compilation; several: its team form on PyTorch's OpenMP threads when it has one and
    :func:`torch_team` finds the runtime); ``dynamic``: its ``prange`` iterations handed out one
    at a time (for tasks of unequal size; which thread runs a task never changes a result)."""
    with _lock:
        n = threads_for(work)
        if n == 1:
            return kernel.compiled(1)(*args)
        if isinstance(kernel, TeamKernel) and torch_team() is not None:
            return kernel.run_team(n, args)
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


def _cached(compile_with, fn):
    """``compile_with(cache=True)(fn)``; where numba finds no writable cache location it raises
    at decoration ("cannot cache function ...: no locator available"): then ``fn`` is compiled
    without the disk cache, and a warning says so once per process."""
    global _warned_no_cache
    try:
        return compile_with(cache=True)(fn)
    except RuntimeError as e:
        if "cannot cache" not in str(e):
            raise
        if not _warned_no_cache:
            _warned_no_cache = True
            warnings.warn(f"spconv2d: numba has no writable cache location here ({e}); the CPU "
                          f"kernels are compiled in every process. Set NUMBA_CACHE_DIR to a "
                          f"writable folder to keep them.", RuntimeWarning, stacklevel=3)
        return compile_with(cache=False)(fn)


def cached_njit(**options):
    """``numba.njit(cache=True, **options)``, or without the disk cache (and a warning once)
    where no cache location is writable."""
    return lambda fn: _cached(lambda cache: njit(cache=cache, **options), fn)


def cached_cfunc(signature):
    """``numba.cfunc(signature, cache=True)``, like :func:`cached_njit`."""
    return lambda fn: _cached(lambda cache: numba.cfunc(signature, cache=cache), fn)


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


# --------------------------------------------------------------------------------------------
# PyTorch's OpenMP team
# --------------------------------------------------------------------------------------------
#: Run team kernels on PyTorch's OpenMP threads when the runtime is found (tests switch it off
#: to run the ``parallel=True`` forms side by side).
USE_TORCH_TEAM = True
_team_lib = None
_team_searched = False

#: The words of a team launch's argument block before the kernel's own arguments: the next
#: task (an atomic counter), the task count, the phase (for kernels with several passes).
TEAM_NEXT, TEAM_TASKS, TEAM_PHASE, TEAM_ARGS = 0, 1, 2, 3


def _openmp_candidates():
    libdir = os.path.join(os.path.dirname(torch.__file__), "lib")
    for pattern in ("libgomp*.so*", "libiomp5*", "libomp*"):
        yield from sorted(glob.glob(os.path.join(libdir, pattern)))
    try:  # a runtime linked from elsewhere (e.g. a conda environment's lib folder), Linux only
        with open("/proc/self/maps") as maps:
            loaded = {line.split()[-1] for line in maps if ".so" in line}
    except OSError:
        return
    yield from sorted(p for p in loaded if os.path.basename(p).startswith(("libgomp", "libiomp5", "libomp")))


def torch_team():
    """PyTorch's OpenMP runtime as a ``ctypes`` library exposing ``GOMP_parallel`` (GNU OpenMP,
    and LLVM's / Intel's runtimes through their GNU entry points), or None: PyTorch built
    without OpenMP, the runtime not found, or :data:`USE_TORCH_TEAM` off."""
    global _team_lib, _team_searched
    if not USE_TORCH_TEAM:
        return None
    if not _team_searched:
        _team_searched = True
        if torch.backends.openmp.is_available():
            for path in _openmp_candidates():
                try:
                    lib = ctypes.CDLL(path)
                    fn = lib.GOMP_parallel
                except (OSError, AttributeError):
                    continue
                fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
                fn.restype = None
                _team_lib = lib
                break
    return _team_lib


def pack_args(*args) -> np.ndarray:
    """The argument block of a team launch: ``TEAM_ARGS`` header words, then per argument its
    words: a C-contiguous array as its address and its shape, a bool or an integer as itself.
    The caller keeps the arrays alive until the launch returns."""
    words = [0] * TEAM_ARGS
    for a in args:
        if isinstance(a, np.ndarray):
            if not a.flags.c_contiguous:
                raise ValueError("team kernels take C-contiguous arrays")
            words.append(a.ctypes.data)
            words.extend(a.shape)
        else:
            words.append(int(a))
    return np.array(words, dtype=np.int64)


@intrinsic
def next_task(typingctx, words):
    """``words[TEAM_NEXT]++`` atomically; returns the old value (the task this thread takes)."""
    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = builder.gep(ary.data, [ir.Constant(ir.IntType(64), TEAM_NEXT)])
        return builder.atomic_rmw("add", ptr, ir.Constant(ir.IntType(64), 1), "monotonic")

    return nbtypes.int64(words), codegen


@intrinsic
def address_as(typingctx, address, dtype):
    """The integer ``address`` as a pointer to ``dtype`` elements (for ``numba.carray``)."""
    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

    return nbtypes.CPointer(dtype.dtype)(address, dtype), codegen


@njit(inline="always")
def array_arg1(words, i, dtype):
    """The 1-d array packed at ``words[i]`` and the index after it."""
    return numba.carray(address_as(words[i], dtype), (words[i + 1],)), i + 2


@njit(inline="always")
def array_arg2(words, i, dtype):
    return numba.carray(address_as(words[i], dtype), (words[i + 1], words[i + 2])), i + 3


@njit(inline="always")
def array_arg3(words, i, dtype):
    return numba.carray(address_as(words[i], dtype), (words[i + 1], words[i + 2], words[i + 3])), i + 4


@njit(inline="always")
def array_arg4(words, i, dtype):
    shape = (words[i + 1], words[i + 2], words[i + 3], words[i + 4])
    return numba.carray(address_as(words[i], dtype), shape), i + 5


@njit(inline="always")
def array_arg5(words, i, dtype):
    shape = (words[i + 1], words[i + 2], words[i + 3], words[i + 4], words[i + 5])
    return numba.carray(address_as(words[i], dtype), shape), i + 6


#: Words a team function may read of its argument block (it reads only those packed).
TEAM_MAX_WORDS = 256


@njit(inline="always")
def team_words(data):
    """Inside a team ``cfunc``: its argument block (``data``: the launch's pointer)."""
    return numba.carray(data, (TEAM_MAX_WORDS,), np.int64)


class TeamKernel(ParallelKernel):
    """A :class:`ParallelKernel` with a team form: ``team(data)``, a ``void(void*)`` function whose
    argument block (:func:`pack_args` of the kernel's own arguments, ``phases`` passes) it reads
    with :func:`team_words` and ``array_arg*``, taking tasks with :func:`next_task` until
    ``words[TEAM_TASKS]``. ``tasks(phase, *args)`` gives each pass's task count (Python)."""

    def __init__(self, fn, team, tasks, phases: int = 1):
        super().__init__(fn)
        self.team = team
        self.tasks = tasks
        self.phases = phases
        self._cfunc = None

    def run_team(self, threads: int, args):
        if self._cfunc is None:
            self._cfunc = cached_cfunc(nbtypes.void(nbtypes.voidptr))(self.team)
        words = pack_args(*args)
        if words.size > TEAM_MAX_WORDS:
            raise ValueError("too many team kernel arguments")
        parallel = torch_team().GOMP_parallel
        for phase in range(self.phases):
            n = self.tasks(phase, *args)
            if n <= 0:
                continue
            words[TEAM_NEXT], words[TEAM_TASKS], words[TEAM_PHASE] = 0, n, phase
            parallel(self._cfunc.address, words.ctypes.data, min(threads, n), 0)

