"""Backend dispatch: which implementation runs an op, decided per call.

Precedence: an explicit ``backend=`` argument, then the innermost ``with sp.backend(...)``
block, then the environment variable ``SPCONV2D_BACKEND`` (``auto|torch|triton``), then
``auto``: CUDA tensors use the Triton kernels, everything else the PyTorch path.
Forcing ``triton`` on CPU tensors runs the kernels in Triton's interpreter, which is switched
on here (``TRITON_INTERPRET=1``) if Triton has not been imported yet.

The lookup index (``sort``, ``grid`` or ``hash``) is chosen likewise: ``index=`` argument,
``with sp.index_strategy(...)``, ``SPCONV2D_INDEX``, then ``auto``.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import threading
from typing import Optional

import torch

BACKENDS = ("auto", "torch", "triton")
INDEX_STRATEGIES = ("auto", "sort", "grid", "hash")

_state = threading.local()


def _stack(name: str) -> list:
    if not hasattr(_state, name):
        setattr(_state, name, [])
    return getattr(_state, name)


def _check(value: str, allowed, what: str) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")
    return value


@contextlib.contextmanager
def _override(stack_name: str, value: str):
    stack = _stack(stack_name)
    stack.append(value)
    try:
        yield
    finally:
        stack.pop()


def backend(name: str):
    """``with sp.backend("torch"): ...`` forces a backend for the ops inside the block."""
    return _override("backend", _check(name, BACKENDS, "backend"))


def index_strategy(name: str):
    """``with sp.index_strategy("grid"): ...`` forces the coordinate index strategy."""
    return _override("index", _check(name, INDEX_STRATEGIES, "index strategy"))


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def requested_backend(override: Optional[str] = None) -> str:
    if override is not None:
        return _check(override, BACKENDS, "backend")
    stack = _stack("backend")
    if stack:
        return stack[-1]
    return _check(os.environ.get("SPCONV2D_BACKEND", "auto"), BACKENDS, "SPCONV2D_BACKEND")


def resolve(device: torch.device, override: Optional[str] = None):
    """The backend object for tensors on ``device``."""
    name = requested_backend(override)
    if name == "auto":
        name = "triton" if device.type == "cuda" and triton_available() else "torch"
    if name == "torch":
        from . import torch_backend

        return torch_backend.backend
    if not triton_available():
        raise RuntimeError("backend 'triton' was requested but the 'triton' package is not installed")
    if device.type == "cpu":
        _ensure_interpreter()
    elif device.type != "cuda":
        raise RuntimeError(f"backend 'triton' runs on CUDA or (interpreted) CPU tensors, not {device.type}")
    from . import triton_backend

    return triton_backend.backend


def _ensure_interpreter() -> None:
    if "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "backend 'triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
            "before triton is first imported (or move the tensors to a CUDA device)"
        )


def resolve_index_strategy(backend_obj, key_space: int, override: Optional[str] = None,
                           n_keys: Optional[int] = None) -> str:
    if override is not None:
        name = _check(override, INDEX_STRATEGIES, "index strategy")
    else:
        stack = _stack("index")
        name = stack[-1] if stack else _check(
            os.environ.get("SPCONV2D_INDEX", "auto"), INDEX_STRATEGIES, "SPCONV2D_INDEX"
        )
    if name == "auto":
        choose = getattr(backend_obj, "default_index_strategy", None)
        name = choose(key_space, n_keys) if choose is not None else "hash"
    return name
