"""spconv2d.zoo — models, data sets and one-command training on top of spconv2d.

    import spconv2d.zoo as zoo
    zoo.list_models()                      # ['cnn', 'mlp', 'sparse_cnn', 'sparse_unet', 'unet']
    model = zoo.create_model("sparse_unet", density=0.3)
    metrics = zoo.train(model="sparse_cnn", data="mnist", epochs=3, out="runs/demo")

See docs/ZOO.md.
"""
from .registry import create_model, list_models, register_model, is_model  # noqa: F401
from . import models  # noqa: F401  (registers mlp, cnn, sparse_cnn, unet, sparse_unet)
from .masks import MaskPolicy, make_mask, measured_density  # noqa: F401
from .data import build_dataset, DATASETS  # noqa: F401
from .checkpoint import CheckpointError, load_checkpoint  # noqa: F401
from .engine import TrainConfig, train, evaluate, train_one_epoch, load_model  # noqa: F401

__all__ = ["create_model", "list_models", "register_model", "is_model", "MaskPolicy", "make_mask",
           "measured_density", "build_dataset", "DATASETS", "CheckpointError", "load_checkpoint",
           "TrainConfig", "train", "evaluate", "train_one_epoch", "load_model"]
