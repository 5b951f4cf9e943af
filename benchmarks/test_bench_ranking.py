"""Ranking speed on the digits preset, on CPU: candidates/s of the batched, sequential and reload
(the authors' procedure: model rebuilt, checkpoint reloaded and data read again per candidate, as
`pgnas-fast rank --evaluator reload` does; `reload-resident` keeps the data resident, to show what each
part costs) evaluators, of the batched one in either evaluation layout, and the images
racing saves at 1000 candidates; and on SupNet-E, batched passes with and without the CPU's pass
budget (search.rank.CPU_PASS_BYTES) against sequential.

Run with `python3 -m pytest benchmarks/test_bench_ranking.py --benchmark-only`; compare the
evaluators' means within one run (this machine is shared and noisy). Nothing asserts a time.
"""
from __future__ import annotations

import pytest
import torch

from pgnas_fast import configs
from pgnas_fast.search import run_search
from pgnas_fast.search.host import keep_freed_host_memory
from pgnas_fast.search.rank import CandidateScorer, best_candidate, best_first, rank
from pgnas_fast.search.run import build_feed, load_data, rebuild_for_evaluation

CANDIDATES = 32


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    keep_freed_host_memory()  # as the pgnas-fast commands do
    out = tmp_path_factory.mktemp("bench")
    config = configs.resolve("digits-tiny", {"epochs": 2, "candidates": 2, "random_baseline": 0})
    run_search(config, seed=0, out_dir=out, progress=False)

    def load_model(channels_last: bool = config["channels_last"]):
        return rebuild_for_evaluation({**config, "channels_last": channels_last}, 10,
                                      torch.load(out / "checkpoint.pt", weights_only=False)["model"])

    def load_heldout():  # as pgnas-fast rank's reload evaluator reads it
        return build_feed(config, load_data(config), torch.device("cpu"), seed=0).split("heldout")

    return load_model, load_data(config).heldout, config["rank_rows"], load_heldout


@pytest.mark.parametrize("evaluator, reread", [("batched", False), ("sequential", False), ("reload", True),
                                               ("reload", False)],
                         ids=["batched", "sequential", "reload", "reload-resident"])
def test_candidates_per_second(benchmark, trained, evaluator, reread):
    load_model, heldout, rows, load_heldout = trained
    scorer = CandidateScorer(load_model(), *heldout, seed=0, evaluator=evaluator, batch_size=1024,
                             rows_per_pass=rows, load_model=load_model,  # the preset's pass size
                             load_heldout=load_heldout if reread else None)
    counts = benchmark.pedantic(scorer.correct, args=(list(range(CANDIDATES)), 0, len(heldout[1])),
                                rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["candidates"] = CANDIDATES
    benchmark.extra_info["images_per_candidate"] = len(heldout[1])
    assert len(counts) == CANDIDATES


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_batched_candidates_per_second_by_layout(benchmark, trained, layout):
    """search.run.evaluation_layout's gain: the preset's batched pass with contiguous or channels_last
    conv weights (the same counts either way on these candidates)."""
    load_model, heldout, rows, _ = trained
    scorer = CandidateScorer(load_model(channels_last=layout == "channels_last"), *heldout, seed=0,
                             batch_size=1024, rows_per_pass=rows)
    counts = benchmark.pedantic(scorer.correct, args=(list(range(CANDIDATES)), 0, len(heldout[1])),
                                rounds=3, iterations=1, warmup_rounds=1)
    assert len(counts) == CANDIDATES


def test_racing_images_saved_at_1000_candidates(benchmark, trained):
    load_model, heldout, rows, _ = trained
    scorer = CandidateScorer(load_model(), *heldout, seed=0, rows_per_pass=rows)
    exhaustive = rank(scorer, range(1000), progress=False)
    racing = benchmark.pedantic(rank, args=(scorer, range(1000)), kwargs={"strategy": "racing", "progress": False},
                                rounds=1, iterations=1)
    ratio = sum(r["images"] for r in exhaustive) / sum(r["images"] for r in racing)
    top3 = [r["id"] for r in sorted(exhaustive, key=best_first)[:3]]
    benchmark.extra_info["images_ratio_exhaustive_over_racing"] = ratio
    benchmark.extra_info["racing_winner_in_exhaustive_top3"] = best_candidate(racing)["id"] in top3
    assert ratio > 1


@pytest.fixture(scope="module")
def supnet_e():
    """SupNet-E at random weights (its largest activation, 737 KB an image, is what matters here) and 50
    random held-out images, on every core (the paper presets take torch's default threads)."""
    import os

    torch.set_num_threads(os.cpu_count() or 1)
    keep_freed_host_memory()
    torch.manual_seed(0)
    from pgnas_fast import supernets

    return supernets.create("supnet-e", num_classes=10).eval(), torch.randn(50, 3, 32, 32), torch.randint(0, 10, (50,))


@pytest.mark.parametrize("evaluator, cap", [("sequential", "device"), ("batched", "device"), ("batched", "none")])
def test_paper_network_pass_size_on_the_cpu(benchmark, supnet_e, monkeypatch, evaluator, cap):
    """search.rank.CPU_PASS_BYTES: batched with the CPU's pass budget (one SupNet-E candidate a pass) and
    without it (8 a pass, the preset's rank_rows), against sequential; 8 candidates x 50 images."""
    from pgnas_fast.search import rank as rank_module

    if cap == "none":
        monkeypatch.setattr(rank_module, "CPU_PASS_BYTES", 1 << 62)
    model, images, labels = supnet_e
    scorer = CandidateScorer(model, images, labels, seed=0, evaluator=evaluator, batch_size=500, rows_per_pass=8192)
    counts = benchmark.pedantic(scorer.correct, args=(list(range(8)), 0, 50), rounds=2, iterations=1, warmup_rounds=1)
    benchmark.extra_info["candidates_per_pass"] = scorer.candidates_per_pass(0, 50)
    assert len(counts) == 8
