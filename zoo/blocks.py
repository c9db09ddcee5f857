"""Building blocks shared by the zoo's models: the *ops tables* that make a dense model and its
sparse twin from one class definition, ``ConvBNReLU``, weight initialisation, and the bilinear
upsampling of coarse logits that both U-Net twins correct.

An ops table is a ``SimpleNamespace`` of constructors with one signature per kind of layer:

    sparse                      bool: the table builds ``spconv2d`` layers
    conv(ci, co, k, bias=False) stride-1 "same" conv (dense: padding k // 2; sparse: SubMConv2d)
    strided(ci, co, k, s, p, bias=False)   strided conv (sparse: SparseConv2d)
    up(ci, co, k, s, bias=False)           transposed conv (sparse: SparseConvTranspose2d)
    maxpool(k), bn(c), relu(), cat(tensors)

Both tables create modules with the same names and parameter shapes (``spconv2d`` layers keep
PyTorch's dense weight layouts), so the twins exchange ``state_dict`` s.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules import module as _module
from torch.nn.utils.fusion import fuse_conv_bn_weights

import spconv2d as sp  # the core library; the zoo depends on it, never the other way


def dense_ops() -> SimpleNamespace:
    """The ops table of dense models (``torch.nn`` layers)."""
    return SimpleNamespace(
        sparse=False,
        conv=lambda ci, co, k, bias=False: nn.Conv2d(ci, co, k, padding=k // 2, bias=bias),
        strided=lambda ci, co, k, s, p, bias=False: nn.Conv2d(ci, co, k, stride=s, padding=p, bias=bias),
        up=lambda ci, co, k, s, bias=False: nn.ConvTranspose2d(ci, co, k, stride=s, bias=bias),
        maxpool=lambda k: nn.MaxPool2d(k),
        bn=nn.BatchNorm2d,
        relu=lambda: nn.ReLU(inplace=True),
        cat=lambda ts: torch.cat(ts, 1),
    )


def sparse_ops() -> SimpleNamespace:
    """The ops table of sparse models (``spconv2d.nn`` layers on ``SparseTensor`` s)."""
    return SimpleNamespace(
        sparse=True,
        conv=lambda ci, co, k, bias=False: sp.nn.SubMConv2d(ci, co, k, bias=bias),
        strided=lambda ci, co, k, s, p, bias=False: sp.nn.SparseConv2d(ci, co, k, stride=s, padding=p, bias=bias),
        up=lambda ci, co, k, s, bias=False: sp.nn.SparseConvTranspose2d(ci, co, k, stride=s, bias=bias),
        maxpool=lambda k: sp.nn.SparseMaxPool2d(k),
        bn=sp.nn.SparseBatchNorm2d,
        relu=lambda: sp.nn.SparseReLU(inplace=True),
        cat=sp.cat,
    )


#: ``ConvBNReLU`` folds its batch norm at inference (switched off only to measure the fold:
#: ``bench/bench_zoo.py -k choice_fold``).
FOLD_BATCH_NORM = True
_FOLDABLE = (nn.Conv2d, nn.ConvTranspose2d, sp.nn.SubMConv2d, sp.nn.SparseConv2d, sp.nn.SparseConvTranspose2d)


class ConvBNReLU(nn.Module):
    """conv -> BN -> ReLU; ``conv`` is any conv-like module built by the caller.

    At inference (eval mode and autograd not recording) a batch norm with running statistics
    is folded into the conv: one conv with ``weight * s`` and ``(bias - mean) * s + beta``,
    ``s = gamma / sqrt(var + eps)`` (``torch.nn.utils.fusion.fuse_conv_bn_weights``), the
    same function up to rounding, without the batch norm's pass over the features (on the
    sparse twin a pass of PyTorch's ``[N, C]`` batch norm per layer); a sparse conv then
    applies a ``SparseReLU`` in its epilogue too (``relu=True``: the numba backend clamps the
    outputs as it writes them, no pass of its own). Both twins fold alike;
    not while a forward hook is registered on the conv or the batch norm (or globally), so that
    hooks see the modules' calls. The folded weights are cached until a parameter or running
    statistic changes (``_version``) or moves."""

    def __init__(self, conv: nn.Module, bn: nn.Module, act: nn.Module):
        super().__init__()
        self.conv, self.bn, self.act = conv, bn, act
        self._fold_key, self._fold = None, None

    def forward(self, x, **kw):  # kw: e.g. output=skip for a sparse transposed conv
        if self.training or torch.is_grad_enabled() or not FOLD_BATCH_NORM or not self._foldable():
            return self.act(self.bn(self.conv(x, **kw)))
        weight, bias = self.folded_weights()
        conv = self.conv
        if isinstance(conv, nn.ConvTranspose2d):
            y = F.conv_transpose2d(x, weight, bias, conv.stride, conv.padding, conv.output_padding, conv.groups,
                                   conv.dilation)
        elif isinstance(conv, nn.Conv2d):
            y = conv._conv_forward(x, weight, bias)
        elif isinstance(self.act, sp.nn.SparseReLU) and not _hooked(self.act):
            return conv.forward_with(x, weight, bias, relu=True, **kw)  # the ReLU in the conv's epilogue
        else:
            y = conv.forward_with(x, weight, bias, **kw)
        return self.act(y)

    def _foldable(self) -> bool:
        bn = self.bn
        return (isinstance(self.conv, _FOLDABLE) and isinstance(bn, nn.modules.batchnorm._BatchNorm)
                and bn.running_mean is not None and bn.running_var is not None
                and (not isinstance(self.conv, nn.ConvTranspose2d) or self.conv.groups == 1)
                and not _hooked(self.conv) and not _hooked(bn))

    def folded_weights(self):
        """``(weight, bias)`` of the conv with the batch norm's running statistics folded in
        (the conv's layout; a bias even where the conv has none)."""
        conv, bn = self.conv, self.bn
        tensors = (conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias)
        present = [t for t in tensors if t is not None]
        key = None
        if not any(torch.is_inference(t) for t in present):  # (inference tensors have no version)
            key = tuple((id(t), t._version, t.data_ptr(), t.dtype, t.device) for t in present) + (bn.eps,)
            if key == self._fold_key:
                return self._fold
        w, b = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight,
                                    bn.bias, transpose=isinstance(conv, (nn.ConvTranspose2d, sp.nn.SparseConvTranspose2d)))
        fold = (w.detach(), b.detach())
        if key is not None:
            self._fold_key, self._fold = key, fold
        return fold


def _hooked(module: nn.Module) -> bool:
    """True when forward hooks would see ``module``'s call (its own or global ones): then it is
    called as a module (e.g. ``zoo.measure.MacCounter`` counts the dense convs with hooks)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or _module._global_forward_hooks
                or _module._global_forward_pre_hooks)


def conv_bn_relu(ops: SimpleNamespace, conv: nn.Module, co: int) -> ConvBNReLU:
    """``ConvBNReLU(conv, ops.bn(co), ops.relu())``: ``conv`` followed by the table's BN and ReLU."""
    return ConvBNReLU(conv, ops.bn(co), ops.relu())


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal init of every 4-d (conv) weight, dense or sparse (same layout): fan-out for
    the modules whose top-level name contains ``up`` (transposed convs), fan-in otherwise."""
    for name, p in model.named_parameters():
        if p.dim() == 4:
            nn.init.kaiming_normal_(p, mode="fan_out" if "up" in name.split(".")[0] else "fan_in",
                                    nonlinearity="relu")


def bilinear_up(logits: torch.Tensor, size) -> torch.Tensor:
    """``[B, K, h, w]`` -> ``[B, K, *size]``, bilinear (``align_corners=False``), computed and
    returned in channels-last memory (pixel rows are views; see docs/ARCHITECTURE.md for why)."""
    return F.interpolate(logits.contiguous(memory_format=torch.channels_last), size=size, mode="bilinear",
                         align_corners=False)
