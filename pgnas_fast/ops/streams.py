"""Stream ids of the RNG contract (design.md "RNG contract").

A Philox stream is named by a 64-bit id; the ids below keep the random numbers of different uses
apart, so that a training step, a candidate and a random-baseline candidate never share numbers:

    stream = domain << 56 | major << 16 | layer

`major` is the training step, the candidate id or the epoch (< 2^40), `layer` the gate-layer index (< 2^16).
Seeds and streams travel through torch.library schemas as signed int64, hence the 2^63 limit.
"""
from __future__ import annotations

import enum
import numbers

SEED_LIMIT = 1 << 63
MAJOR_LIMIT = 1 << 40
LAYER_LIMIT = 1 << 16


class Domain(enum.IntEnum):
    TRAIN = 1  # relaxed gates of training step `major`
    CANDIDATE = 2  # hard gates of candidate `major`
    RANDOM_CANDIDATE = 3  # hard gates of the random-sampling baseline (paper Table 3)
    SHAKE = 4  # shake-shake branch weights of training step `major`
    COMPAT = 5  # the drop-in modules' per-call gates
    DROP_PATH = 6  # drop-path decisions of training step `major` (ENAS cells)
    GAUSSIAN = 7  # eps of the Gaussian posterior's local reparameterization, training step `major`
    AUGMENTATION = 8  # CIFAR training augmentation of epoch `major` (element: image index * 5 + draw)
    AUTOAUGMENT = 9  # the AutoAugment policy's numbers of epoch `major` (element: image index * 9 + draw)
    ORDER = 10  # the training images' order in epoch `major` (elements 2 i, 2 i + 1: image i's sort key)
    RACING_TIES = 11  # racing's order among candidates tied at the cut of round `major` (element: candidate id)


_DOMAINS = frozenset(Domain)


def stream_id(domain: Domain, major: int, layer: int = 0) -> int:
    if domain not in _DOMAINS:
        raise ValueError(f"domain must be one of {', '.join(d.name for d in Domain)} (pgnas_fast.ops.Domain), "
                         f"got {domain!r}")
    if not (type(major) is int and type(layer) is int):  # (set_gates calls this per layer per step)
        for name, value in (("major", major), ("layer", layer)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"stream {name} must be an int, got {type(value).__name__}")
        major, layer = int(major), int(layer)
    if not 0 <= major < MAJOR_LIMIT:
        raise ValueError(f"stream major (step or candidate id) must be in [0, 2^40), got {major}")
    if not 0 <= layer < LAYER_LIMIT:
        raise ValueError(f"gate-layer index must be in [0, 2^16), got {layer}")
    return int(domain) << 56 | major << 16 | layer
