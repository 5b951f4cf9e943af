"""Super-networks by name (design.md layer 3): `create(name, **kwargs)`, timm-style registry."""
from __future__ import annotations

import numbers
from collections.abc import Callable

import torch.nn as nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def add(factory):
        _REGISTRY[name] = factory
        return factory

    return add


def check_sizes(network: str, *, lists: tuple[str, ...] = (), **sizes) -> None:
    """Widths and depths of a super-network: ints >= 1, and for the names in `lists` non-empty
    sequences of them (e.g. blocks per stage); a zero would build a network without layers or with
    empty ones."""
    for name, value in sizes.items():
        many = name in lists
        values = list(value) if many and isinstance(value, (list, tuple)) else [value]
        if (many and not isinstance(value, (list, tuple))) or not values or any(
                isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 for v in values):
            expected = "a non-empty list of ints >= 1" if many else "an int >= 1"
            raise ValueError(f"{network}: {name} must be {expected}, got {value!r}")


# The paper super-networks at a few channels and layers, their structure kept (every kind of block and
# gated layer): what the benchmarks' CPU dry runs build, for `create(name, **SMALL_SIZES[name])`.
SMALL_SIZES: dict[str, dict] = {
    "supnet-m": {"k": 1},
    "supnet-mi": {"k": 1, "blocks_per_stage": 1},
    "supnet-e": {"filters": 4, "num_layers": 3},
    "supnet-ei": {"filters": 2, "num_layers": 3},
    "supnet-d121": {"growth": 4, "block_config": (2, 3, 2, 2), "stem_width": 8},
}


def names() -> list[str]:
    return sorted(_REGISTRY)


def create(name: str, **kwargs) -> nn.Module:
    if name not in _REGISTRY:
        raise ValueError(f"unknown super-network {name!r}; known: {', '.join(names())}")
    return _REGISTRY[name](**kwargs)


from . import digits  # noqa: E402,F401  (registers its networks)
from . import densenet, enas, resnet, shake_shake  # noqa: E402,F401
