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
        self.module = module
        # The state_dict has the wrapped module's own names (no "module." level), so a dense
        # model's state_dict loads into its sparse twin.
        self._register_state_dict_hook(_strip_module_prefix)
        self._register_load_state_dict_pre_hook(_add_module_prefix)

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace(self.module(x.features))


def _strip_module_prefix(module, state_dict, prefix, local_metadata):
    inner = prefix + "module."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _add_module_prefix(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    inner = prefix + "module."
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + key[len(prefix):]] = state_dict.pop(key)


class SparseBatchNorm2d(nn.modules.batchnorm._BatchNorm):
    """``nn.BatchNorm2d`` over active sites (statistics of active pixels only); same state_dict."""

    def _check_input_dim(self, input):
        if input.dim() != 2:
            raise ValueError(f"expected [N, C] features, got {tuple(input.shape)}")

    def forward(self, x: SparseTensor) -> SparseTensor:
        if self.training and x.num_active < 2:
            # No statistics from fewer than two values: normalise with the running ones.
            return SF.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
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
