"""Train / held-out / test splits."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..interrupts import interrupts_deferred


@dataclass
class Splits:
    train: tuple[torch.Tensor, torch.Tensor]  # (images, labels)
    heldout: tuple[torch.Tensor, torch.Tensor]  # ranks candidates
    test: tuple[torch.Tensor, torch.Tensor]  # reported only, never used to choose
    num_classes: int
    # how a raw image becomes the network's input, (pixels * scale - mean) / std per channel (input_recipe):
    # what a user of an exported network must do to the images (None: not known, e.g. made-up test data)
    inputs: dict | None = None
    # the name of each label index, where the data set has names (None: unnamed, e.g. CIFAR without its meta file)
    classes: list[str] | None = None

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train[1]), "heldout": len(self.heldout[1]), "test": len(self.test[1])}


def input_recipe(pixels: str, scale: float, mean, std) -> dict:
    """The record of a data set's input transform: `pixels` says what the raw images are, and the
    network reads (pixels * scale - mean[c]) / std[c] in channel c."""
    return {"pixels": pixels, "scale": float(scale), "mean": [float(m) for m in mean], "std": [float(s) for s in std]}


def stratified_splits(labels: np.ndarray, *, test: int, heldout: int, seed: int) -> tuple[np.ndarray, ...]:
    """Index arrays (train, heldout, test): test first, then held-out from the rest, both stratified."""
    with interrupts_deferred():  # (scikit-learn's first import)
        from sklearn.model_selection import train_test_split

    everything = np.arange(len(labels))
    rest, test_idx = train_test_split(everything, test_size=test, stratify=labels, random_state=seed)
    train_idx, heldout_idx = train_test_split(rest, test_size=heldout, stratify=labels[rest], random_state=seed)
    return np.sort(train_idx), np.sort(heldout_idx), np.sort(test_idx)


def carve_heldout(labels: np.ndarray, heldout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted index arrays (train, heldout): `heldout` examples taken from `labels`, stratified, seeded.

    Each class gives floor(count * heldout / n) examples; the few left over go to the classes with the
    largest remainders (ties in a seeded order), so per-class sizes are proportional within one.
    Vectorised (one sort), so it splits ImageNet's 1.28M labels as fast as CIFAR's 50k.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if not 0 <= heldout < n:
        raise ValueError(f"heldout={heldout} must be in [0, {n}): the training set has {n} examples")
    rng = np.random.default_rng(seed)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    exact = counts * heldout / n
    quota = np.floor(exact).astype(np.int64)
    tie_order = rng.permutation(len(counts))
    by_remainder = tie_order[np.argsort(-(exact - quota)[tie_order], kind="stable")]
    quota[by_remainder[: heldout - quota.sum()]] += 1
    # Rank every example inside its class by a random key; the first `quota` of each class are held out.
    order = np.lexsort((rng.random(n), inverse))
    class_start = np.repeat(np.cumsum(counts) - counts, counts)
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - class_start
    is_heldout = rank < quota[inverse]
    return np.flatnonzero(~is_heldout), np.flatnonzero(is_heldout)
