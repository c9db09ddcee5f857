import pytest
import torch


@pytest.fixture
def gen():
    """A seeded generator: every test draws its own reproducible random inputs."""
    return torch.Generator().manual_seed(0)
