"""``sp.nn``: sparse layers; parameters and state_dicts match their dense twins."""
from .conv import SparseConv2d, SparseConvTranspose2d, SubMConv2d
from .featurewise import (
    FeatureWise, SparseBatchNorm2d, SparseDropout, SparseGELU, SparseIdentity, SparseLeakyReLU, SparseReLU,
    SparseSiLU, SparseSyncBatchNorm2d,
)
from .pool import SparseAvgPool2d, SparseGlobalAvgPool, SparseGlobalMaxPool, SparseMaxPool2d
from .convert import SparseToDense

__all__ = [
    "SubMConv2d", "SparseConv2d", "SparseConvTranspose2d",
    "FeatureWise", "SparseBatchNorm2d", "SparseSyncBatchNorm2d", "SparseReLU", "SparseLeakyReLU", "SparseSiLU",
    "SparseGELU",
    "SparseDropout", "SparseIdentity",
    "SparseMaxPool2d", "SparseAvgPool2d", "SparseGlobalAvgPool", "SparseGlobalMaxPool",
    "SparseToDense",
]
