"""What a search reads: training batches per epoch and evaluation batches per split.

`TensorFeed` keeps a data set resident on the run's device as tensors (digits; CIFAR as uint8, the
airbench habit) and orders each epoch from (seed, epoch) alone, so a resumed run sees the batches
an uninterrupted one would. `prepare_train` (augmentation + normalisation, with a generator seeded
from the same pair) and `prepare_eval` turn stored images into model inputs.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from ..data import Splits

_GOLDEN = 0x9E3779B97F4A7C15
Batch = tuple[torch.Tensor, torch.Tensor]


def epoch_generator(seed: int, epoch: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The random source of one epoch's data order and augmentation: a function of (seed, epoch)."""
    return torch.Generator(device=device).manual_seed((seed + (epoch + 1) * _GOLDEN) % (1 << 63))


class TensorFeed:
    def __init__(self, splits: Splits, *, batch_size: int, eval_batch_size: int, device: torch.device,
                 prepare_train: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
                 prepare_eval: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 max_steps: int | None = None, max_eval_batches: int | None = None):
        self.device = torch.device(device)
        self.splits = {name: tuple(t.to(self.device) for t in getattr(splits, name))
                       for name in ("train", "heldout", "test")}
        self.num_classes = splits.num_classes
        self.n_train = len(self.splits["train"][1])
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.prepare_train = prepare_train or (lambda x, generator: x)
        self.prepare_eval = prepare_eval or (lambda x: x)
        self.max_steps, self.max_eval_batches = max_steps, max_eval_batches

    def steps_per_epoch(self) -> int:
        steps = math.ceil(self.n_train / self.batch_size)
        return steps if self.max_steps is None else min(steps, self.max_steps)

    def train_batches(self, epoch: int, seed: int) -> Iterator[Batch]:
        images, labels = self.splits["train"]
        # the order is drawn on the CPU so that it is the same on every device
        order = torch.randperm(self.n_train, generator=epoch_generator(seed, epoch)).to(self.device)
        generator = epoch_generator(seed, epoch, self.device)  # augmentation
        for i in range(self.steps_per_epoch()):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.prepare_train(images[idx], generator), labels[idx]

    def eval_batches(self, split: str) -> Iterator[Batch]:
        images, labels = self.splits[split]
        for i, start in enumerate(range(0, len(labels), self.eval_batch_size)):
            if self.max_eval_batches is not None and i >= self.max_eval_batches:
                return
            end = start + self.eval_batch_size
            yield self.prepare_eval(images[start:end]), labels[start:end]

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole evaluation split as stored (before `prepare_eval`), cut to the smoke limit."""
        images, labels = self.splits[name]
        if self.max_eval_batches is not None:
            n = self.max_eval_batches * self.eval_batch_size
            images, labels = images[:n], labels[:n]
        return images, labels

    def sizes(self) -> dict[str, int]:
        return {name: len(split[1]) for name, split in self.splits.items()}
