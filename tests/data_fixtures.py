"""Small data sets written in the exact standard layouts, for the loader tests and CLI smoke runs.

`write_cifar10`, `write_cifar100`: the python-pickle releases (dicts of uint8 [N, 3072] plus label
lists, written as pickle protocol 2 like the official files). `write_imagenet`: an ImageFolder tree
of random-colour JPEGs of various sizes. Each returns what it wrote, for comparisons.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def _write_batch(path: Path, data: np.ndarray, labels: dict[bytes, list[int]], protocol: int = 2) -> None:
    names = [b"img%d.png" % i for i in range(len(data))]
    batch = {b"batch_label": path.name.encode(), b"data": data, b"filenames": names}
    batch.update(labels)
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=protocol)


def _balanced_labels(rng: np.random.Generator, n: int, num_classes: int) -> np.ndarray:
    """Every class at least n // num_classes times, in random order."""
    every = np.arange(num_classes).repeat(n // num_classes)
    labels = np.concatenate([every, rng.integers(0, num_classes, n % num_classes)])
    return rng.permutation(labels)


def write_cifar10(data_dir: Path, *, per_batch: int = 80, test: int = 60, seed: int = 0) -> dict[str, np.ndarray]:
    """`data_dir/cifar-10-batches-py/` with data_batch_1..5, test_batch and batches.meta."""
    rng = np.random.default_rng(seed)
    folder = Path(data_dir) / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_data = rng.integers(0, 256, (5 * per_batch, 3072), dtype=np.uint8)
    train_labels = _balanced_labels(rng, 5 * per_batch, 10)
    for i in range(5):
        part = slice(i * per_batch, (i + 1) * per_batch)
        _write_batch(folder / f"data_batch_{i + 1}", train_data[part], {b"labels": train_labels[part].tolist()})
    test_data = rng.integers(0, 256, (test, 3072), dtype=np.uint8)
    test_labels = _balanced_labels(rng, test, 10)
    _write_batch(folder / "test_batch", test_data, {b"labels": test_labels.tolist()})
    meta = {b"label_names": [b"class%d" % i for i in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return {"train_data": train_data, "train_labels": train_labels, "test_data": test_data, "test_labels": test_labels}


def write_cifar100(data_dir: Path, *, train: int = 300, test: int = 100, seed: int = 0) -> dict[str, np.ndarray]:
    """`data_dir/cifar-100-python/` with train and test (fine and coarse labels) and meta."""
    rng = np.random.default_rng(seed)
    folder = Path(data_dir) / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for name, n in (("train", train), ("test", test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = _balanced_labels(rng, n, 100)
        _write_batch(folder / name, data, {b"fine_labels": fine.tolist(), b"coarse_labels": (fine // 5).tolist()})
        out[f"{name}_data"], out[f"{name}_labels"] = data, fine
    meta = {b"fine_label_names": [b"fine%d" % i for i in range(100)],
            b"coarse_label_names": [b"coarse%d" % i for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return out


def write_image(path: Path, width: int, height: int, rng: np.random.Generator, mode: str = "RGB") -> None:
    """A random-colour image: a smooth two-colour gradient plus noise (JPEG-friendly, not constant)."""
    from PIL import Image

    a, b = rng.integers(0, 256, (2, 3))
    t = np.linspace(0, 1, width)[None, :, None]
    pixels = a * (1 - t) + b * t + rng.normal(0, 8, (height, width, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert(mode).save(path)


def write_imagenet(
    data_dir: Path, *, classes: tuple[str, ...] = ("n01440764", "n01443537", "n01484850"),
    train_per_class: int = 6, val_per_class: int = 2, seed: int = 0,
) -> dict[str, dict[str, list[Path]]]:
    """`data_dir/train/<wnid>/*.JPEG` and `data_dir/val/<wnid>/*.JPEG`, sizes 40..500 px, one greyscale."""
    rng = np.random.default_rng(seed)
    written: dict[str, dict[str, list[Path]]] = {"train": {}, "val": {}}
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for wnid in classes:
            folder = Path(data_dir) / split / wnid
            folder.mkdir(parents=True)
            paths = []
            for i in range(per_class):
                path = folder / f"{wnid}_{i:05d}.JPEG"
                width, height = rng.integers(40, 500, 2)
                write_image(path, int(width), int(height), rng, mode="L" if i == 1 else "RGB")
                paths.append(path)
            written[split][wnid] = paths
    return written
