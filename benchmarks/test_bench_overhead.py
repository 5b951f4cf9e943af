"""Host time of one op call on tiny tensors: what every call costs before its kernel's work.

On a GPU a small op's kernel (a CIFAR 8x8 activation: 5 us of memory traffic on an H100) takes less
than the host time to launch it, so this time, not the kernel, bounds a training step of small
layers. Each op runs forward and backward on the `cpu` backend two ways: `eager` (`_library.call`,
what pf.ops uses: the op's body through a plain autograd.Function) and `custom_op` (the same
arguments through the torch.library op, what pf.ops used before and what torch.compile sees), next
to `torch`, the same arithmetic in plain torch ops where one exists. Run with
`python3 -m pytest benchmarks/test_bench_overhead.py --benchmark-only --benchmark-warmup=on
--benchmark-min-rounds=300` (without warm-up the first benchmark of the run reads high). Numbers only;
nothing here asserts a time.
"""
from __future__ import annotations

import pytest
import torch

import pgnas_fast as pf
from pgnas_fast.ops import _library

pytestmark = pytest.mark.skipif(not pf.backends()["cpu"][0], reason=pf.backends()["cpu"][1])
PATHS = ["eager", "custom_op"]


def _op(path: str, name: str):
    return (lambda *args: _library.call(name, *args)) if path == "eager" else _library._custom[name]


@pytest.fixture
def tiny():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, 4, 4, generator=gen, requires_grad=True)
    p_logits = torch.randn(2, 16, generator=gen, requires_grad=True)
    return x, p_logits


@pytest.mark.parametrize("path", PATHS)
def test_gated_apply_forward_backward(benchmark, tiny, path):
    x, p_logits = tiny
    op = _op(path, "gated_apply")
    benchmark(lambda: op(x, p_logits[0], 1, 2, 0.2, "relaxed", 0, "cpu").sum().backward())


def test_gated_apply_forward_backward_torch(benchmark, tiny):
    """The plain-torch floor: x times a [B, C] gate tensor, forward and backward."""
    x, p_logits = tiny
    keep = torch.rand(x.shape[0], x.shape[1])
    benchmark(lambda: (x * (keep * p_logits[0].sigmoid())[:, :, None, None]).sum().backward())


@pytest.mark.parametrize("path", PATHS)
def test_gated_copies_and_branch_combine_forward_backward(benchmark, tiny, path):
    """A two-branch block's own ops: one input to two gated copies, then their shake-shake sum."""
    x, p_logits = tiny
    copies, combine = _op(path, "gated_copies"), _op(path, "branch_combine")
    weights = torch.rand(x.shape[0], 2)

    def step():
        ys = copies(x, p_logits, 1, [2, 3], 0.2, "relaxed", 0, True, "cpu")
        combine([ys[0], ys[1]], weights, x, 1 - weights, "cpu").sum().backward()

    benchmark(step)


@pytest.mark.parametrize("path", PATHS)
def test_regularizer_forward_backward(benchmark, path):
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(16, 16, 3, 3, generator=gen, requires_grad=True) for _ in range(4)]
    p_logits = [torch.randn(16, generator=gen, requires_grad=True) for _ in range(4)]
    op = _op(path, "regularizer")
    benchmark(lambda: op(weights, p_logits, 10.0, 1.0, 1e3, "cpu").backward())
