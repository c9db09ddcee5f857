"""How the numba kernels run (``numba_kernels.runtime``): the team form on PyTorch's own OpenMP
threads, its argument blocks, and its fallback to numba's pool."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from spconv2d.backends.numba_kernels import runtime

pytestmark = pytest.mark.numba

needs_openmp = pytest.mark.skipif(not torch.backends.openmp.is_available(), reason="PyTorch without OpenMP")


@needs_openmp
def test_finds_pytorchs_openmp_runtime():
    lib = runtime.torch_team()
    assert lib is not None and hasattr(lib, "GOMP_parallel")


def test_switched_off_there_is_no_team(monkeypatch):
    monkeypatch.setattr(runtime, "USE_TORCH_TEAM", False)
    assert runtime.torch_team() is None


def test_pack_args_layout_and_contiguity():
    a = np.zeros((3, 5), np.float32)
    words = runtime.pack_args(a, 7, True)
    assert words.dtype == np.int64 and words.size == runtime.TEAM_ARGS + 5
    assert list(words[runtime.TEAM_ARGS:]) == [a.ctypes.data, 3, 5, 7, 1]
    with pytest.raises(ValueError, match="C-contiguous"):
        runtime.pack_args(a[:, ::2])


@needs_openmp
def test_conv_at_two_threads_runs_on_pytorchs_threads_not_numbas_pool():
    # a fresh process: the plan is built and the conv run at 2 threads; numba's own threading
    # layer must never start (every task ran on PyTorch's OpenMP team), and the result equals
    # the one-thread result
    code = textwrap.dedent("""
        import torch
        from numba.np.ufunc import parallel
        from spconv2d.backends.numba_kernels import conv as nk
        g = torch.Generator().manual_seed(0)
        n = 6000
        nbr = torch.randint(-n // 2, n, (9, n), generator=g, dtype=torch.int32).clamp_min(-1)
        x = torch.randn(n, 32, generator=g)
        w = torch.randn(9, 32, 32, generator=g)
        torch.set_num_threads(2)
        two = nk.conv_forward(x, w, None, nbr), nk.conv_backward_weight(x, x, nbr)
        assert not parallel._is_initialized, "numba's pool was started"
        torch.set_num_threads(1)
        one = nk.conv_forward(x, w, None, nbr), nk.conv_backward_weight(x, x, nbr)
        assert all(torch.equal(a, b) for a, b in zip(one, two))
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@needs_openmp
def test_team_kernels_come_from_the_disk_cache_in_a_new_process(tmp_path):
    """The team forms are cached like the other compilations: a second process with the same
    cache folder compiles nothing (a closure capturing a jitted function would change numba's
    cache key in every process and recompile each time)."""
    import os

    code = textwrap.dedent("""
        import torch
        from spconv2d.backends.numba_kernels import conv as nk
        g = torch.Generator().manual_seed(0)
        nbr = torch.randint(-1, 3000, (9, 3000), generator=g, dtype=torch.int32)
        x = torch.randn(3000, 16, generator=g)
        torch.set_num_threads(2)
        nk.conv_forward(x, torch.randn(9, 16, 16, generator=g), None, nbr)
        nk.conv_backward_weight(x, x, nbr)
        from spconv2d.backends.numba_kernels import pool
        pool.max_pool_forward(x, nbr)  # a team kernel made per element type
    """)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), NUMBA_DEBUG_CACHE="1")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
            for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr[-2000:]
    assert "data saved" in runs[0].stdout + runs[0].stderr  # (the first one did compile)
    saved = [line for line in (runs[1].stdout + runs[1].stderr).splitlines() if "data saved" in line]
    assert not saved, saved
