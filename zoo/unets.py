"""Segmentation U-Nets and their registry entry points: ``unet`` (dense) and ``sparse_unet``.

Calling convention: ``model(images, mask=None, return_aux=False)`` with ``images``
``[B, 3, H, W]`` in ``[0, 1]`` (``H``, ``W`` multiples of 4) -> logits ``[B, num_classes, H, W]``
for every pixel (``return_aux=True``: ``(logits, aux)``, ``aux`` the coarse head's logits
upsampled to ``[B, num_classes, H, W]``, the target of an auxiliary loss). Both are one class
definition built with the dense or the sparse ops table (``blocks``): same module names and
parameter shapes, so ``sparse_unet.load_state_dict(unet.state_dict())`` and back work, and with
every pixel active the sparse twin computes what the dense one does.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import spconv2d as sp

from .blocks import bilinear_up, conv_bn_relu, dense_ops, init_weights, sparse_ops
from . import fused
from .inactive import (GUIDED_SIGMA_R, cell_states, compose_rows, guided_rows, guided_spatial_term, refine_uncertain,
                       set_pixel_rows)
from .masks import DEFAULT_DENSITY, MaskedModel
from .registry import ModelDefaults, register_model

SIZE_MULTIPLE = 4  # H and W: two k2 s2 down-samplings and the H/4 context head's 4x4 cells
STREETS_TRAINING = ModelDefaults(data="streets", epochs=10, batch_size=16, lr=3e-3, weight_decay=1e-4,
                                 size_multiple=SIZE_MULTIPLE)


class UNetBase(nn.Module):
    """A 3-level mini U-Net (channels c, 2c, 4c; default 16/32/64) with a dense context head.

    enc0: 2x conv3            (H,   W)
    down1: conv k2 s2, enc1: 2x conv3   (H/2, W/2)
    down2: conv k2 s2, enc2: 2x conv3   (H/4, W/4)   <- coarsest level
    coarse (dense in both twins, H/4 x W/4 = 1/16 of the pixels): cat(enc2 features, the 4x4
            cells' colour mean and standard deviation, occupancy, row coordinate) -> conv3 -> BN
            -> ReLU -> conv3 (dilation 2) -> BN -> ReLU = *context* (4c channels); -> conv1x1 =
            *coarse logits*
    up2: convT k2 s2 of (enc2 + context), cat enc1, dec1: 2x conv3
    up1: convT k2 s2, cat enc0, dec0: 2x conv3, head: conv1x1
    logits = head + the coarse logits upsampled (the fine path predicts a correction)
    Every conv is followed by BN + ReLU (except the heads). H and W must be multiples of 4.
    """

    task, default_data = "segmentation", "streets"

    def __init__(self, ops, in_chans: int = 3, num_classes: int = 19, width: int = 16):
        super().__init__()
        c0, c1, c2 = width, 2 * width, 4 * width
        self.sparse = ops.sparse
        self.in_chans, self.num_classes = in_chans, num_classes
        self.enc0 = nn.Sequential(conv_bn_relu(ops, ops.conv(in_chans, c0, 3), c0), conv_bn_relu(ops, ops.conv(c0, c0, 3), c0))
        self.down1 = conv_bn_relu(ops, ops.strided(c0, c1, 2, 2, 0), c1)
        self.enc1 = nn.Sequential(conv_bn_relu(ops, ops.conv(c1, c1, 3), c1), conv_bn_relu(ops, ops.conv(c1, c1, 3), c1))
        self.down2 = conv_bn_relu(ops, ops.strided(c1, c2, 2, 2, 0), c2)
        self.enc2 = nn.Sequential(conv_bn_relu(ops, ops.conv(c2, c2, 3), c2), conv_bn_relu(ops, ops.conv(c2, c2, 3), c2))
        self.up2 = conv_bn_relu(ops, ops.up(c2, c1, 2, 2), c1)
        self.dec1 = nn.Sequential(conv_bn_relu(ops, ops.conv(2 * c1, c1, 3), c1), conv_bn_relu(ops, ops.conv(c1, c1, 3), c1))
        self.up1 = conv_bn_relu(ops, ops.up(c1, c0, 2, 2), c0)
        self.dec0 = nn.Sequential(conv_bn_relu(ops, ops.conv(2 * c0, c0, 3), c0), conv_bn_relu(ops, ops.conv(c0, c0, 3), c0))
        self.head = ops.conv(c0, num_classes, 1, bias=True)
        # the coarse head is dense in both twins (it runs on H/4 x W/4)
        self.coarse = nn.Sequential(
            nn.Conv2d(c2 + 2 * in_chans + 2, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(inplace=True),
            nn.Conv2d(c2, c2, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(c2), nn.ReLU(inplace=True),
            nn.Conv2d(c2, num_classes, 1))
        init_weights(self)

    def context(self, coarse_feats, images, occupancy):
        """Dense context at H/4 x W/4: ``(features [B, 4c, h, w], logits [B, classes, h, w])``.

        ``coarse_feats`` dense [B, 4c, H/4, W/4]; ``occupancy`` [B, 1, H/4, W/4] in [0, 1].
        Inputs: the coarsest features, each 4x4 cell's colour mean and standard deviation (its
        texture: the sparse twin has no features in cells without active pixels), the occupancy
        and the normalised row coordinate (a vertical position prior: sky above, road below)."""
        pooled = F.avg_pool2d(images, 4)
        std = (F.avg_pool2d(images * images, 4) - pooled * pooled).clamp_min(0).sqrt()  # texture
        B, _, h, w = pooled.shape
        rows = torch.linspace(-1, 1, h, device=images.device, dtype=images.dtype).view(1, 1, h, 1).expand(B, 1, h, w)
        feats = self.coarse[:-1](torch.cat([coarse_feats, pooled, std, occupancy, rows], 1))
        return feats, self.coarse[-1](feats)

    @staticmethod
    def _check(images):
        H, W = images.shape[-2:]
        if H % SIZE_MULTIPLE or W % SIZE_MULTIPLE:
            raise ValueError(f"U-Net input size must be a multiple of {SIZE_MULTIPLE}, got {H}x{W}")


class UNet(UNetBase):
    sparse = False

    def __init__(self, **kw):
        super().__init__(dense_ops(), **kw)

    def forward(self, images, mask=None, return_aux: bool = False):
        self._check(images)
        e0 = self.enc0(images)
        e1 = self.enc1(self.down1(e0))
        e2 = self.enc2(self.down2(e1))
        ctx, coarse = self.context(e2, images, e2.new_ones(e2.shape[0], 1, *e2.shape[2:]))
        d1 = self.dec1(torch.cat([self.up2(e2 + ctx), e1], 1))
        d0 = self.dec0(torch.cat([self.up1(d1), e0], 1))
        up = bilinear_up(coarse, images.shape[-2:])
        logits = self.head(d0) + up  # the fine head corrects the upsampled coarse prediction
        return (logits, up) if return_aux else logits


class SparseUNet(MaskedModel, UNetBase):
    """The U-Net on the active pixels; every pixel gets a prediction.

    Encoder on the active pixels (SubMConv2d, SparseConv2d k2 s2), decoder with
    ``up(x, output=skip)`` so each level is computed exactly at its encoder sites, full-resolution
    head on the active pixels. The coarsest level is made dense (``to_dense``) for the dense
    context head, which gives logits for every H/4 x W/4 cell (cells without an active pixel
    still see their colour and texture) and context features that join the decoder at the
    coarsest level's sites. Active pixels take the head's correction plus the bilinearly
    upsampled coarse logits, as every pixel does in ``unet``: with every pixel active the twins
    compute the same. Inactive pixels take the coarse logits brought to H x W by
    ``guided_upsample`` (colour-guided joint bilateral upsampling; ``upsample="bilinear"``: plain
    bilinear); with ``refine`` (default) the uncertain ones (top-2 logit margin < ``margin``)
    then take the colour-weighted mean of their 7x7 window (``refine_at``), which brings in the
    full-resolution predictions of nearby active pixels. Both are computed only where they can
    change a label (``cell_states``; bilinear stands in elsewhere, same labels). The returned
    aux logits are the upsampled coarse logits everywhere (before the active pixels and the
    refinement are written). The module ``inactive`` holds these steps' functions.

    The steps of ``forward``, in order, are public so that they can be timed one by one
    (``bench/steps_zoo.py`` wraps them): ``make_mask`` (without a given mask), the modules
    ``enc0 down1 enc1 down2 enc2``, ``context``, the modules ``up2 dec1 up1 dec0 head``, then
    ``cell_states``, ``assemble`` (every pixel's logits; on its tensor path it calls
    ``upsample_guided`` with ``upsample="guided"``) and ``refine_uncertain`` (``refine``).
    """

    # inactive pixels: refinement settings (chosen on held-out streets scenes, docs/ZOO.md)
    margin = 2.0            # a top-2 logit margin below this is "uncertain"
    refine_radius = 3       # 7x7 windows
    refine_sigma_r = 0.05
    refine_fraction = 0.03  # at most this fraction of all pixels is refined (least certain first)

    def __init__(self, density: Optional[float] = DEFAULT_DENSITY, mask_policy: str = "residual",
                 upsample: str = "guided", refine: bool = True, **kw):
        super().__init__(sparse_ops(), **kw)
        if upsample not in ("guided", "bilinear"):
            raise ValueError(f"upsample must be 'guided' or 'bilinear', got {upsample!r}")
        self.set_mask_policy(mask_policy, density)
        self.upsample, self.refine = upsample, bool(refine)

    def forward(self, images, mask=None, return_aux: bool = False):
        self._check(images)
        if mask is None:
            mask = self.make_mask(images)
        x = sp.SparseTensor.from_dense(images, mask)
        e0 = self.enc0(x)
        e1 = self.enc1(self.down1(e0))
        e2 = self.enc2(self.down2(e1))
        occ = F.avg_pool2d(mask[:, None].to(images.dtype), 4)
        ctx, coarse = self.context(e2.to_dense(), images, occ)
        e2 = e2.replace(e2.features + sp.at_sites(ctx, e2.coords))
        d1 = self.dec1(sp.cat([self.up2(e2, output=e1), e1]))
        d0 = self.dec0(sp.cat([self.up1(d1, output=e0), e0]))
        head = self.head(d0).features
        mixed, unsure = self.cell_states(coarse) if (self.upsample == "guided" or self.refine) else (None, None)
        out, aux = self.assemble(coarse, images, occ, head, d0.coords, mixed, return_aux)
        if self.refine:
            out = self.refine_uncertain(out, images, mask, unsure)
        return (out, aux) if return_aux else out

    def assemble(self, coarse, images, occ, head, coords, mixed, return_aux: bool = False):
        """Every pixel's logits before the refinement: ``(out [B, K, H, W], aux)`` (``aux`` None
        unless ``return_aux``). The bilinearly upsampled coarse logits, in ``mixed`` cells
        (``upsample="guided"``) the guided upsampling, and at the active pixels (``coords``,
        the head's rows ``head``) the head's correction plus the bilinear logits (as in
        ``unet``). At inference on a CPU with numba in one pass that writes each pixel once
        (``fused.compose``); otherwise tensor ops, with the step ``upsample_guided``, written in
        place, or where autograd records (``_records``: training) by ``inactive.compose_rows``,
        out of place."""
        H, W = images.shape[-2:]
        guided = self.upsample == "guided"
        # (a cell whose pixels are all active gets the fine prediction everywhere; the aux
        # output, a training target, keeps the guided coarse prediction there too)
        cells = (mixed if return_aux else mixed & (occ[:, 0] < 1)) if guided else None
        if not return_aux and fused.usable(coarse, images, head, grad=True):
            if cells is None:
                cells = torch.zeros(coarse.shape[0], *coarse.shape[2:], dtype=torch.bool)
            spatial = guided_spatial_term(H // coarse.shape[2], coarse.dtype)
            return fused.compose(coarse, images, cells, head, coords, GUIDED_SIGMA_R, spatial), None
        c = coords.long()
        pix = (c[:, 0] * H + c[:, 1]) * W + c[:, 2]
        bil = bilinear_up(coarse, (H, W))
        if _records(bil, head):  # training: one op (compose_rows) for the writes and their gradients
            if guided:
                g_idx, g_rows = self.upsample_guided(coarse, images, cells)
            else:
                g_idx, g_rows = pix.new_zeros(0), head.new_zeros(0, head.shape[1])
            out, pred = compose_rows(bil, g_idx, g_rows, pix, head)
            return out, (pred if return_aux else None)
        fine = head + sp.at_sites(bil, coords)  # as in unet: a correction
        pred = bil  # the coarse prediction
        if guided:
            pred = set_pixel_rows(pred, *self.upsample_guided(coarse, images, cells))
        aux = pred.clone() if return_aux else None
        return set_pixel_rows(pred, pix, fine), aux

    def cell_states(self, coarse):
        """``inactive.cell_states(coarse, self.margin)``: ``(mixed, unsure)``, bool ``[B, h, w]``."""
        return cell_states(coarse, self.margin)

    def upsample_guided(self, coarse, images, cells):
        """``guided_upsample(coarse, images)`` in the cells ``cells`` (bool ``[B, h, w]``) only:
        ``(pixel indices into B*H*W, logit rows)`` (``inactive.guided_rows``)."""
        return guided_rows(coarse, images, cells)

    def refine_uncertain(self, out, images, mask, unsure):
        """``inactive.refine_uncertain`` with this model's ``margin``, ``refine_radius``,
        ``refine_sigma_r`` and ``refine_fraction``: ``out`` with its uncertain inactive pixels
        refined (in place unless autograd records)."""
        return refine_uncertain(out, images, mask, unsure, self.margin, self.refine_radius, self.refine_sigma_r,
                                self.refine_fraction, inplace=not _records(out))


def _records(*tensors) -> bool:
    """True when autograd records an op on ``tensors`` (then the logits are written out of place:
    the backward of an in-place write copies the full gradient several times)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# --------------------------------------------------------------------------------------------
# registry entry points
# --------------------------------------------------------------------------------------------
@register_model(defaults=STREETS_TRAINING)
def unet(num_classes: int = 19, in_chans: int = 3, *, width: int = 16) -> nn.Module:
    """Dense 3-level mini U-Net (16/32/64 channels) for street scenes."""
    return UNet(in_chans=in_chans, num_classes=num_classes, width=width)


@register_model(defaults=STREETS_TRAINING)
def sparse_unet(num_classes: int = 19, in_chans: int = 3, density: Optional[float] = DEFAULT_DENSITY,
                mask_policy: str = "residual", *, width: int = 16, upsample: str = "guided",
                refine: bool = True) -> nn.Module:
    """``unet`` on the active pixels (same state_dict layout as ``unet``)."""
    return SparseUNet(in_chans=in_chans, num_classes=num_classes, density=density, mask_policy=mask_policy,
                      width=width, upsample=upsample, refine=refine)
