"""Images per second of one posterior-training step (forward, loss with the regulariser, backward,
Nesterov SGD step) for the paper's super-networks: the CIFAR ones at batch 128 (32x32) and D-121 at
batch 64 (224x224); per backend that takes the device's tensors, eager and torch.compile, fp32 and
bf16 autocast (bf16 on GPU only). First, what a CIFAR step's inputs cost on the device: the batched
augmentation of 128 resident uint8 images, the paper's and with AutoAugment's policy before it. Run from
benchmarks/gpu_suite.sh; prints a markdown table.

    python3 benchmarks/bench_train_step.py --out DIR --time-budget 60     # on the GPU
    python3 benchmarks/bench_train_step.py --dry-run                      # tiny nets on CPU
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

STARTED = time.perf_counter()  # the time budget counts from here: importing torch and triton is part of it

import torch
import torch._dynamo
import torch.nn.functional as F

import pgnas_fast as pf
from pgnas_fast import supernets
from pgnas_fast.data import CIFAR_STATS, augmentation_draws, training_inputs
from pgnas_fast.nn import dynamic_streams, network_regularizer, set_gates
from pgnas_fast.ops.dispatch import resolve

NETWORKS = [  # name, batch, side, classes (the dry run builds them at supernets.SMALL_SIZES)
    ("supnet-m", 128, 32, 10),
    ("supnet-e", 128, 32, 10),
    ("supnet-d121", 64, 224, 1000),
    ("supnet-mi", 128, 32, 10),
    ("supnet-ei", 128, 32, 10),
]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_inputs(batch, *, autoaugment, device, steps) -> float:
    """Images per second of the CIFAR training inputs (search/run.py's prepare_train) from uint8 images on
    `device`: normalise, crop, flip, cutout, after the AutoAugment policy with `autoaugment`."""
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=device)
    mean, std = CIFAR_STATS[10]
    draws = [augmentation_draws(0, epoch, batch, device=device, autoaugment=autoaugment) for epoch in range(2 + steps)]
    for epoch in range(2):  # warm-up: the policy's tables, the allocator
        training_inputs(images, draws[epoch], mean, std, autoaugment=autoaugment)
    _sync(device)
    start = time.perf_counter()
    for epoch in range(2, 2 + steps):
        training_inputs(images, draws[epoch], mean, std, autoaugment=autoaugment)
    _sync(device)
    return batch * steps / (time.perf_counter() - start)


def measure(name, batch, side, classes, knobs, *, device, backend, dtype, compiled, steps) -> float:
    torch.manual_seed(0)
    model = supernets.create(name, num_classes=classes, **knobs).to(device).train()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.randn(batch, 3, side, side, device=device)
    y = torch.randint(0, classes, (batch,), device=device)

    def loss_fn(x, y):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            out = model(x)
        logits = out[0] if isinstance(out, tuple) else out
        return F.cross_entropy(logits.float(), y) + network_regularizer(model, weight_reg=50.0, n_train=5e5)

    forward = torch.compile(loss_fn) if compiled else loss_fn

    def step(i):
        optimizer.zero_grad(set_to_none=True)
        set_gates(model, "relaxed", seed=0, step=i)
        loss = forward(x, y)
        loss.backward()
        optimizer.step()

    with pf.use_backend(backend), dynamic_streams():
        # warm-up: compilation (the second step recompiles once with the steps' stream ids symbolic),
        # autotuning, allocator
        for i in range(2):
            step(i)
        _sync(device)
        # a compiled row that recompiled while timed would time the compiler: let it fail instead
        with torch._dynamo.config.patch(error_on_recompile=compiled):
            start = time.perf_counter()
            for i in range(steps):
                step(2 + i)
            _sync(device)
    return batch * steps / (time.perf_counter() - start)


def _timed_row(row: dict, rate) -> dict:
    """`row` with the images/s that `rate()` measures, or its error: one failing row must not cost the
    others. Printed as it lands."""
    try:
        row["images_per_second"] = rate()
    except Exception as err:
        row["error"] = f"{type(err).__name__}: {err}"[:200]
    print(row, flush=True)
    return row


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))  # the first paragraph
    parser.add_argument("--dry-run", action="store_true", help="tiny networks, batch 4, on CPU")
    parser.add_argument("--out", help="directory for train_step.json")
    parser.add_argument("--time-budget", type=float, default=300.0, help="seconds from the start, imports included; later rows are skipped")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.exit(2, "no CUDA device: use --dry-run to check the script on CPU\n")
    device = torch.device("cpu" if args.dry_run else "cuda")
    backends = []
    for name, (ok, _) in pf.backends().items():
        try:  # the backends that take this device's tensors (not the Triton interpreter: far too slow)
            if ok and not (name == "triton" and device.type == "cpu") and resolve(name, device):
                backends.append(name)
        except ValueError:
            pass
    # most informative first: a tight budget drops compile and fp32 rows before the eager bf16 ones
    plans = [(dtype, compiled) for compiled in (False, True) for dtype in ("bf16", "fp32")
             if not (dtype == "bf16" and device.type == "cpu") and not (compiled and args.dry_run)]
    deadline = STARTED + args.time_budget
    rows = []
    batch = 4 if args.dry_run else 128
    for autoaugment in (False, True):
        if time.perf_counter() > deadline:
            break
        rows.append(_timed_row({"network": "cifar inputs" + (" + autoaugment" if autoaugment else ""), "batch": batch,
                                "backend": "-", "dtype": "uint8 in", "compiled": False},
                               lambda: measure_inputs(batch, autoaugment=autoaugment, device=device,
                                                      steps=1 if args.dry_run else 20)))
    for dtype, compiled in plans:
        for name, batch, side, classes in NETWORKS:
            for backend in backends:
                if time.perf_counter() > deadline:
                    break
                size = (4, 32 if side == 32 else 64) if args.dry_run else (batch, side)
                knobs = supernets.SMALL_SIZES[name] if args.dry_run else {}
                rows.append(_timed_row(
                    {"network": name, "batch": size[0], "backend": backend, "dtype": dtype, "compiled": compiled},
                    lambda: measure(name, size[0], size[1], classes, knobs, device=device, backend=backend,
                                    dtype=dtype, compiled=compiled, steps=1 if args.dry_run else args.steps)))
    print("\n| network | batch | backend | dtype | mode | images/s |\n|---|---|---|---|---|---|")
    for r in rows:
        value = f"{r['images_per_second']:.0f}" if "images_per_second" in r else r["error"]
        print(f"| {r['network']} | {r['batch']} | {r['backend']} | {r['dtype']} | "
              f"{'compile' if r['compiled'] else 'eager'} | {value} |")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "train_step.json").write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
