"""Named presets (design.md layer 1): one readable mapping each, validated by one schema.

A run's resolved config is its preset updated by the user's overrides (`--config FILE.json` and the
CLI flags); `resolve` checks every key's type and range and names the offending key on error.
"""
from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from pathlib import Path


class ConfigError(ValueError):
    """A malformed preset override or config file; the message names the key."""


PRESETS: dict[str, dict] = {
    # The embedded default: real data shipped with scikit-learn, a search in about a minute on 2 cores.
    "digits-tiny": {
        "dataset": "digits",
        "test_size": 360,  # about 20 % of the 1797 images, for reporting only
        "heldout_size": 300,  # carved from the training part; ranks the candidates
        "split_seed": 0,  # fixed, so that every search seed sees the same splits
        "supernet": "digits-tiny",
        "supernet_args": {"width": 16, "gate_group_size": 4},
        "p_init": 0.1,
        "tau": 0.2,
        "epochs": 30,
        "batch_size": 64,
        "lr": 0.05,
        # The authors train 1800 epochs; in 30, the drop logits need a larger step (the authors: 1)
        # for the posterior to move: p then spreads from 0.1 and about a fifth of the channels go.
        "p_lr_scale": 30.0,
        "momentum": 0.9,  # Nesterov SGD, cosine schedule to 0, no weight decay (R replaces it)
        "grad_clip": 5.0,  # global gradient-norm clip; 0 disables
        "weight_reg": 10.0,  # l^2, the length-scale squared
        "drop_reg": 1.0,
        "n_train": 0,  # N of the regulariser; 0 means the training split's size
        "candidates": 200,
        "random_baseline": 200,  # random-gate candidates at the guided ones' expected drop rate (paper Table 3)
        "eval_batch_size": 1024,
        # torch intra-op threads (0: torch's default). Tensors this small gain nothing from a second
        # thread, and OpenMP spin-waits make 2 threads ~40x slower when another process wants a core.
        "threads": 1,
    },
}

# key -> (python types, predicate, what the predicate demands)
_POSITIVE_INT = ((int,), lambda v: v > 0, "an int > 0")
_NON_NEGATIVE_INT = ((int,), lambda v: v >= 0, "an int >= 0")
_POSITIVE = ((int, float), lambda v: math.isfinite(v) and v > 0, "a number > 0")
_NON_NEGATIVE = ((int, float), lambda v: math.isfinite(v) and v >= 0, "a number >= 0")
SCHEMA = {
    "dataset": ((str,), lambda v: v in ("digits",), "'digits'"),
    "test_size": _POSITIVE_INT,
    "heldout_size": _POSITIVE_INT,
    "split_seed": _NON_NEGATIVE_INT,
    "supernet": ((str,), lambda v: bool(v), "a super-network name"),
    "supernet_args": ((dict,), lambda v: True, "an object"),
    "p_init": ((int, float), lambda v: 0 < v < 1, "a number in (0, 1)"),
    "tau": _POSITIVE,
    "epochs": _POSITIVE_INT,
    "batch_size": _POSITIVE_INT,
    "lr": _POSITIVE,
    "p_lr_scale": _POSITIVE,
    "momentum": ((int, float), lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "grad_clip": _NON_NEGATIVE,
    "weight_reg": _NON_NEGATIVE,
    "drop_reg": _NON_NEGATIVE,
    "n_train": _NON_NEGATIVE,
    "candidates": _POSITIVE_INT,
    "random_baseline": _NON_NEGATIVE_INT,
    "eval_batch_size": _POSITIVE_INT,
    "threads": _NON_NEGATIVE_INT,
}


def names() -> list[str]:
    return sorted(PRESETS)


def load_overrides(path: str | Path) -> dict:
    """Overrides from a JSON file (an object of preset keys)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {str(path)!r} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a JSON object of preset keys")
    return data


def resolve(preset: str, overrides: Mapping | None = None) -> dict:
    """The preset's mapping with `overrides` applied, validated; raises ConfigError naming the key."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; known presets: {', '.join(names())}")
    config = copy.deepcopy(PRESETS[preset])
    for key, value in (overrides or {}).items():
        if key not in SCHEMA:
            raise ConfigError(f"unknown config key {key!r}; known keys: {', '.join(sorted(SCHEMA))}")
        config[key] = value
    for key, (types, ok, expected) in SCHEMA.items():
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, types) or not ok(value):
            raise ConfigError(f"config key {key!r} must be {expected}, got {value!r}")
    return {"preset": preset, **config}
