"""Train / held-out / test splits."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Splits:
    train: tuple[torch.Tensor, torch.Tensor]  # (images, labels)
    heldout: tuple[torch.Tensor, torch.Tensor]  # ranks candidates
    test: tuple[torch.Tensor, torch.Tensor]  # reported only, never used to choose
    num_classes: int

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train[1]), "heldout": len(self.heldout[1]), "test": len(self.test[1])}


def stratified_splits(labels: np.ndarray, *, test: int, heldout: int, seed: int) -> tuple[np.ndarray, ...]:
    """Index arrays (train, heldout, test): test first, then held-out from the rest, both stratified."""
    from sklearn.model_selection import train_test_split

    everything = np.arange(len(labels))
    rest, test_idx = train_test_split(everything, test_size=test, stratify=labels, random_state=seed)
    train_idx, heldout_idx = train_test_split(rest, test_size=heldout, stratify=labels[rest], random_state=seed)
    return np.sort(train_idx), np.sort(heldout_idx), np.sort(test_idx)
