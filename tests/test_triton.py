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


def test_regularizer_mixed_weight_dtypes_and_layouts():
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(8, 4, 3, 3, generator=gen).to(memory_format=torch.channels_last),
               torch.randn(6, 8, generator=gen).half(), torch.randn(4, 2, 1, 1, generator=gen).double()]
    p_logits = [torch.randn(4, generator=gen), torch.randn(8, generator=gen), torch.randn(4, generator=gen)]
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


def test_gated_apply_per_example_grid_of_the_gpu(monkeypatch):
    """The GPU grid (axis 1 = example, axis 0 = channel block), forced here under the interpreter; with
    an element offset past 2^32 (a data-parallel rank's rows), which the grid's row index must add."""
    import triton

    gates = importlib.import_module("pgnas_fast.triton.gates")
    monkeypatch.setattr(gates, "_grid", lambda B, C, block_q, device: ((triton.cdiv(C, 16), B), True))
    monkeypatch.setattr(gates, "_tiles", lambda n_rows, S, s_stride, device: (16, 32))
    gen = torch.Generator().manual_seed(7)
    for memory_format, offset in ((torch.contiguous_format, 0), (torch.channels_last, (1 << 32) + 5 * 37)):
        x = torch.randn(3, 37, 7, 9, generator=gen).contiguous(memory_format=memory_format)
        dy = torch.randn(x.shape, generator=gen)
        p_logit = torch.randn(37, generator=gen)
        ours = gates.gated_apply_backward(dy, x, p_logit, SEED, STREAM, 0.2, "relaxed", offset)
        ref = reference.gated_apply_backward(dy, x, p_logit, SEED, STREAM, 0.2, "relaxed", offset)
        out = gates.gated_apply(x, p_logit, SEED, STREAM, 0.2, "relaxed", offset)
        assert rel_err(out, reference.gated_apply(x, p_logit, SEED, STREAM, 0.2, "relaxed", offset)) < 1e-6
        assert rel_err(ours[0], ref[0]) < 1e-6 and rel_err(ours[1], ref[1]) < 1e-5


AOT_SCRIPT = r'''
import importlib, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

philox, gates, combine, regularizer = (importlib.import_module("pgnas_fast.triton." + m)
                                       for m in ("philox", "gates", "combine", "regularizer"))
RNG = {"seed_lo": "i32", "seed_hi": "i32", "stream_lo": "i32", "stream_hi": "i32"}
TAU = {"tau_hi": "fp32", "tau_lo": "fp32"}
GATE_RNG = {**RNG, "offset_lo": "i32", "offset_hi": "i32"}  # the gates' element offset too


def compile_for_h100(kernel, signature, constexprs):
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))


compile_for_h100(philox._philox_uniform_kernel, {"out_ptr": "*fp32", "n": "i64", "offset_lo": "i32",
                 "offset_hi": "i32", **RNG}, {"BLOCK": 1024})
compile_for_h100(gates._gate_keep_kernel, {"p_ptr": "*fp64", "keep_ptr": "*fp64", "n": "i32", "C": "i32", **GATE_RNG,
                 **TAU},
                 {"MODE": 0, "GATE_F64": True, "BLOCK": 1024})
compile_for_h100(gates._gate_grad_kernel, {"g_ptr": "*fp32", "keep_ptr": "*fp32", "out_ptr": "*fp32", "B": "i32",
                 "C": "i32", **TAU}, {"TIMES_KEEP_DERIVATIVE": True, "GATE_F64": False, "BLOCK_B": 32, "BLOCK_C": 128})
strides = {f"s{t}{a}": "i32" for t in "dxg" for a in "bcs"}
compile_for_h100(gates._gated_apply_kernel, {"x_ptr": "*bf16", "out_ptr": "*bf16", "p_ptr": "*fp32", "n_rows": "i32",
                 "C": "i32", "S": "i32", **{f"s{t}{a}": "i32" for t in "xo" for a in "bcs"}, **GATE_RNG, **TAU},
                 {"MODE": 0, "GATE_F64": False, "COMPUTE_F64": False, "SPLIT_ROWS": True, "BLOCK_Q": 128,
                  "BLOCK_S": 32})
compile_for_h100(gates._gated_apply_backward_kernel, {"dy_ptr": "*bf16", "x_ptr": "*bf16", "dx_ptr": "*bf16",
                 "p_ptr": "*fp32", "partial_ptr": "*fp32", "n_rows": "i32", "C": "i32", "S": "i32", **strides,
                 **GATE_RNG, **TAU}, {"MODE": 0, "GATE_F64": False, "COMPUTE_F64": False, "SPLIT_ROWS": True, "BLOCK_Q": 4,
                 "BLOCK_S": 1024})
ys = {f"y{i}": "*bf16" for i in range(4)}
compile_for_h100(combine._combine_kernel, {**ys, "w_ptr": "*fp32", "skip_ptr": "*bf16", "out_ptr": "*bf16", "R": "i32",
                 "B": "i32", "s_total": "i32", "s_base": "i32"}, {"N_BRANCH": 3, "PER_EXAMPLE": True, "HAS_SKIP": True,
                 "ACCUMULATE": False, "COMPUTE_F64": False, "BLOCK_B": 1, "BLOCK_R": 2048})
compile_for_h100(combine._combine_backward_kernel, {"g_ptr": "*bf16", **ys, **{f"d{i}": "*bf16" for i in range(4)},
                 "wb_ptr": "*fp32", "partial_ptr": "*fp32", "R": "i32", "B": "i32", "s_total": "i32", "s_base": "i32"},
                 {"N_BRANCH": 2, "PER_EXAMPLE": False, "WANT_WEIGHT_GRAD": True, "COMPUTE_F64": False, "W_F64": False,
                  "BLOCK_B": 1, "BLOCK_R": 2048})
scales = {"wr_hi": "fp32", "wr_lo": "fp32", "dr_hi": "fp32", "dr_lo": "fp32"}
compile_for_h100(regularizer._regularizer_kernel, {"table_ptr": "*i64", "blocks_ptr": "*i32", "partial_ptr": "*fp32",
                 "w_like": "*bf16", "p_like": "*fp32", **scales}, {"G_TYPE": tl.float32, "BLOCK_C": 32, "BLOCK_R": 32})
compile_for_h100(regularizer._regularizer_backward_kernel, {"table_ptr": "*i64", "blocks_ptr": "*i32",
                 "n_weight_blocks": "i32", "grad_ptr": "*fp32", "w_like": "*bf16", "p_like": "*fp32", **scales},
                 {"G_TYPE": tl.float32, "BLOCK_W": 1024, "BLOCK_C": 32, "BLOCK_R": 32})
print("compiled")
'''


def test_kernels_compile_for_an_h100_without_one():
    """The interpreter does not run Triton's compiler, which is stricter (e.g. both sides of a runtime
    `if` must give a variable one type): compile every kernel ahead of time for sm_90 (PTX and cubin
    with the ptxas Triton ships; no GPU needed), in a subprocess without TRITON_INTERPRET."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]
