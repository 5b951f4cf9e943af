"""CIFAR on the CPU: a DataLoader whose workers augment image by image.

On CUDA the training set stays on the GPU as uint8 and `training_inputs` works on whole batches there
(search/feed.py TensorFeed). On the CPU the same law (the AutoAugment policy if asked for, normalise,
then pad-4 random crop, flip, cutout 16) runs per image in DataLoader workers, beside the training
process: each image goes through `training_inputs` as a batch of one with its numbers of the epoch
(`augmentation_draws`: seed, epoch, index), and an epoch visits the images in the order TensorFeed
draws for (seed, epoch), so the batches are TensorFeed's, whatever the number of workers.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .augment import CROP_PADDING, CUTOUT_SIZE, augmentation_draws, epoch_order, training_inputs
from .imagenet import loader_workers


class CifarTrainSet(Dataset):
    """uint8 images [N, 3, H, W] and labels [N] of a run with seed `seed`; item (index, epoch) -> (float32
    [3, H, W] normalised and augmented with the image's numbers of that epoch, int64 label). `autoaugment`
    runs the AutoAugment policy first (data/autoaugment.py)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                 *, seed: int, autoaugment: bool = False, crop_padding: int = CROP_PADDING, flip: bool = True,
                 cutout_size: int = CUTOUT_SIZE):
        if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(labels):
            raise ValueError(f"images must be uint8 [N, C, H, W] with one label each, got {images.dtype} "
                             f"{tuple(images.shape)} and labels {tuple(labels.shape)}")
        self.images, self.labels, self.seed = images.cpu(), labels.cpu(), seed
        self.mean, self.std = tuple(mean), tuple(std)
        self.augmentation = {"autoaugment": autoaugment, "crop_padding": crop_padding, "flip": flip,
                             "cutout_size": cutout_size}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, epoch = item
        draws = augmentation_draws(self.seed, epoch, 1, first=index, autoaugment=self.augmentation["autoaugment"])
        image = training_inputs(self.images[index:index + 1], draws, self.mean, self.std, **self.augmentation)
        return image[0], self.labels[index]


class EpochOrder(Sampler):
    """(index, epoch) of every training image, in the epoch's order for the run's seed (TensorFeed's)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch  # (a set_epoch during the pass changes the next pass, not this one)
        for index in epoch_order(self.seed, epoch, self.n).tolist():
            yield index, epoch


class BatchShares(Sampler):
    """One epoch of `order`'s items cut into global batches of `batch_size` (the last one short), each
    cut to the rows [start, end) = `share(len(batch))` of this data-parallel rank: a rank loads and
    augments only the images it trains on (their numbers depend on (seed, epoch, index) alone)."""

    def __init__(self, order: EpochOrder, batch_size: int, share: Callable[[int], tuple[int, int]]):
        self.order, self.batch_size, self.share = order, batch_size, share

    def set_epoch(self, epoch: int) -> None:
        self.order.set_epoch(epoch)

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        pairs = list(self.order)
        for first in range(0, len(pairs), self.batch_size):
            batch = pairs[first:first + self.batch_size]
            start, end = self.share(len(batch))
            yield batch[start:end]


def cifar_train_loader(images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, seed: int,
                       mean: Sequence[float], std: Sequence[float], workers: int, autoaugment: bool = False,
                       share: Callable[[int], tuple[int, int]] | None = None) -> tuple[DataLoader, Sampler]:
    """(loader, sampler): one epoch of shuffled, augmented training batches per pass, the last one
    short; call sampler.set_epoch(epoch) before a pass. `share` (data parallel: Parallel.rows) keeps
    this rank's rows of every global batch. At most one worker per available core (loader_workers)."""
    workers = loader_workers(workers)
    sampler = EpochOrder(len(labels), seed)
    dataset = CifarTrainSet(images, labels, mean, std, seed=seed, autoaugment=autoaugment)
    if share is None:
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                            persistent_workers=workers > 0)
        return loader, sampler
    shares = BatchShares(sampler, batch_size, share)
    loader = DataLoader(dataset, batch_sampler=shares, num_workers=workers, persistent_workers=workers > 0)
    return loader, shares
