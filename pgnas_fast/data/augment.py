"""Batched CIFAR augmentation: a few tensor ops per batch, on whatever device holds the data.

The CIFAR training protocol of pgnas-method.md section 3 (SupNet-M/MI, E/EI): random crop from the
image zero-padded by 4 pixels, horizontal flip, cutout of a 16x16 square. Each step is one or two
batched ops driven by a `torch.Generator` (no per-image Python loop), so on CUDA a resident uint8
set is augmented without leaving the GPU, and on CPU the same code runs in the training process.

Order as in the authors' code (AutoAugment's CIFAR pipeline): normalise first, then pad-crop, flip
and cutout, so the padding and the cutout square are zeros after normalisation, i.e. the mean colour.

Random numbers are drawn on the generator's device and moved to the data's device: a CPU generator
gives the same crops, flips and squares on CPU and on CUDA (through pinned, non-blocking copies); a
CUDA generator keeps the draws on the GPU. Nothing here synchronises the GPU with the host.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..ops.transfer import to_device

# Per-channel statistics of each training set, on the 0..1 scale.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
CIFAR_STATS = {10: (CIFAR10_MEAN, CIFAR10_STD), 100: (CIFAR100_MEAN, CIFAR100_STD)}


_GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: spreads (seed, epoch) pairs over the seed space
_USE_STRIDE = 0xD1B54A32D192ED03  # another odd 64-bit constant: an epoch's uses get far-apart seeds


def epoch_seed(seed: int, epoch: int) -> int:
    """The random seed of one epoch's data order and augmentation: a function of (seed, epoch) only."""
    return (seed + (epoch + 1) * _GOLDEN) % (1 << 63)


ORDER, AUGMENTATION = 0, 1  # the uses of an epoch's generators


def epoch_generator(seed: int, epoch: int, device: str | torch.device = "cpu", use: int = ORDER) -> torch.Generator:
    """A generator of one epoch: a function of (seed, epoch, use) only, so a resumed run redraws the same.
    The order and the augmentation draw from different seeds: one seed in two CPU generators tied every
    image's crop to its position in the epoch."""
    return torch.Generator(device=device).manual_seed((epoch_seed(seed, epoch) + use * _USE_STRIDE) % (1 << 63))


def _randint(high: int, n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    source = generator.device if generator is not None else torch.device("cpu")
    return to_device(torch.randint(high, (n,), generator=generator, device=source), device)


def _uniform(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    source = generator.device if generator is not None else torch.device("cpu")
    return to_device(torch.rand(n, generator=generator, device=source), device)


@functools.lru_cache(maxsize=32)
def _channel_stats(mean: tuple[float, ...], std: tuple[float, ...], scale: float, dtype: torch.dtype,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """mean and std as [1, C, 1, 1] tensors on `device`, made once (not one host copy per batch)."""
    def shaped(values):
        return to_device(torch.tensor(values, dtype=dtype).view(1, -1, 1, 1) * scale, device)

    return shaped(mean), shaped(std)


def normalize(
    images: torch.Tensor,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(x - mean) / std per channel, as `dtype`; uint8 images are read as x / 255, float ones as given."""
    scale = 255.0 if images.dtype == torch.uint8 else 1.0
    mean_t, std_t = _channel_stats(tuple(mean), tuple(std), scale, dtype, images.device)
    return (images.to(dtype) - mean_t) / std_t


def random_crop(images: torch.Tensor, generator: torch.Generator | None, padding: int = 4) -> torch.Tensor:
    """Per image, an H x W window of the image zero-padded by `padding`, at a uniform random offset."""
    n, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    dy = _randint(2 * padding + 1, n, generator, images.device)
    dx = _randint(2 * padding + 1, n, generator, images.device)
    rows = dy[:, None] + torch.arange(h, device=images.device)  # [N, H] rows of `padded` to keep
    cols = dx[:, None] + torch.arange(w, device=images.device)  # [N, W]
    # Two gathers (rows, then columns) keep the index tensors at [N, 1, H, 1]-like sizes.
    out = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * padding))
    return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def random_flip(images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = _uniform(len(images), generator, images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def cutout(images: torch.Tensor, generator: torch.Generator | None, size: int = 16) -> torch.Tensor:
    """Zero one size x size square per image, centred on a uniform random pixel (clipped at the border)."""
    n, _, h, w = images.shape
    top = _randint(h, n, generator, images.device) - size // 2
    left = _randint(w, n, generator, images.device) - size // 2
    ys = torch.arange(h, device=images.device)
    xs = torch.arange(w, device=images.device)
    in_rows = (ys >= top[:, None]) & (ys < top[:, None] + size)  # [N, H]
    in_cols = (xs >= left[:, None]) & (xs < left[:, None] + size)  # [N, W]
    square = in_rows[:, None, :, None] & in_cols[:, None, None, :]  # [N, 1, H, W]
    return images.masked_fill(square, 0)


def augment_batch(
    images: torch.Tensor,
    generator: torch.Generator | None,
    *,
    crop_padding: int = 4,
    flip: bool = True,
    cutout_size: int = 16,
) -> torch.Tensor:
    """The CIFAR training augmentation on a normalised batch: pad-crop, flip, cutout (0 turns a step off)."""
    if crop_padding:
        images = random_crop(images, generator, crop_padding)
    if flip:
        images = random_flip(images, generator)
    if cutout_size:
        images = cutout(images, generator, cutout_size)
    return images
