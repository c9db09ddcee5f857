"""The zoo's models in one namespace (importing it registers them): ``mlp``, ``cnn``,
``sparse_cnn`` (MNIST, ``classifiers``) and ``unet``, ``sparse_unet`` (street scenes, ``unets``).

Where things live:

    blocks.py       ops tables (dense / sparse twins from one class), ConvBNReLU, init, bilinear_up
    classifiers.py  MLP, CNN, SparseCNN and the entry points mlp, cnn, sparse_cnn
    unets.py        UNet, SparseUNet and the entry points unet, sparse_unet
    inactive.py     the sparse U-Net's inactive pixels: guided_upsample, guided_rows,
                    logit_margin, refine_at, cell_states, refine_uncertain, pixel-row writes
    masks.py        activity-mask policies and MaskedModel (a sparse model's mask owner)
    registry.py     register_model, create_model, list_models, ModelDefaults, count_parameters

Calling convention shared by every model: ``model(images, mask=None)`` with ``images`` dense
``[B, C, H, W]``; dense models ignore ``mask``; sparse models use it as the activity mask
``[B, H, W]`` bool (``None``: ``model.make_mask(images)``, the model's own policy). Classifiers
return ``[B, classes]`` logits, segmenters dense ``[B, classes, H, W]`` logits
(``return_aux=True`` also returns the coarse head's logits upsampled to ``[B, classes, H, W]``,
used as an auxiliary loss).
"""
from .blocks import ConvBNReLU, bilinear_up, conv_bn_relu, dense_ops, init_weights, sparse_ops  # noqa: F401
from .classifiers import CNN, MLP, CNNBase, SparseCNN, cnn, mlp, sparse_cnn  # noqa: F401
from .inactive import (cell_states, guided_rows, guided_upsample, logit_margin, pixel_rows,  # noqa: F401
                       put_pixel_rows, refine_at, refine_uncertain, set_pixel_rows, with_pixel_rows)
from .registry import count_parameters  # noqa: F401
from .unets import SparseUNet, UNet, UNetBase, sparse_unet, unet  # noqa: F401
