"""spconv2d.zoo — models, data sets and one-command training on top of spconv2d.

    import spconv2d.zoo as zoo
    zoo.list_models()                      # ['cnn', 'mlp', 'sparse_cnn', 'sparse_unet', 'unet']
    model = zoo.create_model("sparse_unet", density=0.3)
    zoo.model_defaults("sparse_unet")      # ModelDefaults(data='streets', epochs=10, ...)
    metrics = zoo.train(model="sparse_cnn", data="mnist", epochs=3, out="runs/demo")

See docs/ZOO.md.
"""
from .registry import (ModelDefaults, count_parameters, create_model, is_model, list_models,  # noqa: F401
                       model_defaults, register_model)
from . import models  # noqa: F401  (registers mlp, cnn, sparse_cnn, unet, sparse_unet)
from .masks import MaskPolicy, MaskedModel, activity_mask, make_mask, measured_density  # noqa: F401
from .data import DATASETS, DatasetInfo, build_dataset, dataset_info  # noqa: F401
from .metrics import ConfusionMatrix  # noqa: F401
from .checkpoint import CheckpointError, load_checkpoint  # noqa: F401
from .config import TrainConfig  # noqa: F401
from .engine import evaluate, load_model, train, train_one_epoch  # noqa: F401
from .study import StudyConfig, run_study  # noqa: F401

__all__ = ["create_model", "list_models", "register_model", "is_model", "model_defaults", "ModelDefaults",
           "count_parameters", "MaskPolicy", "MaskedModel", "activity_mask", "make_mask", "measured_density",
           "build_dataset", "dataset_info", "DatasetInfo", "DATASETS", "ConfusionMatrix", "CheckpointError",
           "load_checkpoint", "TrainConfig", "train", "evaluate", "train_one_epoch", "load_model",
           "StudyConfig", "run_study"]
