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


def _traced_equals_eager(module, shape):
    """torch.jit.trace of `module` on one input equals the module on another (the trace recorded the ops, not
    their outputs)."""
    import warnings

    generator = torch.Generator().manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(module, torch.randn(shape, generator=generator))
    other = torch.randn(shape, generator=generator) * 2 + 0.3
    with torch.no_grad():
        torch.testing.assert_close(traced(other), module(other), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("posterior", ["concrete", "gaussian"])
@pytest.mark.parametrize("mode", ["hard", "full"])
def test_jit_trace_records_the_ops_of_a_candidate_and_the_full_network(backend, posterior, mode):
    from pgnas_fast import supernets
    from pgnas_fast.nn import set_posterior

    if not pf.backends()[backend][0]:
        pytest.skip(pf.backends()[backend][1])
    torch.manual_seed(0)
    model = supernets.create("digits-tiny", in_channels=3).eval()
    set_posterior(model, posterior)
    set_gates(model, mode, **({"seed": 0, "candidate": 5} if mode == "hard" else {}))
    with pf.use_backend(backend):
        _traced_equals_eager(model, (3, 3, 8, 8))


def test_jit_trace_takes_the_drop_in_conv_with_loaded_noise():
    from pgnas_fast.compat import Conv2d_with_CD

    torch.manual_seed(0)
    conv = Conv2d_with_CD(6, 4, 3, deterministic=True, split=2, split_pattern=[2, 4])
    with torch.no_grad():
        conv.p_logit.copy_(torch.tensor([0.3, -0.4]))
        conv.unif_noise_variable.uniform_()
    _traced_equals_eager(conv, (2, 6, 7, 7))


def test_jit_trace_and_export_refuse_random_gates_instead_of_freezing_them():
    """A trace or an exported program records the seed and stream as constants: it would draw the same gates
    on every call."""
    from pgnas_fast import supernets
    from pgnas_fast.compat import Conv2d_with_CD, Linear_with_CD
    from pgnas_fast.nn import set_posterior

    relaxed = supernets.create("digits-tiny").train()
    set_gates(relaxed, "relaxed", seed=0, step=1)
    gaussian = supernets.create("digits-tiny").train()
    set_posterior(gaussian, "gaussian")
    set_gates(gaussian, "relaxed", seed=0, step=1)
    class Shaken(torch.nn.Module):  # shake-shake's branch weights in training
        def __init__(self):
            super().__init__()
            self.combine = ShakeShake()

        def forward(self, x):
            return self.combine([x, 2 * x], skip=x)

    shaken = Shaken().train()
    set_gates(shaken, "relaxed", seed=0, step=1)
    cases = [(relaxed, (2, 1, 8, 8), r"mode='relaxed' \(gates drawn afresh from seed and stream\) cannot be traced"),
             (shaken, (2, 3, 4, 4), r"philox_uniform \(random numbers of seed and stream\) cannot be traced"),
             (gaussian, (2, 1, 8, 8), r"cannot be traced"),
             (Conv2d_with_CD(3, 4, 3, deterministic=False), (2, 3, 5, 5), r"mode='relaxed' .* cannot be traced"),
             (Linear_with_CD(3, 4), (2, 3), r"mode='relaxed' .* cannot be traced")]
    for module, shape, message in cases:
        for trace in (torch.jit.trace, torch.export.export):
            with pytest.raises(RuntimeError, match=message + ": torch.jit.trace and torch.export would record its "
                                                              "seed and stream as constants"):
                trace(module, (torch.randn(shape),))
