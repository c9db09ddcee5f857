"""``TrainConfig``: everything a training run needs, its defaults, and its command-line flags.

Each field's ``metadata["cli"]`` is its ``spconv2d train`` option (``help``, and ``flag`` where it
is not ``--field-name``; ``None``: no option). ``TrainConfig.add_arguments(parser)`` generates the
options from the fields and ``TrainConfig.from_args(args)`` reads them back, so a new option is a
new field. ``None`` means "the model's / data set's default": ``resolved()`` fills it from the
model's registered ``ModelDefaults`` and the data set's ``DatasetInfo``.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import numbers
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from . import validation
from .data import DATASETS, dataset_info
from .device import AMP_MODES
from .masks import DEFAULT_DENSITY, POLICIES
from .registry import is_model, list_models, model_defaults

log = logging.getLogger("spconv2d.zoo")


def _cli(help: str, **kw) -> Dict[str, Any]:
    """Field metadata: the field's command-line option (``flag``, ``positional``, ``choices``)."""
    return {"cli": dict(help=help, **kw)}


@dataclass
class TrainConfig:
    """Everything a run needs. ``None`` means "the model's / data set's default" (``resolved``)."""

    model: str = field(default="sparse_cnn", metadata=_cli("registered model name (see `spconv2d list`)",
                                                             positional=True))
    data: Optional[str] = field(default=None, metadata=_cli("mnist | streets | cityscapes (default: the model's)"))
    epochs: Optional[int] = field(default=None, metadata=_cli("training epochs (default: the model's)"))
    batch_size: Optional[int] = field(default=None, metadata=_cli(
        "training batch size per process (default: the model's; global batch: processes x this)"))
    lr: Optional[float] = field(default=None, metadata=_cli("peak AdamW learning rate (default: the model's)"))
    weight_decay: Optional[float] = field(default=None, metadata=_cli("AdamW weight decay (default: the model's)"))
    density: Optional[float] = field(default=None, metadata=_cli(
        "target fraction of active pixels (edge/contrast/residual policy; sparse models)"))
    mask_policy: Optional[str] = field(default=None, metadata=_cli(
        "activity-mask policy of a sparse model (default: the model's)", choices=POLICIES))
    size: Optional[Tuple[int, int]] = field(default=None, metadata=_cli(
        "segmentation image size (default: the data set's)", metavar=("H", "W")))
    num_train: Optional[int] = field(default=None, metadata=_cli("training items (streets: generated scenes)"))
    num_val: Optional[int] = field(default=None, metadata=_cli("validation items (streets: generated scenes)"))
    device: str = field(default="auto", metadata=_cli(
        "auto (CUDA when available, else CPU) | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)"))
    amp: str = field(default="off", metadata=_cli(
        "mixed precision: autocast in bf16, or fp16 with loss scaling (CUDA only)", choices=AMP_MODES))
    out: Optional[str] = field(default=None, metadata=_cli("output folder (default runs/MODEL-DATA)"))
    resume: bool = field(default=False, metadata=_cli("continue from OUT/checkpoint.safetensors"))
    seed: int = field(default=0, metadata=_cli("seed of the initialisation, the data order and streets' scenes"))
    data_root: Optional[str] = field(default=None, metadata=_cli(
        "folder with MNIST/raw/ or Cityscapes' leftImg8bit/ + gtFine/"))
    download: bool = field(default=False, metadata=_cli("MNIST only: download into --data-root"))
    aux_weight: float = field(default=0.4, metadata=_cli("segmentation: weight of the coarse head's loss"))
    warmup: float = field(default=0.05, metadata=_cli("fraction of the steps with linear LR warm-up"))
    num_workers: Optional[int] = field(default=None, metadata=_cli(
        "DataLoader workers per process (default: 0 for data held in memory, up to 4 otherwise)", flag="--workers"))
    sync_bn: bool = field(default=True, metadata=_cli(
        "several processes: per-process batch-norm statistics (default: synchronised)", flag="--no-sync-bn"))
    augment: bool = field(default=True, metadata=_cli("no training augmentation (shifts, flips)",
                                                      flag="--no-augment"))
    cache_dir: Optional[str] = field(default=None, metadata=_cli(
        "cityscapes: keep the resized split here (made once), so epochs do not decode the PNGs"))
    num_predictions: int = field(default=8, metadata=_cli("validation samples drawn in predictions.png"))
    progress: bool = field(default=True, metadata=_cli("no progress bar", flag="--no-progress"))
    model_kwargs: Dict[str, Any] = field(default_factory=dict, metadata={"cli": None})  # Python only

    def __post_init__(self):
        # any sequence (a list from the command line or a run's JSON, a numpy array) -> a tuple,
        # integral elements -> int; anything else is left as given for validate() to report
        if isinstance(self.size, (list, tuple)) or hasattr(self.size, "tolist"):
            items = self.size.tolist() if hasattr(self.size, "tolist") else self.size
            self.size = tuple(int(s) if isinstance(s, numbers.Integral) and not isinstance(s, bool) else s
                              for s in items)

    def resolved(self) -> "TrainConfig":
        """A copy with every ``None`` default filled in: the model's ``ModelDefaults`` (data,
        epochs, batch size, lr, weight decay, mask policy, density), then the data set's
        ``DatasetInfo`` (size, number of train / val items); an unknown model is a ``KeyError``,
        an unknown data set a ``ValueError``."""
        md = model_defaults(self.model)
        c = dataclasses.replace(self)
        for k in ("data", "epochs", "batch_size", "lr", "weight_decay", "mask_policy", "density"):
            if getattr(c, k) is None:
                setattr(c, k, getattr(md, k))
        info = dataset_info(c.data, c.size)
        if c.size is None and info.resizable:
            c.size = info.image_size
        if c.num_train is None:
            c.num_train = info.num_train
        if c.num_val is None:
            c.num_val = info.num_val
        if c.mask_policy == "nonzero" and self.density is not None:
            log.warning("--density %.3g is ignored by the 'nonzero' mask policy (use --mask-policy residual)",
                        self.density)
        if c.density is None and c.mask_policy in ("edge", "contrast", "residual"):
            c.density = DEFAULT_DENSITY
        if c.out is None:
            c.out = os.path.join("runs", f"{c.model}-{c.data}")
        return c

    def validate(self) -> "TrainConfig":
        """Reject what cannot make a meaningful run, before anything is read, built or written;
        returns ``self``. Unset (``None``) fields are the model's / data set's defaults, which are
        valid; a resolved config validates too. ``train()`` calls it first.

        ``TypeError``: a field of the wrong type. ``ValueError``: an unknown model, data set or
        mask policy; ``epochs``, ``batch_size``, ``num_train``, ``num_val`` < 1; ``lr`` <= 0;
        ``weight_decay``, ``aux_weight``, ``num_workers``, ``num_predictions`` < 0; ``warmup``
        outside [0, 1]; ``density`` outside (0, 1]; ``size`` not two integers >= 1, not a
        multiple of what the model needs (``ModelDefaults.size_multiple``) or given for a data
        set of fixed size; ``seed`` outside [0, 2**32); ``download`` without ``data_root``; a
        device that is not a torch device or not available here. ``FileNotFoundError`` /
        ``NotADirectoryError`` / ``PermissionError``: a ``data_root`` that is not a readable
        folder, an ``out`` that is a file. Every message names the field and the problem
        (``validation.py``); the ``spconv2d`` command prints it and exits with 2."""
        v = validation
        if not isinstance(self.model, str):
            raise TypeError(f"model must be a registered model's name, got {type(self.model).__name__} {self.model!r}")
        if not is_model(self.model):
            raise ValueError(f"unknown model {self.model!r}; registered models: {', '.join(list_models())}")
        md = model_defaults(self.model)
        v.check_choice("data", self.data, DATASETS, what="data set", optional=True)
        info = dataset_info(self.data or md.data)
        task = dataset_info(md.data).task  # a model's task is that of its default data set
        if info.task != task:
            raise ValueError(f"model {self.model!r} does {task} but data set {info.name!r} is {info.task}")
        v.check_int("epochs", self.epochs, 1, optional=True)
        v.check_int("batch_size", self.batch_size, 1, optional=True)
        v.check_real("lr", self.lr, 0, low_open=True, optional=True)
        v.check_real("weight_decay", self.weight_decay, 0, optional=True)
        v.check_density("density", self.density, optional=True)
        v.check_choice("mask_policy", self.mask_policy, POLICIES, what="mask policy", optional=True)
        v.check_size("size", self.size, optional=True)
        if self.size is not None and not info.resizable and tuple(self.size) != info.image_size:
            raise ValueError(f"size {self.size[0]}x{self.size[1]}: data set {info.name!r} has a fixed image size "
                             f"of {info.image_size[0]}x{info.image_size[1]}")
        size = tuple(self.size) if self.size is not None and info.resizable else info.image_size
        v.check_size("size", size, md.size_multiple, who=f"model {self.model!r}")
        v.check_int("num_train", self.num_train, 1, optional=True, why=" (an empty training split)")
        v.check_int("num_val", self.num_val, 1, optional=True, why=" (an empty validation split)")
        v.check_device(self.device)
        v.check_choice("amp", self.amp, AMP_MODES, what="mixed-precision mode")
        v.check_output_folder("out", self.out, optional=True)
        v.check_output_folder("cache_dir", self.cache_dir, optional=True)
        for name in ("resume", "download", "progress", "sync_bn", "augment"):
            v.check_bool(name, getattr(self, name))
        v.check_int("seed", self.seed, 0, 2**32 - 1)
        if self.download:
            if not self.data_root:
                raise ValueError("download needs data_root: the folder to download MNIST into")
            v.check_output_folder("data_root", self.data_root)
        else:
            v.check_input_folder("data_root", self.data_root, optional=True)
        v.check_real("aux_weight", self.aux_weight, 0)
        v.check_real("warmup", self.warmup, 0, 1)
        v.check_int("num_workers", self.num_workers, 0, optional=True)
        v.check_int("num_predictions", self.num_predictions, 0)
        if not isinstance(self.model_kwargs, dict):
            raise TypeError(f"model_kwargs must be a dict, got {type(self.model_kwargs).__name__}")
        return self

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["size"] = list(d["size"]) if d["size"] is not None else None
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        """From ``to_dict()`` output (keys that are no field, e.g. an older run's, are dropped)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    # ---------------------------------------------------------------------------- command line
    @classmethod
    def cli_fields(cls) -> Tuple[dataclasses.Field, ...]:
        """The fields that are ``spconv2d train`` options."""
        return tuple(f for f in dataclasses.fields(cls) if f.metadata.get("cli") is not None)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add one option per ``cli_fields()`` field: ``--field-name`` (or its ``flag``), typed
        from its annotation, defaulting to the field's default (``bool`` fields are switches)."""
        hints = typing.get_type_hints(cls)
        for f in cls.cli_fields():
            meta = dict(f.metadata["cli"])
            flag, positional = meta.pop("flag", None), meta.pop("positional", False)
            hint = hints[f.name]
            args = typing.get_args(hint)
            base = next((a for a in args if a is not type(None)), hint) if typing.get_origin(hint) is typing.Union else hint
            if positional:
                parser.add_argument(f.name, **meta)
                continue
            name = flag or "--" + f.name.replace("_", "-")
            if base is bool:
                parser.add_argument(name, dest=f.name, action="store_false" if f.default else "store_true", **meta)
            elif typing.get_origin(base) is tuple:
                elem = typing.get_args(base)
                parser.add_argument(name, dest=f.name, type=elem[0], nargs=len(elem), default=f.default, **meta)
            else:
                parser.add_argument(name, dest=f.name, type=base, default=f.default, **meta)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainConfig":
        """The config of parsed ``add_arguments`` options."""
        return cls(**{f.name: getattr(args, f.name) for f in cls.cli_fields()})
