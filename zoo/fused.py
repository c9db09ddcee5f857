"""Numba kernels for the inactive-pixel steps of the sparse U-Net's inference.

``inactive.guided_upsample`` and ``inactive.refine_at`` are written as tensor operations (the
reference, differentiable: training uses them). At inference on a CPU, with numba installed
(the ``cpu`` extra), they run as the kernels below instead: one pass per pixel, no gathered
``[pixels, 9, K]`` / ``[pixels, 49]`` buffers. Same formulas, same results up to float rounding
(tests/zoo/test_inactive.py compares them). The kernels run through the core's numba runtime
(``spconv2d.backends.numba_kernels.runtime``: PyTorch's thread count, one launch at a time) and
are compiled lazily (``pixel_kernels`` is imported on first use) and cached on disk.
``usable(*tensors)`` says whether a call may use them.
"""
from __future__ import annotations

import importlib.util

import torch

_AVAILABLE = importlib.util.find_spec("numba") is not None


def usable(*tensors: torch.Tensor) -> bool:
    """True when numba is installed, no gradient is needed and every tensor is a float32 /
    float64 CPU tensor."""
    if not _AVAILABLE or torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) for t in tensors)


def guided_upsample(logits: torch.Tensor, images: torch.Tensor, cell: int, sigma_r: float, sigma_s: float,
                    out: torch.Tensor, sel: torch.Tensor) -> None:
    """``inactive.guided_upsample`` of the cells ``sel`` (flat indices into ``B*h*w``), written
    into the channels-last ``out`` ``[B, K, H, W]`` in place."""
    from spconv2d.backends.numba_kernels.runtime import request_threads

    from . import pixel_kernels

    dt = out.dtype
    lg = logits.detach().to(dt).contiguous()
    im = images.detach().to(dt).contiguous()
    means = torch.nn.functional.avg_pool2d(im, cell).contiguous()
    rows = out.permute(0, 2, 3, 1).view(-1, out.shape[1])  # a view: out is channels-last
    request_threads(sel.numel() * cell * cell * 9 * (images.shape[1] + logits.shape[1]) // 64)
    pixel_kernels.guided(lg.numpy(), im.numpy(), means.numpy(), sel.to(torch.int64).contiguous().numpy(),
                         int(cell), 1.0 / (2 * sigma_r ** 2), 1.0 / (2 * sigma_s ** 2), rows.numpy())


def refine_at(logits: torch.Tensor, images: torch.Tensor, idx: torch.Tensor, radius: int,
              sigma_r: float) -> torch.Tensor:
    """``inactive.refine_at``: ``[len(idx), K]`` colour-weighted window means."""
    from spconv2d.backends.numba_kernels.runtime import request_threads

    from . import pixel_kernels

    dt = logits.dtype
    rows = logits.detach().permute(0, 2, 3, 1).reshape(-1, logits.shape[1]).contiguous()
    im = images.detach().to(dt).contiguous()
    res = torch.empty(idx.numel(), logits.shape[1], dtype=dt)
    request_threads(idx.numel() * (2 * radius + 1) ** 2 * (images.shape[1] + logits.shape[1]) // 64)
    pixel_kernels.refine(rows.numpy(), im.numpy(), idx.to(torch.int64).contiguous().numpy(), int(radius),
                         1.0 / (2 * sigma_r ** 2), res.numpy())
    return res
