"""The 8x8 handwritten digits that scikit-learn ships (1797 images, 10 classes): real data, offline.

The embedded default of `pgnas-fast search`.
"""
from __future__ import annotations

import numpy as np
import torch

from ..interrupts import interrupts_deferred
from .errors import DataError
from .splits import Splits, input_recipe, stratified_splits

TEST_SIZE = 360  # the default test split: about 20 % of the 1797 images, for reporting only


def load_digits(*, test: int, heldout: int, split_seed: int) -> Splits:
    """Stratified splits of the digits; pixels scaled by the training split's mean and std."""
    with interrupts_deferred():  # (scikit-learn's first import)
        from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = bunch.images.astype(np.float32)[:, None]  # [N, 1, 8, 8], values 0..16
    labels = bunch.target.astype(np.int64)
    classes = len(np.unique(labels))
    if not classes <= test < len(labels) or not classes <= heldout < len(labels) - test - classes:
        raise DataError(f"digits has {len(labels)} images: test_size={test} and heldout_size={heldout} leave no "
                        f"training set or no image of a class in a split (each must be >= {classes}, one per "
                        f"class, and together below {len(labels) - classes})")
    train_idx, heldout_idx, test_idx = stratified_splits(labels, test=test, heldout=heldout, seed=split_seed)
    mean, std = images[train_idx].mean(), images[train_idx].std()

    def part(idx):
        return torch.from_numpy((images[idx] - mean) / std), torch.from_numpy(labels[idx])

    return Splits(train=part(train_idx), heldout=part(heldout_idx), test=part(test_idx), num_classes=classes,
                  inputs=input_recipe("scikit-learn's load_digits().images: 8x8, values 0..16", 1.0, [mean], [std]),
                  classes=[str(label) for label in range(classes)])
