"""Feature-wise layers: batch norm over active sites, activations, and ``FeatureWise`` which
runs any module that acts row by row on ``[N, C]`` features (``nn.Linear``, ``nn.Dropout``...)."""
from __future__ import annotations

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
