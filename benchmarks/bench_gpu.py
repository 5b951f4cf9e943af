"""GPU benchmark of the op set: every backend's kernels at CIFAR shapes, in GB/s against the copy bandwidth.

Run by benchmarks/gpu_suite.sh (see benchmarks/README.md). For each op and shape it times, with
`triton.testing.do_bench` (median), the backend functions themselves (no autograd, no custom-op
layer): `reference` eager, `reference+compile` (torch.compile of the same plain-torch functions)
and every other available backend of `pgnas_fast.backends()` that takes CUDA tensors (so a `cuda`
backend joins automatically). GB/s counts the bytes an op must move at least; `%copy` compares it
with a measured device-to-device copy. Writes results.json and results.md to --out.

`--dry-run` runs the same code on CPU under TRITON_INTERPRET=1 with tiny shapes and a wall-clock
timer, so the script is checked before a GPU session runs it blind.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN:  # the interpreter must be on before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import pgnas_fast as pf  # noqa: E402
from pgnas_fast import reference  # noqa: E402
from pgnas_fast.ops import dispatch  # noqa: E402
from pgnas_fast.ops.streams import Domain, stream_id  # noqa: E402

SEED, STREAM, TAU = 7, stream_id(Domain.TRAIN, 1000, 3), 0.2
OPS = ("philox_uniform", "gate_keep", "gated_apply", "gated_apply_fwd_bwd", "affine_relu_gate_fwd_bwd",
       "gated_copies_fwd_bwd", "branch_combine", "branch_combine_fwd_bwd", "regularizer_fwd_bwd", "gaussian_noise_fwd_bwd",
       "gaussian_kl_fwd_bwd")
GAUSSIAN_STREAM = stream_id(Domain.GAUSSIAN, 1000, 3)
EAGER_BASELINE = "torch eager randn_like"  # the Gaussian epilogue as plain autograd code would write it


def shapes(dry_run: bool):
    """(B, C, H, W) activations: the brief's CIFAR widths and issue 4's (SupNet-M/-E-like)."""
    if dry_run:
        return [(2, 6, 4, 4), (2, 12, 3, 3)]
    cifar = [(128, c, s, s) for c, s in ((96, 32), (192, 16), (384, 8), (160, 32), (320, 16), (640, 8))]
    imagenet = [(256, 64, 56, 56), (256, 256, 28, 28), (256, 1024, 7, 7)]
    return cifar + imagenet


def gaussian_shapes(dry_run: bool):
    """(B, C, H, W) of the Gaussian family's epilogue: the CIFAR widths 160/320/640 at 32/16/8."""
    if dry_run:
        return [(2, 6, 4, 4)]
    return [(128, c, s, s) for c, s in ((160, 32), (320, 16), (640, 8))]


def supnet_weights(device, dry_run: bool):
    """56 gated weights of a SupNet-M-like CIFAR net (3 stages of 3x3 and 1x1 convs, a classifier)."""
    widths = (4, 8, 8) if dry_run else (96, 192, 384)
    weights, p_logits = [], []
    weights.append(torch.randn(widths[0], 3, 3, 3, device=device) * 0.05)  # stem
    p_logits.append(torch.randn(3, device=device))
    c_prev = widths[0]
    for c in widths:
        for block in range(6):
            for shape, c_in in (((c, c_prev, 3, 3), c_prev), ((c, c, 3, 3), c), ((c, c, 1, 1), c)):
                weights.append(torch.randn(shape, device=device) * 0.05)
                p_logits.append(torch.randn(c_in, device=device))
            c_prev = c
    weights.append(torch.randn(10, c_prev, device=device) * 0.05)
    p_logits.append(torch.randn(c_prev, device=device))
    return weights, p_logits  # 1 + 3 * 6 * 3 + 1 = 56 gated weights


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
    """{label: module-like} of every backend function set that runs on `device`."""
    impls = {}
    for name, (available, _) in pf.backends().items():
        if not available:
            continue
        try:
            dispatch.resolve(name, device)
        except (ValueError, pf.BackendUnavailableError):
            continue
        impls[name] = Backend(name)
    impls[EAGER_BASELINE] = EagerLocalReparameterization()
    if compile_reference:
        impls["reference+compile"] = CompiledReference()
    return impls


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


def _backend_fwd_bwd(m, op: str, forward_args, backward_args):
    """A zero-argument callable: a backend's forward then backward of `op`."""
    return lambda: (getattr(m, op)(*forward_args), getattr(m, op + "_backward")(*backward_args))


def gaussian_cases(device, dry_run: bool, dtype):
    """The Gaussian family: the noise epilogue forward+backward (mu, var, out; grad, var, d var: 6N
    bytes) in both layouts, next to the eager baseline, and the KL over a SupNet-M's gated layers."""
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

            out.append(("gaussian_noise_fwd_bwd", f"{B}x{C}x{H}x{W} {layout}", 6 * mu.numel() * mu.element_size(),
                        make))
    _, log_alphas = supnet_weights(device, dry_run)  # one log alpha per input channel of each layer
    counts = [9 * a.numel() for a in log_alphas]
    grad = torch.ones((), device=device)
    nbytes = 3 * sum(a.numel() * a.element_size() for a in log_alphas)
    out.append(("gaussian_kl_fwd_bwd", f"{len(log_alphas)} layers", nbytes,
                lambda m: _backend_fwd_bwd(m, "gaussian_kl", (log_alphas, counts, 5e4),
                                           (grad, log_alphas, counts, 5e4))))
    return out


def cases(device, dry_run: bool, dtype):
    """(op, shape label, bytes moved, make(impl) -> zero-argument callable)."""
    gen = torch.Generator(device=device).manual_seed(0)
    out = []
    for B, C, H, W in shapes(dry_run):
        for layout in ("nchw", "nhwc"):
            x = torch.randn(B, C, H, W, device=device, generator=gen).to(dtype)
            if layout == "nhwc":
                x = x.contiguous(memory_format=torch.channels_last)
            dy = torch.randn_like(x)
            p = torch.randn(C, device=device, generator=gen)
            nbytes = x.numel() * x.element_size()
            label = f"{B}x{C}x{H}x{W} {layout}"
            out.append(("gated_apply", label, 2 * nbytes,
                        lambda m, x=x, p=p: lambda: m.gated_apply(x, p, SEED, STREAM, TAU, "relaxed", 0)))
            out.append(("gated_apply_fwd_bwd", label, 5 * nbytes,
                        lambda m, x=x, p=p, dy=dy: lambda: (m.gated_apply(x, p, SEED, STREAM, TAU, "relaxed", 0),
                                                            m.gated_apply_backward(dy, x, p, SEED, STREAM, TAU,
                                                                                   "relaxed", 0))))
            scale, shift = torch.rand(C, device=device, generator=gen) + 0.5, torch.randn(C, device=device, generator=gen)
            # fused BN affine -> ReLU -> gate: read x, write y; backward reads dy and x, writes dx
            out.append(("affine_relu_gate_fwd_bwd", label, 5 * nbytes,
                        lambda m, x=x, p=p, dy=dy, a=scale, b=shift: lambda: (
                            m.affine_relu_gate(x, a, b, p, SEED, STREAM, TAU, "relaxed", 0),
                            m.affine_relu_gate_backward(dy, x, a, b, p, SEED, STREAM, TAU, "relaxed", 0))))
            p2 = torch.stack([p, -p])
            dy2 = torch.randn(2, *x.shape, device=device, generator=gen).to(dtype)
            # one input -> 2 gated copies with the ReLU: read x, write 2; backward reads x and 2 dy, writes dx
            out.append(("gated_copies_fwd_bwd", label + " S=2", 7 * nbytes,
                        lambda m, x=x, p2=p2, dy2=dy2: lambda: (
                            m.gated_copies(x, p2, SEED, [STREAM, STREAM + 1], TAU, "relaxed", 0, True),
                            m.gated_copies_backward(dy2, x, p2, SEED, [STREAM, STREAM + 1], TAU, "relaxed", 0,
                                                    True))))
            if layout == "nhwc":
                continue
            ys = [x, torch.randn_like(x)]
            skip = torch.randn_like(x)
            w = torch.rand(B, 2, device=device, generator=gen)
            out.append(("branch_combine", label + " S=2 +skip", 4 * nbytes,
                        lambda m, ys=ys, w=w, skip=skip: lambda: m.branch_combine(ys, w, skip)))
            out.append(("branch_combine_fwd_bwd", label + " S=2", 3 * nbytes + 5 * nbytes,
                        lambda m, ys=ys, w=w, dy=dy: lambda: (m.branch_combine(ys, w, None),
                                                              m.branch_combine_backward(dy, ys, w, None))))
            out.append(("gate_keep", f"{B}x{C}", B * C * 4,
                        lambda m, p=p, B=B: lambda: m.gate_keep(p, B, SEED, STREAM, TAU, "relaxed", 0)))
    n = 1 << (12 if dry_run else 24)
    out.append(("philox_uniform", f"n={n}", 4 * n,
                lambda m: lambda: m.philox_uniform(n, SEED, STREAM, 0, torch.device(device))))
    weights, p_logits = supnet_weights(device, dry_run)
    weights = [w.to(dtype) for w in weights]
    wbytes = sum(w.numel() * w.element_size() for w in weights)
    grad = torch.ones((), device=device)
    out.append(("regularizer_fwd_bwd", f"{len(weights)} weights", 3 * wbytes,
                lambda m: lambda: (m.regularizer(weights, p_logits, 10.0, 1.0, 5e4),
                                   m.regularizer_backward(grad, weights, p_logits, 10.0, 1.0, 5e4))))
    return out + gaussian_cases(device, dry_run, dtype)


def markdown(results, info) -> str:
    lines = [f"# pgnas_fast op benchmark ({info['device']})", "",
             f"torch {info['torch']}, triton {info['triton']}, dtype {info['dtype']}; "
             f"device copy bandwidth {info['copy_gbps']:.0f} GB/s; times are medians of do_bench.", "",
             "| op | shape | backend | ms | GB/s | % copy | x reference |", "|---|---|---|---:|---:|---:|---:|"]
    for r in results:
        if r.get("ms") is None:
            lines.append(f"| {r['op']} | {r['shape']} | {r['backend']} | {r['note']} | | | |")
            continue
        lines.append(f"| {r['op']} | {r['shape']} | {r['backend']} | {r['ms']:.4f} | {r['gbps']:.0f} | "
                     f"{r['pct_copy']:.0f} | {r['speedup_vs_reference']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results/latest"))
    parser.add_argument("--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny shapes")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--time-budget", type=float, default=240.0,
                        help="seconds; later measurements are skipped (and listed) once it is spent")
    args = parser.parse_args(argv)
    started = time.monotonic()
    device = "cpu" if args.dry_run else "cuda"
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: use --dry-run to check the script on CPU", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    measure = timer(args.dry_run)
    import triton

    info = {"device": "cpu (dry run, Triton interpreter)" if args.dry_run else torch.cuda.get_device_name(),
            "torch": torch.__version__, "triton": triton.__version__, "dtype": args.dtype,
            "backends": {k: list(v) for k, v in pf.backends().items()}}
    info["copy_gbps"] = copy_bandwidth(device, measure, args.dry_run)
    impls = implementations(torch.device(device), compile_reference=not args.no_compile)
    # every backend over every case first, then torch.compile (compilation is the slow part): the
    # budget then cuts compiled numbers before any kernel's own
    all_cases = cases(device, args.dry_run, dtype)
    order = sorted(impls, key=lambda name: name == "reference+compile")
    rows = {}
    for name in order:
        for index, (op, label, nbytes, make) in enumerate(all_cases):
            if name == EAGER_BASELINE and not op.startswith("gaussian_noise"):
                continue  # the baseline has only the Gaussian epilogue
            row = {"op": op, "shape": label, "backend": name, "bytes": nbytes}
            if time.monotonic() - started > args.time_budget:
                row.update(ms=None, note="skipped: time budget")
            else:
                try:
                    ms = measure(make(impls[name]))
                    gbps = nbytes / ms / 1e6
                    row.update(ms=ms, gbps=gbps, pct_copy=100.0 * gbps / info["copy_gbps"])
                except Exception as err:  # one failing backend must not hide the others' numbers
                    row.update(ms=None, note=f"error: {type(err).__name__}: {str(err).splitlines()[0][:120]}")
            rows[index, name] = row
    results = []
    for index in range(len(all_cases)):
        reference_ms = rows[index, "reference"].get("ms")
        for name in impls:
            row = rows.get((index, name))
            if row is None:  # a case the backend does not take part in
                continue
            if row.get("ms") is not None:
                row["speedup_vs_reference"] = reference_ms / row["ms"] if reference_ms else float("nan")
            results.append(row)
    info["seconds"] = time.monotonic() - started
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"info": info, "results": results}, f, indent=1)
    table = markdown(results, info)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
