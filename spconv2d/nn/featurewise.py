"""Feature-wise layers: batch norm over active sites, activations, and ``FeatureWise`` which
runs any module that acts row by row on ``[N, C]`` features (``nn.Linear``, ``nn.Dropout``...)."""
from __future__ import annotations

import torch
from torch import nn

from .. import functional as SF
from ..tensor import SparseTensor


class FeatureWise(nn.Module):
    """``FeatureWise(module)(x) == x.replace(module(x.features))``; the state_dict is the module's."""

    def __init__(self, module: nn.Module):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"FeatureWise: expected an nn.Module, got {type(module).__name__}")
        self.module = module
        # The state_dict has the wrapped module's own names (no "module." level), so a dense
        # model's state_dict loads into its sparse twin.
        self._register_state_dict_hook(_strip_module_prefix)
        self._register_load_state_dict_pre_hook(_add_module_prefix)

    def forward(self, x: SparseTensor) -> SparseTensor:
        return SF.apply(x, self.module)


def _strip_module_prefix(module, state_dict, prefix, local_metadata):
    inner = prefix + "module."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _add_module_prefix(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    inner = prefix + "module."
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + key[len(prefix):]] = state_dict.pop(key)


class SparseBatchNorm2d(nn.BatchNorm1d):
    """``nn.BatchNorm2d`` over active sites (statistics of active pixels only); same state_dict.

    Fewer than two active sites where batch statistics would be used (training, or no running
    statistics): ``sp.functional.batch_norm``'s rule, the same in every mode (running
    statistics if tracked, else the affine part alone; never an error)."""

    def _check_input_dim(self, input):
        if input.dim() != 2:
            raise ValueError(f"expected [N, C] features, got {tuple(input.shape)}")

    def forward(self, x: SparseTensor) -> SparseTensor:
        SF.check_sparse(x, "SparseBatchNorm2d")
        if x.num_channels != self.num_features:
            raise ValueError(f"SparseBatchNorm2d({self.num_features}): input has {x.num_channels} channels")
        batch_stats = self.training or self.running_mean is None
        if batch_stats and x.num_active < 2:
            return SF.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True, 0.0, self.eps)
        return x.replace(super().forward(x.features))


class SparseSyncBatchNorm2d(SparseBatchNorm2d):
    """``SparseBatchNorm2d`` whose training statistics are those of every active site of every
    process of ``process_group`` (default: the world), like ``nn.SyncBatchNorm`` (sums and
    counts all-reduced: ranks may hold different numbers of sites). Outside training, or
    without an initialised process group of more than one process, it is ``SparseBatchNorm2d``.
    Same state_dict; make one from a model with :meth:`convert_sync_batchnorm`."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def _synchronised(self) -> bool:
        import torch.distributed as dist

        return (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.process_group) > 1)

    def forward(self, x: SparseTensor) -> SparseTensor:
        if not self._synchronised():
            return super().forward(x)
        SF.check_sparse(x, "SparseSyncBatchNorm2d")
        if x.num_channels != self.num_features:
            raise ValueError(f"SparseSyncBatchNorm2d({self.num_features}): input has {x.num_channels} channels")
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        return SF.sync_batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.momentum,
                                  self.eps, self.process_group, self.num_batches_tracked)

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """``module`` with every ``SparseBatchNorm2d`` replaced by a ``SparseSyncBatchNorm2d``
        holding the same parameters and buffers (like ``nn.SyncBatchNorm.convert_sync_batchnorm``,
        which must not be used on sparse layers: it would make them dense)."""
        if isinstance(module, SparseBatchNorm2d) and not isinstance(module, cls):
            sync = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                       process_group)
            if module.affine:
                with torch.no_grad():
                    sync.weight, sync.bias = module.weight, module.bias
            sync.running_mean, sync.running_var = module.running_mean, module.running_var
            sync.num_batches_tracked = module.num_batches_tracked
            sync.train(module.training)
            return sync
        for name, child in module.named_children():
            new = cls.convert_sync_batchnorm(child, process_group)
            if new is not child:
                setattr(module, name, new)
        return module


def _activation(name: str, cls):
    class Sparse(FeatureWise):
        def __init__(self, *args, **kwargs):
            super().__init__(cls(*args, **kwargs))

    Sparse.__name__ = Sparse.__qualname__ = name
    Sparse.__doc__ = f"``{cls.__name__}`` applied to the features of a SparseTensor."
    return Sparse


SparseReLU = _activation("SparseReLU", nn.ReLU)
SparseLeakyReLU = _activation("SparseLeakyReLU", nn.LeakyReLU)
SparseSiLU = _activation("SparseSiLU", nn.SiLU)
SparseGELU = _activation("SparseGELU", nn.GELU)
SparseDropout = _activation("SparseDropout", nn.Dropout)
SparseIdentity = _activation("SparseIdentity", nn.Identity)
