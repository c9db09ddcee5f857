"""The evaluation metrics of the zoo, from one confusion matrix.

    cm = ConfusionMatrix(num_classes=19)            # ignore_index=255
    for logits, targets in batches:
        cm.update(logits.argmax(1), targets)
    cm.all_reduce()                                 # no-op unless torch.distributed is initialised
    cm.accuracy(), cm.miou(eval_classes), cm.iou(), cm.class_accuracy()

The whole state is ``cm.mat`` (int64 ``[K, K]``, rows = target class, columns = predicted
class): two matrices of the same data set combine by addition (``cm += other``), so an
evaluation split over processes sums them with one ``all_reduce``.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from .streets import IGNORE_INDEX


class ConfusionMatrix:
    """``mat[t, p]``: how many labelled pixels (or images) of class ``t`` were predicted ``p``."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, device="cpu"):
        self.num_classes, self.ignore_index = int(num_classes), ignore_index
        self.mat = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=device)

    def update(self, preds: torch.Tensor, targets: torch.Tensor) -> "ConfusionMatrix":
        """Count the pairs ``(targets, preds)`` (class ids, same shape) whose target is not
        ``ignore_index``. Returns ``self``."""
        K = self.num_classes
        valid = targets != self.ignore_index
        t, p = targets[valid].to(self.mat.device), preds[valid].to(self.mat.device)
        self.mat += torch.bincount(t * K + p, minlength=K * K).view(K, K)
        return self

    def __iadd__(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot add a {other.num_classes}-class confusion matrix to a {self.num_classes}-class one")
        self.mat += other.mat.to(self.mat.device)
        return self

    def all_reduce(self, group=None) -> "ConfusionMatrix":
        """Sum ``mat`` over the processes of ``group`` (``torch.distributed``); a no-op when
        torch.distributed is not initialised. Returns ``self``."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.mat, op=dist.ReduceOp.SUM, group=group)
        return self

    @property
    def total(self) -> int:
        """The number of counted (labelled) pixels or images."""
        return int(self.mat.sum())

    def accuracy(self) -> float:
        """Correct / counted (0 when nothing was counted)."""
        return float(self.mat.diag().double().sum() / max(self.mat.sum(), 1))

    def class_accuracy(self) -> torch.Tensor:
        """Per class: correct / its count (recall), float64 ``[K]``, NaN for a class never seen."""
        tp, support = self.mat.diag().double(), self.mat.sum(1).double()
        return torch.where(support > 0, tp / support.clamp_min(1), torch.full_like(tp, float("nan")))

    def present(self) -> torch.Tensor:
        """bool ``[K]``: the classes that occur in the targets or the predictions."""
        return self.mat.sum(0) + self.mat.sum(1) > 0

    def iou(self) -> torch.Tensor:
        """Per class: ``tp / (tp + fp + fn)``, float64 ``[K]``, NaN for a class not present."""
        tp = self.mat.diag().double()
        union = self.mat.sum(0).double() + self.mat.sum(1).double() - tp
        return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))

    def miou(self, eval_classes: Optional[Iterable[int]] = None) -> float:
        """Mean IoU over the ``eval_classes`` (default: all) that are present; 0 if none is.

        A pixel predicted as a class outside ``eval_classes`` still counts, as an error of its
        true class (a false negative that lowers that class's IoU); it adds no class of its own."""
        evaluated = torch.zeros(self.num_classes, dtype=torch.bool)
        evaluated[list(eval_classes) if eval_classes is not None else slice(None)] = True
        counted = self.present().cpu() & evaluated
        return float(self.iou().cpu()[counted].mean()) if counted.any() else 0.0
