"""Feature-wise operations: anything that acts on each active site's feature vector alone."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..tensor import SparseTensor


def check_sparse(x, op: str) -> SparseTensor:
    """``x`` if it is a SparseTensor, else ``TypeError`` naming ``op``."""
    if not isinstance(x, SparseTensor):
        raise TypeError(f"{op}: expected a SparseTensor, got {type(x).__name__}")
    return x


def apply(x: SparseTensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> SparseTensor:
    """``x.replace(fn(x.features))``: the generic way to run a feature-wise function (``fn`` must
    return a tensor with one row per active site)."""
    check_sparse(x, "apply")
    if not callable(fn):
        raise TypeError(f"apply: fn must be callable, got {type(fn).__name__}")
    return x.replace(fn(x.features))


def relu(x: SparseTensor, inplace: bool = False) -> SparseTensor:
    return check_sparse(x, "relu").replace(F.relu(x.features, inplace=inplace))


def leaky_relu(x: SparseTensor, negative_slope: float = 0.01) -> SparseTensor:
    return check_sparse(x, "leaky_relu").replace(F.leaky_relu(x.features, negative_slope))


def silu(x: SparseTensor) -> SparseTensor:
    return check_sparse(x, "silu").replace(F.silu(x.features))


def gelu(x: SparseTensor) -> SparseTensor:
    return check_sparse(x, "gelu").replace(F.gelu(x.features))


def dropout(x: SparseTensor, p: float = 0.5, training: bool = True) -> SparseTensor:
    check_sparse(x, "dropout")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: p must be in [0, 1], got {p}")
    return x.replace(F.dropout(x.features, p, training))


def batch_norm(x: SparseTensor, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5) -> SparseTensor:
    """Batch norm over the active sites (statistics of the active pixels only).

    Fewer than two active sites in training (statistics undefined), in every mode: the sites
    are normalised with the running statistics when there are any (and those are not
    updated), otherwise only the affine part is applied (mean 0, variance 1); no error, so a
    nearly empty batch never stops training."""
    check_sparse(x, "batch_norm")
    C = x.num_channels
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (C,):
            raise ValueError(f"batch_norm: {name} must have shape ({C},) for {C} channels, got {tuple(t.shape)}")
    if training and x.num_active < 2:
        if running_mean is None or running_var is None:
            # the affine part alone, written out: F.batch_norm with eps=0 is an error in torch 2.11
            out = x.features if weight is None else x.features * weight
            return x.replace(out if bias is None else out + bias)
        training = False
    return x.replace(F.batch_norm(x.features, running_mean, running_var, weight, bias, training, momentum, eps))


def sync_batch_norm(x: SparseTensor, running_mean, running_var, weight=None, bias=None, momentum=0.1,
                    eps=1e-5, process_group=None, num_batches_tracked=None) -> SparseTensor:
    """Training-mode batch norm whose statistics are those of every active site of every process
    in ``process_group`` (default: the world): the per-channel sums and the site count are
    all-reduced (``torch.distributed.nn``, so the backward pass all-reduces their gradients, as
    ``nn.SyncBatchNorm`` does), then the centred sums of squares. Computed in float32 (float64
    for float64 features). Updates the running statistics in place like ``F.batch_norm``
    (``momentum`` None: cumulative average over ``num_batches_tracked``, which the caller
    increments). Fewer than two sites in all: ``batch_norm``'s small-batch rule, on every rank
    alike (they all see the same count)."""
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_reduce

    check_sparse(x, "sync_batch_norm")
    C = x.num_channels
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    f = x.features.to(acc)
    first = torch.cat([f.sum(0), f.new_full((1,), float(x.num_active))])
    first = all_reduce(first, op=dist.ReduceOp.SUM, group=process_group)
    n = int(first[C].item())
    if n < 2:
        return batch_norm(x, running_mean, running_var, weight, bias, True, 0.0, eps)
    mean = first[:C] / n
    var = all_reduce((f - mean).square().sum(0), op=dist.ReduceOp.SUM, group=process_group) / n
    y = (f - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            factor = momentum if momentum is not None else 1.0 / max(1, int(num_batches_tracked or 1))
            running_mean.mul_(1 - factor).add_(mean.detach().to(running_mean.dtype), alpha=factor)
            unbiased = var.detach() * (n / (n - 1))
            running_var.mul_(1 - factor).add_(unbiased.to(running_var.dtype), alpha=factor)
    return x.replace(y.to(x.dtype))


def _check_same_sites(tensors: Sequence[SparseTensor], op: str) -> None:
    for t in tensors:
        if not isinstance(t, SparseTensor):
            raise TypeError(f"{op}: expected SparseTensors, got {type(t).__name__}")
    first = tensors[0]
    for t in tensors:
        if t.device != first.device:
            raise ValueError(f"{op}: tensors are on {first.device} and {t.device}; they must share a device")
        if not first.same_sites(t):
            raise ValueError(
                f"{op}: tensors must have the same active sites in the same order "
                f"({first.num_active} sites on {first.spatial_shape} vs {t.num_active} on {t.spatial_shape})"
            )


def cat(tensors: Sequence[SparseTensor]) -> SparseTensor:
    """Channel concatenation of tensors on the same sites (features of one dtype)."""
    if isinstance(tensors, SparseTensor) or not isinstance(tensors, (list, tuple)):
        raise TypeError(f"cat: expected a list or tuple of SparseTensors, got {type(tensors).__name__}")
    tensors = list(tensors)
    if not tensors:
        raise ValueError("cat: needs at least one tensor")
    _check_same_sites(tensors, "cat")
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        raise TypeError(f"cat: features must share one dtype, got {sorted(str(d) for d in dtypes)}")
    return tensors[0].replace(torch.cat([t.features for t in tensors], 1))


def add(a: SparseTensor, b) -> SparseTensor:
    """``a + b`` for tensors on the same sites with the same channels, or a Python number, or a
    0-d / ``[C]`` tensor added to every site. Dtypes promote as in ``torch.add``."""
    check_sparse(a, "add")
    if isinstance(b, SparseTensor):
        _check_same_sites([a, b], "add")
        if a.num_channels != b.num_channels:
            raise ValueError(f"add: channel counts differ ({a.num_channels} vs {b.num_channels})")
        return a.replace(a.features + b.features)
    if isinstance(b, torch.Tensor):
        if b.dim() > 1 or (b.dim() == 1 and b.shape[0] not in (1, a.num_channels)):
            raise ValueError(f"add: a tensor operand must be 0-d or [{a.num_channels}], got shape {tuple(b.shape)}")
    elif isinstance(b, bool) or not isinstance(b, (int, float)):
        raise TypeError(f"add: cannot add a {type(b).__name__} to a SparseTensor")
    return a.replace(a.features + b)
