"""The fused BN-affine -> ReLU -> gate op (design.md op set, "fused variants") and the modules' fused path.

`affine_relu_gate(x, scale, shift, p_logit, ...)` must equal gated_apply(relu(x * scale + shift), ...)
on every live backend, values and gradients (x, scale, shift, p_logit), in every layout the other
ops take; `norm_relu_conv(norm, conv, x)` must equal conv(relu(norm(x))), running statistics included.
"""
from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pgnas_fast as pf
from pgnas_fast.nn import GatedConv2d, norm_relu_conv, set_gates
from pgnas_fast.ops import dispatch

from conftest import TOLERANCE, DispatchLog, interpreted, rel_err
from test_ops import DATA_DTYPES, SEED, STREAM, broadcast_keep, expected_keep, make_x, size_one_dims_restrided

SHAPES_AND_LAYOUTS = [
    ((3, 7, 5, 5), "contiguous"),
    ((3, 7, 5, 5), "channels_last"),
    ((3, 7, 5, 5), "channel_slice"),
    ((3, 7, 5, 5), "spatial_transpose"),
    ((2, 16, 4, 4), "channels_last"),
    ((1, 1, 1, 1), "contiguous"),
    ((5, 9), "contiguous"),
    ((4, 6, 11), "contiguous"),
]


def affine_inputs(channels: int, gen: torch.Generator, dtype=torch.float32):
    scale = (0.5 + torch.rand(channels, generator=gen)).to(dtype) * torch.where(
        torch.rand(channels, generator=gen) < 0.2, -1.0, 1.0).to(dtype)  # a few negative BN weights
    shift = (0.5 * torch.randn(channels, generator=gen)).to(dtype)
    p_logit = (1.5 * torch.randn(channels, generator=gen)).to(dtype)
    return scale, shift, p_logit


def expected(x, scale, shift, p_logit, *, mode, tau=0.2):
    """relu(x * scale + shift) * keep in float64, differentiable in every input."""
    pre = x.to(torch.float64) * broadcast_keep(scale.to(torch.float64)[None], x) + broadcast_keep(
        shift.to(torch.float64)[None], x)
    return F.relu(pre) * broadcast_keep(expected_keep(p_logit, x.shape[0], mode=mode, tau=tau), x)


@pytest.mark.parametrize("mode", ["relaxed", "hard", "full"])
@pytest.mark.parametrize("dtype", DATA_DTYPES)
@pytest.mark.parametrize("shape, layout", SHAPES_AND_LAYOUTS)
def test_affine_relu_gate_values(backend, shape, layout, dtype, mode):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, layout, mode)).encode()))
    x = make_x(shape, dtype, layout, gen)
    scale, shift, p_logit = affine_inputs(shape[1], gen)
    out = pf.ops.affine_relu_gate(x, scale, shift, p_logit, seed=SEED, stream=STREAM, mode=mode, backend=backend)
    assert out.shape == x.shape and out.dtype == dtype
    assert rel_err(out, expected(x, scale, shift, p_logit, mode=mode)) < TOLERANCE[dtype]
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    if x.numel() > 16:  # the ReLU really cuts: some pre-activations are negative
        assert (out == 0).any() and (out != 0).any()


def test_affine_relu_gate_equals_the_unfused_ops(backend):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 9, 6, 5, generator=gen, dtype=torch.float64)
    scale, shift, p_logit = affine_inputs(9, gen, torch.float64)
    for mode in ("relaxed", "hard", "full"):
        unfused = pf.ops.gated_apply(F.relu(x * scale[:, None, None] + shift[:, None, None]), p_logit, seed=SEED,
                                     stream=STREAM, tau=0.5, mode=mode, backend=backend)
        fused = pf.ops.affine_relu_gate(x, scale, shift, p_logit, seed=SEED, stream=STREAM, tau=0.5, mode=mode,
                                        backend=backend)
        torch.testing.assert_close(fused, unfused, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("mode", ["relaxed", "hard", "full"])
@pytest.mark.parametrize("shape, layout", [((3, 4, 2, 3), "contiguous"), ((2, 5, 3, 3), "channels_last"),
                                           ((4, 3), "contiguous")])
def test_affine_relu_gate_gradcheck(backend, shape, layout, mode):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, layout)).encode()))
    x = make_x(shape, torch.float64, layout, gen).requires_grad_()
    inputs = [t.requires_grad_() for t in affine_inputs(shape[1], gen, torch.float64)]

    def fn(x, scale, shift, p_logit):
        return pf.ops.affine_relu_gate(x, scale, shift, p_logit, seed=SEED, stream=STREAM, tau=0.5, mode=mode,
                                       backend=backend)

    assert torch.autograd.gradcheck(fn, (x, *inputs), fast_mode=interpreted(backend))


@pytest.mark.parametrize("dtype", DATA_DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "channel_slice"])
@pytest.mark.parametrize("mode", ["relaxed", "hard"])
def test_affine_relu_gate_gradients_match_formula(backend, dtype, layout, mode):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((dtype, layout, mode)).encode()))
    x = make_x((3, 6, 5, 7), dtype, layout, gen).requires_grad_()
    scale, shift, p_logit = (t.requires_grad_() for t in affine_inputs(6, gen))
    dy = torch.randn(3, 6, 5, 7, generator=gen).to(dtype)
    out = pf.ops.affine_relu_gate(x, scale, shift, p_logit, seed=SEED, stream=STREAM, mode=mode, backend=backend)
    grads = torch.autograd.grad(out, (x, scale, shift, p_logit), dy)
    leaves = [t.detach().to(torch.float64).requires_grad_() for t in (x, scale, shift, p_logit)]
    want = torch.autograd.grad(expected(*leaves, mode=mode), leaves, dy.to(torch.float64), allow_unused=True)
    for name, got, ref in zip(("x", "scale", "shift", "p_logit"), grads, want):
        ref = torch.zeros_like(got, dtype=torch.float64) if ref is None else ref
        assert got.dtype == (dtype if name == "x" else torch.float32), name
        tolerance = 1e-5 if dtype == torch.float32 or name == "p_logit" and mode == "hard" else 2e-2
        assert rel_err(got, ref) < tolerance, name
    if mode == "hard":
        assert not grads[3].any()


@pytest.mark.parametrize("shape", [(1, 1), (2, 5, 1, 1)])
def test_affine_relu_gate_gradient_whose_size_one_dims_have_other_strides(backend, shape):
    """A dense incoming gradient with other strides than x's in size-1 dims (found by
    tests/test_ops_fuzz.py: x [1, 1], grad strides (2, 1)): the cpu binding raised "grad must have the
    memory layout of x"."""
    gen = torch.Generator().manual_seed(15)
    x = torch.randn(shape, generator=gen).requires_grad_()
    scale, shift, p_logit = (t.requires_grad_() for t in affine_inputs(shape[1], gen))
    dy = size_one_dims_restrided(torch.randn(shape, generator=gen))
    out = pf.ops.affine_relu_gate(x, scale, shift, p_logit, seed=SEED, stream=STREAM, backend=backend)
    grads = torch.autograd.grad(out, (x, scale, shift, p_logit), dy)
    leaves = [t.detach().to(torch.float64).requires_grad_() for t in (x, scale, shift, p_logit)]
    want = torch.autograd.grad(expected(*leaves, mode="relaxed"), leaves, dy.to(torch.float64), allow_unused=True)
    for name, got, ref in zip(("x", "scale", "shift", "p_logit"), grads, want):
        ref = torch.zeros_like(got, dtype=torch.float64) if ref is None else ref
        assert rel_err(got, ref) < 1e-5, name


def test_affine_relu_gate_draws_float32_gates_beside_float64_affine_vectors(backend):
    """float32 p_logit with a float64 shift: the affine map runs in float64 but the gates are drawn in
    float32, as the reference draws them (found by tests/test_ops_fuzz.py: the cpu backend promoted
    p_logit to float64 with scale and shift, so d p_logit was 4.7e-5 off the reference's and, with
    p_logit = logit(1 - u), 2027 of 4096 hard masks differed)."""
    channels = 4096
    u = pf.ops.philox_uniform(channels, seed=SEED, stream=STREAM, backend="reference").double()
    p_logit = torch.log((1.0 - u) / u).float()  # u + p within a float32 rounding of 1
    x = torch.rand(2, channels, generator=torch.Generator().manual_seed(17)) + 0.5
    scale, shift = torch.ones(channels), torch.zeros(channels, dtype=torch.float64)
    for mode in ("hard", "relaxed"):
        outs = [pf.ops.affine_relu_gate(x, scale, shift, p_logit, seed=SEED, stream=STREAM, mode=mode, backend=b)
                for b in (backend, "reference")]
        if mode == "hard":
            assert torch.equal(*outs)
        else:
            assert rel_err(*outs) < 1e-6
    p = p_logit[:8].clone().mul_(0.1).requires_grad_()
    sc, sh = scale[:8].clone().requires_grad_(), shift[:8].clone().requires_grad_()
    grads = [torch.autograd.grad(pf.ops.affine_relu_gate(x[:, :8], sc, sh, p, seed=SEED, stream=STREAM, backend=b).sum(),
                                 (sc, sh, p)) for b in (backend, "reference")]
    for got, want in zip(*grads):
        assert got.dtype == want.dtype and rel_err(got, want) < 1e-5


def test_affine_relu_gate_computes_in_float64_when_only_the_shift_is(backend):
    """Any float64 input makes the affine map float64 (triton left the shift out of that choice: a
    shift of 1e-9 - 1 on x = 1 gave 0 instead of 1e-9, and dx 0 instead of 1)."""
    x = (torch.rand(2, 3, 2, 2, generator=torch.Generator().manual_seed(5)) + 0.5).requires_grad_()
    scale = torch.ones(3, requires_grad=True)
    shift = (-x.detach().amin((0, 2, 3)).double() + 1e-9).requires_grad_()  # pre of 1e-9 where x is least
    p_logit = torch.zeros(3, requires_grad=True)
    results = []
    for b in (backend, "reference"):
        out = pf.ops.affine_relu_gate(x, scale, shift, p_logit, seed=SEED, stream=STREAM, mode="full", backend=b)
        results.append((out, *torch.autograd.grad(out, (x, scale, shift, p_logit), torch.ones_like(out))))
    for got, want in zip(*results):
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert (results[0][0] > 0).all()  # the least x of each channel too: 1e-9 in float64, 0 in float32


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_affine_relu_gate_backward_is_zero_where_the_relu_is_off_even_at_infinity(backend, layout):
    """Where the ReLU is off, d x is 0 whatever the upstream gradient is, and x = -inf adds 0 to
    d p_logit, as the reference's where and relu give (the cpu backend multiplied by the ReLU's 0 or
    1: 0 * inf = NaN)."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 5, 3, 3, generator=gen)
    dy = torch.randn(2, 5, 3, 3, generator=gen)
    x_inf = x.clone()
    x_inf[0, 1, 0, 0], x_inf[1, 3, 2, 1] = -float("inf"), -float("inf")
    dy_inf = dy.clone()
    dy_inf[x < 0] = dy[x < 0].sign() * float("inf")  # where the ReLU is off
    scale, shift, p_logit = torch.ones(5), torch.zeros(5), torch.randn(5, generator=gen)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    for inputs, upstream, finite in ((x_inf, dy, (0, 1)), (x, dy_inf, (0,))):  # d p_logit: sum of inf * 0 there
        grads = []
        for b in (backend, "reference"):
            leaves = [inputs.contiguous(memory_format=memory_format).requires_grad_(), p_logit.clone().requires_grad_()]
            out = pf.ops.affine_relu_gate(leaves[0], scale, shift, leaves[1], seed=SEED, stream=STREAM, backend=b)
            grads.append(torch.autograd.grad(out, leaves, upstream.contiguous(memory_format=memory_format)))
        for index in finite:
            got, want = grads[0][index], grads[1][index]
            assert torch.isfinite(want).all()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


def test_the_fused_relus_pass_no_gradient_at_exactly_zero(backend):
    """torch's relu convention on every backend, the reference (the oracle) included: an input at 0, or
    an affine map landing exactly on 0, passes no gradient (x >= 0 there would pass dy)."""
    x = torch.tensor([[0.0, 1.0, -1.0, 0.0, 0.5, 0.5]]).repeat(2, 1)
    leaf = x.clone().requires_grad_()
    out = pf.ops.gated_copies(leaf, torch.zeros(2, 6), seed=SEED, streams=COPY_STREAMS[:2], mode="full", relu=True,
                              backend=backend)
    dy = torch.arange(1.0, 1.0 + out.numel()).view_as(out)
    (dx,) = torch.autograd.grad(out, leaf, dy)
    torch.testing.assert_close(dx, dy.sum(0) * (x > 0), rtol=0, atol=0)
    # scale 2, shift -1: x = 0.5 lands exactly on 0, x = 0 and -1 below it
    leaves = [x.clone().requires_grad_(), torch.full((6,), 2.0, requires_grad=True),
              torch.full((6,), -1.0, requires_grad=True)]
    out = pf.ops.affine_relu_gate(*leaves, torch.zeros(6), seed=SEED, stream=STREAM, mode="full", backend=backend)
    dy = torch.arange(1.0, 1.0 + out.numel()).view_as(out)
    dx, dscale, dshift = torch.autograd.grad(out, leaves, dy)
    on = (2 * x - 1 > 0).to(dy.dtype)
    torch.testing.assert_close(dx, 2 * dy * on, rtol=0, atol=0)
    torch.testing.assert_close(dscale, (dy * on * x).sum(0), rtol=0, atol=0)
    torch.testing.assert_close(dshift, (dy * on).sum(0), rtol=0, atol=0)


@pytest.mark.parametrize("relu_copies", [False, True])
def test_a_nan_input_stays_nan_through_the_fused_relu(backend, relu_copies):
    """torch.relu keeps NaN; so must every backend's fused ReLU, forward and the d p_logit sums (a
    diverged run must not look finite on one backend: CUDA's max() turned NaN into 0)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 3, 3, generator=gen)
    x[1, 2, 0, 1] = float("nan")
    dy = torch.randn(2, 4, 3, 3, generator=gen)
    results = []
    for b in (backend, "reference"):
        xl = x.clone().requires_grad_()
        if relu_copies:
            p = torch.randn(2, 4, generator=torch.Generator().manual_seed(4)).requires_grad_()
            out = pf.ops.gated_copies(xl, p, seed=SEED, streams=[STREAM, STREAM + 1], relu=True, backend=b)
            grads = torch.autograd.grad(out, (xl, p), torch.stack([dy, dy]))
        else:
            p = torch.randn(4, generator=torch.Generator().manual_seed(4)).requires_grad_()
            out = pf.ops.affine_relu_gate(xl, torch.ones(4), torch.zeros(4), p, seed=SEED, stream=STREAM, backend=b)
            grads = torch.autograd.grad(out, (xl, p), dy)
        results.append((out, *grads))
    for name, got, want in zip(("out", "d x", "d p_logit"), *results):
        assert torch.isnan(want).any() == (name != "d x"), name  # d x: relu'(NaN) = 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, equal_nan=True, msg=name)


def test_affine_relu_gate_rejects_bad_input():
    x, v = torch.randn(3, 7, 5, 5), torch.randn(7)
    cases = [
        (lambda: pf.ops.affine_relu_gate(x, torch.randn(6), v, v, seed=0, stream=0), ValueError,
         r"scale must have shape \[7\]"),
        (lambda: pf.ops.affine_relu_gate(x, v, v.half(), v, seed=0, stream=0), TypeError, "shift must have dtype"),
        (lambda: pf.ops.affine_relu_gate(x, v, v, v.view(1, 7), seed=0, stream=0), ValueError, "p_logit must be 1-D"),
        (lambda: pf.ops.affine_relu_gate(x.long(), v, v, v, seed=0, stream=0), TypeError, r"\bx must have dtype"),
        (lambda: pf.ops.affine_relu_gate(x, v, v, v, seed=0, stream=0, mode="soft"), ValueError, "mode"),
        (lambda: pf.ops.affine_relu_gate(x, v, v, v, seed=-1, stream=0), ValueError, "seed"),
        (lambda: pf.ops.affine_relu_gate(x, v, v, v, seed=0, stream=0, tau=0.0), ValueError, "tau"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()


# ---- the modules' fused path ----------------------------------------------------------------------
def _fused_backends() -> list[str]:
    from conftest import BACKENDS_UNDER_TEST
    return [b for b in BACKENDS_UNDER_TEST if b != "reference" and "affine_relu_gate" not in dispatch.missing_ops(b)]


def _pair(channels: int, out_channels: int, backend: str | None, seed: int):
    torch.manual_seed(seed)
    norm = nn.BatchNorm2d(channels)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_(0.0, 0.3)
        norm.running_mean.normal_(0.0, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
    conv = GatedConv2d(channels, out_channels, 3, padding=1, bias=False, gate_groups=2, p_init=0.3, backend=backend)
    return norm, conv


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_norm_relu_conv_fused_equals_the_module_composition(training, momentum):
    backends = _fused_backends()
    if not backends:
        pytest.skip("no live backend implements affine_relu_gate natively")
    for backend in backends:
        fused_pair, plain_pair = _pair(6, 5, backend, 0), _pair(6, 5, backend, 0)
        x = torch.randn(4, 6, 7, 7, generator=torch.Generator().manual_seed(1)) * 2 + 0.5
        grads, outs = [], []
        for norm, conv in (fused_pair, plain_pair):
            norm.momentum = momentum
            norm.train(training)
            holder = nn.Module()
            holder.norm, holder.conv = norm, conv
            set_gates(holder, "relaxed", seed=SEED, step=3)
            xi = x.clone().requires_grad_()
            if conv is fused_pair[1]:
                out = norm_relu_conv(norm, conv, xi)
            else:
                out = conv(F.relu(norm(xi)))
            out.backward(torch.cos(out.detach()))
            outs.append(out)
            grads.append([xi.grad, norm.weight.grad, norm.bias.grad, conv.weight.grad, conv.p_logit.grad])
        assert rel_err(outs[0], outs[1]) < 1e-5, backend
        for name, a, b in zip(("x", "bn weight", "bn bias", "conv weight", "p_logit"), *grads):
            assert rel_err(a, b) < 1e-4, (backend, name)
        for stat in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(fused_pair[0], stat), getattr(plain_pair[0], stat), rtol=1e-5,
                                       atol=1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_norm_relu_conv_with_a_batchnorm_that_keeps_no_statistics_uses_the_batch_s(training):
    """BatchNorm2d(track_running_stats=False) normalises by the batch's statistics in eval mode too."""
    backends = _fused_backends()
    if not backends:
        pytest.skip("no live backend implements affine_relu_gate natively")
    for backend in backends:
        x = torch.randn(3, 6, 5, 5, generator=torch.Generator().manual_seed(2)) * 1.5 - 0.3
        results = []
        for fused in (True, False):
            torch.manual_seed(4)
            norm = nn.BatchNorm2d(6, track_running_stats=False).train(training)
            with torch.no_grad():
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.normal_(0.0, 0.3)
            conv = GatedConv2d(6, 4, 3, padding=1, bias=False, gate_groups=3, p_init=0.3, backend=backend)
            holder = nn.Module()
            holder.norm, holder.conv = norm, conv
            set_gates(holder, "relaxed", seed=SEED, step=5)
            xi = x.clone().requires_grad_()
            out = norm_relu_conv(norm, conv, xi) if fused else conv(F.relu(norm(xi)))
            out.backward(torch.sin(out.detach()))
            results.append((out, xi.grad, norm.weight.grad, conv.p_logit.grad))
        assert rel_err(results[0][0], results[1][0]) < 1e-5, backend
        for name, a, b in zip(("x", "bn weight", "p_logit"), results[0][1:], results[1][1:]):
            assert rel_err(a, b) < 1e-4, (backend, name)


def test_norm_relu_conv_in_training_has_first_derivatives_only():
    """The fused training path's backward is a kernel plus BatchNorm's statistics: with create_graph=True
    its first derivatives are the usual ones, and differentiating them again raises, whichever input
    (before, the kernel's share of a second derivative was left out silently)."""
    backends = _fused_backends()
    if not backends:
        pytest.skip("no live backend implements affine_relu_gate natively")
    for backend in backends:
        norm, conv = _pair(6, 5, backend, 0)
        holder = nn.Module()
        holder.norm, holder.conv = norm, conv
        x = (torch.randn(4, 6, 7, 7, generator=torch.Generator().manual_seed(3)) * 2 + 0.5).requires_grad_()
        leaves = [x, norm.weight, norm.bias, conv.p_logit]
        firsts = []
        for create_graph in (False, True):
            set_gates(holder, "relaxed", seed=SEED, step=3)
            out = norm_relu_conv(norm, conv, x)
            firsts.append(torch.autograd.grad((out * torch.cos(out.detach())).sum(), leaves, create_graph=create_graph))
        for plain, graphed in zip(*firsts):
            assert torch.equal(plain, graphed.detach()), backend
        for g in firsts[1]:
            for leaf in leaves:
                with pytest.raises(RuntimeError, match="affine_relu_gate has no second derivative"):
                    torch.autograd.grad(g.sum(), leaf, retain_graph=True, allow_unused=True)


def test_norm_relu_conv_takes_the_fused_op_only_for_relaxed_concrete_gates(monkeypatch):
    backends = _fused_backends()
    if not backends:
        pytest.skip("no live backend implements affine_relu_gate natively")
    calls = []
    real = pf.ops.affine_relu_gate
    monkeypatch.setattr(pf.ops, "affine_relu_gate", lambda *a, **k: calls.append(1) or real(*a, **k))
    norm, conv = _pair(4, 3, backends[0], 2)
    holder = nn.Module()
    holder.norm, holder.conv = norm, conv
    x = torch.randn(2, 4, 5, 5)
    set_gates(holder, "relaxed", seed=1, step=0)
    norm_relu_conv(norm, conv, x)
    assert len(calls) == 1
    for mode, kwargs in (("hard", dict(candidate=4)), ("full", {})):
        set_gates(holder, mode, seed=1, **kwargs)
        want = conv(F.relu(norm(x)))
        torch.testing.assert_close(norm_relu_conv(norm, conv, x), want)
    assert len(calls) == 1
    conv.backend = "reference"  # the reference backend keeps the plain composition
    set_gates(holder, "relaxed", seed=1, step=0)
    norm_relu_conv(norm, conv, x)
    assert len(calls) == 1


def test_fused_supernet_layers_match_the_unfused_path():
    """A D-121 dense layer and a shake-shake branch train the same with the fused path on or off."""
    backends = _fused_backends()
    if not backends:
        pytest.skip("no live backend implements affine_relu_gate natively")
    from pgnas_fast.supernets.densenet import DenseLayer
    from pgnas_fast.supernets.shake_shake import ShakeBranch

    for make, shape in ((lambda kw: DenseLayer([8, 4], 4, 2, kw), (3, 12, 6, 6)),
                        (lambda kw: ShakeBranch(6, 6, 1, kw), (3, 6, 6, 6))):
        results = []
        for backend in (backends[0], "reference"):
            torch.manual_seed(0)
            layer = make(dict(p_init=0.2, tau=0.2, backend=backend)).double()  # float64: exact math, no rounding
            layer.train()
            set_gates(layer, "relaxed", seed=5, step=7)
            x = torch.randn(shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64).requires_grad_()
            out = layer(x)
            out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(6), dtype=out.dtype))
            results.append((out.detach(), x.grad, [p.grad for p in layer.parameters()]))
        (out_f, gx_f, gp_f), (out_r, gx_r, gp_r) = results
        assert rel_err(out_f, out_r) < 1e-6  # gates drawn in float32 from float32 p_logit, data in float64
        assert rel_err(gx_f, gx_r) < 1e-6
        for a, b in zip(gp_f, gp_r):
            assert rel_err(a, b) < 1e-6


# ---- one input -> S gated copies --------------------------------------------------------------------
COPY_STREAMS = [STREAM, STREAM + 1, (1 << 62) + 5]


def expected_copies(x, p_logits, *, mode, relu, tau=0.2, streams=COPY_STREAMS, offset=0):
    """[S, *x.shape] in float64: gated copies of relu(x) (or x), copy s with stream s."""
    src = F.relu(x.to(torch.float64)) if relu else x.to(torch.float64)
    rows = []
    for s, stream in enumerate(streams):
        keep = expected_keep(p_logits[s], x.shape[0] + offset // x.shape[1], stream=stream, mode=mode, tau=tau)
        rows.append(src * broadcast_keep(keep[offset // x.shape[1]:], x))
    return torch.stack(rows)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("mode", ["relaxed", "hard", "full"])
@pytest.mark.parametrize("dtype", DATA_DTYPES)
@pytest.mark.parametrize("shape, layout", SHAPES_AND_LAYOUTS)
def test_gated_copies_values(backend, shape, layout, dtype, mode, relu):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, layout, mode, relu)).encode()))
    x = make_x(shape, dtype, layout, gen)
    p_logits = 1.5 * torch.randn(3, shape[1], generator=gen)
    offset = 2 * shape[1]  # rows 2.. of a larger batch
    out = pf.ops.gated_copies(x, p_logits, seed=SEED, streams=COPY_STREAMS, mode=mode, relu=relu, offset=offset,
                              backend=backend)
    assert out.shape == (3, *x.shape) and out.dtype == dtype
    assert rel_err(out, expected_copies(x, p_logits, mode=mode, relu=relu, offset=offset)) < TOLERANCE[dtype]
    if layout == "channels_last":
        assert all(copy.is_contiguous(memory_format=torch.channels_last) for copy in out)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("mode", ["relaxed", "hard"])
@pytest.mark.parametrize("shape, layout", [((3, 4, 2, 3), "contiguous"), ((2, 5, 3, 3), "channels_last"),
                                           ((4, 3), "contiguous")])
def test_gated_copies_gradcheck(backend, shape, layout, mode, relu):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, layout)).encode()))
    x = make_x(shape, torch.float64, layout, gen)
    x = (x + 0.05 * torch.sign(x)).requires_grad_()  # no value within gradcheck's step of the ReLU's kink
    p_logits = torch.randn(2, shape[1], generator=gen, dtype=torch.float64).requires_grad_()

    def fn(x, p_logits):
        return pf.ops.gated_copies(x, p_logits, seed=SEED, streams=COPY_STREAMS[:2], tau=0.5, mode=mode, relu=relu,
                                   backend=backend)

    assert torch.autograd.gradcheck(fn, (x, p_logits), fast_mode=interpreted(backend))


@pytest.mark.parametrize("dtype", DATA_DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "channel_slice"])
def test_gated_copies_gradients_match_formula(backend, dtype, layout):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((dtype, layout)).encode()))
    x = make_x((3, 6, 5, 7), dtype, layout, gen).requires_grad_()
    p_logits = torch.randn(3, 6, generator=gen).requires_grad_()
    out = pf.ops.gated_copies(x, p_logits, seed=SEED, streams=COPY_STREAMS, relu=True, backend=backend)
    dy = torch.randn(out.shape, generator=gen).to(dtype)
    grads = torch.autograd.grad(out, (x, p_logits), dy)
    leaves = [t.detach().to(torch.float64).requires_grad_() for t in (x, p_logits)]
    want = torch.autograd.grad(expected_copies(*leaves, mode="relaxed", relu=True), leaves, dy.to(torch.float64))
    assert rel_err(grads[0], want[0]) < (1e-5 if dtype == torch.float32 else 2e-2)
    assert rel_err(grads[1], want[1]) < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape, layout", [((2, 3, 17, 17), "contiguous"), ((2, 300, 1, 3), "channels_last")])
def test_gated_copies_gradients_of_long_rows(backend, shape, layout, relu):
    """Rows longer than a kernel's tile (the cpu backend walks 256 at a time: NCHW 289 elements per
    (b, c), NHWC 300 channels per (b, s)): the gradients stay the formula's across tile boundaries."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, layout, relu)).encode()))
    x = make_x(shape, torch.float32, layout, gen).requires_grad_()
    p_logits = torch.randn(3, shape[1], generator=gen).requires_grad_()
    out = pf.ops.gated_copies(x, p_logits, seed=SEED, streams=COPY_STREAMS, relu=relu, backend=backend)
    dy = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad(out, (x, p_logits), dy)
    leaves = [t.detach().to(torch.float64).requires_grad_() for t in (x, p_logits)]
    want = torch.autograd.grad(expected_copies(*leaves, mode="relaxed", relu=relu), leaves, dy.to(torch.float64))
    assert rel_err(grads[0], want[0]) < 1e-5
    assert rel_err(grads[1], want[1]) < 1e-5


def test_gated_copies_rejects_bad_input():
    x, p = torch.randn(3, 7, 5, 5), torch.randn(2, 7)
    cases = [
        (lambda: pf.ops.gated_copies(x, p, seed=0, streams=[1]), ValueError, r"p_logits must have shape \[1, 7\]"),
        (lambda: pf.ops.gated_copies(x, p[:, :6], seed=0, streams=[1, 2]), ValueError, r"p_logits must have shape"),
        (lambda: pf.ops.gated_copies(x, p, seed=0, streams=[]), ValueError, "streams must name 1 to 16"),
        (lambda: pf.ops.gated_copies(x, torch.randn(17, 7), seed=0, streams=list(range(17))), ValueError,
         "streams must name 1 to 16"),
        (lambda: pf.ops.gated_copies(x, p, seed=0, streams=5), TypeError, "streams must be a list"),
        (lambda: pf.ops.gated_copies(x, p, seed=0, streams=[1, -2]), ValueError, r"streams\[1\]"),
        (lambda: pf.ops.gated_copies(x, p.half(), seed=0, streams=[1, 2]), TypeError, "p_logits must have dtype"),
        (lambda: pf.ops.gated_copies(x, p, seed=0, streams=[1, 2], relu=1), TypeError, "relu must be a bool"),
        (lambda: pf.ops.gated_copies(x, p, seed=0, streams=[1, 2], offset=-1), ValueError, "offset"),
        (lambda: pf.ops.gated_copies(x.long(), p, seed=0, streams=[1, 2]), TypeError, r"\bx must have dtype"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()


def _copies_backends() -> list[str]:
    from conftest import BACKENDS_UNDER_TEST
    return [b for b in BACKENDS_UNDER_TEST if b != "reference" and "gated_copies" not in dispatch.missing_ops(b)]


def test_relu_gated_convs_fused_equals_the_composition(monkeypatch):
    backends = _copies_backends()
    if not backends:
        pytest.skip("no live backend implements gated_copies natively")
    from pgnas_fast.nn import relu_gated_convs

    calls = []
    real = pf.ops.gated_copies
    monkeypatch.setattr(pf.ops, "gated_copies", lambda *a, **k: calls.append(1) or real(*a, **k))
    for backend in backends:
        results = []
        for fused in (True, False):
            torch.manual_seed(0)
            holder = nn.Module()
            holder.convs = nn.ModuleList(GatedConv2d(5, 4, k, padding=k // 2, gate_groups=2, p_init=0.3,
                                                     backend=backend) for k in (1, 3, 3))
            set_gates(holder, "relaxed", seed=SEED, step=2, row_offset=3)
            x = torch.randn(3, 5, 6, 6, generator=torch.Generator().manual_seed(1)).requires_grad_()
            outs = (relu_gated_convs(list(holder.convs), x) if fused
                    else [conv(F.relu(x)) for conv in holder.convs])
            assert outs is not None
            sum((o * torch.cos(o.detach())).sum() for o in outs).backward()
            results.append((outs, x.grad, [p.grad for p in holder.parameters()]))
        (outs_f, gx_f, gp_f), (outs_p, gx_p, gp_p) = results
        for a, b in zip(outs_f, outs_p):
            assert rel_err(a, b) < 1e-6
        assert rel_err(gx_f, gx_p) < 1e-5
        for a, b in zip(gp_f, gp_p):
            assert rel_err(a, b) < 1e-5
    assert len(calls) == len(backends)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_relu_gated_convs_with_hard_or_full_gates_share_one_relu(layout):
    """Candidates (K at once) and the full network: the convs read one ReLU of x, and each output is
    its module composition's, bit for bit."""
    from pgnas_fast.nn import relu_gated_convs, stacked_candidate_masks

    torch.manual_seed(0)
    holder = nn.Module()
    holder.convs = nn.ModuleList(GatedConv2d(6, 5, k, padding=k // 2, gate_groups=2, p_init=0.4) for k in (1, 3, 3))
    x = torch.randn(4 * 3, 6, 5, 7, generator=torch.Generator().manual_seed(1)).contiguous(memory_format=layout)
    for mode, kwargs in (("hard", {"masks": stacked_candidate_masks(holder, SEED, [0, 5, 9, 11])}),
                         ("hard", {"candidate": 7, "seed": SEED}), ("full", {})):
        set_gates(holder, mode, **kwargs)
        with DispatchLog() as log:
            outs = relu_gated_convs(list(holder.convs), x)
        assert sum(name.startswith(("aten.relu", "aten.clamp_min")) for name in log.names) == 1, log.names
        for conv, out in zip(holder.convs, outs):
            assert torch.equal(out, conv(F.relu(x)))
        if mode == "hard":  # the masks do act: some dropped channel changes the output
            assert any(not torch.equal(out, conv._conv_forward(F.relu(x), conv.weight, conv.bias))
                       for conv, out in zip(holder.convs, outs))


def test_multi_branch_blocks_match_the_unfused_path():
    """A digits mixed block and a shake-shake block give the same outputs and gradients with the
    fused ops (a native backend) and without them (the reference backend), in float64."""
    backends = _copies_backends()
    if not backends:
        pytest.skip("no live backend implements gated_copies natively")
    from pgnas_fast.supernets.digits import MixedBlock
    from pgnas_fast.supernets.shake_shake import ShakeBlock

    makers = ((lambda b: MixedBlock(6, 8, 2, ("conv3x3", "dil3x3", "conv1x1"), dict(gate_groups=2, backend=b)),
               (3, 6, 6, 6)),
              (lambda b: ShakeBlock(6, 6, 1, dict(gate_groups=None, p_init=0.2, backend=b), b), (3, 6, 6, 6)))
    for make, shape in makers:
        results = []
        for backend in (backends[0], "reference"):
            torch.manual_seed(0)
            block = make(backend).double().train()
            set_gates(block, "relaxed", seed=5, step=7, row_offset=2)
            x = torch.randn(shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64).requires_grad_()
            out = block(x)
            out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(6), dtype=out.dtype))
            results.append((out.detach(), x.grad, [p.grad for p in block.parameters()]))
        (out_f, gx_f, gp_f), (out_r, gx_r, gp_r) = results
        assert rel_err(out_f, out_r) < 1e-6
        assert rel_err(gx_f, gx_r) < 1e-6
        for a, b in zip(gp_f, gp_r):
            assert rel_err(a, b) < 1e-6


# ---- on the GPU (tests marked gpu run in benchmarks/gpu_suite.sh) -----------------------------------------
def _gpu_backends() -> list[str]:
    return [b for b in ("cuda", "triton") if pf.backends()[b][0]]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape", [(16, 160, 32, 32), (3, 7, 5, 9)])
def test_gpu_fused_ops_match_the_reference(shape, memory_format, dtype):
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(shape, device="cuda", generator=gen).to(dtype).contiguous(memory_format=memory_format)
    scale, shift, p = (torch.randn(shape[1], device="cuda", generator=gen) for _ in range(3))
    p2 = torch.stack([p, -p])
    dy = torch.randn(shape, device="cuda", generator=gen).to(dtype)
    dy2 = torch.randn(2, *shape, device="cuda", generator=gen).to(dtype)
    tolerance = TOLERANCE[dtype]
    for backend in _gpu_backends():
        for name, call, grad in (
            ("affine_relu_gate", lambda b, *t: pf.ops.affine_relu_gate(*t, seed=SEED, stream=STREAM, offset=5 * shape[1],
                                                                      backend=b), dy),
            ("gated_copies", lambda b, x, p2: pf.ops.gated_copies(x, p2, seed=SEED, streams=[STREAM, 9], relu=True,
                                                                  offset=3 * shape[1], backend=b), dy2),
        ):
            inputs = (x, scale, shift, p) if name == "affine_relu_gate" else (x, p2)
            results = []
            for b in (backend, "reference"):
                leaves = [t.detach().clone().requires_grad_() for t in inputs]
                out = call(b, *leaves)
                results.append((out, *torch.autograd.grad(out, leaves, grad)))
            for got, want in zip(results[0], results[1]):
                assert rel_err(got, want) < tolerance, (backend, name)
