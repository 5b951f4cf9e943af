"""The `cpu` backend (C++/OpenMP, pgnas_fast._C) against the `reference` backend on CPU, issue 5's targets.

Run with `python3 -m pytest benchmarks/test_bench_native.py --benchmark-only --benchmark-group-by=func`:
each benchmark runs once per backend, so every group holds the pair to compare. Targets on 2 cores:
gated_apply forward+backward (B 64, C 128, 16x16) at least 2x the reference, the regulariser over a
network's gated weights at least 5x, no op slower. Numbers only; nothing here asserts a time.
"""
from __future__ import annotations

import pytest
import torch

import pgnas_fast as pf
from pgnas_fast.ops.streams import Domain, stream_id

SEED = 1
STREAM = stream_id(Domain.TRAIN, 100, 7)
BATCH, CHANNELS, SIZE = 64, 128, 16
BACKENDS = [
    "reference",
    pytest.param("cpu", marks=pytest.mark.skipif(not pf.backends()["cpu"][0], reason=pf.backends()["cpu"][1])),
]


@pytest.fixture
def activation():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=gen)
    p_logit = torch.randn(CHANNELS, generator=gen)
    dy = torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=gen)
    return x, p_logit, dy


@pytest.mark.parametrize("backend", BACKENDS)
def test_philox_uniform_1m(benchmark, backend):
    u = benchmark(lambda: pf.ops.philox_uniform(1 << 20, seed=SEED, stream=STREAM, backend=backend))
    assert u.shape == (1 << 20,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gate_keep_relaxed(benchmark, activation, backend):
    _, p_logit, _ = activation
    keep = benchmark(lambda: pf.ops.gate_keep(p_logit, BATCH, seed=SEED, stream=STREAM, backend=backend))
    assert keep.shape == (BATCH, CHANNELS)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_gated_apply_forward(benchmark, activation, memory_format, backend):
    x, p_logit, _ = activation
    x = x.contiguous(memory_format=memory_format)
    out = benchmark(lambda: pf.ops.gated_apply(x, p_logit, seed=SEED, stream=STREAM, backend=backend))
    assert out.shape == x.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("mode", ["relaxed", "hard"])
def test_gated_apply_forward_backward(benchmark, activation, mode, memory_format, backend):
    """Issue 5's target: the cpu backend at least 2x the reference (relaxed, NCHW)."""
    x, p_logit, dy = activation
    x = x.contiguous(memory_format=memory_format).requires_grad_()
    dy = dy.contiguous(memory_format=memory_format)
    p_logit = p_logit.clone().requires_grad_()

    def step():
        x.grad = p_logit.grad = None
        pf.ops.gated_apply(x, p_logit, seed=SEED, stream=STREAM, mode=mode, backend=backend).backward(dy)

    benchmark(step)
    assert x.grad is not None and p_logit.grad.shape == (CHANNELS,)


def test_gated_apply_forward_backward_compiled_reference(benchmark, activation):
    """The reference's gated_apply and its backward under torch.compile (relaxed, NCHW): the row to
    read next to test_gated_apply_forward_backward[relaxed-nchw-*]. The first call compiles (about
    25 s here) and is not timed."""
    from pgnas_fast import reference

    x, p_logit, dy = activation
    forward, backward = torch.compile(reference.gated_apply), torch.compile(reference.gated_apply_backward)

    def step():
        out = forward(x, p_logit, SEED, STREAM, 0.2, "relaxed", 0)
        return out, backward(dy, x, p_logit, SEED, STREAM, 0.2, "relaxed", 0)

    step()
    out, (grad_x, grad_p) = benchmark(step)
    torch.testing.assert_close(out, reference.gated_apply(x, p_logit, SEED, STREAM, 0.2, "relaxed", 0))
    assert grad_x.shape == x.shape and grad_p.shape == (CHANNELS,)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_affine_relu_gate_forward_backward(benchmark, activation, memory_format, backend):
    """The fused BN affine -> ReLU -> gate (training), against the reference's unfused torch ops."""
    x, p_logit, dy = activation
    x = x.contiguous(memory_format=memory_format).requires_grad_()
    dy = dy.contiguous(memory_format=memory_format)
    gen = torch.Generator().manual_seed(1)
    scale = (torch.rand(CHANNELS, generator=gen) + 0.5).requires_grad_()
    shift = torch.randn(CHANNELS, generator=gen).requires_grad_()
    p_logit = p_logit.clone().requires_grad_()

    def step():
        x.grad = scale.grad = shift.grad = p_logit.grad = None
        pf.ops.affine_relu_gate(x, scale, shift, p_logit, seed=SEED, stream=STREAM, backend=backend).backward(dy)

    benchmark(step)
    assert x.grad is not None and scale.grad.shape == (CHANNELS,)


@pytest.mark.parametrize("backend, path", [
    pytest.param("cpu", "fused", marks=BACKENDS[1].marks), pytest.param("cpu", "modules", marks=BACKENDS[1].marks),
    ("reference", "modules")])
def test_norm_relu_gated_conv_training_step(benchmark, activation, backend, path):
    """A training-mode BatchNorm -> ReLU -> gated 1x1 conv, forward and backward: `fused` through
    nn.norm_relu_conv (affine_relu_gate, BatchNorm's own backward), `modules` the plain composition
    conv(relu(norm(x))) on the same backend."""
    from pgnas_fast.nn import GatedConv2d, norm_relu_conv, set_gates

    x, _, _ = activation
    x = x.clone().requires_grad_()
    torch.manual_seed(0)
    norm = torch.nn.BatchNorm2d(CHANNELS)
    conv = GatedConv2d(CHANNELS, CHANNELS, 1, bias=False, backend=backend)
    holder = torch.nn.ModuleDict({"norm": norm, "conv": conv})
    set_gates(holder, "relaxed", seed=SEED, step=3)

    def step():
        x.grad = None
        holder.zero_grad(set_to_none=True)
        out = norm_relu_conv(norm, conv, x) if path == "fused" else conv(torch.relu(norm(x)))
        out.sum().backward()

    benchmark(step)
    assert x.grad is not None and conv.p_logit.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_gated_copies_three_branches_forward_backward(benchmark, activation, backend):
    """One input -> 3 gated copies with the ReLU (a multi-branch block's branch inputs), training."""
    x, p_logit, _ = activation
    x = x.clone().requires_grad_()
    p_logits = torch.stack([p_logit, -p_logit, 0.5 * p_logit]).requires_grad_()
    dy = torch.randn(3, *x.shape, generator=torch.Generator().manual_seed(2))

    def step():
        x.grad = p_logits.grad = None
        pf.ops.gated_copies(x, p_logits, seed=SEED, streams=[STREAM, STREAM + 1, STREAM + 2], relu=True,
                            backend=backend).backward(dy)

    benchmark(step)
    assert x.grad is not None and p_logits.grad.shape == (3, CHANNELS)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_example", [True, False], ids=["per_example", "per_branch"])
def test_branch_combine_two_branches_forward_backward(benchmark, activation, per_example, backend):
    x, _, dy = activation
    ys = [x.clone().requires_grad_(), (2 * x).requires_grad_()]
    weights = torch.rand((BATCH, 2) if per_example else (2,), requires_grad=True)

    def step():
        for t in (*ys, weights):
            t.grad = None
        pf.ops.branch_combine(ys, weights, skip=x, backend=backend).backward(dy)

    benchmark(step)
    assert weights.grad is not None


def _network_weights():
    """~50 gated weights of a small CIFAR super-network: 3x3 convs, 1x1 convs, depthwise, a classifier."""
    gen = torch.Generator().manual_seed(1)
    shapes = []
    for width in (64, 128, 256):
        for _ in range(5):
            shapes += [((width, width, 3, 3), width), ((width, width, 1, 1), width), ((width, 1, 3, 3), width)]
    shapes += [((128, 64, 1, 1), 64), ((256, 128, 1, 1), 128), ((256, 128, 3, 3), 128), ((256, 64, 3, 3), 128),
               ((10, 256), 256)]
    weights = [(0.05 * torch.randn(s, generator=gen)).requires_grad_() for s, _ in shapes]
    p_logits = [torch.full((c,), -2.2).requires_grad_() for _, c in shapes]
    return weights, p_logits


@pytest.mark.parametrize("backend", BACKENDS)
def test_regularizer_50_tensors_forward_backward(benchmark, backend):
    weights, p_logits = _network_weights()

    def step():
        for t in (*weights, *p_logits):
            t.grad = None
        pf.ops.regularizer(weights, p_logits, weight_reg=50.0, drop_reg=1.0, n_train=5e5, backend=backend).backward()

    benchmark(step)
    assert all(p.grad is not None for p in p_logits)


@pytest.fixture(scope="module")
def supnet_mi_gated():
    """The issue's case: SupNet-MI's 56 gated weights (72.66M, 290 MB of float32), with one drop logit
    per input channel spread as after posterior training."""
    from pgnas_fast import supernets
    from pgnas_fast.nn import gated_layers

    torch.manual_seed(0)
    layers = [layer for _, layer in gated_layers(supernets.create("supnet-mi", num_classes=10))]
    with torch.no_grad():
        weights = [layer.weight.detach().clone().requires_grad_() for layer in layers]
        p_logits = [(torch.rand(layer.gate_channels) * 4 - 4).requires_grad_() for layer in layers]
    return weights, p_logits


@pytest.mark.parametrize("backend", BACKENDS)
def test_regularizer_supnet_mi_forward_backward(benchmark, supnet_mi_gated, backend):
    weights, p_logits = supnet_mi_gated

    def step():
        for t in (*weights, *p_logits):
            t.grad = None
        pf.ops.regularizer(weights, p_logits, weight_reg=10.0, drop_reg=1.0, n_train=5e4, backend=backend).backward()

    benchmark.pedantic(step, rounds=7, warmup_rounds=1, iterations=1)
    assert all(p.grad is not None for p in p_logits)


# ---- the Gaussian family ------------------------------------------------------------------------
GAUSSIAN_STREAM = stream_id(Domain.GAUSSIAN, 100, 7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_gaussian_noise_forward_backward(benchmark, activation, memory_format, backend):
    """The local-reparameterization epilogue (B 64, C 128, 16x16): target, the cpu backend at least
    1.5x the reference (NCHW)."""
    x, _, dy = activation
    mu = x.clone(memory_format=memory_format).requires_grad_()
    var = (x.square() + 0.1).contiguous(memory_format=memory_format).requires_grad_()
    dy = dy.contiguous(memory_format=memory_format)

    def step():
        mu.grad = var.grad = None
        pf.ops.gaussian_noise(mu, var, seed=SEED, stream=GAUSSIAN_STREAM, backend=backend).backward(dy)

    benchmark(step)
    assert var.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_gaussian_kl_50_tensors_forward_backward(benchmark, backend):
    """The KL over the log alphas of the same ~50 gated layers as the regulariser benchmark."""
    weights, p_logits = _network_weights()
    log_alphas = [torch.full_like(p, -2.0).requires_grad_() for p in p_logits]  # one per input channel
    counts = [w.numel() // p.numel() for w, p in zip(weights, p_logits)]  # weights each channel multiplies

    def step():
        for a in log_alphas:
            a.grad = None
        pf.ops.gaussian_kl(log_alphas, counts, n_train=5e5, backend=backend).backward()

    benchmark(step)
    assert all(a.grad is not None for a in log_alphas)
