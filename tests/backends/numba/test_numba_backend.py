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
