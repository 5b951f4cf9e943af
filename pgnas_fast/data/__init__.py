"""Data sets behind the presets. Each loader returns `Splits`: train, held-out (ranking) and test
(reporting only) as tensors, with the held-out split carved from the training part.

ImageNet is too big for tensors: `load_imagenet_index` returns file lists in the same three roles and
`imagenet_loader` decodes them in DataLoader workers. A missing or malformed data directory raises
`DataError` (a ValueError) whose message names the expected layout and where to get the data.
"""
from .augment import (
    CIFAR_STATS,
    augment_batch,
    augmentation_draws,
    cutout,
    epoch_order,
    mirror,
    normalize,
    padded_crop,
    training_inputs,
)
from .cifar import CIFAR_LAYOUTS, CIFAR_URL, load_cifar
from .cifar_loader import CifarTrainSet, cifar_train_loader
from .digits import load_digits
from .errors import DataError
from .imagenet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    IMAGENET_URL,
    ImageFolderDataset,
    ImageNetIndex,
    imagenet_loader,
    load_imagenet_index,
)
from .splits import Splits, carve_heldout, stratified_splits

__all__ = [
    "CIFAR_LAYOUTS",
    "CIFAR_STATS",
    "CIFAR_URL",
    "CifarTrainSet",
    "DataError",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGENET_URL",
    "ImageFolderDataset",
    "ImageNetIndex",
    "Splits",
    "augment_batch",
    "augmentation_draws",
    "carve_heldout",
    "cifar_train_loader",
    "cutout",
    "epoch_order",
    "imagenet_loader",
    "load_cifar",
    "load_digits",
    "load_imagenet_index",
    "mirror",
    "normalize",
    "padded_crop",
    "stratified_splits",
    "training_inputs",
]
