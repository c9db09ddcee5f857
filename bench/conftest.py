"""Shared by the CPU benchmarks: ``BENCH_THREADS=N`` fixes torch's CPU threads for every
implementation a benchmark module times. Without it, a module's ``DEFAULT_THREADS()`` decides
(torch's own setting when the module has none)."""
import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def bench_threads(request):
    n = int(os.environ.get("BENCH_THREADS", 0)) or getattr(request.module, "DEFAULT_THREADS", lambda: 0)()
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    yield torch.get_num_threads()
    torch.set_num_threads(old)
