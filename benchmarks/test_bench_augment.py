"""CIFAR training inputs on the CPU: the paper's crop, flip and cutout, with and without AutoAugment's
policy before them (`--set autoaugment=true`), for a batch of 128 (the batched path, TensorFeed's on a
GPU) and for one image (what a DataLoader worker does per image). Run with
`python3 -m pytest benchmarks/test_bench_augment.py --benchmark-only`. Numbers only; nothing here
asserts a time.
"""
from __future__ import annotations

import pytest
import torch

from pgnas_fast.data import CIFAR_STATS, augmentation_draws, training_inputs


@pytest.mark.parametrize("autoaugment", [False, True], ids=["paper", "autoaugment"])
@pytest.mark.parametrize("batch", [128, 1], ids=["batch128", "one-image"])
def test_cifar_training_inputs(benchmark, batch, autoaugment):
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    draws = augmentation_draws(0, 0, batch, autoaugment=autoaugment)
    mean, std = CIFAR_STATS[10]
    out = benchmark(training_inputs, images, draws, mean, std, autoaugment=autoaugment)
    assert out.shape == (batch, 3, 32, 32)
