"""torch.compile sees the op set: a gated conv training step and a shake-shake mix trace with
fullgraph=True (the custom ops stay opaque) and match eager values and gradients."""
from __future__ import annotations

import pytest
import torch

import pgnas_fast as pf
from pgnas_fast.nn import GatedConv2d, ShakeShake, network_regularizer, set_gates


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gated_conv_step_compiles_fullgraph(backend):
    if not pf.backends()[backend][0]:
        pytest.skip(pf.backends()[backend][1])
    torch.manual_seed(0)
    conv = GatedConv2d(4, 6, 3, padding=1, gate_groups=2)
    combine = ShakeShake().train()
    set_gates(torch.nn.ModuleList([conv, combine]), "relaxed", seed=1, step=7)
    x = torch.randn(3, 4, 5, 5)

    def step(x):
        y = conv(x)
        mixed = combine([y, torch.relu(y)], skip=y)
        return mixed.square().mean() + network_regularizer(conv, weight_reg=10.0, n_train=100.0)

    with pf.use_backend(backend):
        eager = step(x)
        eager.backward()
        grads = [p.grad.clone() for p in conv.parameters()]
        conv.zero_grad()
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
        compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for expected, p in zip(grads, conv.parameters()):
        torch.testing.assert_close(p.grad, expected)
