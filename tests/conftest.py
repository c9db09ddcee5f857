import os

# The Triton kernels run in Triton's interpreter on this CPU-only suite; the variable must be
# set before anything imports triton. (On a GPU machine, run with TRITON_INTERPRET=0.)
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


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
