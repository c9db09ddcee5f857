"""The confusion matrix behind every zoo metric, against hand computations."""
import math

import pytest
import torch

from spconv2d.zoo.metrics import ConfusionMatrix


def test_confusion_matrix_equals_a_hand_computation():
    # 3 classes; 255 = ignore. pairs (target, prediction):
    targets = torch.tensor([[0, 0, 0, 1], [1, 2, 255, 255]])
    preds = torch.tensor([[0, 0, 1, 1], [2, 2, 0, 1]])
    cm = ConfusionMatrix(3).update(preds, targets)
    # (0,0) x2, (0,1), (1,1), (1,2), (2,2); the two ignored pixels count nowhere
    assert cm.mat.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert cm.total == 6
    assert cm.accuracy() == pytest.approx(4 / 6)
    # recall per class: 2/3, 1/2, 1/1
    assert cm.class_accuracy().tolist() == pytest.approx([2 / 3, 1 / 2, 1.0])
    # IoU = tp / (tp + fp + fn): class 0: 2 / (2 + 0 + 1); class 1: 1 / (1 + 1 + 1); class 2: 1 / (1 + 1 + 0)
    assert cm.iou().tolist() == pytest.approx([2 / 3, 1 / 3, 1 / 2])
    assert cm.miou() == pytest.approx((2 / 3 + 1 / 3 + 1 / 2) / 3)
    assert cm.miou(eval_classes=(0, 2)) == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_absent_classes_are_nan_and_not_averaged():
    cm = ConfusionMatrix(4).update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
    assert cm.present().tolist() == [True, True, False, False]
    iou = cm.iou()
    assert iou[:2].tolist() == pytest.approx([1 / 2, 1 / 2]) and iou[2:].isnan().all()
    assert math.isnan(float(cm.class_accuracy()[3]))
    assert cm.miou() == pytest.approx(1 / 2)  # over the 2 present classes
    assert cm.miou(eval_classes=(3,)) == 0.0  # no evaluated class present
    assert ConfusionMatrix(2).accuracy() == 0.0 and ConfusionMatrix(2).total == 0


def test_matrices_add_like_an_all_reduce():
    g = torch.Generator().manual_seed(0)
    t, p = torch.randint(0, 5, (2, 100), generator=g), torch.randint(0, 5, (2, 100), generator=g)
    whole = ConfusionMatrix(5).update(p, t)
    a, b = ConfusionMatrix(5).update(p[0], t[0]), ConfusionMatrix(5).update(p[1], t[1])
    a += b
    assert torch.equal(a.mat, whole.mat) and a.miou() == whole.miou()
    assert a.all_reduce() is a and torch.equal(a.mat, whole.mat)  # no process group: a no-op
    with pytest.raises(ValueError, match="3-class"):
        a += ConfusionMatrix(3)
