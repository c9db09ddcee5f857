"""Backend and index-strategy dispatch: names, instances and options through ``sp.backend``,
the environment variables, and the backends' option validation."""
import pytest
import torch

import spconv2d as sp
from spconv2d import backends
from spconv2d.backends.base import Backend
from spconv2d.backends.torch_backend import TorchBackend


def test_default_backend_on_cpu_is_numba_when_installed_else_torch(monkeypatch):
    monkeypatch.delenv("SPCONV2D_BACKEND", raising=False)
    be = backends.resolve(torch.device("cpu"))
    expect = "numba" if backends.numba_available() else "torch"
    assert be.name == expect and be is backends.default_backend(expect)
    monkeypatch.setattr(backends, "numba_available", lambda: False)  # as without the cpu extra
    backends.auto_cpu_backend.cache_clear()
    try:
        assert backends.resolve(torch.device("cpu")).name == "torch"
    finally:
        monkeypatch.undo()
        backends.auto_cpu_backend.cache_clear()
    with pytest.raises(ValueError, match="unknown backend"):
        backends.resolve(torch.device("cpu"), "numbaa")


def test_context_manager_and_env(monkeypatch):
    monkeypatch.setenv("SPCONV2D_BACKEND", "torch")
    assert backends.requested_backend() == "torch"
    with sp.backend("triton"):
        assert backends.requested_backend() == "triton"
        with sp.backend("auto"):
            assert backends.requested_backend() == "auto"
        assert backends.requested_backend("torch") == "torch"  # an explicit argument wins
    assert backends.requested_backend() == "torch"
    monkeypatch.setenv("SPCONV2D_BACKEND", "cuda")
    with pytest.raises(ValueError, match="SPCONV2D_BACKEND"):
        backends.requested_backend()
    with pytest.raises(ValueError, match="unknown backend"):
        with sp.backend("fast"):
            pass


def test_options_through_the_context_stack():
    cpu = torch.device("cpu")
    with sp.backend("torch", gather="table", dense_fallback=False):
        be = backends.resolve(cpu)
        assert isinstance(be, TorchBackend) and be.gather == "table" and not be.dense_fallback
        with sp.backend("torch"):
            assert backends.resolve(cpu) is backends.default_backend("torch")
        assert backends.resolve(cpu) is be
    custom = TorchBackend(grid_max_keys=10)
    with sp.backend(custom):
        assert backends.resolve(cpu) is custom
        assert backends.resolve(cpu, "torch") is backends.default_backend("torch")  # argument wins
    assert backends.resolve(cpu, custom) is custom
    with pytest.raises(TypeError, match="name a backend"):
        sp.backend("auto", gather="table")
    with pytest.raises(TypeError, match="not an instance"):
        sp.backend(custom, gather="table")


def test_backend_options_are_validated_and_shown():
    with pytest.raises(ValueError, match="gather"):
        TorchBackend(gather="rows")
    with pytest.raises(ValueError, match="dense_thresholds"):
        TorchBackend(dense_thresholds=((16, 0.5),))  # the last step must cover any channel count
    with pytest.raises(TypeError):
        TorchBackend(fast=True)
    be = TorchBackend(gather="pairs", dense_thresholds=((8, 0.3), (None, 0.6)))
    assert "gather='pairs'" in repr(be)
    assert be.dense_subm_threshold(4, 8) == 0.3 and be.dense_subm_threshold(4, 9) == 0.6
    assert not TorchBackend(dense_fallback=False).prefers_dense_subm(1.0, 4, 4)


def test_backend_base_declares_every_hook():
    class Minimal(Backend):
        name = "minimal"

        def build_index(self, keys, key_space, strategy): ...
        def neighbor_table(self, index, out_coords, in_shape, scale, offsets, divisor): ...
        def conv_forward(self, features, weight, bias, kmap): ...
        def conv_backward_input(self, grad_out, weight, kmap): ...
        def conv_backward_weight(self, features, grad_out, kmap): ...

    be = Minimal()
    assert be.default_index_strategy(100) == "sort" and not be.full_subm_lookup(None)
    assert not be.prefers_dense_subm(1.0, 1, 1) and be.options() == {} and repr(be) == "Minimal()"
    with pytest.raises(TypeError):
        type("Incomplete", (Backend,), {"name": "x"})()


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backends.resolve(torch.device("cpu"), "triton")


def test_index_strategy_context(monkeypatch):
    be = backends.resolve(torch.device("cpu"), "torch")
    monkeypatch.delenv("SPCONV2D_INDEX", raising=False)
    assert backends.resolve_index_strategy(be, 100) == "grid"
    assert backends.resolve_index_strategy(be, 1 << 30) == "sort"
    assert backends.resolve_index_strategy(TorchBackend(grid_max_keys=50), 100) == "sort"
    with sp.index_strategy("sort"):
        assert backends.resolve_index_strategy(be, 100) == "sort"
    monkeypatch.setenv("SPCONV2D_INDEX", "grid")
    assert backends.resolve_index_strategy(be, 1 << 30) == "grid"
