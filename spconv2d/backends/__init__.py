"""Backend dispatch: which implementation runs an op, decided per call.

A backend is an instance of a :class:`~spconv2d.backends.base.Backend` subclass; its options are
constructor arguments. Precedence: an explicit ``backend=`` argument (a name or an instance),
then the innermost ``with sp.backend(...)`` block, then the environment variable
``SPCONV2D_BACKEND`` (a name), then ``auto``: CUDA tensors use the Triton kernels, CPU tensors
the fused numba kernels when numba is installed (the ``cpu`` extra), everything else the
PyTorch path.

    with sp.backend("torch", gather="table"): ...          # a name and its options
    with sp.backend(TorchBackend(dense_fallback=False)): ...  # an instance

Forcing ``triton`` on CPU tensors runs the kernels in Triton's interpreter, which must be
switched on before Triton is imported (``TRITON_INTERPRET=1`` in the environment); this module
never writes the environment, it raises with that instruction instead.

The lookup index (``sort``, ``grid`` or ``hash``) is chosen likewise: ``index=`` argument,
``with sp.index_strategy(...)``, ``SPCONV2D_INDEX``, then ``auto`` (the backend's
``default_index_strategy``).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import threading
from typing import Callable, Dict, Optional, Union

import torch

from .base import Backend, CoordIndex  # noqa: F401  (re-exported)

BACKENDS = ("auto", "torch", "numba", "triton")
INDEX_STRATEGIES = ("auto", "sort", "grid", "hash")

BackendSpec = Union[str, Backend]

_state = threading.local()
_defaults: Dict[str, Backend] = {}  # one default-options instance per name, made on first use


def _stack(name: str) -> list:
    if not hasattr(_state, name):
        setattr(_state, name, [])
    return getattr(_state, name)


def _check(value: str, allowed, what: str) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")
    return value


@contextlib.contextmanager
def _override(stack_name: str, value):
    stack = _stack(stack_name)
    stack.append(value)
    try:
        yield
    finally:
        stack.pop()


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _torch_backend_class():
    from .torch_backend import TorchBackend

    return TorchBackend


def numba_available() -> bool:
    return importlib.util.find_spec("numba") is not None


def _numba_backend_class():
    if not numba_available():
        raise RuntimeError("backend 'numba' was requested but the 'numba' package is not installed "
                           "(pip install 'spconv2d[cpu]')")
    from .numba_backend import NumbaBackend

    return NumbaBackend


def _triton_backend_class():
    if not triton_available():
        raise RuntimeError("backend 'triton' was requested but the 'triton' package is not installed")
    from .triton_backend import TritonBackend

    return TritonBackend


_CLASSES: Dict[str, Callable[[], type]] = {"torch": _torch_backend_class, "numba": _numba_backend_class,
                                           "triton": _triton_backend_class}


def create_backend(name: str, **options) -> Backend:
    """A new backend instance: ``create_backend("torch", gather="table")``."""
    _check(name, tuple(_CLASSES), "backend")
    return _CLASSES[name]()(**options)


def default_backend(name: str) -> Backend:
    """The shared default-options instance of backend ``name``."""
    be = _defaults.get(name)
    if be is None:
        be = _defaults.setdefault(name, create_backend(name))
    return be


def backend(spec: BackendSpec, **options):
    """``with sp.backend("torch"): ...`` forces a backend for the ops inside the block.

    ``spec`` is a name (``auto``, ``torch``, ``triton``; keyword ``options`` go to its
    constructor) or a backend instance (no options)."""
    if isinstance(spec, Backend):
        if options:
            raise TypeError(f"sp.backend: options {sorted(options)} go with a backend name, not an instance")
        return _override("backend", spec)
    if not isinstance(spec, str):
        raise TypeError(f"sp.backend: expected a name ({', '.join(BACKENDS)}) or a Backend instance, "
                        f"got {type(spec).__name__}")
    _check(spec, BACKENDS, "backend")
    if options:
        if spec == "auto":
            raise TypeError(f"sp.backend('auto') takes no options (got {sorted(options)}); name a backend")
        return _override("backend", create_backend(spec, **options))
    return _override("backend", spec)


def index_strategy(name: str):
    """``with sp.index_strategy("grid"): ...`` forces the coordinate index strategy."""
    return _override("index", _check(name, INDEX_STRATEGIES, "index strategy"))


def check_index_strategy(name: Optional[str]) -> Optional[str]:
    """``name`` if it is None or a known strategy, else ``ValueError`` (ops check it up front)."""
    return None if name is None else _check(name, INDEX_STRATEGIES, "index strategy")


def requested_backend(override: Optional[BackendSpec] = None) -> BackendSpec:
    """The name or instance in force: the argument, the innermost block, the environment."""
    if override is not None:
        if isinstance(override, Backend):
            return override
        if not isinstance(override, str):
            raise TypeError(f"backend must be a name ({', '.join(BACKENDS)}) or a Backend instance, "
                            f"got {type(override).__name__}")
        return _check(override, BACKENDS, "backend")
    stack = _stack("backend")
    if stack:
        return stack[-1]
    return _check(os.environ.get("SPCONV2D_BACKEND", "auto"), BACKENDS, "SPCONV2D_BACKEND")


def resolve(device: torch.device, override: Optional[BackendSpec] = None) -> Backend:
    """The backend instance for tensors on ``device``."""
    spec = requested_backend(override)
    if spec == "auto":
        spec = "triton" if device.type == "cuda" and triton_available() else auto_cpu_backend() \
            if device.type == "cpu" else "torch"
    if (spec.name if isinstance(spec, Backend) else spec) == "triton":  # (checked before any import)
        if device.type == "cpu":
            _check_interpreter()
        elif device.type != "cuda":
            raise RuntimeError(f"backend 'triton' runs on CUDA or (interpreted) CPU tensors, not {device.type}")
    return spec if isinstance(spec, Backend) else default_backend(spec)


@functools.lru_cache(maxsize=None)
def auto_cpu_backend() -> str:
    """The backend ``auto`` gives CPU tensors: ``numba`` when it is installed and imports, else
    ``torch`` (with a warning, once, when numba is installed but broken). Decided once per
    process (``auto_cpu_backend.cache_clear()`` decides again)."""
    if numba_available():
        try:
            default_backend("numba")
            return "numba"
        except Exception as e:  # a broken numba install must not break the library
            import warnings

            warnings.warn(f"spconv2d: the numba backend is unavailable ({type(e).__name__}: {e}); "
                          f"using the PyTorch path", RuntimeWarning, stacklevel=3)
    return "torch"


def _check_interpreter() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "backend 'triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 in the "
            "environment before triton is first imported (or move the tensors to a CUDA device)"
        )


def resolve_index_strategy(backend_obj: Backend, key_space: int, override: Optional[str] = None,
                           n_keys: Optional[int] = None) -> str:
    if override is not None:
        name = _check(override, INDEX_STRATEGIES, "index strategy")
    else:
        stack = _stack("index")
        name = stack[-1] if stack else _check(
            os.environ.get("SPCONV2D_INDEX", "auto"), INDEX_STRATEGIES, "SPCONV2D_INDEX"
        )
    if name == "auto":
        name = backend_obj.default_index_strategy(key_space, n_keys)
    return name


def __getattr__(name: str):
    # ``sp.backends.TorchBackend`` without importing the backend modules up front
    if name == "TorchBackend":
        return _torch_backend_class()
    if name == "TritonBackend":
        return _triton_backend_class()
    if name == "NumbaBackend":
        return _numba_backend_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
