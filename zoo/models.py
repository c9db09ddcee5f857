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

import warnings
from types import SimpleNamespace
from typing import Optional

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
        relu=lambda: sp.nn.SparseReLU(inplace=True),
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


def _cell_sites(sel: torch.Tensor, h: int, w: int, cell: int):
    """For the cells ``sel`` (flat indices into ``B*h*w``): ``(nbr [n, 9], pixel [n, cell*cell])``,
    the 3x3 neighbourhood (raster order) as flat indices into the border-padded
    ``[B, h + 2, w + 2]`` grid (replicate padding stands in for neighbours outside; non-decreasing
    along each row), and the cells' own pixels (raster order) as flat indices into ``B*H*W``."""
    b, cy, cx = sel // (h * w), (sel // w) % h, sel % w
    d = torch.arange(3, device=sel.device)
    nbr = ((b * (h + 2))[:, None, None] + cy[:, None, None] + d[:, None]) * (w + 2) + cx[:, None, None] + d
    e = torch.arange(cell, device=sel.device)
    pixel = ((b * h * cell + cy * cell)[:, None, None] + e[:, None]) * (w * cell) + (cx * cell)[:, None, None] + e
    return nbr.view(-1, 9), pixel.view(-1, cell * cell)


def _padded_rows(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` -> the rows ``[B*(h+2)*(w+2), C]`` of its replicate-padded map."""
    return _rows(F.pad(x, (1, 1, 1, 1), mode="replicate").contiguous(memory_format=torch.channels_last))


def guided_upsample(logits: torch.Tensor, images: torch.Tensor, cell: int = 4,
                    sigma_r: float = 0.05, sigma_s: float = 3.0, out: Optional[torch.Tensor] = None,
                    cells: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Joint bilateral upsampling of cell logits ``[B, K, H/cell, W/cell]`` to ``[B, K, H, W]``.

    Every pixel takes a weighted mean of the logits of the 3x3 cells around its own, weighted by
    ``exp(-d^2 / 2 sigma_s^2)`` (``d``: pixel-to-cell-centre distance in pixels) times
    ``exp(-|pixel colour - cell mean colour|^2 / 2 sigma_r^2)``: a pixel in a mixed cell (a class
    boundary crossing it) takes the prediction of the neighbouring cell whose colour it has,
    where bilinear upsampling would blend the two. Parameter-free; with ``sigma_r`` -> inf it is
    a Gaussian-weighted (bilinear-like) upsampling. The defaults were chosen on held-out
    ``streets`` scenes (docs/ZOO.md).

    ``cells`` (bool ``[B, H/cell, W/cell]``, with ``out``): compute only those cells' pixels and
    write them into ``out`` ``[B, K, H, W]`` in place (returns ``out``); the other pixels of
    ``out`` are left as they are. Without: a new tensor (channels-last memory).

    Computed cell by cell: colour distances per colour plane, a softmax over the 9 neighbours,
    one batched GEMM ``[n, pixels, 9] x [n, 9, K]`` with the cells' neighbour logits."""
    B, K, h, w = logits.shape
    C = images.shape[1]
    if cells is not None and out is None:
        raise ValueError("guided_upsample: cells= needs out= (the pixels outside those cells are not computed)")
    sel = torch.arange(B * h * w, device=logits.device) if cells is None else cells.reshape(-1).nonzero().squeeze(1)
    nbr, pixel = _cell_sites(sel, h, w, cell)
    pixel = pixel.view(-1)  # [n * cell * cell]
    n, P = sel.numel(), cell * cell
    planes = lambda x: x.transpose(0, 1).reshape(C, -1)  # noqa: E731  [C, B*h*w]: colour planes
    pix = planes(images).index_select(1, pixel).view(C, n, 1, P)
    means = planes(F.pad(F.avg_pool2d(images, cell), (1, 1, 1, 1), mode="replicate"))
    means = means.index_select(1, nbr.view(-1)).view(C, n, 9, 1)
    # score = -|pixel - neighbour mean|^2 / 2 sigma_r^2 - d^2 / 2 sigma_s^2, [n, 9, P]
    score = (pix[0] - means[0]).square_()
    for c in range(1, C):
        score += (pix[c] - means[c]).square_()
    pos = (torch.arange(cell, dtype=images.dtype, device=images.device) + 0.5) - cell / 2
    off = torch.tensor([-cell, 0.0, cell], dtype=images.dtype, device=images.device)
    sy = (off[:, None] - pos[None, :]).pow(2)  # [3 neighbours, cell] squared distances
    ds = (sy[:, None, :, None] + sy[None, :, None, :]).reshape(9, P)  # cell (dy, dx) x pixel (y, x)
    score.mul_(-1 / (2 * sigma_r ** 2)).sub_(ds / (2 * sigma_s ** 2))
    wgt = torch.softmax(score, 1)  # over the 9 cells (softmax over a middle dim: vectorised)
    nl = _padded_rows(logits).index_select(0, nbr.view(-1)).view(n, 9, K)
    res = torch.bmm(wgt.transpose(1, 2), nl).view(n * P, K)
    if out is None:
        out = torch.empty(B, K, h * cell, w * cell, dtype=logits.dtype, device=logits.device,
                          memory_format=torch.channels_last)
    _put_rows(out, pixel, res)
    return out


def logit_margin(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Top-1 minus top-2 logit along ``dim`` (0 where two classes tie for the top; +inf with a
    single class; not differentiable: it selects pixels). A running top-2 over the classes:
    elementwise ops on the other dims, no sort and no transposed copy (``topk`` is ~4x slower
    on a CPU)."""
    x = logits.detach().movedim(dim, 0)
    if x.shape[0] < 2:
        return torch.full(x.shape[1:], float("inf"), dtype=x.dtype, device=x.device)
    top1, top2 = torch.maximum(x[0], x[1]), torch.minimum(x[0], x[1])
    tmp = torch.empty_like(top1)
    for v in x[2:]:
        torch.maximum(top2, torch.minimum(top1, v, out=tmp), out=top2)
        torch.maximum(top1, v, out=top1)
    return top1.sub_(top2)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B*H*W, C]`` pixel rows (a view when ``x`` is channels-last)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _put_rows(x: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> None:
    """``x[b, :, y, x] = rows`` at the flat pixel indices ``idx`` (into ``B*H*W``), in place."""
    B, K, H, W = x.shape
    pixels = x.permute(0, 2, 3, 1)
    if pixels.is_contiguous():  # channels-last: pixel rows are a view
        pixels.view(-1, K).index_copy_(0, idx, rows.to(x.dtype))
    else:
        pixels.index_put_((idx // (H * W), (idx // W) % H, idx % W), rows.to(x.dtype))


def _weighted_rows(weights: torch.Tensor, cols: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``out[i] = sum_j weights[i, j] * table[cols[i, j]]``, ``[M, K]``, as one sparse (CSR) x
    dense product: no ``[M, j, K]`` gather buffer (3-10x faster on a CPU). ``cols`` must be
    non-decreasing along each row (duplicates allowed); differentiable w.r.t. ``table``."""
    M, k = cols.shape
    crow = torch.arange(0, (M + 1) * k, k, device=cols.device)
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore")
        A = torch.sparse_csr_tensor(crow, cols.reshape(-1), weights.reshape(-1).to(table.dtype),
                                    size=(M, table.shape[0]))
    return A @ table


def refine_at(logits: torch.Tensor, images: torch.Tensor, idx: torch.Tensor, radius: int = 3,
              sigma_r: float = 0.05) -> torch.Tensor:
    """Colour-weighted mean of the logits in the ``(2r+1) x (2r+1)`` windows (``r = radius``)
    of the pixels ``idx`` (flat indices into ``B*H*W``): ``[len(idx), K]``::

        l'(p) = sum_q w(p, q) l(q) / sum_q w(p, q),   w(p, q) = exp(-|I(p) - I(q)|^2 / 2 sigma_r^2)

    over the window's pixels inside the image, ``p`` itself included.

    The colours are read from the image padded with ``inf`` (weight exactly 0 outside it), so
    the window's logit columns are plain offsets ``p + dy * W + dx`` (clamped into range; a
    column that wraps to another row has weight 0): each row's columns stay non-decreasing
    for the CSR product."""
    B, K, H, W = logits.shape
    C = images.shape[1]
    r, Hp, Wp = radius, H + 2 * radius, W + 2 * radius
    d = torch.arange(-r, r + 1, device=idx.device)
    b, y, x = idx // (H * W), (idx // W) % H, idx % W
    centre = (b * Hp + y + r) * Wp + x + r  # in the padded grid
    window = centre[:, None] + (d[:, None] * Wp + d).view(-1)  # [M, k*k]
    planes = F.pad(images, (r, r, r, r), value=float("inf")).transpose(0, 1).reshape(C, -1)
    d2 = None
    for plane in planes:  # colour planes: long rows
        diff = (plane.index_select(0, window.view(-1)).view_as(window) - plane.index_select(0, centre)[:, None]).square_()
        d2 = diff if d2 is None else d2.add_(diff)
    wgt = d2.mul_(-1 / (2 * sigma_r ** 2)).exp_()
    wgt = wgt.div_(wgt.sum(1, keepdim=True))
    cols = (idx[:, None] + (d[:, None] * W + d).view(-1)).clamp_(0, B * H * W - 1)
    return _weighted_rows(wgt, cols, _rows(logits))


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
    coarsest level's sites. Active pixels take the head's correction plus the bilinearly
    upsampled coarse logits, as every pixel does in ``unet``: with every pixel active the twins
    compute the same. Inactive pixels take the coarse logits brought to H x W by
    ``guided_upsample`` (colour-guided joint bilateral upsampling; ``upsample="bilinear"``: plain
    bilinear); with ``refine`` (default) the uncertain ones (top-2 logit margin < ``margin``)
    then take the colour-weighted mean of their 7x7 window (``refine_at``), which brings in the
    full-resolution predictions of nearby active pixels. Both are computed only where they can
    change a label (``_cell_states``; bilinear stands in elsewhere, same labels). The returned
    aux logits are the upsampled coarse logits everywhere (before the active pixels and the
    refinement are written).
    """

    sparse = True

    # inactive pixels: refinement settings (chosen on held-out streets scenes, docs/ZOO.md)
    margin = 2.0            # a top-2 logit margin below this is "uncertain"
    refine_radius = 3       # 7x7 windows
    refine_sigma_r = 0.05
    refine_fraction = 0.03  # at most this fraction of all pixels is refined (least certain first)

    def __init__(self, density: float = DEFAULT_DENSITY, mask_policy: str = "residual", upsample: str = "guided",
                 refine: bool = True, **kw):
        super().__init__(sparse_ops(), **kw)
        if upsample not in ("guided", "bilinear"):
            raise ValueError(f"upsample must be 'guided' or 'bilinear', got {upsample!r}")
        self.policy = MaskPolicy(mask_policy, density)
        self.upsample, self.refine = upsample, bool(refine)

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
        out = bil  # written in place from here on (at_sites and interpolate keep no copy of it)
        mixed, unsure = self._cell_states(coarse) if (self.upsample == "guided" or self.refine) else (None, None)
        if self.upsample == "guided":
            # (a cell whose pixels are all active gets the fine prediction everywhere; the aux
            # output, a training target, keeps the guided coarse prediction there too)
            guided_upsample(coarse, images, out=out, cells=mixed if return_aux else mixed & (occ[:, 0] < 1))
        aux = out.clone() if return_aux else None  # the coarse prediction everywhere
        c = d0.coords.long()
        _put_rows(out, (c[:, 0] * out.shape[2] + c[:, 1]) * out.shape[3] + c[:, 2], fine)
        if self.refine:
            self._refine(out, images, mask, unsure)
        return (out, aux) if return_aux else out

    def _cell_states(self, coarse):
        """``(mixed, unsure)``, bool ``[B, h, w]``: cells whose 3x3 neighbourhood (replicated at
        the borders) does not agree on one label, and cells that are mixed or have a neighbour
        with a top-2 logit margin below ``margin``.

        Guided and bilinear upsampling both give a pixel a convex combination of its
        neighbourhood's cell logits: outside mixed cells they give it the neighbourhood's label
        (guided upsampling is computed in mixed cells only, bilinear stands in elsewhere), and
        outside unsure cells with a margin >= ``margin`` (no pixel there is refined). On
        ``streets`` ~40 % of the cells are mixed, ~65 % unsure."""
        coarse = coarse.detach()
        lab = coarse.max(1, keepdim=True).indices.to(coarse.dtype)  # (argmax: ~4x slower on a CPU)
        pad = lambda t: F.pad(t, (1, 1, 1, 1), mode="replicate")  # noqa: E731
        mixed = (F.max_pool2d(pad(lab), 3, 1) != -F.max_pool2d(pad(-lab), 3, 1))[:, 0]
        low = (-F.max_pool2d(pad(-logit_margin(coarse)[:, None]), 3, 1) < self.margin)[:, 0]
        return mixed, mixed | low

    def _refine(self, out, images, mask, unsure):
        """Refine the *uncertain* inactive pixels of ``out`` in place with ``refine_at`` (the
        colour-weighted mean of their 7x7 window, which carries the full-resolution predictions
        of nearby active pixels of the same colour into them). Uncertain: in an unsure cell
        (``_cell_states``) and a top-2 logit margin below ``margin``; the least certain
        first, at most ``refine_fraction`` of all pixels (~2.7 % are refined on ``streets``)."""
        B, K, H, W = out.shape
        cell = W // unsure.shape[-1]
        cand = unsure.repeat_interleave(cell, 1).repeat_interleave(cell, 2) & ~mask
        idx = cand.view(-1).nonzero().squeeze(1)
        marg = logit_margin(_rows(out).detach().index_select(0, idx), 1)
        idx, marg = idx[marg < self.margin], marg[marg < self.margin]
        cap = int(self.refine_fraction * B * H * W)
        if idx.numel() > cap:
            idx = idx[marg.topk(cap, largest=False).indices].sort().values
        if idx.numel():
            _put_rows(out, idx, refine_at(out, images, idx, self.refine_radius, self.refine_sigma_r))


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
