"""GPU benchmark of the op set: every backend's kernels in GB/s against the copy bandwidth, judged against the issues' targets.

Run by benchmarks/gpu_suite.sh (see benchmarks/README.md). For each op and shape it times, with
`triton.testing.do_bench` (median), the backend functions themselves (no autograd, no custom-op
layer): `reference` eager, `reference+compile` (torch.compile of the same plain-torch functions)
and every other available backend of `pgnas_fast.backends()` that takes CUDA tensors (so a `cuda`
backend joins automatically). GB/s counts the bytes an op must move at least; `%copy` compares it
with a measured device-to-device copy. The regulariser and the Gaussian KL run on the gated layers
of the real SupNet-MI and SupNet-D-121, whose regulariser kernel launches are also counted (CUDA
profiler, in a child process so that the profiler cannot slow the timings).

results.md opens with a Targets section (results.json: `targets`): one row per target of issues 4
(Triton), 5 (CUDA) and 8 (Gaussian) per backend, with the worst measured case, the threshold and
PASS / FAIL / UNMEASURED (and why). The measurements the targets need are taken first, so that
`--time-budget` cuts only the other rows; the files are written after each phase.

`--dry-run` runs the same code on CPU under TRITON_INTERPRET=1 with tiny shapes and networks and a
wall-clock timer, so the script is checked before a GPU session runs it blind.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN:  # the interpreter must be on before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import pgnas_fast as pf  # noqa: E402
from pgnas_fast import reference, supernets  # noqa: E402
from pgnas_fast.nn import gated_layers  # noqa: E402
from pgnas_fast.nn.gated import LOG_ALPHA_LIMIT  # noqa: E402
from pgnas_fast.ops import dispatch  # noqa: E402
from pgnas_fast.ops.streams import Domain, stream_id  # noqa: E402

SEED, STREAM, TAU = 7, stream_id(Domain.TRAIN, 1000, 3), 0.2
OPS = ("philox_uniform", "gate_keep", "gated_apply", "gated_apply_fwd_bwd", "affine_relu_gate_fwd_bwd",
       "gated_copies_fwd_bwd", "branch_combine", "branch_combine_fwd_bwd", "regularizer_fwd_bwd", "gaussian_noise_fwd_bwd",
       "gaussian_kl_fwd_bwd")
GAUSSIAN_STREAM = stream_id(Domain.GAUSSIAN, 1000, 3)
EAGER_BASELINE = "torch eager randn_like"  # the Gaussian epilogue as plain autograd code would write it
COMPILED = "reference+compile"
REGULARIZER_ARGS = (10.0, 1.0, 5e4)  # weight_reg, drop_reg, n_train
# The real super-networks whose gated layers the regulariser and the KL run on: name -> classes (the dry
# run builds them at supernets.SMALL_SIZES)
NETWORKS = {"supnet-mi": 10, "supnet-d121": 1000}
LAUNCH_COUNT_TIMEOUT_S = (40, 120)  # the child's timeout: what is left of the budget (+30 s), within these
LAUNCHES_MARK = "launch counts: "  # the child's output line


# ---- the issues' targets (benchmarks/README.md, "Reading the Targets section") -----------------------------
# Issue 4 (Triton): "every fused memory-bound op at the large shapes at or above 80% of the measured
# copy bandwidth; gated_apply forward+backward at least 3x reference eager and 1.5x
# torch.compile(reference); the regulariser for SupNet-MI (56 gates) and D-121 (119 gates) in at
# most 2 kernel launches and at least 10x reference eager."
# Issue 5 (CUDA): "the Triton issue's targets for the cuda backend too; CUDA and Triton within 15% of
# each other on every op (or benchmarks/README.md explains why)."
# Issue 8 (Gaussian): "the epilogue (gaussian_noise forward+backward) at or above 80% of the copy
# bandwidth and at least 2x a plain-torch eager local-reparameterization layer on CIFAR shapes."
KERNEL_ISSUES = {"triton": "4", "cuda": "5"}  # backend -> the issue whose kernel targets it is judged by
# the memory-bound ops of issue 4's %copy target: those that stream activations at the large
# shapes, and the Philox stream (n = 2^24). The regulariser has targets of its own (launches,
# speed-up); its % copy is in the table, not judged.
COPY_JUDGED = (("gated_apply", "large"), ("gated_apply_fwd_bwd", "large"), ("affine_relu_gate_fwd_bwd", "large"),
               ("gated_copies_fwd_bwd", "large"), ("branch_combine", "large"), ("branch_combine_fwd_bwd", "large"),
               ("philox_uniform", "large"))
SUBSETS = {"large": "large shapes", "cifar": "CIFAR shapes", "supnet-mi": "SupNet-MI", "supnet-d121": "SupNet-D-121",
           None: "every judged case"}


@dataclass(frozen=True)
class Target:
    """One target for one backend. kind: pct_copy (% of the copy bandwidth), speedup (over
    `baseline`'s time), launches (kernels of one forward plus one backward call: the issue's "in at
    most 2 launches" read strictly, value and gradients together), parity (% the slower of cuda and
    triton takes longer)."""
    issue: str
    backend: str
    kind: str
    threshold: float
    op: str
    subset: str | None  # the cases judged: a key of SUBSETS (None: every case a target is judged on)
    baseline: str | None = None

    @property
    def higher_is_better(self) -> bool:
        return self.kind in ("pct_copy", "speedup")

    @property
    def text(self) -> str:
        where = SUBSETS[self.subset]
        if self.kind == "pct_copy":
            return f"{self.op}: % copy, {where}"
        if self.kind == "speedup":
            return f"{self.op}: x {self.baseline}, {where}"
        if self.kind == "launches":
            return f"regularizer {where}: launches fwd + bwd together"
        return f"{self.op}: cuda vs triton time apart, {where}"

    @property
    def threshold_text(self) -> str:
        sign = ">=" if self.higher_is_better else "<="
        unit = {"pct_copy": "%", "speedup": "x", "launches": "", "parity": "%"}[self.kind]
        return f"{sign} {self.threshold:g}{unit}"


def targets() -> list[Target]:
    """Every target row of the Targets section, in the order it is printed."""
    out = []
    for backend, issue in KERNEL_ISSUES.items():
        out += [Target(issue, backend, "pct_copy", 80, op, subset) for op, subset in COPY_JUDGED]
        out += [Target(issue, backend, "speedup", 3.0, "gated_apply_fwd_bwd", "large", "reference"),
                Target(issue, backend, "speedup", 1.5, "gated_apply_fwd_bwd", "large", COMPILED)]
        for net in NETWORKS:
            out += [Target(issue, backend, "speedup", 10.0, "regularizer_fwd_bwd", net, "reference"),
                    Target(issue, backend, "launches", 2, "regularizer_fwd_bwd", net)]
    out += [Target("5", "cuda vs triton", "parity", 15, op, None) for op in OPS]
    for backend in KERNEL_ISSUES:
        out += [Target("8", backend, "pct_copy", 80, "gaussian_noise_fwd_bwd", "cifar"),
                Target("8", backend, "speedup", 2.0, "gaussian_noise_fwd_bwd", "cifar", EAGER_BASELINE)]
    return out


def baselines_needed(op: str) -> set[str]:
    """The implementations a speed-up target of `op` divides by (timed with the targets' rows)."""
    return {t.baseline for t in targets() if t.op == op and t.baseline is not None}


def judge(measured, missing, threshold: float, higher_is_better: bool) -> dict:
    """PASS / FAIL / UNMEASURED of a target over its cases, with the worst measured case.

    measured: [(value, where)]; missing: [(where, why)] for the cases without a value. One failing
    case fails the target; it passes only when every case was measured and passes.
    """
    measured = [(v, where) for v, where in measured if not math.isnan(v)]
    worst = (min if higher_is_better else max)(measured, key=lambda m: m[0]) if measured else None
    out = {"value": worst[0] if worst else None, "at": worst[1] if worst else None, "why": None}
    if missing:
        reasons = "; ".join(sorted({why for _, why in missing}))
        out["why"] = reasons if not measured else f"{len(missing)} of {len(missing) + len(measured)} cases: {reasons}"
    if worst is not None and not (worst[0] >= threshold if higher_is_better else worst[0] <= threshold):
        out["verdict"] = "FAIL"
    elif worst is None or missing:
        out["verdict"] = "UNMEASURED"
    else:
        out["verdict"] = "PASS"
    return out


def evaluate(target: Target, case_list, results: list[dict], launches: dict, absent: dict[str, str]) -> dict:
    """The Targets row of `target` from the cases [(op, shape, subset)], the result rows, the launch
    counts and the reasons why an implementation has no rows (`absent`)."""
    rows = {(r["op"], r["shape"], r["backend"]): r for r in results}
    cases = [shape for op, shape, subset in case_list
             if op == target.op and (subset == target.subset if target.subset else subset is not None)]

    def timed(shape, impl):
        """(ms, None) or (None, why not)."""
        row = rows.get((target.op, shape, impl))
        if row is None:
            return None, absent.get(impl, f"{impl}: not run yet")
        return (row["ms"], None) if row.get("ms") is not None else (None, f"{impl}: {row['note']}")

    measured, missing = [], []
    if target.kind == "launches":
        count = launches.get(target.subset, {}).get(target.backend)
        if target.backend in absent:
            missing.append((SUBSETS[target.subset], absent[target.backend]))
        elif not count or count.get("note"):
            missing.append((SUBSETS[target.subset], (count or {}).get("note", "not counted")))
        else:
            forward, backward = count["forward"], count["backward"]
            value = forward + backward
            scale = launches.get(target.subset, {}).get("reference", {})  # eager's count, for scale
            eager = f" (reference: {scale['forward']}; {scale['backward']})" if "forward" in scale else ""
            measured.append((value, f"fwd {forward}; bwd {backward}{eager}"))
    else:
        for shape in cases:
            if target.kind == "parity":
                (ms_a, why_a), (ms_b, why_b) = timed(shape, "cuda"), timed(shape, "triton")
                if why_a or why_b:
                    missing.append((shape, why_a or why_b))
                else:
                    measured.append((100.0 * (max(ms_a, ms_b) / min(ms_a, ms_b) - 1.0), shape))
                continue
            ms, why = timed(shape, target.backend)
            if why:
                missing.append((shape, why))
            elif target.kind == "pct_copy":
                measured.append((rows[target.op, shape, target.backend]["pct_copy"], shape))
            else:
                base_ms, base_why = timed(shape, target.baseline)
                if base_why:
                    missing.append((shape, base_why))
                else:
                    measured.append((base_ms / ms, shape))
        if not cases:
            missing.append(("", "no case of this op was run"))
    out = {"issue": target.issue, "target": target.text, "backend": target.backend, "op": target.op,
           "kind": target.kind, "threshold": target.threshold, "threshold_text": target.threshold_text,
           **judge(measured, missing, target.threshold, target.higher_is_better)}
    if out["value"] is not None:
        unit = {"pct_copy": "%", "speedup": "x", "launches": "", "parity": "%"}[target.kind]
        out["value_text"] = f"{out['value']:.2f}x" if unit == "x" else f"{out['value']:.0f}{unit}"
    else:
        out["value_text"] = "-"
    return out


# ---- what is timed -----------------------------------------------------------------------------------
@dataclass
class Case:
    op: str
    shape: str
    nbytes: int  # the bytes the op must move at least
    make: Callable  # make(implementation) -> a zero-argument callable that runs it
    subset: str | None  # the targets' name for the cases this one is judged with (SUBSETS); None: not judged


def shapes(dry_run: bool):
    """((B, C, H, W), large) activations: CIFAR (B 128: the issue's C 160/320/640 at 32/16/8 and
    SupNet-M's 96/192/384) and ImageNet (B 256, C 64..1024 at 56..7). `large`: the shapes at which
    the %copy and speed-up targets are judged: the ImageNet ones and CIFAR C 160 at 32x32 (84 MB and
    more in fp32; the smaller CIFAR tensors are L2-sized on an H100)."""
    if dry_run:
        return [((2, 6, 4, 4), False), ((2, 12, 3, 3), True)]
    cifar = [((128, c, s, s), (c, s) == (160, 32)) for c, s in ((160, 32), (320, 16), (640, 8), (96, 32), (192, 16), (384, 8))]
    imagenet = [((256, c, s, s), True) for c, s in ((64, 56), (256, 28), (512, 14), (1024, 7))]
    return imagenet + cifar


def gaussian_shapes(dry_run: bool):
    """(B, C, H, W) of the Gaussian family's epilogue: the CIFAR widths 160/320/640 at 32/16/8."""
    if dry_run:
        return [(2, 6, 4, 4)]
    return [(128, c, s, s) for c, s in ((160, 32), (320, 16), (640, 8))]


@dataclass
class GatedNetwork:
    """The gated layers of a super-network as `network_regularizer` passes them to the ops."""
    name: str
    weights: list  # [torch.Tensor]
    p_logits: list  # per input channel, [C_in]
    weights_per_channel: list  # [int]
    label: str


def gated_network(name: str, device, dry_run: bool, dtype=torch.float32) -> GatedNetwork:
    """Builds `name` on CPU (tiny in the dry run), draws drop logits as after posterior training and
    keeps only its gated weights and per-channel logits, on `device`."""
    torch.manual_seed(0)
    model = supernets.create(name, num_classes=NETWORKS[name], **(supernets.SMALL_SIZES[name] if dry_run else {}))
    layers = [layer for _, layer in gated_layers(model)]
    with torch.no_grad():
        for layer in layers:
            layer.p_logit.uniform_(-4.0, 0.0)
        weights = [layer.weight.detach().to(device, dtype) for layer in layers]
        p_logits = [layer.p_logit_per_channel().detach().contiguous().to(device) for layer in layers]
    n_weights = sum(w.numel() for w in weights)
    label = (f"{name}: {len(layers)} gated layers, {sum(layer.p_logit.numel() for layer in layers)} p, "
             f"{n_weights / 1e6:.2f}M weights")
    return GatedNetwork(name, weights, p_logits, [layer.weights_per_channel() for layer in layers], label)


def timer(dry_run: bool):
    if dry_run:
        def measure(fn):
            fn()
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        return measure
    import triton.testing

    return lambda fn: triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def copy_bandwidth(device, measure, dry_run: bool) -> float:
    """GB/s of a device-to-device copy (read + write) of a 256 MiB buffer."""
    n = (1 << 16) if dry_run else (1 << 26)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = measure(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def implementations(device, compile_reference: bool):
    """({label: module-like} of every backend function set that runs on `device`, {label: why
    not} of the backends the targets judge and the compiled reference when they are not there)."""
    impls, absent = {}, {}
    for name, (available, why) in pf.backends().items():
        try:
            if not available:
                raise pf.BackendUnavailableError(why)
            dispatch.resolve(name, device)
        except (ValueError, pf.BackendUnavailableError) as err:
            absent[name] = f"{name} unavailable: {str(err).split(' (')[0][:80]}"
            continue
        impls[name] = Backend(name)
    impls[EAGER_BASELINE] = EagerLocalReparameterization()
    if compile_reference:
        impls[COMPILED] = CompiledReference()
    else:
        absent[COMPILED] = f"{COMPILED} not run (--no-compile)"
    return impls, absent


class EagerLocalReparameterization:
    """The baseline of the Gaussian epilogue: `mu + sqrt(var + 1e-8) * randn_like(mu)` and its
    autograd backward (torch's own RNG; eps kept for the backward pass). Only that op's cases run it."""

    @staticmethod
    def gaussian_noise_fwd_bwd(mu, var, dy):
        mu, var = mu.detach().requires_grad_(), var.detach().requires_grad_()
        out = mu + torch.sqrt(var + 1e-8) * torch.randn_like(mu)
        return torch.autograd.grad(out, (mu, var), dy)


class Backend:
    """A backend's functions by op name, as the custom ops reach them."""

    def __init__(self, name: str):
        self.name = name

    def __getattr__(self, op: str):
        return dispatch.implementation(self.name, op)


class CompiledReference:
    """The reference backend's plain-torch functions under torch.compile (one graph per function)."""

    def __init__(self):
        for op in ("philox_uniform", "gate_keep", "gated_apply", "gated_apply_backward", "affine_relu_gate",
                   "affine_relu_gate_backward", "gated_copies", "gated_copies_backward", "branch_combine", "branch_combine_backward", "regularizer",
                   "regularizer_backward", "gaussian_noise", "gaussian_noise_backward", "gaussian_kl",
                   "gaussian_kl_backward"):
            # default dynamic-shape policy: a second shape recompiles once with symbolic sizes, after
            # which one graph serves every shape (a graph per shape would not fit the time budget)
            setattr(self, op, torch.compile(getattr(reference, op)))


def takes_part(case: Case, impl: str) -> bool:
    return impl != EAGER_BASELINE or case.op == "gaussian_noise_fwd_bwd"  # the baseline has only the epilogue


def _backend_fwd_bwd(m, op: str, forward_args, backward_args):
    """A zero-argument callable: a backend's forward then backward of `op`."""
    return lambda: (getattr(m, op)(*forward_args), getattr(m, op + "_backward")(*backward_args))


def gaussian_cases(device, dry_run: bool, dtype, networks) -> list[Case]:
    """The Gaussian family: the noise epilogue forward+backward (mu, var, out; grad, var, d var: 6N
    bytes) in both layouts, next to the eager baseline, and the KL over the networks' gated layers."""
    gen = torch.Generator(device=device).manual_seed(1)
    out = []
    for B, C, H, W in gaussian_shapes(dry_run):
        for layout in ("nchw", "nhwc"):
            mu = torch.randn(B, C, H, W, device=device, generator=gen).to(dtype)
            var = torch.rand(B, C, H, W, device=device, generator=gen).to(dtype)
            if layout == "nhwc":
                mu, var = (t.contiguous(memory_format=torch.channels_last) for t in (mu, var))
            dy = torch.randn_like(mu)
            rng = (SEED, GAUSSIAN_STREAM, 0)

            def make(m, mu=mu, var=var, dy=dy, rng=rng):
                if isinstance(m, EagerLocalReparameterization):
                    return lambda: m.gaussian_noise_fwd_bwd(mu, var, dy)
                return _backend_fwd_bwd(m, "gaussian_noise", (mu, var, *rng), (dy, var, *rng))

            out.append(Case("gaussian_noise_fwd_bwd", f"{B}x{C}x{H}x{W} {layout}", 6 * mu.numel() * mu.element_size(),
                            make, "cifar"))
    grad = torch.ones((), device=device)
    for net in networks:  # log alpha per input channel of each gated layer, as network_regularizer clips it
        log_alphas = [p.clamp(-LOG_ALPHA_LIMIT, LOG_ALPHA_LIMIT) for p in net.p_logits]
        args = (log_alphas, net.weights_per_channel, 5e4)
        nbytes = 3 * sum(a.numel() * a.element_size() for a in log_alphas)
        out.append(Case("gaussian_kl_fwd_bwd", net.label, nbytes,
                        lambda m, args=args: _backend_fwd_bwd(m, "gaussian_kl", args, (grad, *args)), net.name))
    return out


def cases(device, dry_run: bool, dtype, networks) -> list[Case]:
    gen = torch.Generator(device=device).manual_seed(0)
    out = []
    for (B, C, H, W), large in shapes(dry_run):
        subset = "large" if large else None
        for layout in ("nchw", "nhwc"):
            x = torch.randn(B, C, H, W, device=device, generator=gen).to(dtype)
            if layout == "nhwc":
                x = x.contiguous(memory_format=torch.channels_last)
            dy = torch.randn_like(x)
            p = torch.randn(C, device=device, generator=gen)
            nbytes = x.numel() * x.element_size()
            label = f"{B}x{C}x{H}x{W} {layout}"
            out.append(Case("gated_apply", label, 2 * nbytes,
                            lambda m, x=x, p=p: lambda: m.gated_apply(x, p, SEED, STREAM, TAU, "relaxed", 0), subset))
            out.append(Case("gated_apply_fwd_bwd", label, 5 * nbytes,
                            lambda m, x=x, p=p, dy=dy: lambda: (m.gated_apply(x, p, SEED, STREAM, TAU, "relaxed", 0),
                                                                m.gated_apply_backward(dy, x, p, SEED, STREAM, TAU,
                                                                                       "relaxed", 0)), subset))
            scale, shift = torch.rand(C, device=device, generator=gen) + 0.5, torch.randn(C, device=device, generator=gen)
            # fused BN affine -> ReLU -> gate: read x, write y; backward reads dy and x, writes dx
            out.append(Case("affine_relu_gate_fwd_bwd", label, 5 * nbytes,
                            lambda m, x=x, p=p, dy=dy, a=scale, b=shift: lambda: (
                                m.affine_relu_gate(x, a, b, p, SEED, STREAM, TAU, "relaxed", 0),
                                m.affine_relu_gate_backward(dy, x, a, b, p, SEED, STREAM, TAU, "relaxed", 0)), subset))
            p2 = torch.stack([p, -p])
            dy2 = torch.randn(2, *x.shape, device=device, generator=gen).to(dtype)
            # one input -> 2 gated copies with the ReLU: read x, write 2; backward reads x and 2 dy, writes dx
            out.append(Case("gated_copies_fwd_bwd", label + " S=2", 7 * nbytes,
                            lambda m, x=x, p2=p2, dy2=dy2: lambda: (
                                m.gated_copies(x, p2, SEED, [STREAM, STREAM + 1], TAU, "relaxed", 0, True),
                                m.gated_copies_backward(dy2, x, p2, SEED, [STREAM, STREAM + 1], TAU, "relaxed", 0,
                                                        True)), subset))
            if layout == "nhwc":
                continue
            ys = [x, torch.randn_like(x)]
            skip = torch.randn_like(x)
            w = torch.rand(B, 2, device=device, generator=gen)
            out.append(Case("branch_combine", label + " S=2 +skip", 4 * nbytes,
                            lambda m, ys=ys, w=w, skip=skip: lambda: m.branch_combine(ys, w, skip), subset))
            out.append(Case("branch_combine_fwd_bwd", label + " S=2", 3 * nbytes + 5 * nbytes,
                            lambda m, ys=ys, w=w, dy=dy: lambda: (m.branch_combine(ys, w, None),
                                                                  m.branch_combine_backward(dy, ys, w, None)), subset))
            out.append(Case("gate_keep", f"{B}x{C}", B * C * 4,
                            lambda m, p=p, B=B: lambda: m.gate_keep(p, B, SEED, STREAM, TAU, "relaxed", 0), subset))
    n = 1 << (12 if dry_run else 24)
    out.append(Case("philox_uniform", f"n={n}", 4 * n,
                    lambda m: lambda: m.philox_uniform(n, SEED, STREAM, 0, torch.device(device)), "large"))
    grad = torch.ones((), device=device)
    for net in networks:
        wbytes = sum(w.numel() * w.element_size() for w in net.weights)
        # read the weights (forward), read them again and write their gradients (backward)
        out.append(Case("regularizer_fwd_bwd", net.label, 3 * wbytes,
                        lambda m, net=net: lambda: (
                            m.regularizer(net.weights, net.p_logits, *REGULARIZER_ARGS),
                            m.regularizer_backward(grad, net.weights, net.p_logits, *REGULARIZER_ARGS)), net.name))
    return out + gaussian_cases(device, dry_run, dtype, networks)


def plan(all_cases: list[Case], impls) -> list[tuple[int, int, str]]:
    """(priority, case index, implementation) of every measurement, in the order they run: 0: what
    the targets read, eager (kernel backends and the baselines they are compared with); 1: the
    compiled reference they are compared with (compilation is the slow part); 2: the other rows;
    3: the other compiled rows. The time budget thus cuts the rows no target reads."""
    order = []
    for name in sorted(impls, key=lambda name: name == COMPILED):
        for index, case in enumerate(all_cases):
            if not takes_part(case, name):
                continue
            needed = case.subset is not None and (name in KERNEL_ISSUES or name in baselines_needed(case.op))
            order.append(((0 if needed else 2) + (name == COMPILED), index, name))
    return sorted(order, key=lambda item: item[0])


# ---- kernel launches of the regulariser (counted in a child process) -----------------------------------
def trace_records(trace: dict, category: str) -> int:
    """Records of `category` in a Chrome trace written by torch.profiler ("kernel": kernel launches,
    not copies or memsets; old Kineto versions spell it "Kernel")."""
    return sum(1 for event in trace.get("traceEvents", []) if str(event.get("cat", "")).lower() == category)


def records_per_call(fn, activities, category: str, sync=lambda: None, repeats: int = 3) -> int:
    """Profiler records of `category` that one call of `fn` leaves, counted over `repeats` calls
    after a warm-up call inside the profiling session (CUPTI can drop a session's first records)."""
    from torch.profiler import profile, schedule

    fn()
    sync()
    traces = []
    with tempfile.TemporaryDirectory() as tmp:
        def keep(prof):
            path = os.path.join(tmp, f"trace{len(traces)}.json")
            prof.export_chrome_trace(path)
            with open(path) as f:
                traces.append(json.load(f))

        with profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=repeats, repeat=1),
                     on_trace_ready=keep) as prof:
            for _ in range(1 + repeats):
                fn()
                sync()
                prof.step()
    if len(traces) != 1:
        raise RuntimeError(f"the profiler wrote {len(traces)} traces, expected 1")
    records = trace_records(traces[0], category)
    if records == 0 or records % repeats:
        raise RuntimeError(f"{records} {category} records over {repeats} calls: not a whole number per call "
                           "(the profiler lost records, or CUPTI is unavailable)")
    return records // repeats


def kernel_launches(fn) -> int:
    """Kernels one call of `fn` launches on the GPU (CUDA profiler kernel records)."""
    from torch.profiler import ProfilerActivity

    return records_per_call(fn, [ProfilerActivity.CPU, ProfilerActivity.CUDA], "kernel", sync=torch.cuda.synchronize)


def count_launches(dry_run: bool, dtype, counter=None, backends=("reference", *KERNEL_ISSUES)) -> dict:
    """{network: {implementation: {"forward": kernels, "backward": kernels} or {"note": why not}}}
    of the regulariser's backend functions on the networks' gated layers, for those of `backends`
    that run here (reference: for scale). counter(fn) -> launches of one call of fn (default:
    kernel_launches; on CPU nothing is counted unless a counter is given)."""
    device = torch.device("cpu" if dry_run else "cuda")
    impls, _ = implementations(device, compile_reference=False)
    names = [name for name in impls if name in backends]
    if counter is None and device.type != "cuda":
        return {net_name: {name: {"note": "not counted (CPU dry run)"} for name in names} for net_name in NETWORKS}
    counter = counter or kernel_launches
    out = {}
    for net_name in NETWORKS:
        net = gated_network(net_name, device, dry_run, dtype)
        grad = torch.ones((), device=device)
        out[net_name] = {}
        for name in names:
            forward = (impls[name].regularizer, net.weights, net.p_logits, *REGULARIZER_ARGS)
            backward = (impls[name].regularizer_backward, grad, net.weights, net.p_logits, *REGULARIZER_ARGS)
            try:
                out[net_name][name] = {"forward": counter(lambda call=forward: call[0](*call[1:])),
                                       "backward": counter(lambda call=backward: call[0](*call[1:]))}
            except Exception as err:  # one backend's failure must not hide the others' counts
                out[net_name][name] = {"note": error_note(err)}
    return out


def launches_in_child(args, seconds_left: float) -> dict:
    """count_launches in a child process: the CUDA profiler stays attached to a process after its
    session and would slow every later measurement of this one."""
    command = [sys.executable, os.path.abspath(__file__), "--count-launches", "--dtype", args.dtype]
    if args.dry_run:
        command.append("--dry-run")
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(pf.__file__)))  # the parent's pgnas_fast
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (package_root, os.environ.get("PYTHONPATH"))))}
    try:
        low, high = LAUNCH_COUNT_TIMEOUT_S
        done = subprocess.run(command, check=False, capture_output=True, text=True, env=env,
                              timeout=min(high, max(low, seconds_left + 30)))
        if done.returncode != 0:
            raise RuntimeError(f"exit {done.returncode}: {(done.stderr.strip().splitlines() or [''])[-1]}")
        marked = [line for line in done.stdout.splitlines() if line.startswith(LAUNCHES_MARK)]
        return json.loads(marked[-1][len(LAUNCHES_MARK):])
    except Exception as err:
        note = {"note": f"launch count failed: {error_note(err)}"}
        return {net: {name: note for name in ("reference", *KERNEL_ISSUES)} for net in NETWORKS}


def error_note(err: Exception) -> str:
    return f"error: {type(err).__name__}: {(str(err).splitlines() or [''])[0][:120]}"


# ---- the report ------------------------------------------------------------------------------------
def assemble(rows: dict, all_cases: list[Case], impls) -> list[dict]:
    """The result rows in case order, each with its speed-up over reference eager."""
    results = []
    for index in range(len(all_cases)):
        reference_ms = rows.get((index, "reference"), {}).get("ms")
        for name in impls:
            row = rows.get((index, name))
            if row is None:  # not run (yet), or a case the implementation does not take part in
                continue
            if row.get("ms") is not None:
                row["speedup_vs_reference"] = reference_ms / row["ms"] if reference_ms else float("nan")
            results.append(row)
    return results


def targets_markdown(target_rows: list[dict], info: dict) -> str:
    counts = {v: sum(r["verdict"] == v for r in target_rows) for v in ("PASS", "FAIL", "UNMEASURED")}
    lines = ["## Targets", "",
             (f"{info['device']}, {info['dtype']}, copy bandwidth {info['copy_gbps']:.0f} GB/s. Each row is the worst "
              f"case over its cases (large shapes: {', '.join(info['large_shapes'])}, both layouts where the op has "
              f"them; CIFAR shapes: {', '.join(info['cifar_shapes'])}; SupNet-MI / SupNet-D-121: their real gated layers). "
              "FAIL: some measured case misses the threshold; UNMEASURED: no failure seen but some case has no value "
              "(why given). Issue 4: triton, issue 5: cuda and the cuda-triton parity, issue 8: the Gaussian epilogue."),
             "", f"**{counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['UNMEASURED']} UNMEASURED**", "",
             "| issue | target | backend | worst measured | threshold | verdict | worst at / why |",
             "|---|---|---|---:|---|---|---|"]
    for r in target_rows:
        where = "; ".join(s for s in (r["at"], r["why"]) if s)
        lines.append(f"| {r['issue']} | {r['target']} | {r['backend']} | {r['value_text']} | {r['threshold_text']} | "
                     f"**{r['verdict']}** | {where} |")
    return "\n".join(lines) + "\n"


def markdown(results, info, target_rows) -> str:
    lines = [f"# pgnas_fast op benchmark ({info['device']})", "",
             (f"torch {info['torch']}, triton {info['triton']}, dtype {info['dtype']}; "
              f"device copy bandwidth {info['copy_gbps']:.0f} GB/s; times are medians of do_bench; "
              f"{info['seconds']:.0f} s{' (partial: still running)' if info.get('partial') else ''}."), "",
             targets_markdown(target_rows, info), "## All measurements", "",
             "| op | shape | backend | ms | GB/s | % copy | x reference |", "|---|---|---|---:|---:|---:|---:|"]
    for r in results:
        if r.get("ms") is None:
            lines.append(f"| {r['op']} | {r['shape']} | {r['backend']} | {r['note']} | | | |")
            continue
        lines.append(f"| {r['op']} | {r['shape']} | {r['backend']} | {r['ms']:.4f} | {r['gbps']:.0f} | "
                     f"{r['pct_copy']:.0f} | {r['speedup_vs_reference']:.2f} |")
    return "\n".join(lines) + "\n"


def write_report(out_dir: str, case_list, results, info, launches, absent) -> tuple[str, list[dict]]:
    """Judges the targets and writes results.json and results.md; returns the markdown and the
    Targets rows."""
    target_rows = [evaluate(t, case_list, results, launches, absent) for t in targets()]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"info": info, "targets": target_rows, "launches": launches, "results": results}, f, indent=1)
    text = markdown(results, info, target_rows)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(text)
    return text, target_rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results/latest"))
    parser.add_argument("--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny shapes")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--time-budget", type=float, default=240.0,
                        help="seconds; later measurements are skipped (and listed) once it is spent")
    parser.add_argument("--ops", help="comma-separated ops to time, e.g. gated_apply_fwd_bwd (default: every op); "
                        "the targets of the others read UNMEASURED")
    parser.add_argument("--count-launches", action="store_true",
                        help="internal: print the regulariser's kernel launch counts as JSON and exit")
    args = parser.parse_args(argv)
    chosen = set(args.ops.split(",")) if args.ops else set(OPS)
    if chosen - set(OPS):  # before any tensor is made
        parser.error(f"--ops: unknown {sorted(chosen - set(OPS))}; expected some of {list(OPS)}")
    started = time.monotonic()
    device = "cpu" if args.dry_run else "cuda"
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: use --dry-run to check the script on CPU", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    if args.count_launches:
        print(LAUNCHES_MARK + json.dumps(count_launches(args.dry_run, dtype)))
        return 0
    measure = timer(args.dry_run)
    import triton

    info = {"device": "cpu (dry run, Triton interpreter)" if args.dry_run else torch.cuda.get_device_name(),
            "torch": torch.__version__, "triton": triton.__version__, "dtype": args.dtype,
            "backends": {k: list(v) for k, v in pf.backends().items()},
            "large_shapes": [f"{B}x{C}x{H}x{W}" for (B, C, H, W), large in shapes(args.dry_run) if large],
            "cifar_shapes": [f"{B}x{C}x{H}x{W}" for B, C, H, W in gaussian_shapes(args.dry_run)]}
    info["copy_gbps"] = copy_bandwidth(device, measure, args.dry_run)
    impls, absent = implementations(torch.device(device), compile_reference=not args.no_compile)
    networks = [gated_network(name, device, args.dry_run, dtype) for name in NETWORKS]
    all_cases = cases(device, args.dry_run, dtype, networks)
    del networks  # the cases hold the tensors they need
    all_cases = [c for c in all_cases if c.op in chosen]
    counted = "regularizer_fwd_bwd" not in chosen  # the launch count belongs to the regulariser's targets
    launches = {net: {name: {"note": "not counted yet"} for name in ("reference", *KERNEL_ISSUES)} for net in NETWORKS}
    rows = {}

    def report(partial: bool) -> tuple[str, list[dict]]:
        info.update(seconds=time.monotonic() - started, partial=partial)
        return write_report(args.out, [(c.op, c.shape, c.subset) for c in all_cases], assemble(rows, all_cases, impls),
                            info, launches, absent)

    def count():
        return launches_in_child(args, args.time_budget - (time.monotonic() - started))

    previous = 0
    for priority, index, name in plan(all_cases, impls):
        if priority != previous:  # a phase is done: its verdicts are written before the next one runs
            report(partial=True)
            if not counted:  # after the eager rows the targets read, before the compiled ones (slow)
                launches, counted = count(), True
                report(partial=True)
        previous = priority
        case = all_cases[index]
        row = {"op": case.op, "shape": case.shape, "backend": name, "bytes": case.nbytes, "subset": case.subset}
        if time.monotonic() - started > args.time_budget:
            row.update(ms=None, note="skipped: time budget")
        else:
            try:
                ms = measure(case.make(impls[name]))
                gbps = case.nbytes / ms / 1e6
                row.update(ms=ms, gbps=gbps, pct_copy=100.0 * gbps / info["copy_gbps"])
            except Exception as err:  # one failing backend must not hide the others' numbers
                row.update(ms=None, note=error_note(err))
        rows[index, name] = row
        if name == COMPILED:  # each compiled row costs a compilation: its number is kept at once
            report(partial=True)
    if not counted:
        launches = count()
    text, target_rows = report(partial=False)
    print(text)
    verdicts = [r["verdict"] for r in target_rows]
    print(f"targets: {verdicts.count('PASS')} PASS, {verdicts.count('FAIL')} FAIL, "
          f"{verdicts.count('UNMEASURED')} UNMEASURED ({info['seconds']:.0f} s; {args.out}/results.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
