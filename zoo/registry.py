"""A timm-style model registry.

    from spconv2d.zoo import register_model, create_model, list_models

    @register_model
    def my_net(num_classes=10, **kw):
        return MyNet(num_classes, **kw)

    model = create_model("my_net", num_classes=3)

Every registered entry point is a function returning an ``nn.Module``. Each model carries three
attributes the training loop relies on: ``task`` ("classification" | "segmentation"), ``sparse``
(bool: takes an activity mask) and ``default_data`` (the data set it is meant for).
"""
from __future__ import annotations

import fnmatch
from typing import Callable, Dict, List

import torch.nn as nn

_MODELS: Dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module] | None = None, *, name: str | None = None):
    """Register ``fn`` under ``name`` (default: the function's name). Usable bare or with name=."""

    def deco(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or f.__name__
        if key in _MODELS and _MODELS[key] is not f:
            raise ValueError(f"model {key!r} is already registered")
        _MODELS[key] = f
        return f

    return deco(fn) if fn is not None else deco


def list_models(pattern: str = "*") -> List[str]:
    """Sorted names of the registered models matching the shell-style ``pattern``."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def is_model(name: str) -> bool:
    return name in _MODELS


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    if name not in _MODELS:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return _MODELS[name]


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name``; keyword arguments go to its entry point."""
    model = model_entrypoint(name)(**kwargs)
    model.model_name = name
    return model
