"""Predicting the *inactive* pixels of the sparse U-Net from its coarse (H/cell) logits.

The sparse U-Net computes full-resolution predictions at its active pixels only. Every other
pixel gets the coarse logits brought to H x W (bilinear, ``blocks.bilinear_up``, or colour-guided,
``guided_upsample``), and the *uncertain* ones among them (top-2 logit margin below a threshold)
are then refined from their window (``refine_at``). ``cell_states`` says, exactly, where either
step can change a label, so both are computed only there. Everything here is parameter-free.

Conventions: logits ``[B, K, H, W]``, images ``[B, C, H, W]``; a *pixel index* is a flat index
into ``B*H*W`` (raster order per image, images one after another); a *cell* is a
``cell x cell`` block of pixels, one pixel of the ``[B, K, H/cell, W/cell]`` coarse logits.
``pixel_rows`` / ``put_pixel_rows`` / ``with_pixel_rows`` / ``set_pixel_rows`` read and write
logits by pixel index.
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import fused


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
    return pixel_rows(F.pad(x, (1, 1, 1, 1), mode="replicate").contiguous(memory_format=torch.channels_last))


#: ``guided_upsample``'s defaults (chosen on held-out ``streets`` scenes, docs/ZOO.md)
GUIDED_SIGMA_R, GUIDED_SIGMA_S = 0.05, 3.0


def guided_spatial_term(cell: int, dtype=torch.float32, device=None, sigma_s: float = GUIDED_SIGMA_S) -> torch.Tensor:
    """``guided_upsample``'s distance term ``d^2 / 2 sigma_s^2`` ``[9, cell*cell]``: squared
    distances from each pixel of a cell (raster order) to the centres of its 3x3 neighbour cells
    ((dy, dx) in raster order)."""
    pos = (torch.arange(cell, dtype=dtype, device=device) + 0.5) - cell / 2
    off = torch.tensor([-cell, 0.0, cell], dtype=dtype, device=device)
    sy = (off[:, None] - pos[None, :]).pow(2)  # [3 neighbours, cell] squared distances
    return (sy[:, None, :, None] + sy[None, :, None, :]).reshape(9, cell * cell) / (2 * sigma_s ** 2)


def guided_upsample(logits: torch.Tensor, images: torch.Tensor, cell: int = 4,
                    sigma_r: float = GUIDED_SIGMA_R, sigma_s: float = GUIDED_SIGMA_S, out: Optional[torch.Tensor] = None,
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
    one batched GEMM ``[n, pixels, 9] x [n, 9, K]`` with the cells' neighbour logits. (At
    inference on a CPU with numba the sparse U-Net computes it inside ``fused.compose``.)"""
    B, K, h, w = logits.shape
    if cells is not None and out is None:
        raise ValueError("guided_upsample: cells= needs out= (the pixels outside those cells are not computed)")
    if out is None:
        out = torch.empty(B, K, h * cell, w * cell, dtype=logits.dtype, device=logits.device,
                          memory_format=torch.channels_last)
    put_pixel_rows(out, *guided_rows(logits, images, cells, cell, sigma_r, sigma_s))
    return out


def guided_rows(logits: torch.Tensor, images: torch.Tensor, cells: Optional[torch.Tensor] = None, cell: int = 4,
                sigma_r: float = GUIDED_SIGMA_R, sigma_s: float = GUIDED_SIGMA_S) -> Tuple[torch.Tensor, torch.Tensor]:
    """``guided_upsample`` of the pixels of the cells ``cells`` (bool ``[B, H/cell, W/cell]``;
    None: every cell) as ``(pixel indices into B*H*W, rows [n, K])``, written nowhere."""
    B, K, h, w = logits.shape
    C = images.shape[1]
    sel = torch.arange(B * h * w, device=logits.device) if cells is None else cells.reshape(-1).nonzero().squeeze(1)
    spatial = guided_spatial_term(cell, images.dtype, images.device, sigma_s)
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
    score.mul_(-1 / (2 * sigma_r ** 2)).sub_(spatial)
    wgt = torch.softmax(score, 1)  # over the 9 cells: a middle dim (docs/ARCHITECTURE.md)
    nl = _padded_rows(logits).index_select(0, nbr.view(-1)).view(n, 9, K)
    return pixel, torch.bmm(wgt.transpose(1, 2), nl).view(n * P, K)


def logit_margin(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Top-1 minus top-2 logit along ``dim`` (0 where two classes tie for the top; +inf with a
    single class; not differentiable: it selects pixels). A running top-2 over the classes:
    elementwise ops on the other dims, no sort and no transposed copy (why not ``topk``:
    docs/ARCHITECTURE.md, measured choices)."""
    x = logits.detach().movedim(dim, 0)
    if x.shape[0] < 2:
        return torch.full(x.shape[1:], float("inf"), dtype=x.dtype, device=x.device)
    top1, top2 = torch.maximum(x[0], x[1]), torch.minimum(x[0], x[1])
    tmp = torch.empty_like(top1)
    for v in x[2:]:
        torch.maximum(top2, torch.minimum(top1, v, out=tmp), out=top2)
        torch.maximum(top1, v, out=top1)
    return top1.sub_(top2)


def pixel_rows(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B*H*W, C]`` pixel rows (a view when ``x`` is channels-last)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def put_pixel_rows(x: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> None:
    """``x[b, :, y, x] = rows`` at the flat pixel indices ``idx`` (into ``B*H*W``), in place."""
    B, K, H, W = x.shape
    pixels = x.permute(0, 2, 3, 1)
    if pixels.is_contiguous():  # channels-last: pixel rows are a view
        pixels.view(-1, K).index_copy_(0, idx, rows.to(x.dtype))
    else:
        pixels.index_put_((idx // (H * W), (idx // W) % H, idx % W), rows.to(x.dtype))


def with_pixel_rows(x: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``put_pixel_rows`` out of place: a new ``[B, K, H, W]`` (channels-last) equal to ``x``
    with ``rows`` at the flat pixel indices ``idx``; differentiable: its backward copies the
    gradient once, where an in-place write's backward (clone, fill, copy back) copied the full
    logits several times. (The sparse U-Net's training writes its logits with ``compose_rows``
    and ``refined_copy``, which copy them and their gradient once per chain of writes.)"""
    B, K, H, W = x.shape
    return pixel_rows(x).index_copy(0, idx, rows.to(x.dtype)).view(B, H, W, K).permute(0, 3, 1, 2)


def set_pixel_rows(x: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor, inplace: bool = True) -> torch.Tensor:
    """``x`` with ``rows`` at the flat pixel indices ``idx``: ``put_pixel_rows`` (in place,
    returns ``x``) or, with ``inplace=False``, ``with_pixel_rows`` (a new tensor)."""
    if not inplace:
        return with_pixel_rows(x, idx, rows)
    put_pixel_rows(x, idx, rows)
    return x


class _ComposeRows(torch.autograd.Function):
    """The sparse U-Net's logits for training, as one op (see ``compose_rows``)."""

    @staticmethod
    def forward(ctx, bil, g_idx, g_rows, a_idx, head):
        pred = torch.empty_like(bil, memory_format=torch.channels_last)
        pred.copy_(bil)
        rows = pixel_rows(pred)  # a view
        fine = (head + rows.index_select(0, a_idx)).to(rows.dtype)  # (bil's rows: before the guided write)
        rows.index_copy_(0, g_idx, g_rows.to(rows.dtype))
        out = pred.clone(memory_format=torch.channels_last)
        pixel_rows(out).index_copy_(0, a_idx, fine)
        ctx.save_for_backward(g_idx, a_idx)
        ctx.head_dtype, ctx.rows_dtype = head.dtype, g_rows.dtype
        ctx.set_materialize_grads(False)
        return out, pred

    @staticmethod
    def backward(ctx, g_out, g_pred):
        g_idx, a_idx = ctx.saved_tensors
        like = g_out if g_out is not None else g_pred
        G = torch.empty_like(like, memory_format=torch.channels_last)
        if g_out is None:
            G.zero_()
        else:
            G.copy_(g_out)
        rows = pixel_rows(G)  # a view
        g_fine = rows.index_select(0, a_idx)  # out's active rows: head + bil's rows there
        rows.index_fill_(0, a_idx, 0)
        if g_pred is not None:
            G.add_(g_pred)
        g_rows = rows.index_select(0, g_idx) if ctx.needs_input_grad[2] else None
        rows.index_fill_(0, g_idx, 0)
        rows.index_add_(0, a_idx, g_fine)
        return (G, None, None if g_rows is None else g_rows.to(ctx.rows_dtype), None,
                g_fine.to(ctx.head_dtype) if ctx.needs_input_grad[4] else None)


def compose_rows(bil: torch.Tensor, g_idx: torch.Tensor, g_rows: torch.Tensor, a_idx: torch.Tensor,
                 head: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out, pred)``, both new ``[B, K, H, W]`` channels-last tensors: ``pred`` = ``bil`` with
    the rows ``g_rows`` at the pixels ``g_idx`` (the guided upsampling), ``out`` = ``pred`` with
    ``head + bil``'s rows at the pixels ``a_idx`` (the active pixels' correction; the same
    pixels may be in ``g_idx``); pixel indices flat into ``B*H*W``, unique in each list.
    What ``with_pixel_rows(with_pixel_rows(bil, g_idx, g_rows), a_idx, head + rows of bil)``
    computes, as one differentiable op for training: its backward copies the gradient once and
    adds ``pred``'s gradient into that copy, where the composition of tensor ops copied, filled
    and summed the full gradient about four times more per step."""
    return _ComposeRows.apply(bil, g_idx, g_rows, a_idx, head)


def _weighted_rows(weights: torch.Tensor, cols: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``out[i] = sum_j weights[i, j] * table[cols[i, j]]``, ``[M, K]``, as one sparse (CSR) x
    dense product: no ``[M, j, K]`` gather buffer (docs/ARCHITECTURE.md). ``cols`` must be
    non-decreasing along each row (duplicates allowed); differentiable w.r.t. ``table``."""
    M, k = cols.shape
    crow = torch.arange(0, (M + 1) * k, k, device=cols.device)
    # in float32 for half / bf16 tables (autocast): PyTorch's CSR products have no bf16 CPU kernel
    dtype = torch.float64 if table.dtype == torch.float64 else torch.float32
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore")
        A = torch.sparse_csr_tensor(crow, cols.reshape(-1), weights.reshape(-1).to(dtype),
                                    size=(M, table.shape[0]))
    with torch.autocast(table.device.type, enabled=False):
        return (A @ table.to(dtype)).to(table.dtype)


def refine_at(logits: torch.Tensor, images: torch.Tensor, idx: torch.Tensor, radius: int = 3,
              sigma_r: float = 0.05) -> torch.Tensor:
    """Colour-weighted mean of the logits in the ``(2r+1) x (2r+1)`` windows (``r = radius``)
    of the pixels ``idx`` (flat indices into ``B*H*W``): ``[len(idx), K]``::

        l'(p) = sum_q w(p, q) l(q) / sum_q w(p, q),   w(p, q) = exp(-|I(p) - I(q)|^2 / 2 sigma_r^2)

    over the window's pixels inside the image, ``p`` itself included (``refine_weights``; at
    inference on a CPU with numba: ``fused.refine_at``)."""
    if fused.usable(logits, images, grad=True):  # inference on a CPU: the numba kernel
        return fused.refine_at(logits, images, idx, radius, sigma_r)
    wgt, cols = refine_weights(images, idx, radius, sigma_r)
    return _weighted_rows(wgt, cols, pixel_rows(logits))


def refine_weights(images: torch.Tensor, idx: torch.Tensor, radius: int = 3,
                   sigma_r: float = 0.05) -> Tuple[torch.Tensor, torch.Tensor]:
    """``refine_at``'s normalised weights and their pixels: ``(wgt, cols)``, both ``[len(idx),
    (2r+1)^2]``, ``cols`` flat pixel indices into ``B*H*W`` (window order, non-decreasing along
    each row). The colours are read from the image padded with ``inf`` (weight exactly 0
    outside it), so the window's columns are plain offsets ``p + dy * W + dx`` (clamped into
    range; a column that wraps to another row has weight 0)."""
    B, C, H, W = images.shape
    r, Hp, Wp = radius, H + 2 * radius, W + 2 * radius
    d = torch.arange(-r, r + 1, device=idx.device)
    b, y, x = idx // (H * W), (idx // W) % H, idx % W
    centre = (b * Hp + y + r) * Wp + x + r  # in the padded grid
    window = centre[:, None] + (d[:, None] * Wp + d).view(-1)  # [M, k*k]
    planes = F.pad(images.detach(), (r, r, r, r), value=float("inf")).transpose(0, 1).reshape(C, -1)
    d2 = None
    for plane in planes:  # colour planes: long rows
        diff = (plane.index_select(0, window.view(-1)).view_as(window) - plane.index_select(0, centre)[:, None]).square_()
        d2 = diff if d2 is None else d2.add_(diff)
    wgt = d2.mul_(-1 / (2 * sigma_r ** 2)).exp_()
    wgt = wgt.div_(wgt.sum(1, keepdim=True))
    cols = (idx[:, None] + (d[:, None] * W + d).view(-1)).clamp_(0, B * H * W - 1)
    return wgt, cols


class _RefinedCopy(torch.autograd.Function):
    """``with_pixel_rows(logits, idx, _weighted_rows(wgt, cols, pixel_rows(logits)))`` as one
    op: a new channels-last tensor, the rows ``idx`` replaced by the weighted sums of the rows
    ``cols`` (read before the write). Backward: the gradient copied once, its rows ``idx``
    zeroed, then ``wgt[:, j] * grad[idx]`` added at ``cols[:, j]`` tap by tap (``index_add_``:
    sequential, deterministic). The composition of tensor ops it replaces wrote the full
    gradient four times more per step (the CSR product's transpose makes a dense
    ``[B*H*W, K]``, then the clone, fill and accumulation of the row write)."""

    @staticmethod
    def forward(ctx, logits, idx, wgt, cols):
        out = torch.empty_like(logits, memory_format=torch.channels_last)
        out.copy_(logits)
        rows = pixel_rows(out)  # a view
        rows.index_copy_(0, idx, _weighted_rows(wgt, cols, rows))  # (reads the rows before the write)
        ctx.save_for_backward(idx, wgt, cols)
        return out

    @staticmethod
    def backward(ctx, grad):
        idx, wgt, cols = ctx.saved_tensors
        g_in = torch.empty_like(grad, memory_format=torch.channels_last)
        g_in.copy_(grad)
        rows = pixel_rows(g_in)  # a view
        g_sel = rows.index_select(0, idx).to(wgt.dtype)
        rows.index_fill_(0, idx, 0)
        for j in range(cols.shape[1]):
            rows.index_add_(0, cols[:, j], (wgt[:, j, None] * g_sel).to(rows.dtype))
        return g_in, None, None, None


def refined_copy(logits: torch.Tensor, images: torch.Tensor, idx: torch.Tensor, radius: int = 3,
                 sigma_r: float = 0.05) -> torch.Tensor:
    """``with_pixel_rows(logits, idx, refine_at(logits, images, idx, radius, sigma_r))`` as one
    differentiable op (``_RefinedCopy``): for training, where the logits are written out of
    place."""
    wgt, cols = refine_weights(images, idx, radius, sigma_r)
    return _RefinedCopy.apply(logits, idx, wgt, cols)


def cell_states(coarse: torch.Tensor, margin: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(mixed, unsure)``, bool ``[B, h, w]`` for coarse logits ``[B, K, h, w]``: cells whose
    3x3 neighbourhood (replicated at the borders) does not agree on one label, and cells that are
    mixed or have a neighbour with a top-2 logit margin below ``margin``.

    Guided and bilinear upsampling both give a pixel a convex combination of its
    neighbourhood's cell logits: outside mixed cells they give it the neighbourhood's label
    (so guided upsampling need only be computed in mixed cells, bilinear standing in elsewhere),
    and outside unsure cells with a margin >= ``margin`` (no pixel there is refined). Invariant:
    ``mixed <= unsure``."""
    coarse = coarse.detach()
    lab = coarse.max(1, keepdim=True).indices.to(coarse.dtype)  # (not argmax: docs/ARCHITECTURE.md)
    pad = lambda t: F.pad(t, (1, 1, 1, 1), mode="replicate")  # noqa: E731
    mixed = (F.max_pool2d(pad(lab), 3, 1) != -F.max_pool2d(pad(-lab), 3, 1))[:, 0]
    low = (-F.max_pool2d(pad(-logit_margin(coarse)[:, None]), 3, 1) < margin)[:, 0]
    return mixed, mixed | low


def refine_uncertain(out: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, unsure: torch.Tensor,
                     margin: float, radius: int = 3, sigma_r: float = 0.05, fraction: float = 0.03,
                     inplace: bool = True) -> torch.Tensor:
    """Refine the *uncertain* inactive pixels of ``out`` ``[B, K, H, W]`` with ``refine_at``
    (the colour-weighted mean of their ``(2 radius + 1)^2`` window, which carries the
    full-resolution predictions of nearby active pixels of the same colour into them): in
    place (returns ``out``), or with ``inplace=False`` into a new tensor (``refined_copy``:
    what training wants).

    Uncertain: inactive (``~mask``, ``[B, H, W]``), in an ``unsure`` cell (``cell_states``) and
    with a top-2 logit margin below ``margin``; the least certain first, at most ``fraction`` of
    all ``B*H*W`` pixels. The refined values are computed from ``out`` as it was before the call
    (every window reads unrefined logits)."""
    B, K, H, W = out.shape
    rows = pixel_rows(out)
    if fused.usable(out) and rows.is_contiguous():  # (a selection: no gradient flows through it)
        idx, marg = fused.uncertain_pixels(rows, mask, unsure, margin)
    else:
        cell = W // unsure.shape[-1]
        cand = unsure.repeat_interleave(cell, 1).repeat_interleave(cell, 2) & ~mask
        idx = cand.view(-1).nonzero().squeeze(1)
        marg = logit_margin(rows.detach().index_select(0, idx), 1)
        idx, marg = idx[marg < margin], marg[marg < margin]
    cap = int(fraction * B * H * W)
    if idx.numel() > cap:
        idx = idx[marg.topk(cap, largest=False).indices].sort().values
    if not idx.numel():
        return out
    if not inplace:
        return refined_copy(out, images, idx, radius, sigma_r)
    put_pixel_rows(out, idx, refine_at(out, images, idx, radius, sigma_r))
    return out
