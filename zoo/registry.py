"""A timm-style model registry: each entry point is registered with its training defaults.

    from spconv2d.zoo import ModelDefaults, register_model, create_model, list_models

    @register_model(defaults=ModelDefaults(data="mnist", epochs=5, batch_size=64, lr=1e-3))
    def my_net(num_classes=10, in_chans=1, *, width=32):
        return MyNet(num_classes, in_chans, width)

    model = create_model("my_net", num_classes=3)     # create_model("my_net", depth=2): TypeError
    model_defaults("my_net").epochs                   # 5

Every registered entry point is a function returning an ``nn.Module``; ``create_model`` accepts
only the keyword arguments the entry point names (unknown ones are a ``TypeError`` naming the
accepted ones), and sets ``model.model_name``. A model carries two attributes the training loop
relies on: ``task`` ("classification" | "segmentation") and ``sparse`` (bool: it owns an
activity-mask policy, ``masks.MaskedModel``). Its default data set, epochs, batch size, learning
rate and weight decay are the ``ModelDefaults`` it was registered with; its default mask policy
and density are its entry point's defaults for ``mask_policy`` / ``density``.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import inspect
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch.nn as nn


@dataclass(frozen=True)
class ModelDefaults:
    """A registered model's defaults: what ``TrainConfig.resolved()`` fills in when unset.

    ``data``, ``epochs``, ``batch_size``, ``lr`` (AdamW), ``weight_decay``: as registered (the
    field defaults hold for a model registered without any). ``mask_policy`` / ``density``: read
    from the entry point's signature by ``register_model`` (``None`` for a model that takes no
    such argument, i.e. a dense one); not to be given. ``size_multiple``: a requirement rather
    than a default (timm keeps input sizes in the same config): the image height and width the
    model accepts must be multiples of it (the U-Nets: 4); ``TrainConfig.validate`` checks a
    run's size against it before any data is made."""

    data: str = "mnist"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    mask_policy: Optional[str] = None
    density: Optional[float] = None
    size_multiple: int = 1


@dataclass(frozen=True)
class _Entry:
    fn: Callable[..., nn.Module]
    defaults: ModelDefaults
    kwargs: Tuple[str, ...]  # the keyword arguments fn names
    open_ended: bool         # fn also takes **kwargs


_MODELS: Dict[str, _Entry] = {}


def _signature(fn: Callable) -> Tuple[Tuple[str, ...], bool, Dict[str, object]]:
    """(the names fn takes as keywords, whether it also takes **kwargs, their defaults)."""
    params = inspect.signature(fn).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    named = tuple(p.name for p in params if p.kind in kinds)
    defaults = {p.name: p.default for p in params if p.kind in kinds and p.default is not inspect.Parameter.empty}
    return named, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params), defaults


def register_model(fn: Callable[..., nn.Module] | None = None, *, name: str | None = None,
                   defaults: Union[ModelDefaults, Mapping[str, object], None] = None):
    """Register ``fn`` under ``name`` (default: the function's name) with its training
    ``defaults`` (a ``ModelDefaults`` or a mapping of its fields). Usable bare or with keywords."""
    d = defaults if isinstance(defaults, ModelDefaults) else ModelDefaults(**dict(defaults or {}))
    if d.mask_policy is not None or d.density is not None:
        raise ValueError("ModelDefaults.mask_policy/density come from the entry point's signature; "
                         "give them as its mask_policy=/density= defaults")

    def deco(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or f.__name__
        if key in _MODELS and _MODELS[key].fn is not f:
            raise ValueError(f"model {key!r} is already registered")
        named, open_ended, sig_defaults = _signature(f)
        entry_defaults = dataclasses.replace(d, mask_policy=sig_defaults.get("mask_policy"),
                                             density=sig_defaults.get("density"))
        _MODELS[key] = _Entry(f, entry_defaults, named, open_ended)
        return f

    return deco(fn) if fn is not None else deco


def list_models(pattern: str = "*") -> List[str]:
    """Sorted names of the registered models matching the shell-style ``pattern``."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def is_model(name: str) -> bool:
    return name in _MODELS


def _entry(name: str) -> _Entry:
    if name not in _MODELS:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return _MODELS[name]


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    """The registered function of ``name`` (``KeyError`` naming the registered ones if unknown)."""
    return _entry(name).fn


def model_defaults(name: str) -> ModelDefaults:
    """The defaults ``name`` was registered with (see ``ModelDefaults``)."""
    return _entry(name).defaults


def model_kwargs(name: str) -> Tuple[str, ...]:
    """The keyword arguments the entry point of ``name`` names, in order (an entry point with
    ``**kwargs`` takes others too)."""
    return _entry(name).kwargs


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name``; keyword arguments go to its entry point, which must
    name every one of them (``TypeError`` otherwise, listing what it takes)."""
    entry = _entry(name)
    unknown = [] if entry.open_ended else [k for k in kwargs if k not in entry.kwargs]
    if unknown:
        raise TypeError(f"model {name!r} takes no keyword argument(s) {', '.join(map(repr, unknown))}; "
                        f"it takes: {', '.join(entry.kwargs) or 'none'}")
    model = entry.fn(**kwargs)
    model.model_name = name
    return model


def count_parameters(model: nn.Module) -> int:
    """The number of parameter elements of ``model``."""
    return sum(p.numel() for p in model.parameters())
