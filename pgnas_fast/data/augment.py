"""Batched CIFAR augmentation: a few tensor ops per batch, on whatever device holds the data.

The CIFAR training protocol of pgnas-method.md section 3 (SupNet-M/MI, E/EI): random crop from the
image zero-padded by 4 pixels, horizontal flip, cutout of a 16x16 square. Each step is one or two
batched ops (no per-image Python loop), so on CUDA a resident uint8 set is augmented without leaving
the GPU.

Order as in the authors' code (AutoAugment's CIFAR pipeline, `training_inputs`): the AutoAugment
policy on the uint8 image when a config asks for it (autoaugment.py), normalise, then pad-crop, flip
and cutout, so the padding and the cutout square are zeros after normalisation, i.e. the mean colour.

Random numbers: every image's five numbers of an epoch come from the RNG contract
(`augmentation_draws`: seed, epoch, the image's index), not from a generator's sequence, so the
batched path on a GPU and the CPU's DataLoader workers, which augment one image at a time, give the
same crops, flips and squares, and a resumed run the same as an uninterrupted one. Nothing here
synchronises the GPU with the host.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..ops import philox_uniform
from ..ops.streams import Domain, stream_id
from ..ops.transfer import to_device
from .autoaugment import POLICY_DRAWS, apply_policy
from .uniforms import uniform_bits, uniform_index

# Per-channel statistics of each training set, on the 0..1 scale.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
CIFAR_STATS = {10: (CIFAR10_MEAN, CIFAR10_STD), 100: (CIFAR100_MEAN, CIFAR100_STD)}
# the paper's crop padding and cutout square (pgnas-method.md section 3)
CROP_PADDING = 4
CUTOUT_SIZE = 16


# Which epoch_order a checkpoint was trained with (search/run.py notes a resume across a change):
# absent: torch's CPU generator, seeded from (seed, epoch); 2: the RNG contract's stream ORDER.
ORDER_VERSION = 2
# The data's random numbers are drawn by whichever backend runs on the device that holds them, not by
# the backend selected for the network's ops: a CUDA search selects triton or cuda, which take no CPU
# tensors, while its epoch order (and a DataLoader worker's draws) are made on the CPU. Every backend
# draws the same bits.
DATA_BACKEND = "auto"


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """int64 [n] on the CPU: the order of the n training images in `epoch`, a permutation from the RNG
    contract (stream (ORDER, epoch), elements 2 i and 2 i + 1: image i's 48-bit sort key), so a resumed run
    redraws it, every machine draws the same, and all 64 bits of the seed count. Sorted stably: the
    rare equal keys (about n^2 / 2^49 pairs) keep index order."""
    u = philox_uniform(2 * n, seed=seed, stream=stream_id(Domain.ORDER, epoch), device="cpu", backend=DATA_BACKEND)
    u = u.view(n, 2)
    bits = uniform_bits(u)
    return torch.argsort((bits[:, 0] << 24) | bits[:, 1], stable=True)


# uniforms per image and epoch: crop row offset, crop column offset, cutout centre row and column, flip
DRAWS = 5


def augmentation_draws(seed: int, epoch: int, count: int, *, first: int = 0, device: str | torch.device = "cpu",
                       autoaugment: bool = False) -> torch.Tensor:
    """float32 [count, DRAWS] (+ POLICY_DRAWS columns with `autoaugment`): the augmentation numbers of
    training images first .. first + count - 1 (their indices in the training split) in `epoch`, from the
    RNG contract (stream (AUGMENTATION, epoch), elements index * DRAWS + j; the policy's from stream
    (AUTOAUGMENT, epoch), elements index * POLICY_DRAWS + j), so they are the same bits on every device and
    backend: the CPU's DataLoader workers, drawing one image at a time, and a GPU's batched pass augment
    alike, and a run with the policy crops, flips and cuts as the same run without it."""
    draws = philox_uniform(count * DRAWS, seed=seed, stream=stream_id(Domain.AUGMENTATION, epoch),
                           offset=first * DRAWS, device=device, backend=DATA_BACKEND).view(count, DRAWS)
    if not autoaugment:
        return draws
    policy = philox_uniform(count * POLICY_DRAWS, seed=seed, stream=stream_id(Domain.AUTOAUGMENT, epoch),
                            offset=first * POLICY_DRAWS, device=device, backend=DATA_BACKEND).view(count, POLICY_DRAWS)
    return torch.cat((draws, policy), 1)


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


@functools.lru_cache(maxsize=32)
def _highs(offsets: int, height: int, width: int, device: torch.device) -> torch.Tensor:
    """The ranges of augment_batch's four integers on `device`, made once (not a host copy per batch)."""
    return to_device(torch.tensor([offsets, offsets, height, width]), device)


def padded_crop(images: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                padding: int = CROP_PADDING) -> torch.Tensor:
    """Per image, the H x W window at offset (rows[i], cols[i]) (each in [0, 2 * padding]) of the image
    zero-padded by `padding`."""
    n, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    keep_rows = rows[:, None] + torch.arange(h, device=images.device)  # [N, H] rows of `padded` to keep
    keep_cols = cols[:, None] + torch.arange(w, device=images.device)  # [N, W]
    # Two gathers (rows, then columns) keep the index tensors at [N, 1, H, 1]-like sizes.
    out = padded.gather(2, keep_rows[:, None, :, None].expand(n, c, h, w + 2 * padding))
    return out.gather(3, keep_cols[:, None, None, :].expand(n, c, h, w))


def mirror(images: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Each image mirrored left-right where flip[i] (bool [N]), else as it is."""
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def cutout(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: int = CUTOUT_SIZE) -> torch.Tensor:
    """Per image, zero the size x size square whose top-left corner is (top[i], left[i]) (it may start
    outside the image: clipped at the border)."""
    _, _, h, w = images.shape
    ys = torch.arange(h, device=images.device)
    xs = torch.arange(w, device=images.device)
    in_rows = (ys >= top[:, None]) & (ys < top[:, None] + size)  # [N, H]
    in_cols = (xs >= left[:, None]) & (xs < left[:, None] + size)  # [N, W]
    square = in_rows[:, None, :, None] & in_cols[:, None, None, :]  # [N, 1, H, W]
    return images.masked_fill(square, 0)


def augment_batch(
    images: torch.Tensor,
    draws: torch.Tensor,
    *,
    crop_padding: int = CROP_PADDING,
    flip: bool = True,
    cutout_size: int = CUTOUT_SIZE,
) -> torch.Tensor:
    """The CIFAR training augmentation on a normalised batch [N, C, H, W], each image with its row of
    `draws` ([N, DRAWS] uniforms, `augmentation_draws`): a random crop of the image padded by
    `crop_padding`, a flip with probability 1/2, cutout of a `cutout_size` square centred on a uniform
    random pixel (0 / False turns a step off)."""
    n, _, h, w = images.shape
    if draws.shape != (n, DRAWS):
        raise ValueError(f"draws must be [{n}, {DRAWS}] (one row of augmentation_draws per image), "
                         f"got {list(draws.shape)}")
    draws = to_device(draws, images.device)
    # the four integers in one op (a DataLoader worker augments one image at a time: each op counts)
    rows, cols, centre_row, centre_col = uniform_index(draws[:, :4], _highs(2 * crop_padding + 1, h, w,
                                                                           images.device)).unbind(1)
    if crop_padding:
        images = padded_crop(images, rows, cols, crop_padding)
    if flip:
        images = mirror(images, draws[:, 4] < 0.5)
    if cutout_size:
        images = cutout(images, centre_row - cutout_size // 2, centre_col - cutout_size // 2, cutout_size)
    return images


def training_inputs(images: torch.Tensor, draws: torch.Tensor, mean: Sequence[float], std: Sequence[float], *,
                    autoaugment: bool = False, crop_padding: int = CROP_PADDING, flip: bool = True,
                    cutout_size: int = CUTOUT_SIZE) -> torch.Tensor:
    """CIFAR training inputs from uint8 images [N, 3, H, W] in the authors' order: with `autoaugment`, the
    AutoAugment policy (its emptied pixels the mean colour), then normalisation, then `augment_batch`.
    `draws`: each image's row of `augmentation_draws` (with the same `autoaugment`)."""
    columns = DRAWS + (POLICY_DRAWS if autoaugment else 0)
    if draws.dim() != 2 or draws.shape[1] != columns:
        raise ValueError(f"draws must be [N, {columns}] (augmentation_draws with autoaugment={autoaugment}), "
                         f"got {list(draws.shape)}")
    empty = None
    if autoaugment:
        images, empty = apply_policy(images, draws[:, DRAWS:])
    inputs = normalize(images, mean, std)
    if empty is not None:
        inputs = inputs.masked_fill(empty, 0)
    return augment_batch(inputs, draws[:, :DRAWS], crop_padding=crop_padding, flip=flip, cutout_size=cutout_size)
