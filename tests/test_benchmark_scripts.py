"""The GPU script's Python parts run here in their CPU dry-run modes, so a GPU session can run the
script blind in one call."""
from __future__ import annotations

import importlib.util
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rank_benchmark_dry_run(tmp_path):
    results = _load("bench_rank_gpu").main(["--dry-run", "--out", str(tmp_path / "rank.json")])
    assert results["batched_candidates_per_second"] > 0 and results["sequential_candidates_per_second"] > 0
    assert 0 < results["hours_10k_racing"] < results["hours_10k_exhaustive"]
    assert results["paper_p40_hours_10k"] == 4.63 * 24
    assert (tmp_path / "rank.json").is_file()


def test_train_step_benchmark_dry_run(tmp_path):
    rows = _load("bench_train_step").main(["--dry-run", "--out", str(tmp_path)])
    networks = {r["network"] for r in rows}
    assert networks == {"supnet-m", "supnet-mi", "supnet-e", "supnet-ei", "supnet-d121"}
    assert all("error" not in r and r["images_per_second"] > 0 for r in rows), rows
    assert {r["backend"] for r in rows} >= {"reference"}
    assert (tmp_path / "train_step.json").is_file()


def test_op_benchmark_dry_run(tmp_path):
    """benchmarks/bench_gpu.py on CPU (Triton interpreter, tiny shapes): every case runs, the Gaussian
    family's included, next to its eager baseline."""
    import json

    assert _load("bench_gpu").main(["--dry-run", "--no-compile", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert not [r for r in results if r.get("ms") is None], [r for r in results if r.get("ms") is None]
    assert {"gaussian_noise_fwd_bwd", "gaussian_kl_fwd_bwd"} <= {r["op"] for r in results}
    assert {r["op"] for r in results if r["backend"] == "torch eager randn_like"} == {"gaussian_noise_fwd_bwd"}
