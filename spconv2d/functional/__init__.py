"""``sp.functional``: every sparse op as a function taking explicit weights."""
from .basic import (add, apply, batch_norm, cat, check_sparse, dropout, gelu, leaky_relu, relu, silu,
                    sync_batch_norm)
from .conv import conv2d, conv_transpose2d, subm_conv2d
from .pool import avg_pool2d, global_avg_pool, global_max_pool, max_pool2d

__all__ = [
    "add", "apply", "batch_norm", "cat", "check_sparse", "dropout", "gelu", "leaky_relu", "relu", "silu",
    "sync_batch_norm",
    "conv2d", "conv_transpose2d", "subm_conv2d",
    "avg_pool2d", "global_avg_pool", "global_max_pool", "max_pool2d",
]
