"""Numba kernels for the refinement step of the sparse U-Net's inference.

``inactive.refine_at`` is written as tensor operations (the reference, differentiable: training
uses it). At inference on a CPU, with numba installed (the ``cpu`` extra), it runs as one pass
per refined pixel instead, without the ``[pixels, 49]`` weight and CSR buffers: 2x faster
(docs/ARCHITECTURE.md, "Measured choices — zoo"); same formula, same results up to float
rounding (tests/zoo/test_inactive.py compares them). (A numba guided upsampling measured no
faster than the tensor code's batched GEMM, so there is none.) ``row_margins``: the top-2
margins of the refinement candidates straight from the logit rows (the tensor code gathers the
rows, then runs a strided running top-2): used in training too, it selects pixels only. The kernels run through the core's numba runtime
(``spconv2d.backends.numba_kernels.runtime``: PyTorch's thread count and, where PyTorch has an
OpenMP runtime, PyTorch's own threads; one launch at a time) and
are compiled lazily (``pixel_kernels`` is imported on first use) and cached on disk.
``usable(*tensors)`` says whether a call may use them.
"""
from __future__ import annotations

import importlib.util

import torch

_AVAILABLE = importlib.util.find_spec("numba") is not None


def usable(*tensors: torch.Tensor, grad: bool = False) -> bool:
    """True when numba is installed, every tensor is a float32 / float64 CPU tensor and (unless
    ``grad`` is False: a value no gradient flows through) no gradient is needed."""
    if not _AVAILABLE or (grad and torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return False
    return all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) for t in tensors)


def row_margins(rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``inactive.logit_margin`` of the rows ``rows[idx]`` (``rows`` ``[N, K]``), without
    gathering them: ``[len(idx)]``."""
    from spconv2d.backends.numba_kernels.runtime import launch

    from . import pixel_kernels

    r = rows.detach()
    if not r.is_contiguous():
        r = r.contiguous()
    out = torch.empty(idx.numel(), dtype=r.dtype)
    r_np = r.numpy()
    launch(pixel_kernels.margins_kernel(r_np.dtype.type), r_np, idx.to(torch.int64).contiguous().numpy(),
           out.numpy(), work=idx.numel() * rows.shape[1] // 16)
    return out


def refine_at(logits: torch.Tensor, images: torch.Tensor, idx: torch.Tensor, radius: int,
              sigma_r: float) -> torch.Tensor:
    """``inactive.refine_at``: ``[len(idx), K]`` colour-weighted window means."""
    import numpy as np

    from spconv2d.backends.numba_kernels.runtime import launch

    from . import pixel_kernels

    dt = logits.dtype
    rows = logits.detach().permute(0, 2, 3, 1).reshape(-1, logits.shape[1]).contiguous()
    im = images.detach().to(dt).contiguous()
    res = torch.empty(idx.numel(), logits.shape[1], dtype=dt)
    rows_np = rows.numpy()
    launch(pixel_kernels.refine_kernel(rows_np.dtype.type), rows_np, im.numpy(), idx.to(torch.int64).contiguous().numpy(),
           int(radius), np.array([1.0 / (2 * sigma_r ** 2)]), res.numpy(),
           work=idx.numel() * (2 * radius + 1) ** 2 * (images.shape[1] + logits.shape[1]) // 64)
    return res


def residual_ridge_energy(images: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``max(masks.residual_energy(images), masks.ridge_energy(images))`` ``[B, H, W]`` in one
    pass, given ``up`` (the images' upsampled coarse approximation, as ``residual_energy``
    computes it): the same values exactly (subtractions, absolute values, min and max only)."""
    from spconv2d.backends.numba_kernels.runtime import launch

    from . import pixel_kernels

    im, u = images.detach().contiguous(), up.detach().to(images.dtype).contiguous()
    B, C, H, W = im.shape
    out = torch.empty(B, H, W, dtype=im.dtype)
    im_np = im.numpy()
    launch(pixel_kernels.energy_kernel(im_np.dtype.type), im_np, u.numpy(), out.numpy(), work=B * H * W * C)
    return out
