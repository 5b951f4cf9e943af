"""What is specific to the `triton` backend (design.md layer 6): the multi-tensor regulariser in O(1)
launches over a whole network, tails of every block size, more branches than one launch takes, and
(GPU only) bfloat16, CIFAR-sized shapes, CUDA graph capture and torch.compile.

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest), so CPU shapes stay small.
"""
from __future__ import annotations

import importlib

import pytest
import torch

import pgnas_fast as pf
from pgnas_fast import reference
from pgnas_fast.ops.streams import Domain, stream_id

from conftest import TOLERANCE, rel_err

pytestmark = pytest.mark.skipif(not pf.backends()["triton"][0], reason="triton backend not available here")

SEED = 31415
STREAM = stream_id(Domain.TRAIN, 9, 4)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def network_weights(gen, n_layers=56, device="cpu", dtype=torch.float32):
    """A SupNet-like list: 3x3 convs, 1x1 convs, grouped and depthwise convs and a classifier."""
    weights, p_logits = [], []
    widths = [3, 16, 24, 32, 48]
    for k in range(n_layers - 1):
        c_in, c_out = widths[k % len(widths)], widths[(k + 1) % len(widths)]
        kind = k % 4
        if kind == 0:
            shape = (c_out, c_in, 3, 3)
        elif kind == 1:
            shape = (c_out, c_in, 1, 1)
        elif kind == 2 and c_in % 2 == 0 and c_out % 2 == 0:
            shape = (c_out, c_in // 2, 3, 3)  # groups = 2
        else:
            shape, c_in = (c_in, 1, 3, 3), c_in  # depthwise
        weights.append(0.3 * torch.randn(shape, generator=gen))
        p_logits.append(1.5 * torch.randn(c_in, generator=gen))
    weights.append(0.1 * torch.randn(10, 48, generator=gen))  # classifier
    p_logits.append(torch.randn(48, generator=gen))
    return [w.to(device, dtype) for w in weights], [p.to(device) for p in p_logits]


class LaunchCounter:
    """Stands in for a Triton kernel object and counts `kernel[grid](...)` launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def test_regularizer_over_a_whole_network_in_one_launch_each_way(monkeypatch):
    module = importlib.import_module("pgnas_fast.triton.regularizer")

    weights, p_logits = network_weights(torch.Generator().manual_seed(0), device=DEVICE)
    assert len(weights) >= 50
    forward = LaunchCounter(module._regularizer_kernel)
    backward = LaunchCounter(module._regularizer_backward_kernel)
    monkeypatch.setattr(module, "_regularizer_kernel", forward)
    monkeypatch.setattr(module, "_regularizer_backward_kernel", backward)

    ws = [w.clone().requires_grad_() for w in weights]
    ps = [p.clone().requires_grad_() for p in p_logits]
    r = pf.ops.regularizer(ws, ps, weight_reg=25.0, drop_reg=2.0, n_train=5e4, backend="triton")
    r.backward()
    assert (forward.launches, backward.launches) == (1, 1)

    ws_ref = [w.clone().requires_grad_() for w in weights]
    ps_ref = [p.clone().requires_grad_() for p in p_logits]
    r_ref = pf.ops.regularizer(ws_ref, ps_ref, weight_reg=25.0, drop_reg=2.0, n_train=5e4, backend="reference")
    r_ref.backward()
    assert rel_err(r, r_ref) < 1e-5
    for a, b in zip(ws + ps, ws_ref + ps_ref):
        assert a.grad.shape == b.grad.shape and a.grad.dtype == b.grad.dtype
        assert rel_err(a.grad, b.grad) < 1e-5


def test_multi_tensor_values_sum_over_more_programs_than_one_pass_of_the_last_program():
    """The last program adds the partials SUM_BLOCK at a time: more programs than that, a ragged end."""
    tables = importlib.import_module("pgnas_fast.triton.tables")
    gen = torch.Generator().manual_seed(5)
    weights = [0.2 * torch.randn(3, c, generator=gen).to(DEVICE) for c in (4000, 3999, 1500)]  # linear layers
    p_logits = [torch.randn(w.shape[1], generator=gen).to(DEVICE) for w in weights]
    blocks = sum(-(-w.shape[1] // 32) for w in weights)
    assert blocks > 2 * tables.SUM_BLOCK.value and blocks % tables.SUM_BLOCK.value
    r = pf.ops.regularizer(weights, p_logits, weight_reg=3.0, drop_reg=1.0, n_train=10.0, backend="triton")
    r_ref = pf.ops.regularizer(weights, p_logits, weight_reg=3.0, drop_reg=1.0, n_train=10.0, backend="reference")
    assert rel_err(r, r_ref) < 1e-5
    again = pf.ops.regularizer(weights, p_logits, weight_reg=3.0, drop_reg=1.0, n_train=10.0, backend="triton")
    assert torch.equal(r, again)  # summed in index order: deterministic
    counts = [4 * w.shape[1] for w in weights]
    kl = pf.ops.gaussian_kl(p_logits, counts, n_train=10.0, backend="triton")
    assert rel_err(kl, pf.ops.gaussian_kl(p_logits, counts, n_train=10.0, backend="reference")) < 1e-5


def test_multi_tensor_tables_are_built_once_and_stay_right_when_tensors_change(monkeypatch):
    """Tables are cached by address and shape: after a first call, neither pass copies a table to the
    device (gradients go to flat buffers, whose addresses are kernel arguments); new values at the
    same addresses, and new tensors (maybe at reused addresses), still give the reference's results."""
    tables = importlib.import_module("pgnas_fast.triton.tables")
    copies = []
    on_device = tables._on_device
    monkeypatch.setattr(tables, "_on_device", lambda rows, *a: copies.append(len(rows)) or on_device(rows, *a))
    tables.clear()
    gen = torch.Generator().manual_seed(6)
    weights, p_logits = network_weights(gen, n_layers=12, device=DEVICE)

    def run(backend):
        ws = [w.detach().requires_grad_() for w in weights]
        ps = [p.detach().requires_grad_() for p in p_logits]
        r = pf.ops.regularizer(ws, ps, weight_reg=5.0, drop_reg=1.0, n_train=50.0, backend=backend)
        r.backward()
        return [r] + [t.grad for t in ws + ps]

    def check():
        for a, b in zip(run("triton"), run("reference")):
            assert rel_err(a, b) < 1e-5

    check()
    assert len(copies) == 3  # layer table, forward blocks, backward blocks
    copies.clear()
    for w in weights:
        w.mul_(-1.5)  # same addresses, new values
    check()
    assert copies == []
    weights[:] = [w.clone() + 0.1 for w in weights]  # new tensors
    p_logits[:] = [p.clone() - 0.2 for p in p_logits]
    check()


def test_multi_tensor_inputs_are_copied_only_when_needed():
    """tables.dense: the caller's list itself when every tensor has the dtype and is contiguous (no
    per-tensor call on a training step's path), else the same values in that dtype, contiguous."""
    tables = importlib.import_module("pgnas_fast.triton.tables")
    gen = torch.Generator().manual_seed(8)
    ready = [torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen)]
    assert tables.dense(ready, torch.float32) is ready
    mixed = [ready[0].t(), ready[1].half(), ready[1]]  # a transposed view, another dtype
    dense = tables.dense(mixed, torch.float32)
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in dense)
    assert all(torch.equal(a, b.float()) for a, b in zip(dense, mixed))
    assert dense[2] is ready[1]  # a tensor that needs nothing is not copied


def test_multi_tensor_table_cache_is_bounded(monkeypatch):
    """More networks than the cache holds: the least recently used tables go, results stay right."""
    tables = importlib.import_module("pgnas_fast.triton.tables")
    monkeypatch.setattr(tables, "CACHE_ENTRIES", 3)
    tables.clear()
    gen = torch.Generator().manual_seed(7)
    for n_layers in (3, 4, 5, 6):
        weights, p_logits = network_weights(gen, n_layers=n_layers, device=DEVICE)
        r = pf.ops.regularizer(weights, p_logits, weight_reg=2.0, drop_reg=1.0, n_train=30.0, backend="triton")
        r_ref = pf.ops.regularizer(weights, p_logits, weight_reg=2.0, drop_reg=1.0, n_train=30.0, backend="reference")
        assert rel_err(r, r_ref) < 1e-5
        assert len(tables._cache) <= 3
    tables.clear()


def test_a_training_step_of_per_channel_gates_reuses_the_regularizer_s_tables():
    """Gates with a group per channel hand the regulariser their parameters themselves, so its launch
    tables are hit at every later step (a fresh per-channel tensor would miss: a copy per step, and
    no CUDA graph capture of the step)."""
    from pgnas_fast.nn import GatedConv2d, GatedLinear, network_regularizer

    tables = importlib.import_module("pgnas_fast.triton.tables")
    tables.clear()
    model = torch.nn.Sequential(GatedConv2d(3, 5, 3, gate_groups=1), GatedLinear(4, 2, gate_groups=1)).to(DEVICE)
    assert model[0].p_logit_per_channel() is model[0].p_logit
    values = []
    for _ in range(2):
        r = network_regularizer(model, weight_reg=2.0, n_train=30.0, backend="triton")
        r.backward()
        values.append((r.detach(), *(p.grad.clone() for p in model.parameters() if p.grad is not None)))
        keys = list(tables._cache)
        model.zero_grad(set_to_none=True)
    assert keys and list(tables._cache) == keys  # the second step built no table
    assert all(torch.equal(a, b) for a, b in zip(*values))
    tables.clear()


def test_no_table_is_copied_to_the_device_during_a_cuda_graph_capture(monkeypatch):
    """A host-to-device copy captured in a graph would re-read a pinned buffer reused since: a table
    not cached yet is refused, clearly, before it is built."""
    tables = importlib.import_module("pgnas_fast.triton.tables")
    built = []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="run the same call .* once before the capture"):
        tables.cached(("regularizer layers", (1,)), lambda: built.append(1) or [[1]], torch.int64,
                      torch.device("cuda"))
    assert built == []


def test_no_per_call_host_copy_during_a_cuda_graph_capture(monkeypatch):
    """Values copied to the device on every call (the gated copies' stream words, candidate ids) are
    refused during a capture, with what they are, before any copy: a replay would re-read a pinned
    host buffer reused since."""
    from pgnas_fast.ops.transfer import to_device

    fused = importlib.import_module("pgnas_fast.triton.fused")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="the gated copies' stream words must be copied .* CUDA graph"):
        fused._stream_words([3, 4], torch.device("cuda"))
    with pytest.raises(RuntimeError, match="candidate ids must be copied .* CUDA graph"):
        to_device(torch.arange(3), torch.device("cuda"), "candidate ids")
    assert torch.equal(to_device(torch.arange(3), torch.device("cpu")), torch.arange(3))  # no CUDA: no check


def test_a_table_a_cuda_graph_captured_outlives_the_cache(monkeypatch):
    """A captured launch reads its table at every replay: a table used during a capture stays alive
    when the cache evicts it (here a CPU tensor stands in for the device table)."""
    tables = importlib.import_module("pgnas_fast.triton.tables")
    monkeypatch.setattr(tables, "_on_device", lambda rows, dtype, device: torch.tensor(rows, dtype=dtype))
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    table = tables.cached(("captured", (1,)), lambda: [[7]], torch.int64, cuda)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert tables.cached(("captured", (1,)), lambda: [[8]], torch.int64, cuda) is table  # a hit, captured
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    for i in range(tables.CACHE_ENTRIES + 1):
        tables.cached(("other", (i,)), lambda: [[i]], torch.int64, cuda)
    assert all(key[0][0] != "captured" for key in tables._cache)  # evicted from the cache ...
    assert any(t is table for t in tables._captured.values())  # ... but still alive
    tables.clear()
    tables._captured.clear()  # CPU stand-ins only: no graph reads them


def test_regularizer_mixed_weight_dtypes_and_layouts():
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(8, 4, 3, 3, generator=gen).to(DEVICE, memory_format=torch.channels_last),
               torch.randn(6, 8, generator=gen).to(DEVICE).half(), torch.randn(4, 2, 1, 1, generator=gen).to(DEVICE).double()]
    p_logits = [torch.randn(c, generator=gen).to(DEVICE) for c in (4, 8, 4)]
    outs = {}
    for backend in ("triton", "reference"):
        ws = [w.clone().requires_grad_() for w in weights]
        ps = [p.clone().requires_grad_() for p in p_logits]
        r = pf.ops.regularizer(ws, ps, weight_reg=4.0, drop_reg=1.0, n_train=100.0, backend=backend)
        r.backward()
        outs[backend] = (r, ws, ps)
    (r, ws, ps), (r_ref, ws_ref, ps_ref) = outs["triton"], outs["reference"]
    assert rel_err(r, r_ref) < 1e-5
    assert ws[0].grad.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(ws + ps, ws_ref + ps_ref):
        assert a.grad.dtype == b.grad.dtype and a.grad.stride() == b.grad.stride()
        assert rel_err(a.grad, b.grad) < TOLERANCE[a.dtype]


@pytest.mark.parametrize("n", [1, 1023, 1025, 5003])
def test_philox_uniform_tails_bit_equal(n):
    for offset in (0, (1 << 32) - 7):
        ours = pf.ops.philox_uniform(n, seed=SEED, stream=STREAM, offset=offset, device=DEVICE, backend="triton")
        ref = pf.ops.philox_uniform(n, seed=SEED, stream=STREAM, offset=offset, device=DEVICE, backend="reference")
        assert torch.equal(ours, ref)


# Offsets around 2^31, where the low counter word's top bit turns on: split_u64 hands it to the kernels
# as a negative int32 (exactly -2^31 at 2^31), and the word arithmetic must read it back unsigned
# (a signed compare or a sign extension there carries into the high word)
WORD_BOUNDARY_OFFSETS = [(1 << 31) - 5, (1 << 31) - 1, 1 << 31, (1 << 31) + 1, (1 << 32) + (1 << 31) - 3,
                         (1 << 32) + (1 << 31), (1 << 32) - 1]


@pytest.mark.parametrize("offset", WORD_BOUNDARY_OFFSETS)
def test_philox_uniform_at_the_int32_word_boundary_bit_equal(offset):
    """A few elements at and across 2^31 in the low word (with a high word of 0 and of 1), under seeds
    and streams whose own words are exactly 2^31: the triton stream equals the reference's Philox
    element for element."""
    for seed, stream in ((SEED, STREAM), (1 << 31, (1 << 62) | (1 << 31)), ((1 << 32) + (1 << 31), 1 << 31)):
        ours = pf.ops.philox_uniform(11, seed=seed, stream=stream, offset=offset, device=DEVICE, backend="triton")
        ref = pf.ops.philox_uniform(11, seed=seed, stream=stream, offset=offset, device=DEVICE, backend="reference")
        assert torch.equal(ours, ref), (seed, stream)
        # the same elements one at a time (no carry inside the launch): the same numbers
        single = torch.cat([pf.ops.philox_uniform(1, seed=seed, stream=stream, offset=offset + j, device=DEVICE,
                                                  backend="triton") for j in (0, 5, 10)])
        assert torch.equal(single, ref[[0, 5, 10]])


@pytest.mark.parametrize("offset", [(1 << 31) - 6, 1 << 31, (1 << 32) + (1 << 31) + 3])
def test_gates_and_noise_at_the_int32_word_boundary_match_the_reference(offset):
    """The gate kernels (the element offset rebuilt from its two words) and the noise kernels (their
    counters offset / 4) at offsets whose low word crosses or has its top bit: hard gates and eps bit
    for bit, relaxed gates within float64's tolerance."""
    gen = torch.Generator().manual_seed(offset % 1000)
    p_logit = torch.randn(6, generator=gen, dtype=torch.float64).to(DEVICE)
    for mode in ("hard", "relaxed"):
        ours = pf.ops.gate_keep(p_logit, 2, seed=SEED, stream=STREAM, mode=mode, offset=offset, backend="triton")
        ref = pf.ops.gate_keep(p_logit, 2, seed=SEED, stream=STREAM, mode=mode, offset=offset, backend="reference")
        assert rel_err(ours, ref) < TOLERANCE[torch.float64], mode
    x = torch.randn(2, 6, 3, 3, generator=gen, dtype=torch.float64).to(DEVICE)
    ours = pf.ops.gated_apply(x, p_logit, seed=SEED, stream=STREAM, offset=offset, backend="triton")
    ref = pf.ops.gated_apply(x, p_logit, seed=SEED, stream=STREAM, offset=offset, backend="reference")
    assert rel_err(ours, ref) < TOLERANCE[torch.float64]
    zeros, ones = torch.zeros(3, 7, device=DEVICE), torch.ones(3, 7, device=DEVICE)  # out = eps
    for k in (offset, offset + 1):  # (two leads into the first quad)
        eps = pf.ops.gaussian_noise(zeros, ones, seed=SEED, stream=STREAM, offset=k, backend="triton")
        assert torch.equal(eps, pf.ops.gaussian_noise(zeros, ones, seed=SEED, stream=STREAM, offset=k,
                                                      backend="reference")), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("mode", ["relaxed", "hard"])
def test_gated_apply_forward_backward_with_tails(dtype, memory_format, mode):
    """Odd sizes so every tile has a masked tail; forward and backward against the reference."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 37, 13, 11, generator=gen).to(DEVICE, dtype).contiguous(memory_format=memory_format)
    dy = torch.randn(x.shape, generator=gen).to(DEVICE, dtype)
    p_logit = torch.randn(37, generator=gen).to(DEVICE)
    results = {}
    for backend in ("triton", "reference"):
        xb, pb = x.clone().requires_grad_(), p_logit.clone().requires_grad_()
        out = pf.ops.gated_apply(xb, pb, seed=SEED, stream=STREAM, mode=mode, backend=backend)
        out.backward(dy)
        results[backend] = (out, xb.grad, pb.grad)
    for ours, ref in zip(results["triton"], results["reference"]):
        assert ours.dtype == ref.dtype and ours.stride() == ref.stride()
        assert rel_err(ours, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_branch_combine_of_more_branches_than_one_launch_keeps_the_dtype(dtype):
    """More than MAX_BRANCHES branches accumulate over launches in float32: a float16 result is cast back."""
    from pgnas_fast.triton.combine import MAX_BRANCHES

    gen = torch.Generator().manual_seed(4)
    ys = [torch.randn(2, 3, 4, 4, generator=gen).to(DEVICE, dtype) for _ in range(MAX_BRANCHES + 1)]
    weights = torch.rand(MAX_BRANCHES + 1, generator=gen).to(DEVICE)
    out = pf.ops.branch_combine(ys, weights, backend="triton")
    ref = pf.ops.branch_combine(ys, weights, backend="reference")
    assert out.dtype == ref.dtype == dtype and rel_err(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("n_branches", [5, 9])
@pytest.mark.parametrize("per_example", [True, False])
def test_branch_combine_more_branches_than_one_launch_takes(n_branches, per_example):
    from pgnas_fast.triton.combine import MAX_BRANCHES

    assert n_branches > MAX_BRANCHES
    gen = torch.Generator().manual_seed(3)
    ys = [torch.randn(3, 5, 7, 3, generator=gen).to(DEVICE) for _ in range(n_branches)]
    skip = torch.randn(3, 5, 7, 3, generator=gen).to(DEVICE)
    weights = torch.rand((3, n_branches) if per_example else (n_branches,), generator=gen).to(DEVICE)
    dout = torch.randn(3, 5, 7, 3, generator=gen).to(DEVICE)
    results = {}
    for backend in ("triton", "reference"):
        yb = [y.clone().requires_grad_() for y in ys]
        wb = weights.clone().requires_grad_()
        out = pf.ops.branch_combine(yb, wb, skip=skip, backend=backend)
        out.backward(dout)
        results[backend] = (out, wb.grad, *(y.grad for y in yb))
    for ours, ref in zip(results["triton"], results["reference"]):
        assert rel_err(ours, ref) < 1e-5


@pytest.mark.parametrize("shape, memory_format", [((3, 7, 5, 5), torch.contiguous_format),
                                                  ((2, 6, 3, 3), torch.channels_last),
                                                  ((5, 9), torch.contiguous_format)])
@pytest.mark.parametrize("tau", [0.2, 2 / 3])
def test_float64_gates_match_the_reference_to_float64_precision(shape, memory_format, tau):
    """Float64 drop logits (the gradcheck path) draw float64 gates: u, the logit and tau (passed as a
    float32 pair) in float64. Gates, gated data and every gradient match the reference within
    float64's tolerance (1e-12), where any float32 step would leave ~1e-8."""
    gen = torch.Generator().manual_seed(shape[0] * 10 + len(shape))
    C = shape[1]
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(DEVICE).contiguous(memory_format=memory_format)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(DEVICE)
    p_logit = (1.5 * torch.randn(C, generator=gen, dtype=torch.float64)).to(DEVICE)
    scale = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).to(DEVICE)
    shift = (0.3 * torch.randn(C, generator=gen, dtype=torch.float64)).to(DEVICE)
    results = {}
    for backend in ("triton", "reference"):
        keep = pf.ops.gate_keep(p_logit, shape[0], seed=SEED, stream=STREAM, tau=tau, offset=7, backend=backend)
        xs, ps = x.clone().requires_grad_(), p_logit.clone().requires_grad_()
        out = pf.ops.gated_apply(xs, ps, seed=SEED, stream=STREAM, tau=tau, offset=7, backend=backend)
        out.backward(dy)
        leaves = [t.clone().requires_grad_() for t in (x, scale, shift, p_logit)]
        fused = pf.ops.affine_relu_gate(*leaves, seed=SEED, stream=STREAM, tau=tau, offset=7, backend=backend)
        fused.backward(dy)
        results[backend] = [keep, out, xs.grad, ps.grad, fused, *(t.grad for t in leaves)]
    for k, (ours, ref) in enumerate(zip(results["triton"], results["reference"])):
        assert ours.dtype == ref.dtype == torch.float64, k
        assert rel_err(ours, ref) < TOLERANCE[torch.float64], k


@pytest.mark.parametrize("mode", ["relaxed", "hard", "full"])
def test_float64_data_with_float32_gates_is_multiplied_in_float64(mode):
    """float64 data with float32 drop logits: the gates are float32, the product x * keep is taken in
    float64 (the math dtype of the pair), so out is exactly x times the (float32) gate, as the
    reference's torch.mul; a float32 product would round x to 24 bits."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(4, 6, 3, 5, generator=gen, dtype=torch.float64).to(DEVICE)
    p_logit = torch.randn(6, generator=gen).to(DEVICE)
    scale = (torch.rand(6, generator=gen) + 0.5).to(DEVICE)
    shift = (0.3 * torch.randn(6, generator=gen)).to(DEVICE)
    keep = pf.ops.gate_keep(p_logit, 4, seed=SEED, stream=STREAM, mode=mode, backend="triton")
    out = pf.ops.gated_apply(x, p_logit, seed=SEED, stream=STREAM, mode=mode, backend="triton")
    assert keep.dtype == torch.float32 and out.dtype == torch.float64
    assert torch.equal(out, x * keep.double()[:, :, None, None])
    ref = pf.ops.gated_apply(x, p_logit, seed=SEED, stream=STREAM, mode=mode, backend="reference")
    assert rel_err(out, ref) < (TOLERANCE[torch.float64] if mode != "relaxed" else TOLERANCE[torch.float32])
    # the fused op: the affine map and the ReLU in float64 too (float32 scale and shift widened exactly)
    fused = pf.ops.affine_relu_gate(x, scale, shift, p_logit, seed=SEED, stream=STREAM, mode=mode, backend="triton")
    pre = torch.relu(x * scale.double()[:, None, None] + shift.double()[:, None, None])
    assert torch.equal(fused, pre * keep.double()[:, :, None, None])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode", ["hard", "full"])
def test_float32_math_of_narrow_data_rounds_as_the_reference(dtype, mode):
    """The other way round: float32 (and float16) data with float32 gates compute in float32, not
    float64. With 0/1 gates the fused op's relu(x * scale + shift) is then bit-equal to the reference's
    two float32 roundings (in float64 one rounding is skipped, and ~15% of the elements differ)."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(4, 16, 8, 8, generator=gen).to(DEVICE, dtype)
    p_logit = torch.randn(16, generator=gen).to(DEVICE)
    scale = (torch.rand(16, generator=gen) + 0.5).to(DEVICE)
    shift = torch.randn(16, generator=gen).to(DEVICE)
    ours = pf.ops.affine_relu_gate(x, scale, shift, p_logit, seed=SEED, stream=STREAM, mode=mode, backend="triton")
    ref = pf.ops.affine_relu_gate(x, scale, shift, p_logit, seed=SEED, stream=STREAM, mode=mode, backend="reference")
    assert ours.dtype == dtype and torch.equal(ours, ref)


def test_unavailable_reason(monkeypatch):
    import pgnas_fast.triton as backend

    assert backend.unavailable_reason() is None  # here: CUDA, or the interpreter
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reason = backend.unavailable_reason()
    assert "CUDA" in reason and "TRITON_INTERPRET" in reason


# ---- GPU only -------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_gpu_gated_apply_cifar_shapes(dtype, memory_format):
    gen = torch.Generator(device="cuda").manual_seed(4)
    for shape in [(128, 96, 32, 32), (128, 192, 16, 16), (128, 384, 8, 8), (3, 7, 5, 5)]:
        x = torch.randn(shape, device="cuda", generator=gen).to(dtype).contiguous(memory_format=memory_format)
        dy = torch.randn(shape, device="cuda", generator=gen).to(dtype)
        p_logit = torch.randn(shape[1], device="cuda", generator=gen)
        results = {}
        for backend in ("triton", "reference"):
            xb, pb = x.clone().requires_grad_(), p_logit.clone().requires_grad_()
            out = pf.ops.gated_apply(xb, pb, seed=SEED, stream=STREAM, backend=backend)
            out.backward(dy)
            results[backend] = (out, xb.grad, pb.grad)
        for ours, ref in zip(results["triton"], results["reference"]):
            assert ours.stride() == ref.stride()
            assert rel_err(ours, ref) < TOLERANCE[dtype]


@pytest.mark.gpu
def test_gpu_philox_and_hard_gates_bit_equal():
    u = pf.ops.philox_uniform(1 << 22, seed=SEED, stream=STREAM, offset=(1 << 32) - 5, device="cuda", backend="triton")
    ref = pf.ops.philox_uniform(1 << 22, seed=SEED, stream=STREAM, offset=(1 << 32) - 5, device="cuda",
                                backend="reference")
    assert torch.equal(u, ref)
    p_logit = torch.randn(384, device="cuda")
    hard = pf.ops.gate_keep(p_logit, 128, seed=SEED, stream=STREAM, mode="hard", backend="triton")
    hard_ref = pf.ops.gate_keep(p_logit, 128, seed=SEED, stream=STREAM, mode="hard", backend="reference")
    # equal unless torch's and Triton's sigmoid differ by an ulp right at u + p = 1 (essentially never)
    assert (hard != hard_ref).sum().item() <= 1


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_branch_combine_and_regularizer(dtype):
    gen = torch.Generator(device="cuda").manual_seed(5)
    ys = [torch.randn(128, 192, 16, 16, device="cuda", generator=gen).to(dtype) for _ in range(3)]
    weights = torch.rand(128, 3, device="cuda", generator=gen)
    skip = torch.randn(128, 192, 16, 16, device="cuda", generator=gen).to(dtype)
    out = pf.ops.branch_combine(ys, weights, skip=skip, backend="triton")
    assert rel_err(out, pf.ops.branch_combine(ys, weights, skip=skip, backend="reference")) < TOLERANCE[dtype]
    ws, ps = network_weights(torch.Generator().manual_seed(6), device="cuda", dtype=dtype)
    r = pf.ops.regularizer(ws, ps, weight_reg=25.0, drop_reg=2.0, n_train=5e4, backend="triton")
    r_ref = pf.ops.regularizer(ws, ps, weight_reg=25.0, drop_reg=2.0, n_train=5e4, backend="reference")
    assert rel_err(r, r_ref) < TOLERANCE[dtype]


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_of_gated_apply_forward_backward():
    x = torch.randn(64, 96, 16, 16, device="cuda", requires_grad=True)
    p_logit = torch.randn(96, device="cuda", requires_grad=True)
    dy = torch.randn(64, 96, 16, 16, device="cuda")

    def step():
        x.grad = p_logit.grad = None
        out = pf.ops.gated_apply(x, p_logit, seed=SEED, stream=STREAM, backend="triton")
        out.backward(dy)
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compiles the kernels) outside the capture
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    expected = (step().detach().clone(), x.grad.clone(), p_logit.grad.clone())

    graph = torch.cuda.CUDAGraph()
    x.grad = p_logit.grad = None
    with torch.cuda.graph(graph):
        out = pf.ops.gated_apply(x, p_logit, seed=SEED, stream=STREAM, backend="triton")
        out.backward(dy)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected[0])
    assert torch.equal(x.grad, expected[1]) and torch.equal(p_logit.grad, expected[2])


@pytest.mark.gpu
def test_gpu_torch_compile_of_a_gated_conv_step():
    conv = torch.nn.Conv2d(32, 64, 3, padding=1).cuda()
    p_logit = torch.zeros(64, device="cuda", requires_grad=True)
    x = torch.randn(16, 32, 16, 16, device="cuda")

    def step(x, p_logit):
        y = pf.ops.gated_apply(conv(x), p_logit, seed=SEED, stream=STREAM, backend="triton")
        return torch.relu(y).square().mean()

    # one eager call first: dynamo cannot trace the op layer's first-use import of a backend
    # (pgnas_fast.ops.dispatch._load); once loaded, the whole step is one graph
    step(x, p_logit).backward()
    p_logit.grad = None
    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(x, p_logit)
    loss.backward()
    grad_compiled = p_logit.grad.clone()
    p_logit.grad = None
    eager = step(x, p_logit)
    eager.backward()
    assert rel_err(loss, eager) < 1e-5 and rel_err(grad_compiled, p_logit.grad) < 1e-4


GRID_Y_LIMIT = 65535  # CUDA's limit on grid axes 1 and 2


@pytest.mark.parametrize("B", [1, 2, 4097, GRID_Y_LIMIT - 1, GRID_Y_LIMIT, GRID_Y_LIMIT + 1, 2 * GRID_Y_LIMIT,
                               2 * GRID_Y_LIMIT + 1, 10**6])
def test_gpu_gate_grids_put_the_batch_on_axis_1_only_within_its_limit(B):
    """The gate kernels' GPU grid (gates._grid, also the fused ops'): one example per program row on
    axis 1 up to 65535 examples, else the flat grid over B * C rows on axis 0; never an axis 1 past
    the limit. (Pure Python: a launch past the limit would take minutes under the interpreter.)"""
    import triton

    gates = importlib.import_module("pgnas_fast.triton.gates")
    for C, block_q in ((37, 16), (1, 1), (512, 64)):
        grid, split_rows = gates._grid(B, C, block_q, torch.device("cuda"))
        if B <= GRID_Y_LIMIT:
            assert split_rows and grid == (triton.cdiv(C, block_q), B)
        else:
            assert not split_rows and grid == (triton.cdiv(B * C, block_q),)
        assert len(grid) == 1 or grid[1] <= GRID_Y_LIMIT
        # the CPU (interpreter) grid is always the flat one
        assert gates._grid(B, C, block_q, torch.device("cpu")) == ((triton.cdiv(B * C, block_q),), False)


@pytest.mark.parametrize("B", [1, 3, GRID_Y_LIMIT - 1, GRID_Y_LIMIT, GRID_Y_LIMIT + 1, 2 * GRID_Y_LIMIT,
                               2 * GRID_Y_LIMIT + 1, 4 * GRID_Y_LIMIT + 7, 10**6])
def test_gpu_branch_combine_blocks_keep_axis_1_within_its_limit(B):
    """combine._blocks on a GPU: one example per program up to 65535 examples; past that the fewest
    examples per program (a power of two) that keep the grid's axis 1, cdiv(B, BLOCK_B), within 65535."""
    import triton

    combine = importlib.import_module("pgnas_fast.triton.combine")
    for R in (1, 49, 4096, 100_000):
        block_b, block_r = combine._blocks(B, R, torch.device("cuda"))
        assert triton.cdiv(B, block_b) <= GRID_Y_LIMIT
        assert block_b & (block_b - 1) == 0  # a power of two (a Triton block size)
        if B <= GRID_Y_LIMIT:
            assert block_b == 1
        else:
            assert triton.cdiv(B, block_b // 2) > GRID_Y_LIMIT  # no smaller block fits
        assert block_r == min(triton.next_power_of_2(R), 2048)


# relaxed gates' float32 outputs against the reference: the interpreter's numpy math rounds as torch's
# CPU math does; a GPU's exp, log and division are approximate to a few ulp, which 1/tau magnifies
RELAXED = 1e-6 if DEVICE == "cpu" else TOLERANCE[torch.float32]


def test_gated_apply_per_example_grid_of_the_gpu(monkeypatch):
    """The GPU grid (axis 1 = example, axis 0 = channel block), forced here under the interpreter; with
    an element offset past 2^32 (a data-parallel rank's rows), which the grid's row index must add."""
    import triton

    gates = importlib.import_module("pgnas_fast.triton.gates")
    monkeypatch.setattr(gates, "_grid", lambda B, C, block_q, device: ((triton.cdiv(C, 16), B), True))
    monkeypatch.setattr(gates, "_tiles", lambda n_rows, S, s_stride, device: (16, 32))
    gen = torch.Generator().manual_seed(7)
    for memory_format, offset in ((torch.contiguous_format, 0), (torch.channels_last, (1 << 32) + 5 * 37)):
        x = torch.randn(3, 37, 7, 9, generator=gen).to(DEVICE).contiguous(memory_format=memory_format)
        dy = torch.randn(x.shape, generator=gen).to(DEVICE)
        p_logit = torch.randn(37, generator=gen).to(DEVICE)
        ours = gates.gated_apply_backward(dy, x, p_logit, SEED, STREAM, 0.2, "relaxed", offset)
        ref = reference.gated_apply_backward(dy, x, p_logit, SEED, STREAM, 0.2, "relaxed", offset)
        out = gates.gated_apply(x, p_logit, SEED, STREAM, 0.2, "relaxed", offset)
        assert rel_err(out, reference.gated_apply(x, p_logit, SEED, STREAM, 0.2, "relaxed", offset)) < RELAXED
        assert rel_err(ours[0], ref[0]) < RELAXED and rel_err(ours[1], ref[1]) < 1e-5


@pytest.mark.parametrize("shape, memory_format, tiles", [
    ((2, 37, 7, 7), torch.contiguous_format, (64, 32)),  # rows of no multiple of 16: 32 positions a step
    ((2, 12, 14, 14), torch.contiguous_format, (16, 32)),
    ((2, 160, 2, 3), torch.channels_last, (64, 8)),  # channels_last: 64 channels a tile
])
def test_gated_apply_with_the_tiles_of_the_gpu(monkeypatch, shape, memory_format, tiles):
    """The GPU's tile rule (`_tiles` for a CUDA device) and grid, forced here under the interpreter."""
    import triton

    gates = importlib.import_module("pgnas_fast.triton.gates")
    gpu_rule, B, chosen = gates._tiles, shape[0], []

    def gpu_tiles(n_rows, S, s_stride, device):  # the wrapper passes B * C rows on CPU, C on a GPU
        chosen.append(gpu_rule(n_rows if device.type == "cuda" else n_rows // B, S, s_stride, torch.device("cuda")))
        return chosen[-1]

    monkeypatch.setattr(gates, "_tiles", gpu_tiles)
    monkeypatch.setattr(gates, "_grid", lambda B, C, block_q, device: ((triton.cdiv(C, block_q), B), True))
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(shape, generator=gen).to(DEVICE).contiguous(memory_format=memory_format)
    dy = torch.randn(shape, generator=gen).to(DEVICE)
    p_logit = torch.randn(shape[1], generator=gen).to(DEVICE)
    out = gates.gated_apply(x, p_logit, SEED, STREAM, 0.2, "relaxed", 0)
    ours = gates.gated_apply_backward(dy, x, p_logit, SEED, STREAM, 0.2, "relaxed", 0)
    ref = reference.gated_apply_backward(dy, x, p_logit, SEED, STREAM, 0.2, "relaxed", 0)
    assert chosen == [tiles, tiles]
    assert rel_err(out, reference.gated_apply(x, p_logit, SEED, STREAM, 0.2, "relaxed", 0)) < RELAXED
    assert rel_err(ours[0], ref[0]) < RELAXED and rel_err(ours[1], ref[1]) < 1e-5


# ---- ahead-of-time compilation for an H100, no GPU needed ---------------------------------------------
AOT_SCRIPT = r'''
"""Compiles the Triton kernels for sm_90 (PTX and cubin with the ptxas Triton ships) through Triton's
own launch path, `warmup`: the argument values are specialised as at a launch (i32 or i64, a value
of 1 as a constant, 16-byte divisibility of ints and pointers), compiled, never launched. A stand-in
driver answers the three questions warmup asks about the device. Each `launch_*` below mirrors a
host wrapper's launch site (same argument list, tiles from the wrappers' own helpers for a CUDA
device), on meta tensors, so strides and views come from the host code too. Every failure is
reported; exit status 1 if any, or if a module-level `*_kernel` of pgnas_fast/triton was never
compiled. `--full` adds the cross product of data and gate dtypes with the modes and layouts."""
import importlib
import pkgutil
import sys
import traceback

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction, MockTensor

import pgnas_fast.triton as backend
from pgnas_fast.ops.streams import Domain
from pgnas_fast.reference import stacked_empty_like

FULL = "--full" in sys.argv
H100_SHARED_MEMORY = 227 * 1024  # bytes one block may use
CUDA = torch.device("cuda")  # the wrappers' tile pickers only read its type
SEED, STREAM, OFFSET, TAU = 31415, (1 << 56) | (9 << 16) | 4, (1 << 32) + 3 * 96, 0.2
BF16, F16, F32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
DATA, GATES = (BF16, F16, F32, F64), (F32, F64)


class H100Driver:
    """What warmup asks the active driver: the current device, its stream and its compile target."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


driver.set_active(H100Driver())
MODULES = {m.name: importlib.import_module(f"{backend.__name__}.{m.name}")
           for m in pkgutil.iter_modules(backend.__path__)}
combine, fused, gates, gaussian, philox, regularizer = (
    MODULES[m] for m in ("combine", "fused", "gates", "gaussian", "philox", "regularizer"))


class Pointer(MockTensor):
    """A tensor argument as warmup sees it: dtype and address (16-byte aligned, or a view's offset)."""

    def __init__(self, t):
        super().__init__(t.dtype)
        self.address = t.storage_offset() * t.element_size()

    def data_ptr(self):
        return self.address


def meta(*shape, dtype=F32, channels_last=False):
    t = torch.empty(shape, dtype=dtype, device="meta")
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


compiled, failures = {}, []


def compile_for_h100(kernel, *args, **constexprs):
    name = kernel.fn.__name__
    compiled[name] = compiled.get(name, 0) + 1
    args = [Pointer(a) if isinstance(a, torch.Tensor) else a for a in args]
    try:
        binary = kernel.warmup(*args, grid=(1,), **constexprs)
        if binary.metadata.shared > H100_SHARED_MEMORY:
            raise RuntimeError(f"{binary.metadata.shared} bytes of shared memory, the H100 has {H100_SHARED_MEMORY}")
    except Exception as err:  # noqa: BLE001 - every failure is reported, then the next variant compiles
        described = [f"{a.dtype}@{a.address}" if isinstance(a, Pointer) else repr(a) for a in args]
        label = f"{name}({', '.join(described)}, {constexprs})"
        print(f"{label}:\n{traceback.format_exc()}", file=sys.stderr)
        while err.__cause__ is not None:  # the compiler's own error, under the source locations
            err = err.__cause__
        failures.append(f"{label}: {type(err).__name__}: {str(err).strip().splitlines()[-1]}")


# ---- gates.py -------------------------------------------------------------------------------------
def launch_reduce_gate_grad(g, keep, times_keep_derivative, dtype):
    B, C = g.shape
    out = meta(C, dtype=dtype)
    compile_for_h100(gates._gate_grad_kernel, g, keep, out, B, C, *philox.split_f64(TAU),
                     TIMES_KEEP_DERIVATIVE=times_keep_derivative, GATE_F64=dtype == F64,
                     BLOCK_B=min(triton.next_power_of_2(B), 32), BLOCK_C=min(triton.next_power_of_2(C), 128))


def launch_gate_keep(p_dtype, batch, C, mode):
    p_logit = meta(C, dtype=p_dtype)
    keep = meta(batch, C, dtype=p_dtype)
    n = batch * C
    compile_for_h100(gates._gate_keep_kernel, p_logit, keep, n, C, *gates._rng(SEED, STREAM, OFFSET, TAU),
                     MODE=gates.MODES[mode], GATE_F64=p_dtype == F64, BLOCK=min(triton.next_power_of_2(n), 1024))
    if mode == "relaxed":  # gate_keep_backward
        launch_reduce_gate_grad(meta(batch, C, dtype=p_dtype), keep, True, p_dtype)


def launch_candidate_keep(p_dtype, K, C, layer):
    drop_prob = meta(C, dtype=p_dtype).sigmoid()
    candidates, keep = meta(K, dtype=torch.int64), meta(K, C, dtype=p_dtype)
    n = K * C
    compile_for_h100(gates._candidate_keep_kernel, drop_prob, candidates, keep, n, C, *philox.split_u64(SEED),
                     layer, int(Domain.CANDIDATE), BLOCK=min(triton.next_power_of_2(n), 1024))


def bcs_launch(xv):
    """SPLIT_ROWS, BLOCK_Q and BLOCK_S of the gated kernels on a GPU (fused._launch_shape's)."""
    B, C, S = xv.shape
    block_q, block_s = gates._tiles(C, S, xv.stride(2), CUDA)
    _grid, split_rows = gates._grid(B, C, block_q, CUDA)
    return {"SPLIT_ROWS": split_rows, "BLOCK_Q": block_q, "BLOCK_S": block_s}


def fused_launch(xv):
    """fused._launch_shape's: bcs_launch's, and no fp fusion."""
    return {**bcs_launch(xv), **philox.EXACT}


def launch_gated_apply(x, p_dtype, mode, grad_channels_last=None):
    p_logit = meta(x.shape[1], dtype=p_dtype)
    flags = {"MODE": gates.MODES[mode], "GATE_F64": p_dtype == F64, "COMPUTE_F64": gates._compute_f64(x, p_logit)}
    xv, ov = gates._as_bcs(x), gates._out_bcs(torch.empty_like(x))
    B, C, S = xv.shape
    rng = gates._rng(SEED, STREAM, OFFSET, TAU)
    compile_for_h100(gates._gated_apply_kernel, xv, ov, p_logit, B * C, C, S, *xv.stride(), *ov.stride(), *rng,
                     **flags, **bcs_launch(xv))
    grad = x if grad_channels_last is None else meta(*x.shape, dtype=x.dtype, channels_last=grad_channels_last)
    dyv, gv = gates._as_bcs(grad), gates._out_bcs(torch.empty_like(x))
    partial = meta(B, C, dtype=p_dtype) if mode == "relaxed" else p_logit
    compile_for_h100(gates._gated_apply_backward_kernel, dyv, xv, gv, p_logit, partial, B * C, C, S,
                     *dyv.stride(), *xv.stride(), *gv.stride(), *rng, **flags, **bcs_launch(xv))
    if mode == "relaxed":
        launch_reduce_gate_grad(partial, partial, False, p_dtype)


# ---- fused.py -------------------------------------------------------------------------------------
def launch_affine_relu_gate(x, p_dtype, mode):
    C = x.shape[1]
    scale, shift, p_logit = (meta(C, dtype=p_dtype) for _ in range(3))  # BN's folded affine map: gate dtypes
    f64 = gates._compute_f64(x, scale, shift, p_logit)
    flags = {"MODE": gates.MODES[mode], "GATE_F64": p_dtype == F64, "COMPUTE_F64": f64}
    xv, ov = gates._as_bcs(x), gates._out_bcs(torch.empty_like(x))
    B, C, S = xv.shape
    rng = gates._rng(SEED, STREAM, OFFSET, TAU)
    compile_for_h100(fused._affine_relu_gate_kernel, xv, ov, scale, shift, p_logit, B * C, C, S, *xv.stride(),
                     *ov.stride(), *rng, **flags, **fused_launch(xv))
    dyv, gv = xv, gates._out_bcs(torch.empty_like(x))
    rows = meta(2, B, C, dtype=F64 if f64 else F32)
    partial = meta(B, C, dtype=p_dtype) if mode == "relaxed" else p_logit
    compile_for_h100(fused._affine_relu_gate_backward_kernel, dyv, xv, gv, scale, shift, p_logit, rows[0], rows[1],
                     partial, B * C, C, S, *dyv.stride(), *xv.stride(), *gv.stride(), *rng, **flags,
                     **fused_launch(xv))
    if mode == "relaxed":
        launch_reduce_gate_grad(partial, partial, False, p_dtype)


def launch_gated_copies(x, p_dtype, n_copies, mode, relu):
    p_logits = meta(n_copies, x.shape[1], dtype=p_dtype)
    streams = meta(2 * n_copies, dtype=torch.int32)
    flags = {"MODE": gates.MODES[mode], "GATE_F64": p_dtype == F64, "COMPUTE_F64": gates._compute_f64(x, p_logits),
             "RELU": relu}
    xv = gates._as_bcs(x)
    B, C, S = xv.shape
    ov = stacked_empty_like(x, n_copies).view(n_copies, B, C, S)
    seed_lo, seed_hi, _, _, offset_lo, offset_hi, tau_hi, tau_lo = gates._rng(SEED, 0, OFFSET, TAU)
    rng = (seed_lo, seed_hi, offset_lo, offset_hi, tau_hi, tau_lo)
    compile_for_h100(fused._gated_copies_kernel, xv, ov, p_logits, streams, n_copies, B * C, C, S, *xv.stride(),
                     *ov.stride(), *rng, **flags, **fused_launch(xv))
    dyv, gv = ov, gates._out_bcs(torch.empty_like(x))  # the incoming gradient in the copies' layout
    partial = meta(B, n_copies, C, dtype=p_dtype) if mode == "relaxed" else p_logits
    compile_for_h100(fused._gated_copies_backward_kernel, dyv, xv, gv, p_logits, streams, partial, n_copies, B * C,
                     C, S, *dyv.stride(), *xv.stride(), *gv.stride(), *rng, **flags, **fused_launch(xv))
    if mode == "relaxed":
        launch_reduce_gate_grad(partial.view(B, n_copies * C), partial, False, p_dtype)


# ---- combine.py -----------------------------------------------------------------------------------
def launch_branch_combine(shape, dtype, w_dtype, n_branches, per_example, skip_dtype):
    B, R = shape[0], torch.Size(shape[1:]).numel()
    ys = [meta(*shape, dtype=dtype) for _ in range(n_branches)]
    weights = meta(B, n_branches, dtype=w_dtype) if per_example else meta(n_branches, dtype=w_dtype)
    out = ys[0]
    skip = out if skip_dtype is None else meta(*shape, dtype=skip_dtype)
    block_b, block_r = combine._blocks(B, R, CUDA)
    compute_f64 = F64 in (dtype, w_dtype, skip_dtype)
    for base, count in combine._groups(n_branches):
        compile_for_h100(combine._combine_kernel, *combine._padded(ys, base, count), weights, skip, out, R, B,
                         n_branches, base, N_BRANCH=count, PER_EXAMPLE=per_example,
                         HAS_SKIP=skip_dtype is not None and base == 0, ACCUMULATE=base > 0,
                         COMPUTE_F64=compute_f64, BLOCK_B=block_b, BLOCK_R=block_r)


def launch_branch_combine_backward(shape, dtype, w_dtype, n_branches, per_example, backward_w_dtype):
    B, R = shape[0], torch.Size(shape[1:]).numel()
    grad = meta(*shape, dtype=dtype)
    ys, ds = ([meta(*shape, dtype=dtype) for _ in range(n_branches)] for _ in range(2))
    w_shape = (B, n_branches) if per_example else (n_branches,)
    weights = meta(*w_shape, dtype=w_dtype)
    want_weight_grad = backward_w_dtype is None
    if not want_weight_grad:  # shake-shake: the backward weights scale the gradients, no weight gradient
        ys = [grad] * n_branches
    block_b, block_r = combine._blocks(B, R, CUDA)
    chunks = -(-R // block_r)
    partial = meta(B, chunks, n_branches, dtype=w_dtype) if want_weight_grad else weights
    wb = weights if want_weight_grad else meta(*w_shape, dtype=backward_w_dtype)
    for base, count in combine._groups(n_branches):
        compile_for_h100(combine._combine_backward_kernel, grad, *combine._padded(ys, base, count),
                         *combine._padded(ds, base, count), wb, partial, R, B, n_branches, base, N_BRANCH=count,
                         PER_EXAMPLE=per_example, WANT_WEIGHT_GRAD=want_weight_grad,
                         COMPUTE_F64=F64 in (dtype, w_dtype), W_F64=w_dtype == F64, BLOCK_B=block_b,
                         BLOCK_R=block_r)


# ---- regularizer.py, gaussian.py, philox.py -------------------------------------------------------
def launch_regularizer(w_dtype, g_dtype):
    table = meta(56, regularizer.LAYER_COLUMNS.value, dtype=torch.int64)
    blocks = meta(300, 2, dtype=torch.int32)
    w_like, p_like = meta(64, 32, 3, 3, dtype=w_dtype), meta(32, dtype=g_dtype)
    scales = (*philox.split_f64(25.0 / 5e4), *philox.split_f64(2.0 / 5e4))
    g_type = regularizer._TL_TYPES[g_dtype]
    counter = meta(1, dtype=torch.int32)
    compile_for_h100(regularizer._regularizer_kernel, table, blocks, meta(150, dtype=g_dtype), counter,
                     meta(dtype=g_dtype), 150, w_like, p_like, *scales, G_TYPE=g_type, BLOCK_C=regularizer.BLOCK_C,
                     BLOCK_R=regularizer.BLOCK_R)
    compile_for_h100(regularizer._regularizer_backward_kernel, table, blocks, 233, meta(dtype=g_dtype),
                     meta(64 * 32 * 9, dtype=w_dtype), meta(32, dtype=g_dtype), w_like, p_like, *scales, G_TYPE=g_type,
                     BLOCK_W=regularizer.BLOCK_W, BLOCK_C=regularizer.BLOCK_C, BLOCK_R=regularizer.BLOCK_R)


def launch_gaussian_noise(like, channels_last, offset=OFFSET):
    """The kernel gaussian._noise_launch picks for `like` (forward and backward), with its GPU tiles."""
    n = like.numel()
    words = (*philox.split_u64(offset), *philox.split_u64(SEED), *philox.split_u64(STREAM))
    C, S = (like.shape[1], like.shape[2] * like.shape[3]) if channels_last else (1, n)
    for backward in (False, True):
        flags = {"BACKWARD": backward, "COMPUTE_F64": like.dtype == F64, **philox.EXACT}
        if not channels_last:
            compile_for_h100(gaussian._noise_dense_kernel, like, like, like, n, *words, LEAD=offset & 3, BLOCK_Q=256,
                             **flags)
        elif S % 4 == 0 and offset % 4 == 0:
            compile_for_h100(gaussian._noise_channels_last_kernel, like, like, like, n, C, S, *words, BLOCK_P=16,
                             BLOCK_C=min(triton.next_power_of_2(C), 64), **flags)
        else:
            compile_for_h100(gaussian._noise_elements_kernel, like, like, like, n, C, S, *words, BLOCK=1024, **flags)


def launch_gaussian_kl(dtype):
    table, blocks = meta(20, gaussian.KL_TABLE_COLUMNS.value, dtype=torch.int64), meta(40, 2, dtype=torch.int32)
    alpha = meta(96, dtype=dtype)
    compile_for_h100(gaussian._gaussian_kl_kernel, table, blocks, meta(40, dtype=dtype), meta(1, dtype=torch.int32),
                     meta(dtype=dtype), 40, alpha, G_TYPE=gaussian._TL_TYPES[dtype], BLOCK_C=gaussian.KL_BLOCK_C)
    compile_for_h100(gaussian._gaussian_kl_backward_kernel, table, blocks, meta(dtype=dtype), meta(96, dtype=dtype),
                     alpha, G_TYPE=gaussian._TL_TYPES[dtype], BLOCK_C=gaussian.KL_BLOCK_C)


def launch_philox_uniform(n):
    compile_for_h100(philox._philox_uniform_kernel, meta(1, dtype=F32), n, *philox.split_u64(OFFSET),
                     *philox.split_u64(SEED), *philox.split_u64(STREAM), BLOCK=min(1024, triton.next_power_of_2(n)))


# ---- the variants -----------------------------------------------------------------------------------
CIFAR, ODD, LINEAR = (128, 96, 32, 32), (3, 37, 7, 9), (128, 640)  # a conv map, odd sizes, a linear layer's input
HUGE_BATCH = (70000, 3, 1, 1)  # more examples than grid axis 1 takes: rows run flat (SPLIT_ROWS False)

for n in (5000, (1 << 31) + 5):  # n as i32 and as i64
    launch_philox_uniform(n)
for p_dtype in GATES:
    for mode in gates.MODES:
        launch_gate_keep(p_dtype, 128, 96, mode)
    launch_candidate_keep(p_dtype, 1000, 96, layer=1)  # a layer index of 1 is specialised as a constant
    launch_candidate_keep(p_dtype, 7, 37, layer=12)
launch_gate_keep(F32, 1, 1, "relaxed")

# (data dtype, gate dtype, mode, shape, channels_last): the GPU's 16-bit data, float32 data with float64
# gates (the gradcheck path), every mode and both layouts
GATED = [(BF16, F32, "relaxed", CIFAR, False), (BF16, F32, "hard", CIFAR, True), (F16, F32, "full", ODD, False),
         (F16, F32, "relaxed", ODD, True), (F32, F64, "relaxed", ODD, False), (F32, F64, "hard", CIFAR, True),
         (BF16, F64, "relaxed", ODD, False), (BF16, F32, "relaxed", LINEAR, False),
         (BF16, F32, "relaxed", HUGE_BATCH, False)]
if FULL:
    GATED += [(d, p, mode, shape, cl) for d in DATA for p in GATES for mode in gates.MODES
              for shape, cl in ((CIFAR, False), (ODD, True), (LINEAR, False))]
for dtype, p_dtype, mode, shape, channels_last in GATED:
    x = meta(*shape, dtype=dtype, channels_last=channels_last)
    launch_gated_apply(x, p_dtype, mode)
    launch_affine_relu_gate(x, p_dtype, mode)
    for relu in (False, True):
        launch_gated_copies(x, p_dtype, 3 if relu else 1, mode, relu)  # 1 copy: a constant n_copies
launch_gated_apply(meta(*CIFAR, dtype=BF16, channels_last=True), F32, "relaxed", grad_channels_last=False)

COMBINE = [(CIFAR, BF16, F32, 3, True, BF16), (CIFAR, F16, F32, 6, False, None), (ODD, F32, F64, 2, True, F32),
           (CIFAR, BF16, F32, 2, True, F32), (LINEAR, BF16, F32, 1, False, None),
           (HUGE_BATCH, BF16, F32, 2, True, BF16)]  # several examples per program
if FULL:
    COMBINE += [(CIFAR, d, w, n, per_example, skip) for d in DATA for w in GATES
                for n, per_example, skip in ((1, False, None), (3, True, d), (6, False, F32))]
for shape, dtype, w_dtype, n, per_example, skip_dtype in COMBINE:
    launch_branch_combine(shape, dtype, w_dtype, n, per_example, skip_dtype)
    launch_branch_combine_backward(shape, dtype, w_dtype, n, per_example, None)
    launch_branch_combine_backward(shape, dtype, w_dtype, n, per_example, w_dtype)  # shake-shake
launch_branch_combine_backward(CIFAR, BF16, F32, 2, True, F64)

REGULARIZER = [(BF16, F32), (F16, F32), (F32, F64)]  # (weight dtype, gate dtype)
if FULL:
    REGULARIZER += [(d, g) for d in DATA for g in GATES]
for w_dtype, g_dtype in REGULARIZER:
    launch_regularizer(w_dtype, g_dtype)
for dtype in GATES:
    launch_gaussian_kl(dtype)
for dtype in DATA:
    for channels_last in (False, True):
        launch_gaussian_noise(meta(*CIFAR, dtype=dtype, channels_last=channels_last), channels_last)
launch_gaussian_noise(meta(*ODD, dtype=BF16, channels_last=True), True)  # 7 x 9 positions: element by element
launch_gaussian_noise(meta(*ODD, dtype=F32), False, offset=OFFSET + 1)  # quads cut by the offset
launch_gaussian_noise(meta(1 << 16, 1 << 15 | 3, dtype=BF16), False)  # more than 2^31 elements: n as i64

kernels = {name for m in MODULES.values() for name, obj in vars(m).items()
           if isinstance(obj, JITFunction) and name.endswith("_kernel")}
for name in sorted(kernels - set(compiled)):
    failures.append(f"{name}: a kernel of pgnas_fast/triton never compiled here (add a launch_* for it)")
for failure in failures:
    print("FAILED", failure)
print(f"compiled {sum(compiled.values())} variants of {len(compiled)} kernels for sm_90; {len(failures)} failures")
sys.exit(1 if failures else 0)
'''


def run_aot_script(*args: str, timeout: float):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", AOT_SCRIPT, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


# on a GPU machine the GPU tests compile (and run) every kernel; the stand-in driver is for CPU machines
cpu_machine_only = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine compiles the kernels for real")


@cpu_machine_only
def test_kernels_compile_for_an_h100_without_one():
    """The interpreter does not run Triton's compiler, which is stricter (e.g. both sides of a runtime
    `if` must give a variable one type, no float64 in some intrinsics): compile every kernel ahead of
    time for sm_90, in the variants the host code launches on a GPU (16-bit data, float64 gates, both
    layouts, every mode), in a subprocess without TRITON_INTERPRET."""
    result = run_aot_script(timeout=600)
    assert result.returncode == 0 and "; 0 failures" in result.stdout, result.stdout + result.stderr[-6000:]


@pytest.mark.slow
@cpu_machine_only
def test_kernels_compile_for_an_h100_every_variant():
    """The cross product of data and gate dtypes, modes, layouts, shapes and branch counts."""
    result = run_aot_script("--full", timeout=3000)
    assert result.returncode == 0 and "; 0 failures" in result.stdout, result.stdout + result.stderr[-6000:]


def test_every_launched_kernel_is_compiled_ahead_of_time():
    """A new `*_kernel` in pgnas_fast/triton must get a launch in AOT_SCRIPT, or its first compile is on a GPU."""
    import ast
    import re
    from pathlib import Path

    kernels = []
    for path in sorted((Path(__file__).resolve().parents[1] / "pgnas_fast" / "triton").glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel") and any(
                    "triton.jit" in ast.unparse(d) for d in node.decorator_list):
                kernels.append(f"{path.stem}.{node.name}")
    assert len(kernels) >= 17
    missing = [k for k in kernels if not re.search(rf"\b{re.escape(k)}\b", AOT_SCRIPT)]
    assert not missing, f"kernels without an ahead-of-time compile in AOT_SCRIPT: {missing}"
