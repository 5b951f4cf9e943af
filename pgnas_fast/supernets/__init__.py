"""Super-networks by name (design.md layer 3): `create(name, **kwargs)`, timm-style registry."""
from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def add(factory):
        _REGISTRY[name] = factory
        return factory

    return add


def names() -> list[str]:
    return sorted(_REGISTRY)


def create(name: str, **kwargs) -> nn.Module:
    if name not in _REGISTRY:
        raise ValueError(f"unknown super-network {name!r}; known: {', '.join(names())}")
    return _REGISTRY[name](**kwargs)


from . import digits  # noqa: E402,F401  (registers its networks)
from . import densenet, enas, resnet, shake_shake  # noqa: E402,F401
