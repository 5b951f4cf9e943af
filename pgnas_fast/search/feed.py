"""What a search reads: training batches per epoch and evaluation batches per split.

`TensorFeed` keeps a data set resident on the run's device as tensors (digits; CIFAR as uint8, the
airbench habit) and orders each epoch from (seed, epoch) alone, so a resumed run sees the batches
an uninterrupted one would. `prepare_train` (normalisation + augmentation, with each image's numbers
of the epoch from the RNG contract) and `prepare_eval` turn stored images into model inputs.
`LoaderFeed` serves ImageNet through DataLoader workers with the same interface, and `CifarLoaderFeed`
CIFAR on the CPU (workers augment image by image: the same batches as TensorFeed's batched path).

Training reads `train_shards(epoch, seed, parallel)`: this rank's rows of every global batch with
the global row of its first example and the global batch's size (parallel.py); a single process
gets whole batches at row 0.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from torch.utils.data import Sampler

from ..configs import ConfigError
from ..data import (ImageNetIndex, Splits, augmentation_draws, cifar_train_loader, epoch_order, imagenet_loader,
                    normalize)
from ..data.imagenet import CROP_SCALE, eval_resize, imagenet_inputs
from ..ops.transfer import to_device
from ..supernets.info import one_image_pass
from .parallel import SINGLE_PROCESS, Parallel

Batch = tuple[torch.Tensor, torch.Tensor]
Shard = tuple[torch.Tensor, torch.Tensor, int, int]  # images, labels, first global row, global batch rows


def check_shards(batch_sizes: list[int], parallel: Parallel, *, train_images: int, batch_size: int) -> None:
    """An epoch has a batch, and every rank gets rows of every batch: the preset's batch divides among
    the ranks, and no (last, short) batch has fewer rows than there are ranks. Raises ConfigError (bad
    input: exit 2)."""
    if not batch_sizes:
        raise ConfigError(f"an epoch has no training batch: the training split's {train_images} image"
                          f"{'s are' if train_images != 1 else ' is'} fewer than batch_size {batch_size} (the "
                          "ImageFolder pipeline drops the last partial batch); lower batch_size or heldout_size")
    if not parallel.enabled:
        return
    if batch_sizes[0] % parallel.world:
        raise ConfigError(f"batch_size {batch_sizes[0]} must be divisible by the world size {parallel.world} "
                          "(torchrun --nproc_per_node x nodes): it is the global batch, split among the ranks")
    if min(batch_sizes) < parallel.world:
        raise ConfigError(f"the last training batch of an epoch has {min(batch_sizes)} rows, fewer than the "
                          f"{parallel.world} ranks; change batch_size or heldout_size so that it has none or more")


def check_batchnorm_rows(model: torch.nn.Module, input_shape: tuple[int, ...], batch_sizes: list[int],
                         parallel: Parallel, *, sync_bn: bool = False) -> None:
    """Every BatchNorm gets at least 2 values per channel from every training batch: the fewest rows a
    process normalises over (all ranks' with sync_bn), times the smallest plane a BatchNorm reads (a
    1x1 map at the end of a deep network), found by one eval forward of one image. Else training would
    stop inside BatchNorm at that batch. Raises ConfigError (bad input: exit 2)."""
    planes = {}  # BatchNorm's name -> values per channel of one image

    def record(name):
        def hook(module, args):  # (a pre-hook returning a value would replace the input)
            planes[name] = args[0][0, 0].numel()
        return hook

    hooks = [m.register_forward_pre_hook(record(name))
             for name, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    try:
        one_image_pass(model, input_shape)
    except (RuntimeError, ValueError) as err:  # e.g. a --set supernet built for other images
        raise ConfigError(f"the super-network does not take this data set's {'x'.join(map(str, input_shape))} "
                          f"images: {err}") from None
    finally:
        for hook in hooks:
            hook.remove()
    rows = min(batch_sizes) if sync_bn else min(batch_sizes) // parallel.world
    if not planes or rows * min(planes.values()) >= 2:
        return
    name = min(planes, key=planes.get)
    who = "a process" if parallel.enabled and not sync_bn else "the network"
    fix = ("raise batch_size or input_size" if min(batch_sizes) == batch_sizes[0] else
           f"change batch_size or heldout_size so that the epoch's last batch (of {batch_sizes[-1]}) is larger")
    raise ConfigError(f"a training batch gives {who} {rows} image(s), and BatchNorm {name!r} reads a "
                      f"{planes[name]}-value map per channel at input_size {input_shape[-1]}: its training statistics "
                      f"need 2 values or more; {fix}")


def checked_recalibration_images(feed: "TensorFeed | LoaderFeed", n: int) -> torch.Tensor:
    """The n training images that `--bn-recalibrate n` recomputes BatchNorm statistics from (rank and
    export read the same ones); refused before any pass when the training split is smaller."""
    available = feed.sizes()["train"]
    if n > available:
        raise ConfigError(f"--bn-recalibrate {n} asks for more images than the run's {available} training images")
    return feed.recalibration_images(n)


class TensorFeed:
    def __init__(self, splits: Splits, *, batch_size: int, eval_batch_size: int, device: torch.device,
                 prepare_train: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 prepare_eval: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 max_steps: int | None = None, max_eval_batches: int | None = None, autoaugment: bool = False):
        self.device = torch.device(device)
        self.splits = {name: tuple(t.to(self.device) for t in getattr(splits, name))
                       for name in ("train", "heldout", "test")}
        self.num_classes, self.inputs, self.classes = splits.num_classes, splits.inputs, splits.classes
        self.n_train = len(self.splits["train"][1])
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.prepare_train = prepare_train  # (images, their augmentation draws) -> model inputs; None: as stored
        self.autoaugment = autoaugment  # the draws carry the AutoAugment policy's columns too
        self.prepare_eval = prepare_eval or (lambda x: x)
        self.max_steps, self.max_eval_batches = max_steps, max_eval_batches

    def steps_per_epoch(self) -> int:
        steps = math.ceil(self.n_train / self.batch_size)
        return steps if self.max_steps is None else min(steps, self.max_steps)

    def train_batch_sizes(self) -> list[int]:
        return [min(self.batch_size, self.n_train - i * self.batch_size) for i in range(self.steps_per_epoch())]

    def train_shards(self, epoch: int, seed: int, parallel: Parallel = SINGLE_PROCESS) -> Iterator[Shard]:
        """Each rank prepares only its rows of every global batch (an image's augmentation depends on
        (seed, epoch, index) alone, not on the batch it is in)."""
        for idx, draws in self._epoch(epoch, seed):
            start, end = parallel.rows(len(idx))
            yield *self._prepared(idx[start:end], None if draws is None else draws[start:end]), start, len(idx)

    def train_batches(self, epoch: int, seed: int) -> Iterator[Batch]:
        for idx, draws in self._epoch(epoch, seed):
            yield self._prepared(idx, draws)

    def _epoch(self, epoch: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Each batch's training-image indices, with their augmentation draws (None: no prepare_train)."""
        order = to_device(epoch_order(seed, epoch, self.n_train), self.device)
        draws = None  # else every image's numbers of the epoch, by index (augment.py)
        if self.prepare_train is not None:
            draws = augmentation_draws(seed, epoch, self.n_train, device=self.device, autoaugment=self.autoaugment)
        for i in range(self.steps_per_epoch()):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield idx, None if draws is None else draws[idx]

    def _prepared(self, idx: torch.Tensor, draws: torch.Tensor | None) -> Batch:
        images, labels = self.splits["train"]
        return (images[idx] if draws is None else self.prepare_train(images[idx], draws)), labels[idx]

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

    def recalibration_images(self, n: int) -> torch.Tensor:
        """The first n training images as model inputs (no augmentation), for BatchNorm recalibration."""
        return self.prepare_eval(self.splits["train"][0][:n])


class CifarLoaderFeed(TensorFeed):
    """CIFAR on the CPU: training batches from DataLoader workers (pgnas_fast.data.cifar_train_loader),
    evaluation as TensorFeed. The same batches as TensorFeed's for (seed, epoch): its order, and each
    image's augmentation from the same numbers (seed, epoch, index)."""

    def __init__(self, splits: Splits, *, seed: int, mean, std, workers: int, batch_size: int, eval_batch_size: int,
                 device: torch.device, max_steps: int | None = None, max_eval_batches: int | None = None,
                 parallel: Parallel = SINGLE_PROCESS, autoaugment: bool = False):
        super().__init__(splits, batch_size=batch_size, eval_batch_size=eval_batch_size, device=device,
                         prepare_eval=lambda images: normalize(images, mean, std), max_steps=max_steps,
                         max_eval_batches=max_eval_batches)
        self.seed, self.parallel = seed, parallel
        self.train_loader, self.sampler = cifar_train_loader(
            *self.splits["train"], batch_size=batch_size, seed=seed, mean=mean, std=std, workers=workers,
            autoaugment=autoaugment, share=parallel.rows if parallel.enabled else None)

    def train_shards(self, epoch: int, seed: int, parallel: Parallel = SINGLE_PROCESS) -> Iterator[Shard]:
        """The workers load and augment this rank's rows only (each image's numbers depend on (seed,
        epoch, index), not on the batch it is in)."""
        if parallel != self.parallel:
            raise ValueError(f"this feed was built for {self.parallel}, not {parallel}")
        for rows, (images, labels) in zip(self.train_batch_sizes(), self.train_batches(epoch, seed)):
            yield images, labels, parallel.rows(rows)[0], rows

    def train_batches(self, epoch: int, seed: int) -> Iterator[Batch]:
        """This rank's rows of every global batch (all of it in a single process)."""
        if seed != self.seed:
            raise ValueError(f"this feed was built for seed {self.seed}, not {seed}")
        self.sampler.set_epoch(epoch)
        for i, (images, labels) in enumerate(self.train_loader):
            if i >= self.steps_per_epoch():
                return
            yield images.to(self.device), labels.to(self.device)


class LoaderFeed:
    """ImageNet: decoding and augmentation in DataLoader workers (pgnas_fast.data.imagenet_loader).

    Evaluation splits for ranking are decoded once into memory (`split`), since every candidate
    reads the same images: float32 [N, 3, 224, 224], about 6 GB for 10,000 held-out images.
    """

    def __init__(self, index: ImageNetIndex, *, seed: int, batch_size: int, eval_batch_size: int,
                 device: torch.device, workers: int, channels_last: bool, input_size: int,
                 crop_scale: tuple[float, float] = CROP_SCALE, flip: bool = True,
                 max_steps: int | None = None, max_eval_batches: int | None = None,
                 parallel: Parallel = SINGLE_PROCESS):
        self.device = torch.device(device)
        self.index, self.seed = index, seed
        self.num_classes, self.classes = index.num_classes, list(index.classes)
        self.inputs = imagenet_inputs(input_size)
        self.n_train = len(index.train[1])
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.max_steps, self.max_eval_batches = max_steps, max_eval_batches
        self.loader_args = dict(device=self.device, num_workers=workers, channels_last=channels_last,
                                size=input_size, resize=eval_resize(input_size))
        self.parallel = parallel
        # data parallel: each rank's workers decode only its rows of every global batch
        share = None if not parallel.enabled else RowShareSampler(self.n_train, seed=seed, batch=batch_size,
                                                                   parallel=parallel)
        check_shards([batch_size], parallel, train_images=self.n_train, batch_size=batch_size)
        self.train_loader = imagenet_loader(*index.train, train=True, batch_size=batch_size // parallel.world,
                                            seed=seed, sampler=share, scale=tuple(crop_scale), flip=flip,
                                            **self.loader_args)
        self.prepare_eval = lambda x: x
        self._splits: dict[str, Batch] = {}

    def steps_per_epoch(self) -> int:
        steps = len(self.train_loader)
        return steps if self.max_steps is None else min(steps, self.max_steps)

    def train_batch_sizes(self) -> list[int]:
        return [self.batch_size] * self.steps_per_epoch()  # the last partial batch is dropped

    def train_shards(self, epoch: int, seed: int, parallel: Parallel = SINGLE_PROCESS) -> Iterator[Shard]:
        if parallel != self.parallel:
            raise ValueError(f"this feed was built for {self.parallel}, not {parallel}")
        start, _ = parallel.rows(self.batch_size)
        for images, labels in self.train_batches(epoch, seed):
            yield images, labels, start, self.batch_size

    def train_batches(self, epoch: int, seed: int) -> Iterator[Batch]:
        """This rank's rows of every global batch (all of it in a single process)."""
        if seed != self.seed:
            raise ValueError(f"this feed was built for seed {self.seed}, not {seed}")
        self.train_loader.set_epoch(epoch)
        for i, batch in enumerate(self.train_loader):
            if i >= self.steps_per_epoch():
                return
            yield batch

    def eval_batches(self, split: str) -> Iterator[Batch]:
        files, labels = getattr(self.index, {"test": "val"}.get(split, split))
        loader = imagenet_loader(files, labels, train=False, batch_size=self.eval_batch_size, **self.loader_args)
        for i, batch in enumerate(loader):
            if self.max_eval_batches is not None and i >= self.max_eval_batches:
                return
            yield batch

    def split(self, name: str) -> Batch:
        if name not in self._splits:
            images, labels = zip(*self.eval_batches(name))
            self._splits[name] = torch.cat(images), torch.cat(labels)
        return self._splits[name]

    def recalibration_images(self, n: int) -> torch.Tensor:
        """n training images (no augmentation) drawn with the run's seed: train/ is listed class by class,
        so its first n would be a class or two."""
        files, labels = self.index.train
        pick = torch.randperm(len(files), generator=torch.Generator().manual_seed(self.seed))[:n].tolist()
        loader = imagenet_loader([files[i] for i in pick], labels[pick], train=False, batch_size=self.eval_batch_size,
                                 **self.loader_args)
        return torch.cat([images for images, _ in loader])

    def sizes(self) -> dict[str, int]:
        return {"train": self.n_train, "heldout": len(self.index.heldout[1]), "test": len(self.index.val[1])}


class RowShareSampler(Sampler):
    """Indices of this rank's rows of every full global batch of `batch` rows, in the order the
    single-process sampler (pgnas_fast.data.imagenet.SeededSampler) shuffles for (seed, epoch)."""

    def __init__(self, n: int, *, seed: int, batch: int, parallel: Parallel):
        self.n, self.seed, self.batch, self.parallel, self.epoch = n, seed, batch, parallel, 0
        self.start, self.end = parallel.rows(batch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (self.n // self.batch) * (self.end - self.start)

    def __iter__(self) -> Iterator[int]:
        order = epoch_order(self.seed, self.epoch, self.n)
        for first in range(0, (self.n // self.batch) * self.batch, self.batch):
            yield from order[first + self.start:first + self.end].tolist()
