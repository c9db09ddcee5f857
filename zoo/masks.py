"""Activity masks: which pixels a sparse model computes on.

A policy turns dense images ``[B, C, H, W]`` into a bool mask ``[B, H, W]``:

* ``"nonzero"`` — pixels where any channel is non-zero (MNIST: the digit's strokes). ``density``
  is ignored: the image decides.
* ``"edge"`` — Sobel gradient magnitude (max over channels), dilated by a ``dilation x dilation``
  max-pool, thresholded per image at its ``(1 - density)`` quantile. Thresholding the dilated
  energy is the same as thresholding the energy and dilating the mask (max-pool commutes with a
  threshold), and it makes the measured density equal to the target (up to ties).
* ``"contrast"`` — the same with local standard deviation over a 5x5 window as the energy.
* ``"residual"`` (segmentation default) — what a 1/``cell`` resolution level cannot represent:
  ``|image - upsample(avg_pool(image, cell))|`` (``cell`` 4, bilinear upsampling, max over
  channels), i.e. the image minus its own coarse (H/4) approximation, combined (``max``) with a
  thin-line ``ridge_energy`` (a pixel differing in the same direction from both horizontal
  neighbours at distance 1-2: poles), thresholded per image at its ``(1 - density)`` quantile
  without dilation. Flat regions and smooth gradients (sky, road, walls) have ~0 energy wherever
  they are, and class boundaries, thin structures and small objects — exactly where the sparse
  U-Net's coarse prediction is wrong — have the largest.
* ``"full"`` — every pixel (density 1; a sparse model then computes what its dense twin does).

``measured_density(mask)`` is the fraction of active pixels, reported in every metrics file.

A sparse model owns its policy (``MaskedModel``): ``model.make_mask(images)`` is the mask it
computes on when called without one, and training, evaluation, prediction and the benchmarks ask
it through ``activity_mask(model, images)`` (``None`` for a dense model).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import fused
from .validation import check_choice, check_density

POLICIES = ("nonzero", "edge", "contrast", "residual", "full")
# target density of the energy policies unless told otherwise: the operating point the zoo's
# sparse U-Net is trained and measured at (docs/ZOO.md)
DEFAULT_DENSITY = 0.3
# default dilation per energy policy (the residual is already a band around each boundary)
DEFAULT_DILATION = {"edge": 3, "contrast": 3, "residual": 1}


def sobel_energy(images: torch.Tensor) -> torch.Tensor:
    """Gradient magnitude ``[B, H, W]`` (max over channels), replicate-padded borders."""
    B, C, H, W = images.shape
    kx = images.new_tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8
    k = torch.stack([kx, kx.t()])[:, None].repeat(C, 1, 1, 1)  # [2C, 1, 3, 3]
    g = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), k, groups=C).view(B, C, 2, H, W)
    return g.pow(2).sum(2).sqrt().amax(1)


def contrast_energy(images: torch.Tensor, window: int = 5) -> torch.Tensor:
    """Local standard deviation over a ``window x window`` neighbourhood (max over channels)."""
    p = window // 2
    x = F.pad(images, (p, p, p, p), mode="replicate")
    mean = F.avg_pool2d(x, window, 1)
    sq = F.avg_pool2d(x * x, window, 1)
    return (sq - mean * mean).clamp_min(0).sqrt().amax(1)


def coarse_approximation(images: torch.Tensor, cell: int = 4) -> torch.Tensor:
    """``bilinear_up(avg_pool(images, cell))`` back to ``H x W``: what a ``cell``-times coarser
    level represents of the images."""
    H, W = images.shape[-2:]
    coarse = F.avg_pool2d(images, cell, ceil_mode=True)
    return F.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=False)


def residual_energy(images: torch.Tensor, cell: int = 4) -> torch.Tensor:
    """``|images - bilinear_up(avg_pool(images, cell))|``, max over channels, ``[B, H, W]``.

    The local-contrast energy w.r.t. the coarse level: 0 where a ``cell``-times coarser image
    (what the sparse U-Net's coarse head sees) reproduces the pixel, large at boundaries and
    thin structures. ``H`` and ``W`` need not be multiples of ``cell`` (the pooling floors, the
    upsampling goes back to ``H x W``)."""
    return (images - coarse_approximation(images, cell)).abs().amax(1)


def ridge_energy(images: torch.Tensor, distances=(1, 2)) -> torch.Tensor:
    """Thin vertical structures (poles, trunks, legs): how much a pixel differs *in the same
    direction* from both its left and right neighbours at distance 1 or 2, i.e.
    ``max_d max_c relu(min(a, b)) + relu(min(-a, -b))`` with ``a = x - x[j-d]``, ``b = x - x[j+d]``.
    Zero on flat areas, gradients and step edges (one side equals the pixel), large on a line
    1-3 px wide. ``[B, H, W]``, replicate-padded borders."""
    B, C, H, W = images.shape
    p = max(distances)
    xp = F.pad(images, (p, p, 0, 0), mode="replicate")
    centre, out = xp[..., p:p + W], None
    for d in distances:
        # relu(min(a, b)) + relu(min(-a, -b)) = relu(max(min(a, b), -max(a, b))) (at most one
        # term is non-zero); relu commutes with the max over channels: clamped once at the end
        a = torch.sub(centre, xp[..., p - d:p - d + W])
        b = torch.sub(centre, xp[..., p + d:p + d + W])
        low = torch.minimum(a, b)
        r = torch.maximum(low, torch.maximum(a, b, out=a).neg_(), out=low).amax(1)
        out = r if out is None else torch.maximum(out, r, out=out)
    return out.clamp_min_(0)


def threshold_density(energy: torch.Tensor, density: float, dilation: int = 3) -> torch.Tensor:
    """Per image: dilate ``energy`` [B, H, W] and keep its top ``density`` fraction of pixels
    (those at least its ``k``-th largest value; with numba, float32: found by a radix select,
    ``fused.top_fraction``, the same value as ``kthvalue``)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    B, H, W = energy.shape
    if dilation > 1:
        energy = F.max_pool2d(energy[:, None], dilation, 1, dilation // 2)[:, 0, :H, :W]
    flat = energy.reshape(B, -1)
    k = max(1, min(flat.shape[1], round(density * flat.shape[1])))
    if energy.dtype == torch.float32 and fused.usable(energy):  # a radix select: the same threshold
        mask = fused.top_fraction(energy, k)
        if mask is not None:
            return mask
    thresh = flat.kthvalue(flat.shape[1] - k + 1, dim=1, keepdim=True).values  # k-th largest per image
    return (flat >= thresh).view(B, H, W)


def make_mask(images: torch.Tensor, policy: str = "edge", density: float = DEFAULT_DENSITY,
              dilation: Optional[int] = None) -> torch.Tensor:
    """The activity mask ``[B, H, W]`` bool of ``images`` ``[B, C, H, W]`` under ``policy``
    (``dilation`` None: the policy's default, 3 for edge/contrast, 1 for residual)."""
    if dilation is None:
        dilation = DEFAULT_DILATION.get(policy, 1)
    if policy == "nonzero":
        return (images != 0).any(1)
    if policy == "full":
        return torch.ones(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
    if policy == "edge":
        return threshold_density(sobel_energy(images), density, dilation)
    if policy == "contrast":
        return threshold_density(contrast_energy(images), density, dilation)
    if policy == "residual":
        if fused.usable(images):  # one pass instead of ~20 tensor ops; the same values exactly
            energy = fused.residual_ridge_energy(images, coarse_approximation(images))
        else:
            energy = torch.maximum(residual_energy(images), ridge_energy(images))
        return threshold_density(energy, density, dilation)
    raise ValueError(f"unknown mask policy {policy!r}; choose from {POLICIES}")


def measured_density(mask: torch.Tensor) -> float:
    return float(mask.float().mean()) if mask.numel() else 0.0


class MaskPolicy:
    """A callable ``images -> mask`` carrying its configuration (picklable, no parameters)."""

    def __init__(self, policy: str = "edge", density: float = DEFAULT_DENSITY, dilation: Optional[int] = None):
        check_choice("mask_policy", policy, POLICIES, what="mask policy")
        check_density("density", density)
        if dilation is None:
            dilation = DEFAULT_DILATION.get(policy, 1)
        self.policy, self.density, self.dilation = policy, float(density), int(dilation)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return make_mask(images, self.policy, self.density, self.dilation)

    def __repr__(self) -> str:
        return f"MaskPolicy({self.policy!r}, density={self.density}, dilation={self.dilation})"


class MaskedModel:
    """Mixin of the sparse models: the one owner of a model's activity-mask policy.

    ``policy`` (a ``MaskPolicy``, read-only: change it with ``set_mask_policy``) is what
    ``make_mask(images)`` applies; a sparse model's ``forward(images, mask=None)`` calls
    ``make_mask`` when it is given no mask. The subclass's ``__init__`` calls
    ``set_mask_policy(mask_policy, density)`` with its entry point's arguments."""

    sparse = True

    def set_mask_policy(self, mask_policy: Optional[str] = None, density: Optional[float] = None) -> None:
        """Replace the policy; ``None`` keeps the current value (at construction: ``"nonzero"``
        and ``DEFAULT_DENSITY``). E.g. ``model.set_mask_policy(density=0.2)`` for ``eval --density``."""
        old = getattr(self, "policy", None)
        if mask_policy is None:
            mask_policy = old.policy if old is not None else "nonzero"
        if density is None:
            density = old.density if old is not None else DEFAULT_DENSITY
        self.policy = MaskPolicy(mask_policy, density)

    def make_mask(self, images: torch.Tensor) -> torch.Tensor:
        """The activity mask ``[B, H, W]`` bool the model computes ``images`` ``[B, C, H, W]`` on."""
        return self.policy(images)


def activity_mask(model, images: torch.Tensor) -> Optional[torch.Tensor]:
    """``model.make_mask(images)`` for a sparse model (``model.sparse``), ``None`` for a dense one."""
    return model.make_mask(images) if getattr(model, "sparse", False) else None
