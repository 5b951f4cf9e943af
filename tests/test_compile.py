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


def test_shake_block_with_the_fused_paths_compiles_under_inductor():
    """A shake-shake block trains through gated_copies and the fused BN - ReLU - gate (cpu backend) and
    through single-group gates; torch.compile (Inductor) gives eager's values and gradients."""
    if not pf.backends()["cpu"][0]:
        pytest.skip(pf.backends()["cpu"][1])
    from pgnas_fast.supernets.shake_shake import ShakeBlock

    results = []
    for compile_it in (False, True):
        torch.manual_seed(0)
        block = ShakeBlock(6, 6, 1, dict(gate_groups=None, p_init=0.2, backend="cpu"), "cpu").train()
        set_gates(block, "relaxed", seed=1, step=2)
        x = torch.randn(3, 6, 6, 6, generator=torch.Generator().manual_seed(1)).requires_grad_()
        out = (torch.compile(block) if compile_it else block)(x)
        out.backward(torch.cos(out.detach()))
        results.append((out.detach(), x.grad, [p.grad for p in block.parameters()]))
    (out_e, gx_e, gp_e), (out_c, gx_c, gp_c) = results
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_c, gx_e, rtol=1e-4, atol=1e-5)
    for compiled, eager in zip(gp_c, gp_e):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("posterior", ["concrete", "gaussian"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_a_compiled_training_loop_compiles_twice_under_dynamic_streams(backend, posterior):
    """set_gates gives the gates and shake-shake new stream ids every step; under dynamic_streams the
    second step recompiles with them symbolic and the later steps reuse it, with eager's losses."""
    if not pf.backends()[backend][0]:
        pytest.skip(pf.backends()[backend][1])
    from pgnas_fast import supernets
    from pgnas_fast.nn import dynamic_streams, set_posterior

    torch.manual_seed(0)
    model = supernets.create("digits-tiny", width=8).train()
    set_posterior(model, posterior)
    x = torch.randn(5, 1, 8, 8)
    y = torch.randint(0, 10, (5,))
    graphs = []

    def count_graphs(graph_module, example_inputs):  # a dynamo backend that runs the captured graph
        graphs.append(graph_module)
        return graph_module.forward

    def loss_fn(x, y):
        return torch.nn.functional.cross_entropy(model(x), y) + network_regularizer(model, weight_reg=10.0,
                                                                                   n_train=100.0)

    torch._dynamo.reset()  # no sizes or ints marked dynamic by an earlier test of the same code
    compiled = torch.compile(loss_fn, backend=count_graphs)
    with pf.use_backend(backend), dynamic_streams():
        for step in range(5):
            set_gates(model, "relaxed", seed=3, step=step)
            expected = loss_fn(x, y)
            assert torch.equal(compiled(x, y), expected), step
            assert len(graphs) == min(step + 1, 2), step
