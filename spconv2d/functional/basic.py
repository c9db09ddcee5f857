"""Feature-wise operations: anything that acts on each active site's feature vector alone."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..tensor import SparseTensor


def apply(x: SparseTensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> SparseTensor:
    """``x.replace(fn(x.features))``: the generic way to run a feature-wise function."""
    return x.replace(fn(x.features))


def relu(x: SparseTensor, inplace: bool = False) -> SparseTensor:
    return x.replace(F.relu(x.features, inplace=inplace))


def leaky_relu(x: SparseTensor, negative_slope: float = 0.01) -> SparseTensor:
    return x.replace(F.leaky_relu(x.features, negative_slope))


def silu(x: SparseTensor) -> SparseTensor:
    return x.replace(F.silu(x.features))


def gelu(x: SparseTensor) -> SparseTensor:
    return x.replace(F.gelu(x.features))


def dropout(x: SparseTensor, p: float = 0.5, training: bool = True) -> SparseTensor:
    return x.replace(F.dropout(x.features, p, training))


def batch_norm(x: SparseTensor, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5) -> SparseTensor:
    """Batch norm over the active sites (statistics of the active pixels only)."""
    if training and x.num_active < 2:
        # Statistics of fewer than two values are undefined; like an empty batch, pass through
        # the affine part with the running statistics instead of failing mid-training.
        training = False
    return x.replace(F.batch_norm(x.features, running_mean, running_var, weight, bias, training, momentum, eps))


def _check_same_sites(tensors: Sequence[SparseTensor], op: str) -> None:
    first = tensors[0]
    for t in tensors:
        if not isinstance(t, SparseTensor):
            raise TypeError(f"{op}: expected SparseTensors, got {type(t).__name__}")
        if not first.same_sites(t):
            raise ValueError(
                f"{op}: tensors must have the same active sites in the same order "
                f"({first.num_active} sites on {first.spatial_shape} vs {t.num_active} on {t.spatial_shape})"
            )


def cat(tensors: Sequence[SparseTensor]) -> SparseTensor:
    """Channel concatenation of tensors on the same sites."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError("cat: needs at least one tensor")
    _check_same_sites(tensors, "cat")
    return tensors[0].replace(torch.cat([t.features for t in tensors], 1))


def add(a: SparseTensor, b) -> SparseTensor:
    """``a + b`` for tensors on the same sites, or a scalar / per-channel tensor ``b``."""
    if isinstance(b, SparseTensor):
        _check_same_sites([a, b], "add")
        return a.replace(a.features + b.features)
    return a.replace(a.features + b)
