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
