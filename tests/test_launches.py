"""How the GPU is driven (GPU only, but for one CPU image of a launch count): kernel launches of the
whole-network ops (issue 4: the regulariser of SupNet-MI and D-121 in at most 2 launches), counted by
the profiler for every native backend that runs there; their capture in CUDA graphs; and no host
synchronisation in a training step or a candidate pass. On CPU, tests/test_triton.py counts the
Triton launches of the same calls through the interpreter."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pgnas_fast as pf
from pgnas_fast import supernets
from pgnas_fast.nn import gated_layers, network_regularizer, set_gates, set_posterior, stacked_candidate_masks

from conftest import DispatchLog, load_benchmark


def _kernel_launches(fn) -> int:
    """Kernels one call of `fn` launches after a warm-up call (compilation, tables): the GPU
    benchmark's counter (benchmarks/bench_gpu.py), one definition for both."""
    return load_benchmark("bench_gpu").kernel_launches(fn)


@pytest.mark.gpu
@pytest.mark.parametrize("network", ["supnet-mi", "supnet-d121"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_regularizer_value_and_gradients_in_two_launches(network, backend):
    if not pf.backends()[backend][0]:
        pytest.skip(f"{backend} backend unavailable: {pf.backends()[backend][1]}")
    model = supernets.create(network, num_classes=10).cuda()
    layers = [layer for _, layer in gated_layers(model)]
    weights = [layer.weight for layer in layers]
    # contiguous leaves: autograd clones the gradient of an expanded (stride-0) leaf, one copy per layer
    p_logits = [layer.p_logit_per_channel().detach().clone().requires_grad_() for layer in layers]

    one = torch.ones((), device="cuda")  # made here: backward() would launch a fill for it

    def step():
        for t in weights + p_logits:
            t.grad = None  # the gradients are handed over, not added: no accumulation kernels
        r = pf.ops.regularizer(weights, p_logits, weight_reg=10.0, drop_reg=1.0, n_train=5e4, backend=backend)
        r.backward(one)

    assert _kernel_launches(step) <= 2


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


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_regularizer_captured_first_on_a_stream_then_called_eagerly_there(backend):
    """The one-launch sum's ticket counter (one per stream) must not come from a capture: a graph
    captured by the first call on a stream, then an eager call on that stream before any replay,
    both give eager's value."""
    if not pf.backends()[backend][0]:
        pytest.skip(f"{backend} backend unavailable: {pf.backends()[backend][1]}")
    gen = torch.Generator(device="cuda").manual_seed(3)
    weights = [torch.randn(8, 4, 3, 3, device="cuda", generator=gen), torch.randn(6, 8, device="cuda", generator=gen)]
    p_logits = [torch.randn(4, device="cuda", generator=gen), torch.randn(8, device="cuda", generator=gen)]

    def value():
        return pf.ops.regularizer(weights, p_logits, weight_reg=10.0, drop_reg=1.0, n_train=5e4, backend=backend)

    expected = value().clone()  # on the default stream: compiles and caches the tables
    torch.cuda.synchronize()
    side, graph = torch.cuda.Stream(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        captured = value()
    with torch.cuda.stream(side):
        eager = value()
    torch.cuda.synchronize()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(eager, expected) and torch.equal(captured, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_captured_regularizer_replays_right_after_its_table_left_the_cache(backend):
    """A replay reads the launch table captured with it: after more new tables than the cache holds
    (their device memory reused by the allocator), the replay still gives eager's value."""
    if not pf.backends()[backend][0]:
        pytest.skip(f"{backend} backend unavailable: {pf.backends()[backend][1]}")
    gen = torch.Generator(device="cuda").manual_seed(4)
    weights = [torch.randn(8, 4, 3, 3, device="cuda", generator=gen), torch.randn(6, 8, device="cuda", generator=gen)]
    p_logits = [torch.randn(4, device="cuda", generator=gen), torch.randn(8, device="cuda", generator=gen)]

    def value(ws, ps):
        return pf.ops.regularizer(ws, ps, weight_reg=10.0, drop_reg=1.0, n_train=5e4, backend=backend)

    expected = value(weights, p_logits).clone()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = value(weights, p_logits)
    for rows in range(1, 100):  # 99 other tables: more than either cache keeps (64)
        value([torch.randn(rows, 4, device="cuda")], [torch.randn(4, device="cuda")])
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, expected)


@pytest.mark.gpu
def test_gpu_capture_of_a_per_call_host_copy_is_refused():
    """Triton's gated copies copy their stream words to the device on every call: under a capture that
    is a clear error, not a graph that replays from a freed pinned buffer."""
    if not pf.backends()["triton"][0]:
        pytest.skip(f"triton backend unavailable: {pf.backends()['triton'][1]}")
    x, p_logits = torch.randn(4, 6, 5, 5, device="cuda"), torch.randn(2, 6, device="cuda")
    pf.ops.gated_copies(x, p_logits, seed=1, streams=[1, 2], backend="triton")  # compiled outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="stream words must be copied .* CUDA graph"):
        with torch.cuda.graph(graph):
            pf.ops.gated_copies(x, p_logits, seed=1, streams=[1, 2], backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("posterior", ["concrete", "gaussian"])
@pytest.mark.parametrize("network", ["digits-tiny", "supnet-mi"])
@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_gpu_training_step_and_candidate_pass_never_synchronise(network, backend, posterior):
    """A host sync (a value read back, a copy from pageable memory) drains the launch queue every
    time; none may happen inside a training step (relaxed gates or Gaussian noise, shake-shake, the
    regulariser or KL, clipping, SGD) or a batched candidate pass, after one warm-up step."""
    if not pf.backends()[backend][0]:
        pytest.skip(f"{backend} backend unavailable: {pf.backends()[backend][1]}")
    knobs, channels, size = {"digits-tiny": ({}, 1, 8), "supnet-mi": ({"k": 1, "blocks_per_stage": 1}, 3, 32)}[network]
    torch.manual_seed(0)
    model = supernets.create(network, num_classes=10, **knobs).cuda()
    set_posterior(model, posterior)
    x = torch.randn(16, channels, size, size, device="cuda")
    y = torch.randint(0, 10, (16,), device="cuda")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def train_step(step):
        model.train()
        set_gates(model, "relaxed", seed=3, step=step)
        loss = F.cross_entropy(model(x), y) + network_regularizer(model, weight_reg=10.0, n_train=1000.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()

    def candidate_pass():
        model.eval()
        set_gates(model, "hard", masks=stacked_candidate_masks(model, 0, range(4)))
        return model(x.repeat(4, 1, 1, 1))

    with pf.ops.use_backend(backend):
        train_step(0)  # compiles the kernels, caches the launch tables, makes the momentum buffers
        candidate_pass()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            train_step(1)
            logits = candidate_pass()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(logits).all()


def test_a_regularizer_step_runs_only_its_two_ops(backend):
    """The CPU image of the GPU launch count above: forward and backward of the whole-network
    regulariser dispatch the op and its backward op and nothing else that would launch a kernel
    (views of the flat gradients only; no copy, clone or fill per tensor)."""
    gen = torch.Generator().manual_seed(3)
    shapes = [((8, 3, 3, 3), 3), ((10, 6), 6), ((8, 2, 3, 3), 4), ((6, 1, 3, 3), 6), ((9, 2, 1, 1), 6)]
    weights = [torch.randn(s, generator=gen).requires_grad_() for s, _ in shapes]
    p_logits = [torch.randn(c, generator=gen).requires_grad_() for _, c in shapes]
    one = torch.ones(())

    def step():
        for t in weights + p_logits:
            t.grad = None
        pf.ops.regularizer(weights, p_logits, weight_reg=10.0, drop_reg=1.0, n_train=5e4, backend=backend).backward(one)

    step()
    with DispatchLog() as log:
        step()
    launching = [name for name in log.names if name.split(".")[1] not in ("view", "slice", "split_with_sizes", "detach")]
    assert launching == ["pgnas_fast.regularizer.default", "pgnas_fast.regularizer_backward.default"], launching
    assert all(w.grad is not None and p.grad is not None for w, p in zip(weights, p_logits))
