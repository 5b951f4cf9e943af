"""GPU kernel launches of the whole-network ops (issue 4: the regulariser of SupNet-MI and D-121 in at
most 2 launches): counted by the profiler on the device, for every native backend that runs there.
On CPU, tests/test_triton.py counts the Triton launches of the same calls through the interpreter."""
from __future__ import annotations

import pytest
import torch

import pgnas_fast as pf
from pgnas_fast import supernets
from pgnas_fast.nn import gated_layers


def _kernels(fn) -> list[str]:
    """Names of the CUDA kernels `fn` launches (after one warm-up call: compilation, tables)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
            and not e.name.startswith(("Memcpy", "Memset"))]


@pytest.mark.gpu
@pytest.mark.parametrize("network", ["supnet-mi", "supnet-d121"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_regularizer_value_and_gradients_in_two_launches(network, backend):
    if not pf.backends()[backend][0]:
        pytest.skip(f"{backend} backend unavailable: {pf.backends()[backend][1]}")
    model = supernets.create(network, num_classes=10).cuda()
    layers = [layer for _, layer in gated_layers(model)]
    weights = [layer.weight for layer in layers]
    p_logits = [layer.p_logit_per_channel().detach().requires_grad_() for layer in layers]

    one = torch.ones((), device="cuda")  # made here: backward() would launch a fill for it

    def step():
        for t in weights + p_logits:
            t.grad = None  # the gradients are handed over, not added: no accumulation kernels
        r = pf.ops.regularizer(weights, p_logits, weight_reg=10.0, drop_reg=1.0, n_train=5e4, backend=backend)
        r.backward(one)

    kernels = _kernels(step)
    assert len(kernels) <= 2, kernels


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_cuda_graph_captures_the_regularizer_and_kl_forward_backward(backend):
    """Once their tables are cached, the whole-network ops copy nothing to the device (gradients go to
    flat buffers), so a CUDA graph captures value and gradients; a replay gives eager's bits."""
    if not pf.backends()[backend][0]:
        pytest.skip(f"{backend} backend unavailable: {pf.backends()[backend][1]}")
    torch.manual_seed(0)
    model = supernets.create("supnet-d121", num_classes=10).cuda()
    layers = [layer for _, layer in gated_layers(model)]
    weights = [layer.weight for layer in layers]
    p_logits = [(layer.p_logit_per_channel().detach() + torch.randn_like(layer.p_logit_per_channel())).requires_grad_()
                for layer in layers]
    log_alphas = [(4 * torch.rand_like(p) - 2).requires_grad_() for p in p_logits]
    counts = [layer.weights_per_channel() for layer in layers]
    leaves = weights + p_logits + log_alphas

    def step():
        for t in leaves:
            t.grad = None
        r = pf.ops.regularizer(weights, p_logits, weight_reg=10.0, drop_reg=1.0, n_train=5e4, backend=backend)
        kl = pf.ops.gaussian_kl(log_alphas, counts, n_train=5e4, backend=backend)
        (r + 0.5 * kl).backward()
        return r, kl

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compiles, caches the tables) on the capturing stream
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    expected = [t.detach().clone() for t in step()] + [t.grad.clone() for t in leaves]

    graph = torch.cuda.CUDAGraph()
    for t in leaves:
        t.grad = None
    with torch.cuda.graph(graph, stream=side):
        outputs = step()
    graph.replay()
    torch.cuda.synchronize()
    got = list(outputs) + [t.grad for t in leaves]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
