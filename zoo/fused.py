"""Numba kernels for the sparse U-Net's inference on a CPU: its output assembly, refinement and
activity mask.

The steps are written as tensor operations (the reference, differentiable: training uses
them). At inference on a CPU, with numba installed (the ``cpu`` extra), they run as kernels
instead; same formulas, same results up to float rounding (tests/zoo/test_inactive.py and
test_masks.py compare them):

* ``compose``: every pixel's logits before the refinement in one pass that writes each pixel
  once: bilinear coarse logits, the guided upsampling in the mixed cells, the head's rows plus
  the bilinear logits at the active pixels. The tensor path computes the bilinear logits at
  every pixel, gathers them at the active ones, computes the guided values and writes the
  fine rows over them (``bench/bench_zoo.py -k choice_assembly``; docs/ZOO.md, "Results").
* ``refine_at``: one pass per refined pixel, without the ``[pixels, 49]`` weight and CSR
  buffers; ``uncertain_pixels``: the refinement's candidates and their top-2 margins straight
  from the logit rows (used in training too: it selects pixels only).
* ``residual_ridge_energy``: the ``residual`` mask policy's energy in one pass (bit-identical);
  ``top_fraction``: its threshold (each image's k-th largest energy) by a radix select instead
  of ``kthvalue`` (the same value; the same mask).

The kernels run through the core's numba runtime (``spconv2d.backends.numba_kernels.runtime``:
PyTorch's thread count and, where PyTorch has an OpenMP runtime, PyTorch's own threads; one
launch at a time), are compiled lazily (``pixel_kernels`` is imported on first use) and cached
on disk. ``usable(*tensors)`` says whether a call may use them.
"""
from __future__ import annotations

import functools
import importlib.util

import torch

_AVAILABLE = importlib.util.find_spec("numba") is not None


def usable(*tensors: torch.Tensor, grad: bool = False) -> bool:
    """True when numba is installed, every tensor is a float32 / float64 CPU tensor and (unless
    ``grad`` is False: a value no gradient flows through) no gradient is needed."""
    if not _AVAILABLE or (grad and torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return False
    return all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) for t in tensors)


def uncertain_pixels(rows: torch.Tensor, mask: torch.Tensor, unsure: torch.Tensor, margin: float):
    """The refinement's candidates: ``(idx, margins)`` of the pixels (flat indices into
    ``B*H*W``, raster order) that are inactive (``~mask [B, H, W]``), in an ``unsure`` cell
    (bool ``[B, h, w]``) and have a top-2 margin of their logit row (``rows [B*H*W, K]``,
    contiguous) below ``margin``: what ``inactive.refine_uncertain``'s tensor ops select, in two
    passes over the image rows (margins and counts, then the selection) instead of upsampling
    the cell states, a ``nonzero`` over every pixel, gathered margins and a filter."""
    import numpy as np

    from spconv2d.backends.numba_kernels.runtime import launch

    from . import pixel_kernels

    r = rows.detach().contiguous()
    B, H, W = mask.shape
    r_np = r.numpy()
    kernel = pixel_kernels.uncertain_kernel(r_np.dtype.type)
    m = mask.contiguous().view(torch.uint8).numpy()
    u = unsure.contiguous().view(torch.uint8).numpy()
    thresh = np.array([margin], r_np.dtype)
    marg = np.empty(B * H * W, r_np.dtype)
    start = np.zeros(B * H + 1, np.int64)
    none_i, none_m = np.empty(0, np.int64), np.empty(0, r_np.dtype)
    work = B * H * W * r.shape[1] // 32
    launch(kernel, 0, r_np, m, u, thresh, marg, start, none_i, none_m, work=work)
    np.cumsum(start, out=start)
    idx, out = torch.empty(int(start[-1]), dtype=torch.int64), torch.empty(int(start[-1]), dtype=r.dtype)
    if idx.numel():
        launch(kernel, 1, r_np, m, u, thresh, marg, start, idx.numpy(), out.numpy(), work=B * H * W // 8)
    return idx, out


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


@functools.lru_cache(maxsize=64)
def _bilinear_taps(n_in: int, n_out: int, dtype: torch.dtype):
    """``F.interpolate(mode="bilinear", align_corners=False)``'s source indices ``[n_out, 2]``
    and weights ``[n_out, 2]`` along one axis (same formula, same float type); cached (read
    only: a handful of small tensors per image size)."""
    src = ((torch.arange(n_out, dtype=dtype) + 0.5) * (n_in / n_out) - 0.5).clamp_min_(0)
    i0 = src.long()  # floor: src >= 0
    i1 = i0 + (i0 < n_in - 1).long()
    l1 = src - i0.to(dtype)
    return torch.stack([i0, i1], 1).contiguous(), torch.stack([1 - l1, l1], 1).contiguous()


def compose(coarse: torch.Tensor, images: torch.Tensor, guided: torch.Tensor, fine: torch.Tensor,
            coords: torch.Tensor, sigma_r: float, spatial: torch.Tensor) -> torch.Tensor:
    """The sparse U-Net's logits ``[B, K, H, W]`` (channels-last) before refinement, each pixel
    written once: at the active pixels ``coords`` (``[N, 3]`` rows ``(b, y, x)``, distinct and
    inside the images, as a ``SparseTensor``'s) ``fine`` (the head's rows) plus the bilinearly
    upsampled ``coarse`` logits; at the inactive pixels of the cells ``guided`` (bool
    ``[B, h, w]``) ``inactive.guided_upsample`` (``sigma_r``; ``spatial``: its distance term
    ``[9, cell*cell]``); elsewhere the bilinear logits. What ``bilinear_up``, ``guided_upsample(out=, cells=)`` and ``put_pixel_rows``
    compute one after another, in one pass."""
    import numpy as np
    import torch.nn.functional as F

    from spconv2d.backends.numba_kernels.runtime import launch

    from . import pixel_kernels

    dt = coarse.dtype
    B, K, h, w = coarse.shape
    H, W = images.shape[-2:]
    im = images.detach().to(dt).contiguous()
    means = F.avg_pool2d(im, H // h).contiguous()
    rows = coarse.detach().permute(0, 2, 3, 1).contiguous().view(B * h * w, K)
    out = torch.empty(B, K, H, W, dtype=dt, memory_format=torch.channels_last)
    iy, wy = _bilinear_taps(h, H, dt)
    ix, wx = _bilinear_taps(w, W, dt)
    cell = H // h
    # the distance term per pixel of a row of cells: [9, cell, W]
    spatial_rows = spatial.to(dt).view(9, cell, 1, cell).expand(9, cell, w, cell).reshape(9, cell, W).contiguous()
    im_np = im.numpy()
    coords = coords.long()
    site = torch.full((B, H, W), -1, dtype=torch.int32)  # the active pixels' rows of ``fine``
    site[coords[:, 0], coords[:, 1], coords[:, 2]] = torch.arange(coords.shape[0], dtype=torch.int32)
    args = (im_np, site.numpy(), guided.contiguous().view(torch.uint8).numpy(),
            means.numpy(), rows.view(-1).numpy(), spatial_rows.numpy(),
            np.array([1.0 / (2 * sigma_r ** 2)], dtype=im_np.dtype), iy.numpy(), wy.numpy(), ix.numpy(), wx.numpy(),
            fine.detach().to(dt).contiguous().numpy(), out.permute(0, 2, 3, 1).view(-1, K).numpy())
    launch(pixel_kernels.compose_kernel(im_np.dtype.type, K), *args, work=B * H * W * K // 8)
    return out


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


def top_fraction(energy: torch.Tensor, k: int) -> torch.Tensor:
    """``masks.threshold_density``'s selection (after its dilation): bool ``[B, H, W]``, true where
    ``energy`` (float32 ``[B, H, W]``) is at least its image's ``k``-th largest value, the
    threshold found by a radix select (one task per image) instead of ``kthvalue``: the same
    value, the same mask. None when an image has a NaN (then the tensor ops decide)."""
    from spconv2d.backends.numba_kernels.runtime import launch

    from . import pixel_kernels

    B, H, W = energy.shape
    e = energy.detach().contiguous().view(B, H * W)
    out = torch.empty(B, H, W, dtype=torch.uint8)
    nan = torch.zeros(B, dtype=torch.uint8)
    launch(pixel_kernels.select_kernel(), e.numpy(), int(k), out.view(B, H * W).numpy(), nan.numpy(),
           work=B * H * W // 4)
    return None if bool(nan.any()) else out.view(torch.bool)
