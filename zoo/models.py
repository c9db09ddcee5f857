"""The zoo's models: ``mlp``, ``cnn``, ``sparse_cnn`` (MNIST) and ``unet``, ``sparse_unet``
(street scenes).

Dense and sparse twins are built from one class definition by swapping an *ops* table (dense
``nn`` layers or their ``spconv2d.nn`` twins), so they have the same module names and parameter
shapes: ``sparse_unet.load_state_dict(unet.state_dict())`` and back just work (likewise
``cnn`` <-> ``sparse_cnn``).

Calling convention shared by every model: ``model(images, mask=None)`` with ``images`` dense
``[B, C, H, W]``; dense models ignore ``mask``; sparse models use it as the activity mask
``[B, H, W]`` bool (``None``: the model's own mask policy). Classifiers return ``[B, classes]``
logits, segmenters dense ``[B, classes, H, W]`` logits (``return_aux=True`` also returns the
coarse head's logits upsampled to ``[B, classes, H, W]``, used as an auxiliary loss).
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

import spconv2d as sp  # the core library; the zoo depends on it, never the other way
from spconv2d.tensor import at_sites

from .masks import DEFAULT_DENSITY, MaskPolicy
from .registry import register_model


# --------------------------------------------------------------------------------------------
# ops tables: the only difference between a dense model and its sparse twin
# --------------------------------------------------------------------------------------------
def dense_ops() -> SimpleNamespace:
    return SimpleNamespace(
        sparse=False,
        conv=lambda ci, co, k, bias=False: nn.Conv2d(ci, co, k, padding=k // 2, bias=bias),
        strided=lambda ci, co, k, s, p, bias=False: nn.Conv2d(ci, co, k, stride=s, padding=p, bias=bias),
        up=lambda ci, co, k, s, bias=False: nn.ConvTranspose2d(ci, co, k, stride=s, bias=bias),
        maxpool=lambda k: nn.MaxPool2d(k),
        bn=nn.BatchNorm2d,
        relu=lambda: nn.ReLU(inplace=True),
        cat=lambda ts: torch.cat(ts, 1),
    )


def sparse_ops() -> SimpleNamespace:
    return SimpleNamespace(
        sparse=True,
        conv=lambda ci, co, k, bias=False: sp.nn.SubMConv2d(ci, co, k, bias=bias),
        strided=lambda ci, co, k, s, p, bias=False: sp.nn.SparseConv2d(ci, co, k, stride=s, padding=p, bias=bias),
        up=lambda ci, co, k, s, bias=False: sp.nn.SparseConvTranspose2d(ci, co, k, stride=s, bias=bias),
        maxpool=lambda k: sp.nn.SparseMaxPool2d(k),
        bn=sp.nn.SparseBatchNorm2d,
        relu=sp.nn.SparseReLU,
        cat=sp.cat,
    )


class ConvBNReLU(nn.Module):
    """conv -> BN -> ReLU; ``conv`` is any conv-like module built by the caller."""

    def __init__(self, conv: nn.Module, bn: nn.Module, act: nn.Module):
        super().__init__()
        self.conv, self.bn, self.act = conv, bn, act

    def forward(self, x, **kw):  # kw: e.g. output=skip for a sparse transposed conv
        return self.act(self.bn(self.conv(x, **kw)))


def _cbr(ops, conv, co):
    return ConvBNReLU(conv, ops.bn(co), ops.relu())


def _init_weights(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if p.dim() == 4:  # conv weights, dense or sparse (same layout)
            nn.init.kaiming_normal_(p, mode="fan_out" if "up" in name.split(".")[0] else "fan_in",
                                    nonlinearity="relu")


# --------------------------------------------------------------------------------------------
# MNIST classifiers
# --------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """784 -> 512 -> 256 -> 10 with ReLU and dropout."""

    task, sparse, default_data = "classification", False, "mnist"

    def __init__(self, in_chans: int = 1, num_classes: int = 10, img_size: int = 28,
                 hidden=(512, 256), drop: float = 0.2):
        super().__init__()
        layers, d = [nn.Flatten()], in_chans * img_size * img_size
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU(inplace=True), nn.Dropout(drop)]
            d = h
        layers.append(nn.Linear(d, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, images, mask=None):
        return self.net(images)


class _CNNBase(nn.Module):
    """conv3(32) conv3(32) | conv3 s2 (64) conv3(64) | maxpool2 conv3(128) | global avg pool, fc.

    28x28 -> 14x14 -> 7x7. The sparse twin uses SubMConv2d for the stride-1 convs, SparseConv2d
    for the strided one, SparseMaxPool2d and SparseGlobalAvgPool (mean over active sites).
    """

    task, default_data = "classification", "mnist"

    def __init__(self, ops, in_chans: int = 1, num_classes: int = 10, width: int = 32, drop: float = 0.2):
        super().__init__()
        c1, c2, c3 = width, 2 * width, 4 * width
        self.sparse = ops.sparse
        self.conv1 = _cbr(ops, ops.conv(in_chans, c1, 3), c1)
        self.conv2 = _cbr(ops, ops.conv(c1, c1, 3), c1)
        self.down1 = _cbr(ops, ops.strided(c1, c2, 3, 2, 1), c2)
        self.conv3 = _cbr(ops, ops.conv(c2, c2, 3), c2)
        self.pool = ops.maxpool(2)
        self.conv4 = _cbr(ops, ops.conv(c2, c3, 3), c3)
        self.drop = nn.Dropout(drop)
        self.fc = nn.Linear(c3, num_classes)
        _init_weights(self)

    def features(self, x):
        x = self.conv2(self.conv1(x))
        x = self.conv3(self.down1(x))
        return self.conv4(self.pool(x))


class CNN(_CNNBase):
    def __init__(self, **kw):
        super().__init__(dense_ops(), **kw)

    def forward(self, images, mask=None):
        x = self.features(images)
        return self.fc(self.drop(x.mean((2, 3))))


class SparseCNN(_CNNBase):
    """The CNN on the digit's strokes: active pixels = non-zero pixels (or ``mask``)."""

    def __init__(self, **kw):
        super().__init__(sparse_ops(), **kw)
        self.gpool = sp.nn.SparseGlobalAvgPool()

    def forward(self, images, mask=None):
        x = sp.SparseTensor.from_dense(images, mask)
        x = self.features(x)
        return self.fc(self.drop(self.gpool(x)))


def _neighbours(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` -> ``[B, h, w, 9, C]``: every cell's 3x3 neighbourhood, raster order,
    replicate-padded borders."""
    B, C, h, w = x.shape
    xp = F.pad(x, (1, 1, 1, 1), mode="replicate").permute(0, 2, 3, 1)
    return torch.stack([xp[:, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], 3)


def guided_upsample(logits: torch.Tensor, images: torch.Tensor, cell: int = 4,
                    sigma_r: float = 0.05, sigma_s: float = 3.0) -> torch.Tensor:
    """Joint bilateral upsampling of cell logits ``[B, K, H/cell, W/cell]`` to ``[B, K, H, W]``.

    Every pixel takes a weighted mean of the logits of the 3x3 cells around its own, weighted by
    ``exp(-d^2 / 2 sigma_s^2)`` (``d``: pixel-to-cell-centre distance in pixels) times
    ``exp(-|pixel colour - cell mean colour|^2 / 2 sigma_r^2)``: a pixel in a mixed cell (a class
    boundary crossing it) takes the prediction of the neighbouring cell whose colour it has,
    where bilinear upsampling would blend the two. Parameter-free; with ``sigma_r`` -> inf it is
    a Gaussian-weighted (bilinear-like) upsampling. The defaults were chosen on held-out
    ``streets`` scenes (docs/ZOO.md).

    Computed cell by cell as two batched GEMMs (colour distances, then the weighted sum of the
    9 neighbours' logits); the result is an NCHW view of channels-last memory."""
    B, K, h, w = logits.shape
    C = images.shape[1]
    n = B * h * w
    pix = images.view(B, C, h, cell, w, cell).permute(0, 2, 4, 1, 3, 5).reshape(n, C, cell * cell)
    nb = _neighbours(F.avg_pool2d(images, cell)).reshape(n, 9, C)
    # |pixel - neighbour mean|^2 = |p|^2 - 2 p.m + |m|^2: one batched GEMM, [n, 9, cell^2]
    d2 = torch.baddbmm(nb.pow(2).sum(2, keepdim=True) + pix.pow(2).sum(1, keepdim=True), nb, pix, alpha=-2)
    pos = (torch.arange(cell, dtype=images.dtype, device=images.device) + 0.5) - cell / 2
    off = torch.tensor([-cell, 0.0, cell], dtype=images.dtype, device=images.device)
    sy = (pos[None, :] - off[:, None]).pow(2)  # [3 neighbours, cell] squared pixel distances
    ds = (sy[:, None, :, None] + sy[None, :, None, :]).reshape(9, cell * cell)
    wgt = torch.softmax(ds / (-2 * sigma_s ** 2) + d2.clamp_min_(0) / (-2 * sigma_r ** 2), 1)
    out = torch.bmm(wgt.transpose(1, 2), _neighbours(logits).reshape(n, 9, K))  # [n, cell^2, K]
    out = out.view(B, h, w, cell, cell, K).permute(0, 1, 3, 2, 4, 5).reshape(B, h * cell, w * cell, K)
    return out.permute(0, 3, 1, 2)


def _bilinear(logits: torch.Tensor, size) -> torch.Tensor:
    """Bilinear upsampling in channels-last (~2.5x faster on a CPU; permutes to NHWC are free)."""
    return F.interpolate(logits.contiguous(memory_format=torch.channels_last), size=size, mode="bilinear",
                         align_corners=False)


# --------------------------------------------------------------------------------------------
# U-Nets
# --------------------------------------------------------------------------------------------
class _UNetBase(nn.Module):
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
        self.enc0 = nn.Sequential(_cbr(ops, ops.conv(in_chans, c0, 3), c0), _cbr(ops, ops.conv(c0, c0, 3), c0))
        self.down1 = _cbr(ops, ops.strided(c0, c1, 2, 2, 0), c1)
        self.enc1 = nn.Sequential(_cbr(ops, ops.conv(c1, c1, 3), c1), _cbr(ops, ops.conv(c1, c1, 3), c1))
        self.down2 = _cbr(ops, ops.strided(c1, c2, 2, 2, 0), c2)
        self.enc2 = nn.Sequential(_cbr(ops, ops.conv(c2, c2, 3), c2), _cbr(ops, ops.conv(c2, c2, 3), c2))
        self.up2 = _cbr(ops, ops.up(c2, c1, 2, 2), c1)
        self.dec1 = nn.Sequential(_cbr(ops, ops.conv(2 * c1, c1, 3), c1), _cbr(ops, ops.conv(c1, c1, 3), c1))
        self.up1 = _cbr(ops, ops.up(c1, c0, 2, 2), c0)
        self.dec0 = nn.Sequential(_cbr(ops, ops.conv(2 * c0, c0, 3), c0), _cbr(ops, ops.conv(c0, c0, 3), c0))
        self.head = ops.conv(c0, num_classes, 1, bias=True)
        # the coarse head is dense in both twins (it runs on H/4 x W/4)
        self.coarse = nn.Sequential(
            nn.Conv2d(c2 + 2 * in_chans + 2, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(inplace=True),
            nn.Conv2d(c2, c2, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(c2), nn.ReLU(inplace=True),
            nn.Conv2d(c2, num_classes, 1))
        _init_weights(self)

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
        if H % 4 or W % 4:
            raise ValueError(f"U-Net input size must be a multiple of 4, got {H}x{W}")


class UNet(_UNetBase):
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
        up = _bilinear(coarse, images.shape[-2:])
        logits = self.head(d0) + up  # the fine head corrects the upsampled coarse prediction
        return (logits, up) if return_aux else logits


class SparseUNet(_UNetBase):
    """The U-Net on the active pixels; every pixel gets a prediction.

    Encoder on the active pixels (SubMConv2d, SparseConv2d k2 s2), decoder with
    ``up(x, output=skip)`` so each level is computed exactly at its encoder sites, full-resolution
    head on the active pixels. The coarsest level is made dense (``to_dense``) for the dense
    context head, which gives logits for every H/4 x W/4 cell (cells without an active pixel
    still see their colour and texture) and context features that join the decoder at the
    coarsest level's sites. Inactive pixels take the coarse logits brought to H x W by
    ``guided_upsample`` (colour-guided joint bilateral upsampling; ``upsample="bilinear"``: plain
    bilinear); active pixels take the head's correction plus the bilinearly upsampled coarse
    logits, as every pixel does in ``unet``: with every pixel active the twins compute the same.
    The returned aux logits are the upsampled coarse logits everywhere.
    """

    sparse = True

    def __init__(self, density: float = DEFAULT_DENSITY, mask_policy: str = "residual", upsample: str = "guided", **kw):
        super().__init__(sparse_ops(), **kw)
        if upsample not in ("guided", "bilinear"):
            raise ValueError(f"upsample must be 'guided' or 'bilinear', got {upsample!r}")
        self.policy = MaskPolicy(mask_policy, density)
        self.upsample = upsample

    def forward(self, images, mask=None, return_aux: bool = False):
        self._check(images)
        if mask is None:
            mask = self.policy(images)
        x = sp.SparseTensor.from_dense(images, mask)
        e0 = self.enc0(x)
        e1 = self.enc1(self.down1(e0))
        e2 = self.enc2(self.down2(e1))
        occ = F.avg_pool2d(mask[:, None].to(images.dtype), 4)
        ctx, coarse = self.context(e2.to_dense(), images, occ)
        e2 = e2.replace(e2.features + at_sites(ctx, e2.coords))
        d1 = self.dec1(sp.cat([self.up2(e2, output=e1), e1]))
        d0 = self.dec0(sp.cat([self.up1(d1, output=e0), e0]))
        bil = _bilinear(coarse, images.shape[-2:])
        fine = self.head(d0).features + at_sites(bil, d0.coords)  # as in unet: a correction
        up = guided_upsample(coarse, images) if self.upsample == "guided" else bil
        c = d0.coords.long()
        out = up.clone() if return_aux else up  # the aux output keeps the coarse prediction everywhere
        out.permute(0, 2, 3, 1).index_put_((c[:, 0], c[:, 1], c[:, 2]), fine)
        return (out, up) if return_aux else out


# --------------------------------------------------------------------------------------------
# registry entry points
# --------------------------------------------------------------------------------------------
@register_model
def mlp(num_classes: int = 10, in_chans: int = 1, **kw) -> nn.Module:
    """MLP 784-512-256-10 for MNIST."""
    return MLP(in_chans=in_chans, num_classes=num_classes, **kw)


@register_model
def cnn(num_classes: int = 10, in_chans: int = 1, **kw) -> nn.Module:
    """Dense 5-conv CNN for MNIST (28 -> 14 -> 7, global average pool)."""
    return CNN(in_chans=in_chans, num_classes=num_classes, **kw)


@register_model
def sparse_cnn(num_classes: int = 10, in_chans: int = 1, **kw) -> nn.Module:
    """``cnn`` on the digit's strokes (same state_dict layout as ``cnn``)."""
    return SparseCNN(in_chans=in_chans, num_classes=num_classes, **kw)


@register_model
def unet(num_classes: int = 19, in_chans: int = 3, **kw) -> nn.Module:
    """Dense 3-level mini U-Net (16/32/64 channels) for street scenes."""
    kw.pop("density", None), kw.pop("mask_policy", None)
    return UNet(in_chans=in_chans, num_classes=num_classes, **kw)


@register_model
def sparse_unet(num_classes: int = 19, in_chans: int = 3, density: float = DEFAULT_DENSITY,
                mask_policy: str = "residual", **kw) -> nn.Module:
    """``unet`` on the active pixels (same state_dict layout as ``unet``)."""
    return SparseUNet(in_chans=in_chans, num_classes=num_classes, density=density,
                      mask_policy=mask_policy, **kw)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
