"""Candidate ranking throughput on a SupNet-MI-shaped network, for the GPU script.

Builds SupNet-MI (Shake-Shake-26 2x160d, 72.7M parameters) with random weights and drop
probabilities, a CIFAR-shaped held-out set of random images, and measures candidates per second of
the batched evaluator (K candidates x b images per pass) and of the sequential one on the whole
held-out set (`--heldout` images); then projects the hours to rank 10,000 CIFAR-10 candidates on the
CIFAR presets' 5,000 held-out images (`--project-heldout`) exhaustively and with racing, next to the
paper's 4.63 P40-days (Table 6: 10k candidates). Last, the authors' loop on the same device (the
`reload` evaluator: for every candidate the held-out images read from a file, the network built and
its weights loaded from a checkpoint file) on `--project-heldout` images, for `--reload-candidates`
candidates, and its projected hours for 10k candidates.

    python3 benchmarks/bench_rank_gpu.py --out results.json           # on the GPU
    python3 benchmarks/bench_rank_gpu.py --dry-run                    # tiny, on CPU, to check it runs
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from pgnas_fast import configs, supernets
from pgnas_fast.data import normalize
from pgnas_fast.search.rank import CandidateScorer, round_ends

PAPER_P40_DAYS_10K = 4.63


def _timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny network and data on CPU")
    parser.add_argument("--heldout", type=int, default=5000)
    parser.add_argument("--candidates", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=configs.DEFAULTS["eval_batch_size"])
    parser.add_argument("--rows", type=int, default=configs.DEFAULTS["rank_rows"],
                        help="rows per batched pass (the library's default)")
    parser.add_argument("--project-heldout", type=int,
                        default=configs.resolve("cifar10-supnet-mi")["heldout_size"],
                        help="held-out images of the projected 10k-candidate ranking (the CIFAR presets')")
    parser.add_argument("--reload-candidates", type=int, default=2,
                        help="candidates timed through the authors' loop (each rebuilds the 72.7M-parameter network)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.exit(2, "no CUDA device: use --dry-run to check the script on CPU\n")
    device = torch.device("cuda" if not args.dry_run else "cpu")
    knobs = supernets.SMALL_SIZES["supnet-mi"] if args.dry_run else {}
    heldout, candidates = (64, 4) if args.dry_run else (args.heldout, args.candidates)
    batch = 32 if args.dry_run else args.batch_size

    torch.manual_seed(0)
    model = supernets.create("supnet-mi", num_classes=10, **knobs).to(device).eval()
    with torch.no_grad():  # a spread of drop probabilities, as after posterior training
        for module in model.modules():
            if hasattr(module, "p_logit"):
                module.p_logit.uniform_(-4.0, 0.0)
    images = torch.randn(heldout, 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (heldout,), device=device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)

    results = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
               "network": "supnet-mi" if not args.dry_run else "supnet-mi (tiny, dry run)",
               "params": sum(p.numel() for p in model.parameters()), "heldout_images": heldout}
    ids = list(range(candidates))
    for evaluator, rows in (("batched", args.rows), ("sequential", 1)):
        scorer = CandidateScorer(model, images, labels, seed=0, evaluator=evaluator, batch_size=batch,
                                 rows_per_pass=rows)
        count = candidates if evaluator == "batched" else max(2, candidates // 8)
        # warm-up: one batch of images with the timed passes' candidates, so the same shapes (cuDNN
        # autotuning, Triton specialisations, the allocator's growth) are not timed
        scorer.correct(ids[:count], 0, min(heldout, batch))
        seconds = _timed(lambda: scorer.correct(ids[:count], 0, heldout), device)
        results[f"{evaluator}_candidates_per_second"] = count / seconds
        print(f"{evaluator}: {count / seconds:.2f} candidates/s", flush=True)  # (kept if the step's cap cuts the rest)
    images_per_second = results["batched_candidates_per_second"] * heldout  # candidate-images
    project = results["projected_heldout_images"] = args.project_heldout
    racing_images = sum(n * (end - start) for n, start, end in _racing_plan(10000, project))
    results["hours_10k_exhaustive"] = 10000 * project / images_per_second / 3600
    results["hours_10k_racing"] = racing_images / images_per_second / 3600
    results["paper_p40_hours_10k"] = PAPER_P40_DAYS_10K * 24
    results.update(_authors_loop(model, knobs, project if not args.dry_run else heldout, args.reload_candidates,
                                 batch, device))
    print(json.dumps(results, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return results


def _authors_loop(model, knobs: dict, heldout: int, candidates: int, batch: int, device: torch.device) -> dict:
    """Candidates/s of the reload evaluator (the authors' per-candidate loop) on `heldout` images, the
    checkpoint and the images read from files as their loops read them; and its hours for 10k candidates."""
    with tempfile.TemporaryDirectory() as tmp:
        weights, data = os.path.join(tmp, "checkpoint.pt"), os.path.join(tmp, "heldout.pt")
        torch.save(model.state_dict(), weights)
        generator = torch.Generator().manual_seed(1)
        torch.save((torch.randint(0, 256, (heldout, 3, 32, 32), dtype=torch.uint8, generator=generator),
                    torch.randint(0, 10, (heldout,), generator=generator)), data)

        def load_heldout():  # stored as uint8, as the CIFAR feed keeps it; prepare normalises on the device
            images, labels = torch.load(data)
            return images.to(device), labels.to(device)

        def load_model():
            fresh = supernets.create("supnet-mi", num_classes=10, **knobs)
            fresh.load_state_dict(torch.load(weights, map_location="cpu"))
            fresh = fresh.to(device)
            return fresh.to(memory_format=torch.channels_last) if device.type == "cuda" else fresh

        def prepare(images):  # as the CIFAR feed's prepare_eval, in the layout the timed passes above read
            layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
            return normalize(images).contiguous(memory_format=layout)

        images, labels = load_heldout()
        scorer = CandidateScorer(model, images, labels, seed=0, evaluator="reload", batch_size=batch,
                                 prepare=prepare, load_model=load_model, load_heldout=load_heldout)
        scorer.correct([0], 0, min(heldout, batch))  # warm-up (shapes, allocator)
        seconds = _timed(lambda: scorer.correct(list(range(candidates)), 0, heldout), device)
    rate = candidates / seconds
    print(f"authors' loop (reload): {rate:.3f} candidates/s on {heldout} images", flush=True)
    return {"authors_loop_candidates_per_second": rate, "authors_loop_heldout_images": heldout,
            "hours_10k_authors_loop": 10000 / rate / 3600}


def _racing_plan(candidates: int, heldout: int, eta: int = configs.DEFAULTS["racing_eta"],
                 first_share: float = configs.DEFAULTS["racing_first_share"]):
    """(survivors, start, end) of each racing round, as `rank` runs them with the default settings."""
    plan, survivors, start = [], candidates, 0
    for end in round_ends("racing", heldout, eta, first_share):
        plan.append((survivors, start, end))
        survivors, start = -(-survivors // eta), end
    return plan


if __name__ == "__main__":
    main()
