"""Argument checks shared by ``TrainConfig.validate`` and the ``spconv2d`` command line.

Each check raises ``TypeError`` (wrong type) or ``ValueError`` (bad value) with a one-line
message that names the argument, what it must be and what it got, e.g. ``epochs must be >= 1,
got 0``; a path that is not there is a ``FileNotFoundError`` / ``NotADirectoryError`` /
``IsADirectoryError`` / ``PermissionError`` naming it. The command line prints the message as
``spconv2d <cmd>: error: <message>`` and exits with 2; the Python API raises it. ``None`` means
"unset" (the default) wherever ``optional=True``.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Any, Iterable, Optional, Sequence

import torch


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")


def check_int(name: str, value: Any, minimum: Optional[int] = None, maximum: Optional[int] = None, *,
              optional: bool = False, why: str = "") -> None:
    """An integer (not a bool) in ``[minimum, maximum]``; ``why`` is appended to a range error."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}{why}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}{why}")


def check_real(name: str, value: Any, low: Optional[float] = None, high: Optional[float] = None, *,
               low_open: bool = False, optional: bool = False) -> None:
    """A finite real number (not a bool) in the interval ``low..high`` (``low_open``: ``low``
    excluded; ``high`` is always included)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and value > high
    if below or above:
        if low is not None and high is not None:
            want = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
        elif low is not None:
            want = f"{'>' if low_open else '>='} {low:g}"
        else:
            want = f"<= {high:g}"
        raise ValueError(f"{name} must be {want}, got {value}")


def check_density(name: str, value: Any, *, optional: bool = False) -> None:
    """A fraction of active pixels: in ``(0, 1]``."""
    check_real(name, value, 0, 1, low_open=True, optional=optional)


def check_choice(name: str, value: Any, choices: Iterable[str], *, what: Optional[str] = None,
                 optional: bool = False) -> None:
    """One of ``choices`` (``what``: how the message calls it, default ``name``)."""
    if value is None and optional:
        return
    choices = tuple(choices)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string (one of {', '.join(choices)}), got {type(value).__name__} {value!r}")
    if value not in choices:
        raise ValueError(f"unknown {what or name} {value!r}; choose from {', '.join(choices)}")


def check_size(name: str, value: Any, multiple: int = 1, who: str = "", *, optional: bool = False) -> None:
    """An image size ``(H, W)``: two integers >= 1, multiples of ``multiple`` (``who`` needs it)."""
    if value is None and optional:
        return
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise TypeError(f"{name} must be two integers (H, W), got {value!r}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must be two integers (H, W), got {tuple(value)!r}")
    h, w = value
    if h < 1 or w < 1:
        raise ValueError(f"{name} must be >= 1 in both dimensions, got {h}x{w}")
    if h % multiple or w % multiple:
        raise ValueError(f"{name} {h}x{w}: {who or 'the model'} needs a height and width that are "
                         f"multiples of {multiple}")


def check_device(device: Any) -> None:
    """A torch device this process can use; ``"auto"`` always can (it is resolved when the run
    starts). Not a device: ``ValueError``; a device that is not there (no CUDA, ``cuda:3`` on a
    one-GPU machine): ``ValueError`` saying so."""
    if isinstance(device, torch.device):
        d = device
    elif not isinstance(device, str):
        raise TypeError(f"device must be a string such as 'cpu', 'cuda', 'cuda:1' or 'auto', "
                        f"got {type(device).__name__} {device!r}")
    elif device == "auto":
        return
    else:
        try:
            d = torch.device(device)
        except (RuntimeError, ValueError):
            raise ValueError(f"device {device!r} is not a torch device (use cpu, cuda, cuda:N, mps or auto)") from None
    if d.type == "cpu":
        return
    if d.type == "meta":
        raise ValueError(f"device {device!r} holds no data; use cpu, cuda, cuda:N, mps or auto")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            build = f"torch built with CUDA {torch.version.cuda}" if torch.version.cuda else "torch built without CUDA"
            raise ValueError(f"device {device!r} is not available: no CUDA GPU is visible ({build}); "
                             f"use cpu or auto")
        n = torch.cuda.device_count()
        if d.index is not None and d.index >= n:
            raise ValueError(f"device {device!r} is not available: {n} CUDA device(s) visible "
                             f"(cuda:0..cuda:{n - 1})")
        return
    if d.type == "mps":
        ok = torch.backends.mps.is_available()
    else:  # xpu, hpu, ...: whatever their module says, if it says anything
        is_available = getattr(getattr(torch, d.type, None), "is_available", None)
        ok = is_available() if callable(is_available) else True
    if not ok:
        raise ValueError(f"device {device!r} is not available in this process; use cpu or auto")


def check_path_type(name: str, value: Any, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path, got {type(value).__name__} {value!r}")


def check_input_folder(name: str, path: Any, *, optional: bool = False) -> None:
    """An existing, readable folder."""
    if path is None and optional:
        return
    check_path_type(name, path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} {os.fspath(path)!r} does not exist")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{name} {os.fspath(path)!r} is a file, not a folder")
    if not os.access(path, os.R_OK | os.X_OK):
        raise PermissionError(f"{name} {os.fspath(path)!r} is not readable")


def check_output_folder(name: str, path: Any, *, optional: bool = False) -> None:
    """A folder to write into: it may not exist yet, but must not be a file."""
    if path is None and optional:
        return
    check_path_type(name, path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{name} {os.fspath(path)!r} is a file, not a folder")


def check_output_file(name: str, path: Any, *, optional: bool = False) -> None:
    """A file to write: not a folder, in a folder that exists."""
    if path is None and optional:
        return
    check_path_type(name, path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{name} {os.fspath(path)!r} is a folder, not a file")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"{name} {os.fspath(path)!r}: folder {parent!r} does not exist")
