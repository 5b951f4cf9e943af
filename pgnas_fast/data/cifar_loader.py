"""CIFAR on the CPU: a DataLoader whose workers augment image by image.

On CUDA the training set stays on the GPU as uint8 and `augment_batch` works on whole batches there
(search/feed.py TensorFeed). On the CPU the same law (normalise, then pad-4 random crop, flip,
cutout 16) runs per image in DataLoader workers, beside the training process: each image goes
through `augment_batch` as a batch of one, with a generator seeded from (seed, epoch, index) by
`SeededSampler`, so a fixed seed reproduces a run whatever the number of workers, and an epoch visits
the images in the order TensorFeed draws for (seed, epoch).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .augment import augment_batch, normalize
from .imagenet import SeededSampler, loader_workers


class CifarTrainSet(Dataset):
    """uint8 images [N, 3, H, W] and labels [N]; item (index, seed) -> (float32 [3, H, W] normalised and
    augmented with a generator seeded by `seed`, int64 label)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                 *, crop_padding: int = 4, flip: bool = True, cutout_size: int = 16):
        if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(labels):
            raise ValueError(f"images must be uint8 [N, C, H, W] with one label each, got {images.dtype} "
                             f"{tuple(images.shape)} and labels {tuple(labels.shape)}")
        self.images, self.labels = images.cpu(), labels.cpu()
        self.mean, self.std = tuple(mean), tuple(std)
        self.crop_padding, self.flip, self.cutout_size = crop_padding, flip, cutout_size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = item
        image = normalize(self.images[index:index + 1], self.mean, self.std)
        image = augment_batch(image, torch.Generator().manual_seed(seed), crop_padding=self.crop_padding,
                              flip=self.flip, cutout_size=self.cutout_size)
        return image[0], self.labels[index]


class BatchShares(Sampler):
    """One epoch of `seeded`'s (index, seed) pairs cut into global batches of `batch_size` (the last one
    short), each cut to the rows [start, end) = `share(len(batch))` of this data-parallel rank: a rank
    loads and augments only the images it trains on (their numbers depend on (seed, epoch, index) alone)."""

    def __init__(self, seeded: SeededSampler, batch_size: int, share: Callable[[int], tuple[int, int]]):
        self.seeded, self.batch_size, self.share = seeded, batch_size, share

    def set_epoch(self, epoch: int) -> None:
        self.seeded.set_epoch(epoch)

    def __len__(self) -> int:
        return math.ceil(len(self.seeded) / self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        pairs = list(self.seeded)
        for first in range(0, len(pairs), self.batch_size):
            batch = pairs[first:first + self.batch_size]
            start, end = self.share(len(batch))
            yield batch[start:end]


def cifar_train_loader(images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, seed: int,
                       mean: Sequence[float], std: Sequence[float], workers: int,
                       share: Callable[[int], tuple[int, int]] | None = None) -> tuple[DataLoader, Sampler]:
    """(loader, sampler): one epoch of shuffled, augmented training batches per pass, the last one
    short; call sampler.set_epoch(epoch) before a pass. `share` (data parallel: Parallel.rows) keeps
    this rank's rows of every global batch. At most one worker per available core (loader_workers)."""
    workers = loader_workers(workers)
    sampler = SeededSampler(len(labels), shuffle=True, seed=seed)
    dataset = CifarTrainSet(images, labels, mean, std)
    if share is None:
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                            persistent_workers=workers > 0)
        return loader, sampler
    shares = BatchShares(sampler, batch_size, share)
    loader = DataLoader(dataset, batch_sampler=shares, num_workers=workers, persistent_workers=workers > 0)
    return loader, shares
