"""CPU threads for torch: the application's choice, made by the ``spconv2d`` command line (and
the test and benchmark suites), never inside a library function such as ``train()``."""
from __future__ import annotations

import os
from typing import Optional

import torch

from .validation import check_int


def auto_threads() -> int:
    """Threads for torch on the CPU: the idle cores (cores minus the 1-minute load average,
    rounded), at least 1 and at most torch's current setting.

    On a shared machine, more OpenMP threads than idle cores makes every op wait on busy cores
    (docs/ARCHITECTURE.md, measured choices)."""
    n = torch.get_num_threads()
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return n
    return max(1, min(n, int((os.cpu_count() or n) - load + 0.5)))


def set_threads(threads: Optional[int] = None) -> int:
    """``torch.set_num_threads(threads)`` (``None``: ``auto_threads()``); returns the number set.
    ``threads`` must be an integer >= 1 (``ValueError`` / ``TypeError`` otherwise)."""
    check_int("threads", threads, 1, optional=True)
    n = threads if threads is not None else auto_threads()
    torch.set_num_threads(n)
    return n
