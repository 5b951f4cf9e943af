"""Property-based differential tests: random valid calls of every public op, every CPU-runnable backend
against the `reference` oracle (design.md "The op set", "RNG contract", "Numerics").

Hypothesis draws shapes (size-1, odd and empty dims), data and gate dtypes, memory layouts (dense,
channels_last, slices, transposes, storage offsets, expanded views, for inputs and for incoming
gradients alike), modes, tau, seeds / streams / offsets up to the documented 2^63 limits, numbers of
branches and copies, and mixed lists for the whole-network ops. Values and gradients are compared with
the reference: the uniforms bit for bit, hard masks exactly, everything else by relative norm error
within conftest.TOLERANCE of the dtypes involved.

CI runs a fixed, derandomized sample (no example database written). For a deeper local search:
PGNAS_FUZZ_EXAMPLES=2000 PGNAS_FUZZ_RANDOM=1 python3 -m pytest tests/test_ops_fuzz.py
"""
from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pgnas_fast as pf
from pgnas_fast.ops import MAX_COPIES, Domain
from pgnas_fast.ops.streams import LAYER_LIMIT, MAJOR_LIMIT, SEED_LIMIT

from conftest import BACKENDS_UNDER_TEST, TOLERANCE, interpreted, rel_err

FUZZ_BACKENDS = [b for b in BACKENDS_UNDER_TEST if b != "reference"]
if not FUZZ_BACKENDS:
    pytest.skip("no non-reference backend runs on CPU tensors here", allow_module_level=True)

GATE_DTYPES = [torch.float32, torch.float64]
MODES = ["relaxed", "hard", "full"]


def fuzz_settings(backend: str) -> settings:
    """The CI profile: fixed examples (80 per op), no deadline, no example database (.hypothesis/ is
    gitignored). The interpreted Triton backend gets tiny shapes and 10 examples per op."""
    tiny = interpreted(backend)
    n = int(os.environ.get("PGNAS_FUZZ_EXAMPLES", "0")) or (10 if tiny else 80)
    return settings(
        max_examples=n,
        derandomize=os.environ.get("PGNAS_FUZZ_RANDOM", "0") in ("", "0"),
        deadline=None,
        database=None,
        print_blob=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


def fuzz(check):
    """A pytest test over FUZZ_BACKENDS running `check(backend, tiny, data)` under hypothesis."""

    @pytest.mark.parametrize("backend", FUZZ_BACKENDS)
    def test(backend):
        tiny = interpreted(backend)

        @fuzz_settings(backend)
        @given(st.data())
        def run(data):
            check(backend, tiny, data)

        run()

    test.__name__ = check.__name__.replace("check_", "test_fuzz_")
    test.__doc__ = check.__doc__
    return test


# ---- strategies -----------------------------------------------------------------------------------
def data_dtypes(backend: str):
    dtypes = [torch.float32, torch.float16, torch.float64]
    if not interpreted(backend):  # no bfloat16 in numpy, so none under the Triton interpreter
        dtypes.append(torch.bfloat16)
    return st.sampled_from(dtypes)


def rng_word(data, label: str, high: int = SEED_LIMIT - 1) -> int:
    """A seed / stream / offset in [0, high]: small, anywhere, or at a 32-bit or 63-bit boundary."""
    edges = [0, 1, (1 << 32) - 1, 1 << 32, (1 << 32) + 1, (1 << 62) + 3, high - 1, high]
    value = data.draw(st.one_of(st.integers(0, 1 << 16), st.integers(0, high), st.sampled_from(edges)), label=label)
    return max(0, min(value, high))


def offset_word(data, n_elements: int) -> int:
    """An element offset with offset < 2^63 and offset + n_elements <= 2^63 (the documented limits)."""
    return rng_word(data, "offset", min(SEED_LIMIT - 1, SEED_LIMIT - n_elements))


def tau_value(data) -> float:
    return data.draw(st.one_of(st.sampled_from([0.2, 2 / 3, 1.0]), st.floats(0.05, 5.0)), label="tau")


def dims(data, label: str, *, min_ndim: int, max_ndim: int, tiny: bool, cap: int, allow_empty: bool = True) -> tuple:
    """A shape of min_ndim..max_ndim dims, each 0 (rarely), 1, odd or small; numel at most `cap`, with
    an occasional long dim (rows longer than the native kernels' tiles)."""
    ndim = data.draw(st.integers(min_ndim, max_ndim), label=f"{label}.ndim")
    top = 3 if tiny else 9
    size = st.one_of(st.integers(1, top), st.sampled_from([1, 2, 3, 5, 7]))
    if allow_empty:
        size = st.one_of(size, st.just(0))
    shape = [data.draw(size, label=f"{label}[{d}]") for d in range(ndim)]
    if not tiny and ndim and data.draw(st.integers(0, 7), label=f"{label}.long") == 0:
        d = data.draw(st.integers(0, ndim - 1), label=f"{label}.long_dim")
        shape[d] = data.draw(st.integers(17, 300), label=f"{label}.long_size")
    while math.prod(shape) > cap:  # shrink the largest dim until it fits
        d = max(range(ndim), key=lambda k: shape[k])
        shape[d] = max(1, shape[d] // 2)
    return tuple(shape)


def layouts_for(ndim: int, *, grad_input: bool = True) -> list[str]:
    names = ["contiguous", "storage_offset"]
    if ndim >= 1:
        names += ["slice0", "expanded0"]
    if ndim >= 2:
        names += ["slice1", "transpose01", "expanded_last"]
    if ndim >= 3:
        names += ["transpose_last", "slice_last"]
    if ndim == 4:
        names += ["channels_last", "channels_last", "channels_last_slice"]
    if not grad_input:
        names += ["expanded_all"]  # what `out.sum().backward()` hands a backward
    return names


def make_tensor(shape, dtype, layout: str, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """Random values of `shape` and `dtype` in memory layout `layout` (the values are what they are)."""
    shape = tuple(shape)
    ndim = len(shape)

    def randn(s):
        return (scale * torch.randn(s, generator=gen, dtype=torch.float64)).to(dtype)

    if layout == "contiguous":
        t = randn(shape)
    elif layout == "storage_offset":
        t = randn((math.prod(shape) + 3,))[3:].view(shape)
    elif layout.startswith("slice"):
        d = {"slice0": 0, "slice1": 1, "slice_last": ndim - 1}[layout]
        wide = list(shape)
        wide[d] = 2 * shape[d]
        t = randn(wide).narrow(d, 0, 2 * shape[d])
        t = t[(slice(None),) * d + (slice(None, None, 2),)]
    elif layout == "transpose01":
        t = randn((shape[1], shape[0], *shape[2:])).transpose(0, 1)
    elif layout == "transpose_last":
        t = randn((*shape[:-2], shape[-1], shape[-2])).transpose(-1, -2)
    elif layout == "channels_last":
        t = randn(shape).contiguous(memory_format=torch.channels_last)
    elif layout == "channels_last_slice":  # every other channel of a channels_last tensor
        t = randn((shape[0], 2 * shape[1], *shape[2:])).contiguous(memory_format=torch.channels_last)[:, ::2]
    elif layout == "expanded0":
        t = randn((1, *shape[1:])).expand(shape)
    elif layout == "expanded_last":
        t = randn((*shape[:-1], 1)).expand(shape)
    elif layout == "expanded_all":
        t = randn(()).expand(shape)
    else:
        raise AssertionError(layout)
    assert tuple(t.shape) == shape and t.dtype == dtype, (layout, t.shape, shape)
    return t


def draw_tensor(data, label, shape, dtype, gen, *, scale=1.0, grad_input=True, requires_grad=False):
    layout = data.draw(st.sampled_from(layouts_for(len(shape), grad_input=grad_input)), label=f"{label}.layout")
    t = make_tensor(shape, dtype, layout, gen, scale)
    return t.requires_grad_() if requires_grad else t


def draw_logits(data, label, shape, dtype, gen, *, requires_grad=True):
    """Drop logits: mostly moderate, sometimes saturating (|logit| up to 40)."""
    scale = data.draw(st.sampled_from([0.1, 1.5, 3.0, 40.0]), label=f"{label}.scale")
    return draw_tensor(data, label, shape, dtype, gen, scale=scale, requires_grad=requires_grad)


def generator(data) -> torch.Generator:
    return torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="values_seed"))


# ---- comparisons ----------------------------------------------------------------------------------
def tolerance(*dtypes) -> float:
    return max(TOLERANCE[d] for d in dtypes)


def assert_close(got, want, tol: float, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    if want.numel() == 0:
        return
    assert bool(torch.isfinite(got).all()) == bool(torch.isfinite(want).all()), f"{what}: non-finite values"
    err = rel_err(got, want)
    assert err < tol, f"{what}: rel_err {err:.3g} >= {tol:g}"


def assert_equal(got, want, what: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, (
        f"{what}: {tuple(got.shape)} {got.dtype} != {tuple(want.shape)} {want.dtype}")
    assert torch.equal(got, want), f"{what}: differs in {int((got != want).sum())} of {want.numel()} elements"


def assert_gated_outputs(mode: str, tol: float, *pairs) -> None:
    """(got, want, what) pairs of a gated op: relaxed gates agree to rounding, hard and full ones exactly
    (outputs x * {0, 1}, and a p_logit gradient that is zero)."""
    for got, want, what in pairs:
        if mode == "relaxed":
            assert_close(got, want, tol, what)
        else:
            assert_equal(got, want, what)


def leaves(*tensors):
    """Fresh leaf copies (same strides) of each tensor that requires grad, others as they are."""
    return [t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) and t.requires_grad else t
            for t in tensors]


def grads(out, inputs, grad_out):
    wanted = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return torch.autograd.grad(out, wanted, grad_out, allow_unused=True)


def run_both(backend, call, inputs, grad_out=None):
    """(out, grads) of call(*inputs, backend=b) for b = backend and reference, each on its own leaves."""
    results = []
    for name in (backend, "reference"):
        own = leaves(*inputs)
        out = call(*own, backend=name)
        g = None
        if grad_out is not None and out.requires_grad:
            g = grads(out, own, grad_out)
        results.append((out, g))
    return results


# ---- the ops --------------------------------------------------------------------------------------
def check_philox_uniform(backend, tiny, data):
    """u of any (n, seed, stream, offset) is the reference's bit for bit."""
    n = data.draw(st.one_of(st.integers(0, 8), st.integers(0, 64 if tiny else 5000)), label="n")
    seed, stream = rng_word(data, "seed"), rng_word(data, "stream")
    offset = offset_word(data, n)
    got = pf.ops.philox_uniform(n, seed=seed, stream=stream, offset=offset, backend=backend)
    want = pf.ops.philox_uniform(n, seed=seed, stream=stream, offset=offset, backend="reference")
    assert_equal(got, want, "u")


def check_gate_keep(backend, tiny, data):
    """keep [B, C] and d p_logit of every mode; hard and full gates exactly."""
    gen = generator(data)
    batch = data.draw(st.integers(1, 3 if tiny else 40), label="batch")
    (channels,) = dims(data, "C", min_ndim=1, max_ndim=1, tiny=tiny, cap=300)
    gate_dtype = data.draw(st.sampled_from(GATE_DTYPES), label="gate_dtype")
    mode = data.draw(st.sampled_from(MODES), label="mode")
    tau = tau_value(data)
    seed, stream = rng_word(data, "seed"), rng_word(data, "stream")
    offset = offset_word(data, batch * channels)
    p_logit = draw_logits(data, "p_logit", (channels,), gate_dtype, gen)
    grad_out = draw_tensor(data, "grad", (batch, channels), gate_dtype, gen, grad_input=False)

    def call(p, backend):
        return pf.ops.gate_keep(p, batch, seed=seed, stream=stream, tau=tau, mode=mode, offset=offset, backend=backend)

    (out, g), (want, wg) = run_both(backend, call, [p_logit], grad_out)
    if mode == "relaxed":
        assert_close(out, want, TOLERANCE[gate_dtype], "keep")
        assert_close(g[0], wg[0], TOLERANCE[gate_dtype], "d p_logit")
    else:
        assert_equal(out, want, "keep")
        assert_equal(g[0], wg[0], "d p_logit")


def check_candidate_keep(backend, tiny, data):
    """Hard masks [K, C] of any candidate ids, layer, domain and seed: exactly the reference's."""
    gen = generator(data)
    (channels,) = dims(data, "C", min_ndim=1, max_ndim=1, tiny=tiny, cap=300)
    k = data.draw(st.integers(0, 3 if tiny else 12), label="K")
    ids = data.draw(st.lists(st.one_of(st.integers(0, 100), st.integers(0, MAJOR_LIMIT - 1),
                                       st.just(MAJOR_LIMIT - 1)), min_size=k, max_size=k), label="ids")
    layer = data.draw(st.one_of(st.integers(0, 8), st.just(LAYER_LIMIT - 1)), label="layer")
    domain = data.draw(st.sampled_from(list(Domain)), label="domain")
    seed = rng_word(data, "seed")
    gate_dtype = data.draw(st.sampled_from(GATE_DTYPES), label="gate_dtype")
    p_logit = draw_logits(data, "p_logit", (channels,), gate_dtype, gen)
    candidates = torch.tensor(ids, dtype=torch.int64)
    if k > 1 and data.draw(st.booleans(), label="strided_ids"):
        candidates = torch.stack([candidates, candidates]).t()[:, 0]  # stride 2
    grad_out = draw_tensor(data, "grad", (k, channels), gate_dtype, gen, grad_input=False)

    def call(p, backend):
        return pf.ops.candidate_keep(p, candidates, seed=seed, layer=layer, domain=domain, backend=backend)

    (out, g), (want, wg) = run_both(backend, call, [p_logit], grad_out)
    assert_equal(out, want, "masks")
    assert_equal(g[0], wg[0], "d p_logit")


def gate_call_args(data, tiny, gen, backend, *, max_ndim=5):
    """x, p_logit and the RNG arguments of a gated op."""
    shape = dims(data, "x", min_ndim=2, max_ndim=max_ndim, tiny=tiny, cap=200 if tiny else 6000)
    dtype = data.draw(data_dtypes(backend), label="dtype")
    gate_dtype = data.draw(st.sampled_from(GATE_DTYPES), label="gate_dtype")
    x = draw_tensor(data, "x", shape, dtype, gen, requires_grad=True)
    rng = {"seed": rng_word(data, "seed"), "stream": rng_word(data, "stream"), "tau": tau_value(data),
           "mode": data.draw(st.sampled_from(MODES), label="mode"), "offset": offset_word(data, shape[0] * shape[1])}
    return x, gate_dtype, rng


def check_gated_apply(backend, tiny, data):
    """x * keep and d x, d p_logit, any layout of x and of the incoming gradient."""
    gen = generator(data)
    x, gate_dtype, rng = gate_call_args(data, tiny, gen, backend)
    p_logit = draw_logits(data, "p_logit", (x.shape[1],), gate_dtype, gen)
    grad_out = draw_tensor(data, "grad", x.shape, x.dtype, gen, grad_input=False)

    def call(x, p, backend):
        return pf.ops.gated_apply(x, p, **rng, backend=backend)

    (out, g), (want, wg) = run_both(backend, call, [x, p_logit], grad_out)
    tol = tolerance(x.dtype, gate_dtype)
    assert_gated_outputs(rng["mode"], tol, (out, want, "out"), (g[1], wg[1], "d p_logit"))
    assert_close(g[0], wg[0], tol, "d x")


def check_affine_relu_gate(backend, tiny, data):
    """relu(x * scale + shift) * keep and d x, d scale, d shift, d p_logit (gate vectors of mixed dtypes)."""
    gen = generator(data)
    x, gate_dtype, rng = gate_call_args(data, tiny, gen, backend)
    channels = x.shape[1]
    vec_dtypes = [data.draw(st.sampled_from(GATE_DTYPES), label=f"{n}.dtype") for n in ("scale", "shift")]
    scale = draw_tensor(data, "scale", (channels,), vec_dtypes[0], gen, requires_grad=True)
    shift = draw_tensor(data, "shift", (channels,), vec_dtypes[1], gen, scale=0.5, requires_grad=True)
    p_logit = draw_logits(data, "p_logit", (channels,), gate_dtype, gen)
    grad_out = draw_tensor(data, "grad", x.shape, x.dtype, gen, grad_input=False)

    def call(x, scale, shift, p, backend):
        return pf.ops.affine_relu_gate(x, scale, shift, p, **rng, backend=backend)

    (out, g), (want, wg) = run_both(backend, call, [x, scale, shift, p_logit], grad_out)
    tol = tolerance(x.dtype, gate_dtype, *vec_dtypes)
    assert_close(out, want, tol, "out")
    for name, a, b in zip(("d x", "d scale", "d shift", "d p_logit"), g, wg):
        assert_close(a, b, tol, name)
    if rng["mode"] != "relaxed":
        assert_equal(g[3], wg[3], "d p_logit")


def check_gated_copies(backend, tiny, data):
    """S gated copies of one input (relu or not): values and d x, d p_logits."""
    gen = generator(data)
    x, gate_dtype, rng = gate_call_args(data, tiny, gen, backend)
    n_copies = data.draw(st.integers(1, 3 if tiny else MAX_COPIES), label="S")
    stream = rng.pop("stream")
    streams = [stream] + [rng_word(data, f"streams[{s}]") for s in range(1, n_copies)]
    relu = data.draw(st.booleans(), label="relu")
    p_logits = draw_logits(data, "p_logits", (n_copies, x.shape[1]), gate_dtype, gen)
    grad_out = draw_tensor(data, "grad", (n_copies, *x.shape), x.dtype, gen, grad_input=False)

    def call(x, p, backend):
        return pf.ops.gated_copies(x, p, streams=streams, relu=relu, **rng, backend=backend)

    (out, g), (want, wg) = run_both(backend, call, [x, p_logits], grad_out)
    tol = tolerance(x.dtype, gate_dtype)
    assert_gated_outputs(rng["mode"], tol, (out, want, "out"), (g[1], wg[1], "d p_logits"))
    assert_close(g[0], wg[0], tol, "d x")


def check_branch_combine(backend, tiny, data):
    """sum_s w * y_s (+ skip), weights per example or per branch, with or without backward weights."""
    gen = generator(data)
    shape = dims(data, "y", min_ndim=1, max_ndim=4, tiny=tiny, cap=200 if tiny else 6000)
    n_branches = data.draw(st.integers(1, 3 if tiny else 6), label="S")
    dtype = data.draw(data_dtypes(backend), label="dtype")
    ys = [draw_tensor(data, f"ys[{s}]", shape, dtype, gen, requires_grad=True) for s in range(n_branches)]
    per_example = data.draw(st.booleans(), label="per_example")
    wshape = (shape[0], n_branches) if per_example else (n_branches,)
    w_dtype = data.draw(st.sampled_from(GATE_DTYPES), label="w_dtype")
    weights = draw_tensor(data, "weights", wshape, w_dtype, gen, requires_grad=True)
    backward_weights = None
    if data.draw(st.booleans(), label="shake"):
        bw_dtype = data.draw(st.sampled_from(GATE_DTYPES), label="bw_dtype")
        backward_weights = draw_tensor(data, "backward_weights", wshape, bw_dtype, gen)
    skip = None
    if data.draw(st.booleans(), label="with_skip"):
        skip = draw_tensor(data, "skip", shape, dtype, gen, requires_grad=True)  # the op takes the branches' dtype
    grad_out = draw_tensor(data, "grad", shape, dtype, gen, grad_input=False)

    def call(weights, skip, *ys, backend):
        return pf.ops.branch_combine(list(ys), weights, skip=skip, backward_weights=backward_weights, backend=backend)

    (out, g), (want, wg) = run_both(backend, call, [weights, skip, *ys], grad_out)
    dtypes = [dtype, w_dtype] + ([skip.dtype] if skip is not None else [])
    tol = tolerance(*dtypes)
    assert_close(out, want, tol, "out")
    names = ["d weights"] + (["d skip"] if skip is not None else []) + [f"d ys[{s}]" for s in range(n_branches)]
    for name, a, b in zip(names, g, wg):
        if name == "d skip":
            assert_equal(a, b, name)  # the incoming gradient itself
        else:
            assert_close(a, b, tol if name != "d weights" else tolerance(dtype, w_dtype), name)


def draw_conv_weight(data, label, tiny, dtype, gen):
    """A conv / linear weight [O, C_in / G, ...] and its C_in (grouped and depthwise convs included)."""
    top = 3 if tiny else 8
    groups = data.draw(st.sampled_from([1, 1, 2, 3]), label=f"{label}.groups")
    per_group = data.draw(st.integers(1, top), label=f"{label}.per_group")
    out_channels = groups * data.draw(st.integers(1, top), label=f"{label}.out_per_group")
    kernel = data.draw(st.sampled_from([(), (), (1, 1), (3, 3), (3,), (2, 0), (5, 1)]), label=f"{label}.kernel")
    if tiny:
        kernel = tuple(min(k, 2) for k in kernel)
    shape = (out_channels, per_group, *kernel)
    return draw_tensor(data, label, shape, dtype, gen, scale=0.3, requires_grad=True), groups * per_group


def check_regularizer(backend, tiny, data):
    """R and d W, d p_logit over a list of layers of mixed shapes, groups, layouts and dtypes."""
    gen = generator(data)
    n_layers = data.draw(st.integers(1, 3 if tiny else 6), label="L")
    weights, p_logits = [], []
    for k in range(n_layers):
        w_dtype = data.draw(data_dtypes(backend), label=f"weights[{k}].dtype")
        w, in_channels = draw_conv_weight(data, f"weights[{k}]", tiny, w_dtype, gen)
        p_dtype = data.draw(st.sampled_from(GATE_DTYPES), label=f"p_logits[{k}].dtype")
        weights.append(w)
        p_logits.append(draw_logits(data, f"p_logits[{k}]", (in_channels,), p_dtype, gen))
    coefs = {"weight_reg": data.draw(st.sampled_from([0.0, 1.0, 5e-4, 37.5]), label="weight_reg"),
             "drop_reg": data.draw(st.sampled_from([0.0, 1.0, 2.5]), label="drop_reg"),
             "n_train": data.draw(st.sampled_from([1.0, 7.0, 50000.0]), label="n_train")}
    math_dtype = torch.float64 if any(p.dtype == torch.float64 for p in p_logits) else torch.float32
    grad_out = torch.tensor(data.draw(st.sampled_from([1.0, -2.5, 0.0]), label="grad"), dtype=math_dtype)

    def call(*tensors, backend):
        return pf.ops.regularizer(list(tensors[:n_layers]), list(tensors[n_layers:]), **coefs, backend=backend)

    (out, g), (want, wg) = run_both(backend, call, [*weights, *p_logits], grad_out)
    assert_close(out, want, TOLERANCE[math_dtype], "R")
    for k in range(n_layers):
        assert_close(g[k], wg[k], tolerance(weights[k].dtype, math_dtype), f"d weights[{k}]")
        assert_close(g[n_layers + k], wg[n_layers + k], tolerance(math_dtype, *[w.dtype for w in weights]),
                     f"d p_logits[{k}]")


def check_gaussian_noise(backend, tiny, data):
    """mu + sqrt(max(var, 0) + 1e-8) * eps and d mu, d var; var with zeros and negatives."""
    gen = generator(data)
    shape = dims(data, "mu", min_ndim=1, max_ndim=4, tiny=tiny, cap=200 if tiny else 6000)
    dtype = data.draw(data_dtypes(backend), label="dtype")
    mu = draw_tensor(data, "mu", shape, dtype, gen, requires_grad=True)
    var = draw_tensor(data, "var", shape, dtype, gen).detach()
    var_kind = data.draw(st.sampled_from(["positive", "mixed", "tiny"]), label="var_kind")
    if var_kind == "positive":
        var = var.abs()
    elif var_kind == "tiny":
        var = var * 1e-9
    var.requires_grad_()
    seed, stream = rng_word(data, "seed"), rng_word(data, "stream")
    offset = offset_word(data, mu.numel())
    grad_out = draw_tensor(data, "grad", shape, dtype, gen, grad_input=False)

    def call(mu, var, backend):
        return pf.ops.gaussian_noise(mu, var, seed=seed, stream=stream, offset=offset, backend=backend)

    (out, g), (want, wg) = run_both(backend, call, [mu, var], grad_out)
    tol = TOLERANCE[dtype] if dtype != torch.float64 else TOLERANCE[torch.float32]  # eps is float32
    assert_close(out, want, tol, "out")
    assert_close(g[0], wg[0], tol, "d mu")
    assert_close(g[1], wg[1], tol, "d var")


def check_gaussian_kl(backend, tiny, data):
    """KL and d log alpha over a list of layers of mixed sizes (empty included) and dtypes."""
    gen = generator(data)
    n_layers = data.draw(st.integers(1, 3 if tiny else 8), label="L")
    log_alphas, counts = [], []
    for k in range(n_layers):
        (channels,) = dims(data, f"log_alphas[{k}]", min_ndim=1, max_ndim=1, tiny=tiny, cap=300)
        a_dtype = data.draw(st.sampled_from(GATE_DTYPES), label=f"log_alphas[{k}].dtype")
        scale = data.draw(st.sampled_from([1.0, 4.0, 30.0]), label=f"log_alphas[{k}].scale")
        log_alphas.append(draw_tensor(data, f"log_alphas[{k}]", (channels,), a_dtype, gen, scale=scale,
                                      requires_grad=True))
        counts.append(data.draw(st.one_of(st.integers(1, 5000), st.just(1 << 31), st.just(1 << 40)),
                                label=f"counts[{k}]"))
    n_train = data.draw(st.sampled_from([1.0, 3.0, 50000.0]), label="n_train")
    math_dtype = torch.float64 if any(a.dtype == torch.float64 for a in log_alphas) else torch.float32
    grad_out = torch.tensor(data.draw(st.sampled_from([1.0, -0.5]), label="grad"), dtype=math_dtype)

    def call(*log_alphas, backend):
        return pf.ops.gaussian_kl(list(log_alphas), counts, n_train=n_train, backend=backend)

    (out, g), (want, wg) = run_both(backend, call, log_alphas, grad_out)
    assert_close(out, want, TOLERANCE[math_dtype], "KL")
    for k in range(n_layers):
        assert_close(g[k], wg[k], TOLERANCE[math_dtype], f"d log_alphas[{k}]")


test_fuzz_philox_uniform = fuzz(check_philox_uniform)
test_fuzz_gate_keep = fuzz(check_gate_keep)
test_fuzz_candidate_keep = fuzz(check_candidate_keep)
test_fuzz_gated_apply = fuzz(check_gated_apply)
test_fuzz_affine_relu_gate = fuzz(check_affine_relu_gate)
test_fuzz_gated_copies = fuzz(check_gated_copies)
test_fuzz_branch_combine = fuzz(check_branch_combine)
test_fuzz_regularizer = fuzz(check_regularizer)
test_fuzz_gaussian_noise = fuzz(check_gaussian_noise)
test_fuzz_gaussian_kl = fuzz(check_gaussian_kl)
