"""MNIST classifiers and their registry entry points: ``mlp``, ``cnn``, ``sparse_cnn``.

Calling convention: ``model(images, mask=None)`` with ``images`` ``[B, C, H, W]`` in ``[0, 1]``
-> logits ``[B, num_classes]``. ``cnn`` and ``sparse_cnn`` are one class definition built with
the dense or the sparse ops table (``blocks``): same module names and parameter shapes, so
``sparse_cnn.load_state_dict(cnn.state_dict())`` and back work.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch.nn as nn

import spconv2d as sp

from .blocks import conv_bn_relu, dense_ops, init_weights, sparse_ops
from .masks import MaskedModel
from .registry import ModelDefaults, register_model

MNIST_TRAINING = ModelDefaults(data="mnist", epochs=12, batch_size=64, lr=3e-3, weight_decay=5e-4)


class MLP(nn.Module):
    """784 -> 512 -> 256 -> 10 with ReLU and dropout (``img_size``: ``H`` of a square image or
    ``(H, W)``; the input is flattened to ``in_chans * H * W`` features)."""

    task, sparse = "classification", False

    def __init__(self, in_chans: int = 1, num_classes: int = 10, img_size: Union[int, Tuple[int, int]] = 28,
                 hidden: Sequence[int] = (512, 256), drop: float = 0.2):
        super().__init__()
        h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
        layers, d = [nn.Flatten()], in_chans * h * w
        for width in hidden:
            layers += [nn.Linear(d, width), nn.ReLU(inplace=True), nn.Dropout(drop)]
            d = width
        layers.append(nn.Linear(d, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, images, mask=None):
        return self.net(images)


class CNNBase(nn.Module):
    """conv3(32) conv3(32) | conv3 s2 (64) conv3(64) | maxpool2 conv3(128) | global avg pool, fc.

    28x28 -> 14x14 -> 7x7. The sparse twin uses SubMConv2d for the stride-1 convs, SparseConv2d
    for the strided one, SparseMaxPool2d and SparseGlobalAvgPool (mean over active sites).
    """

    task = "classification"

    def __init__(self, ops, in_chans: int = 1, num_classes: int = 10, width: int = 32, drop: float = 0.2):
        super().__init__()
        c1, c2, c3 = width, 2 * width, 4 * width
        self.sparse = ops.sparse
        self.conv1 = conv_bn_relu(ops, ops.conv(in_chans, c1, 3), c1)
        self.conv2 = conv_bn_relu(ops, ops.conv(c1, c1, 3), c1)
        self.down1 = conv_bn_relu(ops, ops.strided(c1, c2, 3, 2, 1), c2)
        self.conv3 = conv_bn_relu(ops, ops.conv(c2, c2, 3), c2)
        self.pool = ops.maxpool(2)
        self.conv4 = conv_bn_relu(ops, ops.conv(c2, c3, 3), c3)
        self.drop = nn.Dropout(drop)
        self.fc = nn.Linear(c3, num_classes)
        init_weights(self)

    def features(self, x):
        x = self.conv2(self.conv1(x))
        x = self.conv3(self.down1(x))
        return self.conv4(self.pool(x))


class CNN(CNNBase):
    def __init__(self, **kw):
        super().__init__(dense_ops(), **kw)

    def forward(self, images, mask=None):
        x = self.features(images)
        return self.fc(self.drop(x.mean((2, 3))))


class SparseCNN(MaskedModel, CNNBase):
    """The CNN on the active pixels: by default the digit's strokes (policy ``nonzero``), or
    ``mask`` ``[B, H, W]`` bool when given."""

    def __init__(self, mask_policy: str = "nonzero", density: Optional[float] = None, **kw):
        super().__init__(sparse_ops(), **kw)
        self.gpool = sp.nn.SparseGlobalAvgPool()
        self.set_mask_policy(mask_policy, density)

    def forward(self, images, mask=None):
        if mask is None:
            mask = self.make_mask(images)
        x = sp.SparseTensor.from_dense(images, mask)
        x = self.features(x)
        return self.fc(self.drop(self.gpool(x)))


# --------------------------------------------------------------------------------------------
# registry entry points
# --------------------------------------------------------------------------------------------
@register_model(defaults=ModelDefaults(data="mnist", epochs=20, batch_size=64, lr=2e-3, weight_decay=1e-4))
def mlp(num_classes: int = 10, in_chans: int = 1, *, img_size: Union[int, Tuple[int, int]] = 28,
        hidden: Sequence[int] = (512, 256), drop: float = 0.2) -> nn.Module:
    """MLP 784-512-256-10 for MNIST."""
    return MLP(in_chans=in_chans, num_classes=num_classes, img_size=img_size, hidden=hidden, drop=drop)


@register_model(defaults=MNIST_TRAINING)
def cnn(num_classes: int = 10, in_chans: int = 1, *, width: int = 32, drop: float = 0.2) -> nn.Module:
    """Dense 5-conv CNN for MNIST (28 -> 14 -> 7, global average pool)."""
    return CNN(in_chans=in_chans, num_classes=num_classes, width=width, drop=drop)


@register_model(defaults=MNIST_TRAINING)
def sparse_cnn(num_classes: int = 10, in_chans: int = 1, *, width: int = 32, drop: float = 0.2,
               mask_policy: str = "nonzero", density: Optional[float] = None) -> nn.Module:
    """``cnn`` on the digit's strokes (same state_dict layout as ``cnn``)."""
    return SparseCNN(in_chans=in_chans, num_classes=num_classes, width=width, drop=drop,
                     mask_policy=mask_policy, density=density)
