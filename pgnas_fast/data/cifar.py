"""CIFAR-10 and CIFAR-100 from the python-pickle release (`cifar-10-batches-py/`, `cifar-100-python/`).

The images stay uint8 NCHW, as stored, on the device the caller names: 50000 x 3 x 32 x 32 bytes is
150 MB, so on CUDA the whole set lives on the GPU and the search's feed (search/feed.py TensorFeed,
with `augment.training_inputs`) cuts, normalises and augments each batch there (pgnas-method.md
section 3). The held-out split that ranks candidates is carved from the training batches; the test
batch is kept for reporting only.

Nothing is downloaded: a missing or malformed directory raises `DataError` naming the layout and the
page to get it from.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .augment import CIFAR_STATS
from .errors import DataError
from .splits import Splits, carve_heldout, input_recipe

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR release keeps its batches, as unpacked from its `*-python.tar.gz`."""

    name: str
    folder: str
    archive: str
    train_files: tuple[str, ...]
    test_file: str
    label_key: bytes
    meta_file: str  # the class names, as `names_key`: list of bytes (optional here: names are information only)
    names_key: bytes

    def describe(self, data_dir: Path) -> str:
        train = ", ".join(self.train_files)
        return (
            f"expected the {self.name} python version unpacked as {data_dir / self.folder}/ holding "
            f"{train} and {self.test_file} (the folder {self.archive} unpacks to). Get {self.archive} "
            f"from {CIFAR_URL} and unpack it into {data_dir}; pgnas-fast never downloads data."
        )


CIFAR_LAYOUTS = {
    10: CifarLayout(
        name="CIFAR-10",
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_file="test_batch",
        label_key=b"labels",
        meta_file="batches.meta",
        names_key=b"label_names",
    ),
    100: CifarLayout(
        name="CIFAR-100",
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        train_files=("train",),
        test_file="test",
        label_key=b"fine_labels",
        meta_file="meta",
        names_key=b"fine_label_names",
    ),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batch dicts and refuses anything else: a pickle can run arbitrary code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),  # written by numpy 1 (the official files)
        ("numpy._core.multiarray", "_reconstruct"),  # written by numpy 2
        ("numpy.core.numeric", "_frombuffer"),  # pickle protocol 5
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes in protocol 2 pickles written by Python 3
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")
        # numpy 2 renamed numpy.core to numpy._core; load either spelling with the installed numpy.
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = "numpy._core" + module[len("numpy.core"):]
        elif module.startswith("numpy._core") and not hasattr(np, "_core"):
            module = "numpy.core" + module[len("numpy._core"):]
        return super().find_class(module, name)


def _unpickle(path: Path, problem):
    try:
        with open(path, "rb") as f:
            return _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except Exception as e:  # truncated, not a pickle, foreign classes: all mean "not a CIFAR file"
        raise problem(f"{path} is not a readable CIFAR pickle ({type(e).__name__}: {e})") from e


def _read_batch(path: Path, layout: CifarLayout, num_classes: int, problem) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 3, 32, 32], labels int64 [N]) from one batch file, checked."""
    if not path.is_file():
        raise problem(f"missing file {path}")
    batch = _unpickle(path, problem)
    if not isinstance(batch, dict) or b"data" not in batch or layout.label_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise problem(f"{path} holds {keys}, expected a dict with b'data' and {layout.label_key!r}")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise problem(f"{path}: b'data' is {dtype} of shape {shape}, expected uint8 [N, 3072]")
    try:
        raw = np.asarray(batch[layout.label_key])
        labels = raw.astype(np.int64)
        if raw.dtype.kind not in "iub" and not np.array_equal(labels, raw):  # 2.5 would be class 2, silently
            raise ValueError("not whole numbers")
    except (TypeError, ValueError) as e:
        raise problem(f"{path}: {layout.label_key!r} is not a list of integers") from e
    if labels.shape != (len(data),):
        raise problem(f"{path}: {len(data)} images but {layout.label_key!r} has shape {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise problem(f"{path}: labels span [{labels.min()}, {labels.max()}], expected [0, {num_classes})")
    # Each row is the red, green and blue 32x32 planes, row-major: exactly NCHW.
    return data.reshape(-1, 3, 32, 32), labels


def _read_class_names(path: Path, layout: CifarLayout, num_classes: int, problem) -> list[str] | None:
    """Label i's name from the release's meta file; None without the file (the batches suffice)."""
    if not path.is_file():
        return None
    meta = _unpickle(path, problem)
    names = meta.get(layout.names_key) if isinstance(meta, dict) else None
    if (not isinstance(names, list) or len(names) != num_classes
            or not all(isinstance(name, (bytes, str)) for name in names)):
        raise problem(f"{path}: {layout.names_key!r} is not a list of {num_classes} names")
    try:
        return [name.decode() if isinstance(name, bytes) else name for name in names]
    except UnicodeDecodeError as e:
        raise problem(f"{path}: a class name is not UTF-8 ({e})") from e


def _cifar_folder(data_dir: Path, layout: CifarLayout, problem) -> Path:
    if data_dir.name == layout.folder and data_dir.is_dir():  # pointed at the batch folder itself
        return data_dir
    folder = data_dir / layout.folder
    if folder.is_dir():
        return folder
    if not data_dir.is_dir():
        raise problem(f"data directory {data_dir} does not exist")
    if (data_dir / layout.archive).is_file():
        raise problem(f"found {data_dir / layout.archive} still packed: run `tar xzf {layout.archive}` in {data_dir}")
    raise problem(f"{folder} does not exist")


def load_cifar(
    data_dir: str | os.PathLike,
    *,
    num_classes: int = 10,
    heldout: int = 5000,
    split_seed: int = 0,
    device: str | torch.device = "cpu",
) -> Splits:
    """CIFAR-10 or CIFAR-100 as `Splits` of uint8 NCHW images and int64 labels on `device`.

    `heldout` training images (stratified, chosen by `split_seed`) become the held-out split that
    ranks candidates; the rest train; the official test batch is the test split. Raises `DataError`
    when `data_dir` lacks the release's folder or a batch file is missing or malformed.
    """
    if num_classes not in CIFAR_LAYOUTS:
        raise ValueError(f"num_classes={num_classes}: CIFAR has 10 or 100 classes")
    layout = CIFAR_LAYOUTS[num_classes]
    data_dir = Path(data_dir).expanduser()

    def problem(what: str) -> DataError:
        return DataError(f"{layout.name} under {data_dir}: {what}; {layout.describe(data_dir)}")

    folder = _cifar_folder(data_dir, layout, problem)
    parts = [_read_batch(folder / name, layout, num_classes, problem) for name in layout.train_files]
    train_images = np.concatenate([images for images, _ in parts])
    train_labels = np.concatenate([labels for _, labels in parts])
    test_images, test_labels = _read_batch(folder / layout.test_file, layout, num_classes, problem)
    classes = _read_class_names(folder / layout.meta_file, layout, num_classes, problem)
    if not 0 <= heldout < len(train_labels):
        n = len(train_labels)
        raise DataError(f"heldout_size={heldout} must be below {n}: {layout.name} under {data_dir} has {n} training "
                        "images")
    train_idx, heldout_idx = carve_heldout(train_labels, heldout, split_seed)

    def part(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(np.ascontiguousarray(images)).to(device), torch.from_numpy(labels).to(device)

    return Splits(
        train=part(train_images[train_idx], train_labels[train_idx]),
        heldout=part(train_images[heldout_idx], train_labels[heldout_idx]),
        test=part(test_images, test_labels),
        num_classes=num_classes,
        inputs=input_recipe("uint8 RGB, 32x32 (the data set's own images)", 1 / 255, *CIFAR_STATS[num_classes]),
        classes=classes,
    )
