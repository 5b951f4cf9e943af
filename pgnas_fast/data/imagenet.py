"""ImageNet (ILSVRC2012) from an ImageFolder tree: `train/<wnid>/*.JPEG` and `val/<wnid>/*.JPEG`; any
other classification tree of that layout too (README "Your own data": any class names and count).

Class indices follow the sorted class-folder names. The held-out split that ranks candidates is carved
from `train/` (stratified, seeded); `val/` is the test split, for reporting only.

Images are decoded by DataLoader workers with Pillow (JPEG draft mode decodes big files at 1/2, 1/4
or 1/8 scale when the crop allows it) and travel as uint8; the batch is normalised with the ImageNet
mean/std on the training device and handed over channels_last. Training: RandomResizedCrop(224,
scale 0.08-1, ratio 3/4-4/3) + horizontal flip (the scale range and the flip are the config's
`data_args` crop_scale and flip: small images of your own lose too much to ImageNet's crops);
evaluation: resize the short side to 256, centre crop 224.

Augmentation randomness is a function of (seed, epoch, image index) only: the sampler sends each
worker the index with its own seed, so results do not depend on the number of workers, persistent
workers, or a resume.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .augment import epoch_order, normalize
from .errors import DataError
from .splits import carve_heldout, input_recipe

IMAGENET_URL = "https://image-net.org/download.php"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".ppm", ".bmp", ".webp", ".tif", ".tiff")
CROP_SCALE = (0.08, 1.0)  # RandomResizedCrop's share of the image's area (ImageNet's, the default)


def imagenet_layout(data_dir: Path) -> str:
    return (
        f"expected an ImageFolder tree {data_dir}/train/<class>/<images> and {data_dir}/val/<class>/<images> "
        f"(one folder per class, the same class folders in train/ and val/; for ILSVRC2012 the WordNet ids, "
        f"the 50000 validation images sorted into them: get it from {IMAGENET_URL}, free registration; "
        f"pgnas-fast never downloads data)"
    )


@dataclass
class ImageNetIndex:
    """File lists and int64 labels of each split; `classes[label]` is the class folder name."""

    classes: list[str]
    train: tuple[list[str], np.ndarray]
    heldout: tuple[list[str], np.ndarray]  # ranks candidates
    val: tuple[list[str], np.ndarray]  # the test split: reported only, never used to choose

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train[0]), "heldout": len(self.heldout[0]), "val": len(self.val[0])}


def _is_image(entry: os.DirEntry) -> bool:
    return entry.is_file() and not entry.name.startswith(".") and entry.name.lower().endswith(IMAGE_EXTENSIONS)


def _scan(root: Path, problem) -> dict[str, list[str]]:
    """{class folder: sorted image paths} under `root`, every class non-empty."""
    if not root.is_dir():
        raise problem(f"{root} does not exist")
    with os.scandir(root) as entries:
        entries = list(entries)
    loose = sum(_is_image(e) for e in entries)
    if loose:
        raise problem(f"{root} holds {loose} images directly; sort them into one folder per class")
    classes = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise problem(f"{root} has no class folders")
    files = {}
    for name in classes:
        with os.scandir(root / name) as entries:
            files[name] = sorted(e.path for e in entries if _is_image(e))
    empty = [name for name in classes if not files[name]]
    if empty:
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise problem(f"{len(empty)} class folder{'s' if len(empty) > 1 else ''} under {root} "
                      f"hold{'' if len(empty) > 1 else 's'} no images ({shown}; read are files directly in a class "
                      f"folder, named *{', *'.join(IMAGE_EXTENSIONS)})")
    return files


def load_imagenet_index(
    data_dir: str | os.PathLike, *, heldout: int = 10000, split_seed: int = 0
) -> ImageNetIndex:
    """Scan `data_dir/train` and `data_dir/val`; carve `heldout` training images (stratified, seeded).

    Raises `DataError` for a missing tree, a class folder without images, loose images in `val/`,
    or class folders that differ between `train/` and `val/`.
    """
    data_dir = Path(data_dir).expanduser()

    def problem(what: str) -> DataError:
        return DataError(f"ImageFolder data (ImageNet's or your own) under {data_dir}: {what}; "
                         f"{imagenet_layout(data_dir)}")

    if not data_dir.is_dir():
        raise problem(f"data directory {data_dir} does not exist")
    train = _scan(data_dir / "train", problem)
    val = _scan(data_dir / "val", problem)
    if sorted(val) != sorted(train):
        missing = sorted(set(train) - set(val))[:5]
        extra = sorted(set(val) - set(train))[:5]
        raise problem(
            f"val/ and train/ have different class folders (only in train/: {missing}, only in val/: {extra})"
        )
    classes = sorted(train)

    def flatten(tree: dict[str, list[str]]) -> tuple[list[str], np.ndarray]:
        files = [path for name in classes for path in tree[name]]
        labels = np.repeat(np.arange(len(classes), dtype=np.int64), [len(tree[name]) for name in classes])
        return files, labels

    train_files, train_labels = flatten(train)
    if not 0 <= heldout < len(train_files):
        raise DataError(f"heldout_size={heldout} must be below {len(train_files)}: {data_dir / 'train'} has "
                        f"{len(train_files)} images")
    train_idx, heldout_idx = carve_heldout(train_labels, heldout, split_seed)
    # a class left without training images is one the network never learns, one without held-out images
    # one the ranking never asks for (carve_heldout takes each class's share in proportion to its images)
    for split, idx in [("training", train_idx)] + ([("held-out", heldout_idx)] if heldout else []):
        missing = [classes[c] for c in np.flatnonzero(np.bincount(train_labels[idx], minlength=len(classes)) == 0)]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            fix = ("lower heldout_size, or add images to those classes" if split == "training" else
                   f"raise heldout_size: at least {len(classes)}, more where classes are small")
            raise DataError(f"heldout_size={heldout} leaves {len(missing)} of the {len(classes)} classes without a "
                            f"{split} image ({shown}): each class needs images in both splits, and the held-out one "
                            f"takes each class's share in proportion to its images in {data_dir / 'train'}; {fix}")
    # train/ is listed class by class: the held-out split in a seeded random order, so that racing's
    # first shares (prefixes of it) hold every class
    heldout_idx = heldout_idx[np.random.default_rng([split_seed, 1]).permutation(len(heldout_idx))]
    return ImageNetIndex(
        classes=classes,
        train=([train_files[i] for i in train_idx], train_labels[train_idx]),
        heldout=([train_files[i] for i in heldout_idx], train_labels[heldout_idx]),
        val=flatten(val),
    )


# ---- transforms (Pillow + torch, one image at a time in a worker) ----


def random_resized_crop_box(
    width: int,
    height: int,
    generator: torch.Generator | None = None,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a crop covering a uniform `scale` fraction of the area, log-uniform aspect `ratio`.

    Ten tries; if none fits inside the image, the largest centred crop whose aspect lies in `ratio`.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u_area, u_ratio, u_left, u_top = torch.rand(4, generator=generator).tolist()
        target = area * (scale[0] + u_area * (scale[1] - scale[0]))
        aspect = math.exp(log_ratio[0] + u_ratio * (log_ratio[1] - log_ratio[0]))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = min(int(u_left * (width - w + 1)), width - w)
            top = min(int(u_top * (height - h + 1)), height - h)
            return left, top, w, h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, min(height, round(width / ratio[0]))
    elif aspect > ratio[1]:
        w, h = min(width, round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


_WIDE_INTEGER_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # 16-bit PNGs and TIFFs open in these


def _eight_bit(image):
    """`image` with 8-bit values: Pillow converts its wide integer modes to RGB by clipping at 255 (a 16-bit
    image would come out white), so their 16-bit values are scaled down; a float image, whose range no file
    states, and integers beyond 16 bits are refused (DataError, named with the file by the dataset)."""
    from PIL import Image

    if image.mode == "F":
        raise DataError("a floating-point image (mode F): save it with 8 or 16 bits per channel")
    if image.mode not in _WIDE_INTEGER_MODES:
        return image
    values = np.asarray(image, dtype=np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise DataError(f"a {image.mode} image with values in [{values.min()}, {values.max()}], beyond 16 bits: save "
                        "it with 8 or 16 bits per channel")
    return Image.fromarray(np.rint(values / 257).astype(np.uint8), mode="L")  # (65535 -> 255)


def _resize_box(image, box: tuple[float, float, float, float], size: int, min_scale: float):
    """`size` x `size` RGB from `box` of the opened (not yet decoded) `image`, bilinear with antialiasing.

    `min_scale` is the box-to-output scale; JPEG draft mode then decodes at the smallest 1/2^k scale
    that still leaves the box at least `size` pixels, which is much faster on large files.
    """
    from PIL import Image

    width, height = image.size
    if min_scale > 1:
        image.draft("RGB", (math.ceil(width / min_scale), math.ceil(height / min_scale)))
    fx, fy = image.size[0] / width, image.size[1] / height  # the decoded scale (1 without draft)
    left, top, right, bottom = box
    image = _eight_bit(image).convert("RGB")
    return image.resize((size, size), Image.Resampling.BILINEAR, box=(left * fx, top * fy, right * fx, bottom * fy))


def load_train_image(
    path: str,
    generator: torch.Generator | None = None,
    size: int = 224,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
) -> torch.Tensor:
    """uint8 [3, size, size]: RandomResizedCrop then (`flip`) a horizontal flip with probability 1/2."""
    from PIL import Image

    with Image.open(path) as image:
        left, top, w, h = random_resized_crop_box(image.size[0], image.size[1], generator, scale, ratio)
        out = _resize_box(image, (left, top, left + w, top + h), size, min(w, h) / size)
    if flip and torch.rand(1, generator=generator).item() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _to_tensor(out)


def eval_resize(size: int) -> int:
    """The short side an evaluation image is resized to before its centre `size` x `size` crop: 256 for 224."""
    return round(size * 256 / 224)


def imagenet_inputs(size: int = 224) -> dict:
    """What a network evaluated at `size` reads (Splits.inputs): the evaluation crop, normalised."""
    pixels = f"uint8 RGB: the short side resized to {eval_resize(size)} (bilinear), the centre {size}x{size} cropped"
    return input_recipe(pixels, 1 / 255, IMAGENET_MEAN, IMAGENET_STD)


def load_eval_image(path: str, size: int = 224, resize: int = 256) -> torch.Tensor:
    """uint8 [3, size, size]: short side resized to `resize`, then the centre `size` x `size`."""
    from PIL import Image

    with Image.open(path) as image:
        width, height = image.size
        # The resized image's size, then the centre crop mapped back to source pixels.
        rw, rh = (resize, int(resize * height / width)) if width <= height else (int(resize * width / height), resize)
        left, top = int(round((rw - size) / 2)), int(round((rh - size) / 2))
        sx, sy = width / rw, height / rh
        box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
        out = _resize_box(image, box, size, min(width / rw, height / rh))
    return _to_tensor(out)


def _to_tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


class ImageFolderDataset(Dataset):
    """(image, label) from file paths: training or evaluation transform, float normalised or uint8.

    An item key is an index, or (index, seed) as `SeededSampler` sends it: the seed then drives that
    image's crop and flip. With a plain index the `generator` given here is used (None: torch's global
    RNG, which DataLoader seeds per worker).
    """

    def __init__(self, files: Sequence[str], labels: Sequence[int] | np.ndarray, *, train: bool,
                 size: int = 224, resize: int = 256, scale: tuple[float, float] = CROP_SCALE,
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True, normalize: bool = True,
                 generator: torch.Generator | None = None):
        if len(files) != len(labels):
            raise ValueError(f"{len(files)} files but {len(labels)} labels")
        # One numpy buffer, not a list of str objects: forked workers reading a list touch every
        # object's refcount and so copy the pages holding 1.28M paths, once per worker.
        self.files = np.array([os.fsencode(f) for f in files], dtype=np.bytes_)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.train, self.size, self.resize, self.scale, self.ratio, self.flip = train, size, resize, scale, ratio, flip
        self.normalize, self.generator = normalize, generator

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        if isinstance(key, tuple):
            index, seed = key
            generator = torch.Generator().manual_seed(seed)
        else:
            index, generator = key, self.generator
        path = os.fsdecode(self.files[index])
        try:
            if self.train:
                image = load_train_image(path, generator, self.size, self.scale, self.ratio, self.flip)
            else:
                image = load_eval_image(path, self.size, self.resize)
        except (OSError, ValueError, SyntaxError) as e:  # what Pillow raises for unreadable files
            raise DataError(f"cannot decode image {path} ({type(e).__name__}: {e})") from e
        if self.normalize:
            image = normalize(image[None], IMAGENET_MEAN, IMAGENET_STD)[0]
        return image, int(self.labels[index])


_GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: spreads (seed, epoch) pairs over the seed space


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed from which an epoch's per-image transform seeds derive (SeededSampler): a function of
    (seed, epoch) only."""
    return (seed + (epoch + 1) * _GOLDEN) % (1 << 63)


class SeededSampler(Sampler):
    """Yields (index, seed) with seed a function of (seed, epoch, index): augmentation that resumes exactly.

    Order: `base` (e.g. feed.RowShareSampler under torchrun) if given, else a permutation seeded by
    (seed, epoch) when shuffling, else 0..n-1. `set_epoch` reaches `base` too.
    """

    def __init__(self, n: int, *, shuffle: bool, seed: int = 0, base: Sampler | None = None):
        self.n, self.shuffle, self.seed, self.base, self.epoch = n, shuffle, seed, base, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base) if self.base is not None else self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        seed_of_epoch = epoch_seed(self.seed, self.epoch)
        if self.base is not None:
            order = iter(self.base)
        elif self.shuffle:
            order = epoch_order(self.seed, self.epoch, self.n).tolist()
        else:
            order = range(self.n)
        for index in order:
            yield int(index), (seed_of_epoch * 10_000_019 + int(index)) % (1 << 62)


class DeviceLoader:
    """Iterates a uint8 DataLoader and hands over float batches on `device`, normalised, channels_last.

    Each pass is one epoch; the epoch counts up by itself, `set_epoch` sets it (resume, DDP).
    """

    def __init__(self, loader: DataLoader, sampler: SeededSampler, device: torch.device,
                 mean: Sequence[float], std: Sequence[float], channels_last: bool):
        self.loader, self.sampler, self.device = loader, sampler, device
        self.mean, self.std, self.channels_last = mean, std, channels_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.set_epoch(self.epoch)
        self.epoch += 1
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        for images, labels in self.loader:
            images = images.to(self.device, non_blocking=True).contiguous(memory_format=memory_format)
            yield normalize(images, self.mean, self.std), labels.to(self.device, non_blocking=True)


def loader_workers(requested: int) -> int:
    """DataLoader workers to start: at most the available cores, since more would only contend with
    training for them (0: batches made in the training process)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(requested, cores)


def imagenet_loader(
    files: Sequence[str],
    labels: Sequence[int] | np.ndarray,
    *,
    train: bool,
    batch_size: int,
    device: str | torch.device = "cpu",
    num_workers: int | None = None,
    seed: int = 0,
    sampler: Sampler | None = None,
    drop_last: bool | None = None,
    channels_last: bool = True,
    size: int = 224,
    resize: int = 256,
    scale: tuple[float, float] = CROP_SCALE,
    flip: bool = True,
    prefetch_factor: int = 4,
) -> DeviceLoader:
    """Batches of (float32 [B, 3, size, size] normalised, channels_last; int64 [B]) on `device`.

    Workers (default 8, never more than the available cores) decode and crop; they stay alive between
    epochs; batches are pinned when `device` is CUDA. `train` shuffles, augments (crops of `scale` of the
    area, flips if `flip`) and by default drops the last partial batch. Under torchrun the search passes
    its RowShareSampler as `sampler` (it then decides the order).
    """
    device = torch.device(device)
    num_workers = loader_workers(8 if num_workers is None else num_workers)
    dataset = ImageFolderDataset(files, labels, train=train, size=size, resize=resize, scale=scale, flip=flip,
                                 normalize=False)
    seeded = SeededSampler(len(dataset), shuffle=train, seed=seed, base=sampler)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=seeded,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        drop_last=train if drop_last is None else drop_last,
        persistent_workers=num_workers > 0,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
    )
    return DeviceLoader(loader, seeded, device, IMAGENET_MEAN, IMAGENET_STD, channels_last)
