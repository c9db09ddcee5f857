"""The suite's one set-up: Triton mode, devices, skip markers, shared fixtures.

Triton: on this CPU-only suite the kernels run in Triton's interpreter; ``TRITON_INTERPRET``
must be in the environment before anything imports triton, so it is set here, once (the test
suite may write the environment; the library never does). On a CUDA machine,
``TRITON_INTERPRET=0 python -m pytest`` runs the same tests on compiled kernels.

Markers (applied as skips at collection):
    ``triton``  needs the Triton kernels somewhere: the interpreter or a GPU;
    ``cuda``    needs compiled Triton on a CUDA device (bf16, TF32, autotuning, large shapes);
    ``numba``   needs numba (the ``cpu`` extra: the fused CPU backend).
Fixtures: ``gen`` (a seeded generator), ``triton_device`` (where the kernels run) and
``backend_case`` (the backends every oracle test runs on, with their dtype and tolerances).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
from typing import NamedTuple  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from spconv2d.testing import triton_device as _triton_device  # noqa: E402

TRITON_DEVICE = _triton_device()
HAVE_NUMBA = importlib.util.find_spec("numba") is not None


def pytest_collection_modifyitems(config, items):
    no_triton = pytest.mark.skip(reason="needs triton: the interpreter (TRITON_INTERPRET=1) or a CUDA device")
    no_cuda = pytest.mark.skip(reason="needs CUDA and compiled Triton (TRITON_INTERPRET=0)")
    no_numba = pytest.mark.skip(reason="needs numba (pip install 'spconv2d[cpu]')")
    for item in items:
        if "numba" in item.keywords and not HAVE_NUMBA:
            item.add_marker(no_numba)
        if "triton" in item.keywords and TRITON_DEVICE is None:
            item.add_marker(no_triton)
        if "cuda" in item.keywords and TRITON_DEVICE != "cuda":
            item.add_marker(no_cuda)


def pytest_ignore_collect(collection_path, config):
    # the kernel modules import triton / numba at module level
    if collection_path.suffix == ".py":
        if TRITON_DEVICE is None and collection_path.parent.name == "kernels":
            return True
        if not HAVE_NUMBA and collection_path.parent.name == "numba":
            return True
    return None


@pytest.fixture(autouse=True, scope="session")
def _idle_core_threads():
    """On a shared CPU, more torch threads than idle cores is many times slower."""
    from spconv2d.zoo.threads import auto_threads

    old = torch.get_num_threads()
    torch.set_num_threads(auto_threads())
    yield
    torch.set_num_threads(old)


@pytest.fixture
def gen():
    """A seeded generator: every test draws its own reproducible random inputs."""
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="session")
def triton_device():
    """``"cpu"`` (interpreter) or ``"cuda"`` (compiled): where the Triton kernels run."""
    return TRITON_DEVICE or "cpu"


class BackendCase(NamedTuple):
    """One backend configuration an oracle test runs on: the backend (name or instance), the
    device and dtype of the inputs, and the tolerances against the float64 dense oracle."""

    name: str
    backend: object
    device: str
    dtype: torch.dtype
    rtol: float
    atol: float


def _torch(gather):
    from spconv2d.backends import create_backend

    return create_backend("torch", gather=gather)


def _cases():
    exact = dict(rtol=1e-10, atol=1e-10)
    yield pytest.param(("torch-pairs", lambda: _torch("pairs"), "cpu", torch.float64, exact), id="torch-pairs")
    yield pytest.param(("torch-table", lambda: _torch("table"), "cpu", torch.float64, exact), id="torch-table")
    yield pytest.param(("torch-im2col", lambda: _torch("im2col"), "cpu", torch.float64, exact), id="torch-im2col")
    yield pytest.param(("torch-auto", lambda: "torch", "cpu", torch.float64, exact), id="torch-auto")
    yield pytest.param(("torch-fp32", lambda: "torch", "cpu", torch.float32, dict(rtol=1e-4, atol=1e-4)),
                       id="torch-fp32")
    yield pytest.param(("torch-fp16", lambda: "torch", "cpu", torch.float16, dict(rtol=2e-2, atol=2e-2)),
                       id="torch-fp16")
    yield pytest.param(("numba-fp64", lambda: "numba", "cpu", torch.float64, exact), id="numba-fp64",
                       marks=pytest.mark.numba)
    yield pytest.param(("numba-fp32", lambda: "numba", "cpu", torch.float32, dict(rtol=1e-4, atol=1e-4)),
                       id="numba-fp32", marks=pytest.mark.numba)
    yield pytest.param(("numba-fp16", lambda: "numba", "cpu", torch.float16, dict(rtol=2e-2, atol=2e-2)),
                       id="numba-fp16", marks=pytest.mark.numba)
    dev = TRITON_DEVICE or "cpu"
    yield pytest.param(("triton-fp32", lambda: "triton", dev, torch.float32, dict(rtol=1e-4, atol=1e-4)),
                       id="triton-fp32", marks=pytest.mark.triton)
    yield pytest.param(("triton-fp16", lambda: "triton", dev, torch.float16, dict(rtol=2e-2, atol=2e-2)),
                       id="triton-fp16", marks=pytest.mark.triton)


@pytest.fixture(params=list(_cases()))
def backend_case(request) -> BackendCase:
    name, make, device, dtype, tol = request.param
    return BackendCase(name, make(), device, dtype, **tol)
