"""The numba backend as a whole: auto-selected on CPU tensors, determinism of whole ops at 1 and
2 threads, PyTorch's thread count left alone, and the warning-once fallback when a kernel fails
to compile. (Its oracle tests are the ``numba-*`` backend cases of tests/ops.)"""
import warnings

import pytest
import torch

import spconv2d as sp
from spconv2d.backends.numba_backend import NumbaBackend
from spconv2d.backends.numba_kernels import conv as nk
from spconv2d.testing import random_sparse

pytestmark = pytest.mark.numba


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(sp.nn.SubMConv2d(5, 16, 3), sp.nn.SparseConv2d(16, 32, 2, 2),
                               sp.nn.SparseMaxPool2d(3, 1, 1), sp.nn.SubMConv2d(32, 32, 3))


def _run(x, net):
    y = net(x)
    y.features.square().sum().backward()
    return [y.features.detach().clone(), x.features.grad.clone()] + [p.grad.clone() for p in net.parameters()]


def test_whole_ops_are_bit_identical_across_runs_and_threads(gen):
    x0 = random_sparse(4, 5, (40, 60), 0.3, dtype=torch.float32, generator=gen)
    old, results = torch.get_num_threads(), []
    try:
        for threads in (1, 2, 1, 2):
            torch.set_num_threads(threads)
            x = sp.SparseTensor(x0.features.clone().requires_grad_(), x0.coords, x0.spatial_shape, 4)
            net = _net()
            with sp.backend("numba", dense_fallback=False):  # (F.conv2d's own sums depend on threads)
                results.append(_run(x, net))
            assert torch.get_num_threads() == threads  # the kernels never change PyTorch's setting
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_a_kernel_that_fails_to_compile_falls_back_with_one_warning(gen, monkeypatch):
    from numba.core.errors import TypingError

    def broken(*args, **kwargs):
        raise TypingError("simulated: no LLVM target for this CPU")

    monkeypatch.setattr(nk, "conv_forward", broken)
    be = NumbaBackend()
    x = random_sparse(2, 3, (9, 9), 0.4, generator=gen)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=gen)
    with pytest.warns(RuntimeWarning, match="failed to compile"):
        y = sp.functional.subm_conv2d(x, w, backend=be)
    ref = sp.functional.subm_conv2d(x, w, backend="torch")
    torch.testing.assert_close(y.features, ref.features)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        sp.functional.subm_conv2d(x, w, backend=be)


def test_options_and_index_strategies(gen):
    be = NumbaBackend(gather="pairs", grid_keys_per_site=4, torch_conv_channels=8, torch_conv_fill=1.1)
    assert "grid_keys_per_site=4" in repr(be) and be.gather == "pairs"
    x = random_sparse(2, 8, (12, 10), 0.3, generator=gen)
    w = torch.randn(8, 8, 3, 3, dtype=torch.float64, generator=gen)
    ref = sp.functional.subm_conv2d(x, w, backend="torch").features
    for strategy in ("auto", "sort", "grid", "hash"):
        y = sp.functional.subm_conv2d(sp.SparseTensor(x.features, x.coords, (12, 10), 2), w, backend=be,
                                      index=strategy)  # every conv on the PyTorch path (fill < 1.1)
        torch.testing.assert_close(y.features, ref)


def test_read_only_install_compiles_without_the_disk_cache(tmp_path):
    """No writable cache location (a read-only install and home; as root, permissions cannot
    make one, so ``__pycache__`` is a file and the user cache folder lies under a file): the
    kernels still run on numba, uncached, with one warning saying so, and match PyTorch."""
    import os
    import shutil
    import subprocess
    import sys

    src = os.path.dirname(sp.__file__)
    site = tmp_path / "site"
    shutil.copytree(src, site / "spconv2d", ignore=shutil.ignore_patterns("__pycache__"))
    (site / "spconv2d" / "backends" / "numba_kernels" / "__pycache__").write_text("not a folder\n")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CACHE")}
    env.update(PYTHONPATH=str(site), XDG_CACHE_HOME=str(blocker / "cache"), HOME=str(blocker / "home"))
    code = ("import warnings, torch, spconv2d as sp\n"
            "from spconv2d.testing import random_sparse\n"
            "warnings.simplefilter('always')\n"
            "x = random_sparse(2, 3, (9, 11), 0.4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))\n"
            "w = torch.randn(3, 3, 3, 3, dtype=torch.float64)\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    y = sp.functional.subm_conv2d(x, w, backend='numba')\n"
            "    from spconv2d.backends.numba_kernels import conv as nk\n"  # the team form too
            "    nbr = torch.randint(-1, 3000, (9, 3000), dtype=torch.int32)\n"
            "    torch.set_num_threads(2)\n"
            "    big = nk.conv_forward(torch.ones(3000, 8), torch.ones(9, 8, 8), None, nbr)\n"
            "assert torch.equal(big[:, 0], 8.0 * (nbr >= 0).sum(0)), 'team conv wrong'\n"
            "ref = sp.functional.subm_conv2d(x, w, backend='torch')\n"
            "assert sp.__file__.startswith(%r), sp.__file__\n"
            "assert torch.allclose(y.features, ref.features), 'numba differs from torch'\n"
            "msgs = [str(c.message) for c in caught]\n"
            "assert any('no writable cache location' in m for m in msgs), msgs\n"
            "assert not any('failed to compile' in m for m in msgs), msgs\n"
            "print('ok')\n") % str(site)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_fused_coordinate_check_equals_the_torch_checks(dtype, gen, monkeypatch):
    """``SparseTensor(check=True)`` on >= 4096 CPU rows runs the numba backend's one-pass check:
    the same coordinates and keys as the torch-op checks, the same errors, word for word."""
    from spconv2d.backends.numba_kernels import maps as nm

    calls = []
    fused = nm.check_coords
    monkeypatch.setattr(nm, "check_coords", lambda *a, **k: calls.append(1) or fused(*a, **k))
    B, H, W = 2, 120, 170
    c = (torch.rand(B, H, W, generator=gen) < 0.3).nonzero()
    c = c[torch.randperm(c.shape[0], generator=gen)].to(dtype)
    f = torch.randn(c.shape[0], 3, generator=gen)
    assert c.shape[0] >= 4096
    with sp.backend("numba"):
        x = sp.SparseTensor(f, c, (H, W), B)
    with sp.backend("torch"):
        y = sp.SparseTensor(f, c, (H, W), B)
    assert len(calls) == 1  # the numba construction used the fused check, the torch one did not
    assert torch.equal(x.coords, y.coords) and x.coords.dtype == torch.int32 and x.coords.is_contiguous()
    assert torch.equal(x.coord_set.keys, y.coord_set.keys) and x.coord_set.keys.dtype == y.coord_set.keys.dtype
    bad = {"duplicate": (100, c[5]), "x-too-large": (4000, torch.tensor([1, 3, W])),
           "negative-y": (4095, torch.tensor([0, -1, 3])), "batch-too-large": (7, torch.tensor([B, 0, 0]))}
    if dtype == torch.int64:
        bad["beyond-int32"] = (9, torch.tensor([0, 2**32 + 1, 0]))  # would wrap to 1 if cast first
    for name, (row, value) in bad.items():
        cb = c.clone()
        cb[row] = value.to(dtype)
        messages = []
        for be in ("numba", "torch"):
            with sp.backend(be), pytest.raises(ValueError) as err:
                sp.SparseTensor(f, cb, (H, W), B)
            messages.append(str(err.value))
        assert messages[0] == messages[1], name
