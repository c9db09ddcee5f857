"""Shared set-up of the Triton-kernel tests (imported after ``TRITON_INTERPRET`` is set).

Device policy: under the interpreter (``TRITON_INTERPRET=1``, the default the test modules set)
kernels run on CPU tensors; with ``TRITON_INTERPRET=0`` on a CUDA machine the same tests run the
compiled kernels on the GPU, and the ``gpu``-marked tests (bf16, TF32, autotuning, larger shapes)
run too.
"""
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if INTERPRET:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:  # compiled Triton needs a GPU
    DEVICE = None

needs_device = pytest.mark.skipif(DEVICE is None, reason="compiled Triton needs CUDA; set TRITON_INTERPRET=1")
needs_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA and compiled Triton (TRITON_INTERPRET=0)")


def load_kernels():
    from spconv2d.backends.triton_backend import import_kernels

    return import_kernels()
