"""Figures: training curves and prediction sheets (matplotlib, Agg backend, no display)."""
from __future__ import annotations

from typing import List, Sequence

import numpy as np
import torch

from .streets import colorize


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_curves(history: List[dict], path: str, metric: str) -> None:
    """Loss (train and val) and the validation ``metric`` per epoch."""
    plt = _plt()
    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    a.plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    a.plot(ep, [h["val_loss"] for h in history], "s-", label="val")
    a.set_xlabel("epoch"), a.set_ylabel("loss"), a.legend(), a.grid(alpha=0.3)
    b.plot(ep, [100 * h[metric] for h in history], "o-", color="C2")
    b.set_xlabel("epoch"), b.set_ylabel(f"val {metric} (%)"), b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _to_rgb(img: torch.Tensor) -> np.ndarray:
    x = img.detach().float().cpu().clamp(0, 1).numpy()
    return np.repeat(x, 3, 0).transpose(1, 2, 0) if x.shape[0] == 1 else x[:3].transpose(1, 2, 0)


def save_segmentation_sheet(images, targets, preds, masks, path: str, title: str = "") -> None:
    """Rows: input | ground truth | prediction | active mask."""
    plt = _plt()
    n = len(images)
    fig, axes = plt.subplots(n, 4, figsize=(4 * 2.6, n * 1.45 + 0.4), squeeze=False)
    for i in range(n):
        cols = [_to_rgb(images[i]), colorize(targets[i].cpu().numpy()), colorize(preds[i].cpu().numpy()),
                masks[i].cpu().numpy() if masks is not None else np.ones(images[i].shape[-2:])]
        for j, c in enumerate(cols):
            axes[i, j].imshow(c, cmap="gray" if j == 3 else None, vmin=0, vmax=1, interpolation="nearest")
            axes[i, j].axis("off")
            if i == 0:
                axes[i, j].set_title(["input", "ground truth", "prediction", "active mask"][j], fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_classification_sheet(images, targets, preds, masks, path: str,
                              class_names: Sequence[str], title: str = "") -> None:
    """Two rows per digit block: the input titled 'gt / pred' and its active mask."""
    plt = _plt()
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(n * 1.2, 2.9), squeeze=False)
    for i in range(n):
        ok = targets is None or int(targets[i]) == int(preds[i])
        gt = "?" if targets is None else class_names[int(targets[i])]
        axes[0, i].imshow(_to_rgb(images[i]), interpolation="nearest")
        axes[0, i].set_title(f"{gt} / {class_names[int(preds[i])]}", fontsize=8, color="k" if ok else "r")
        m = masks[i].cpu().numpy() if masks is not None else np.ones(images[i].shape[-2:])
        axes[1, i].imshow(m, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        axes[0, i].axis("off"), axes[1, i].axis("off")
    axes[0, 0].text(-0.3, 0.5, "gt / pred", transform=axes[0, 0].transAxes, rotation=90, va="center", fontsize=8)
    axes[1, 0].text(-0.3, 0.5, "active", transform=axes[1, 0].transAxes, rotation=90, va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
