"""The GPU script's Python parts run here in their CPU dry-run modes, so a GPU session can run the
script blind in one call."""
from __future__ import annotations

from conftest import BENCHMARKS
from conftest import load_benchmark as _load


def test_rank_benchmark_dry_run(tmp_path):
    results = _load("bench_rank_gpu").main(["--dry-run", "--out", str(tmp_path / "rank.json")])
    assert results["batched_candidates_per_second"] > 0 and results["sequential_candidates_per_second"] > 0
    assert 0 < results["hours_10k_racing"] < results["hours_10k_exhaustive"]
    assert results["paper_p40_hours_10k"] == 4.63 * 24
    # the authors' loop (the reload evaluator, its images and weights read from files) on the same device
    assert results["authors_loop_candidates_per_second"] > 0 and results["authors_loop_heldout_images"] == 64
    assert results["hours_10k_authors_loop"] == 10000 / results["authors_loop_candidates_per_second"] / 3600
    assert (tmp_path / "rank.json").is_file()


def test_train_step_benchmark_dry_run(tmp_path):
    rows = _load("bench_train_step").main(["--dry-run", "--out", str(tmp_path)])
    networks = {r["network"] for r in rows}
    assert networks == {"cifar inputs", "cifar inputs + autoaugment", "supnet-m", "supnet-mi", "supnet-e", "supnet-ei",
                        "supnet-d121"}
    assert all("error" not in r and r["images_per_second"] > 0 for r in rows), rows
    assert {r["backend"] for r in rows} >= {"reference"}
    assert (tmp_path / "train_step.json").is_file()


def test_op_benchmark_dry_run(tmp_path):
    """benchmarks/bench_gpu.py (run blind by benchmarks/gpu_suite.sh) on CPU, tiny shapes and networks,
    Triton interpreter: every case of every op runs on the reference and triton backends, the Gaussian
    epilogue next to its eager baseline, and results.md opens with a Targets section holding a row
    per target."""
    import json

    bench = _load("bench_gpu")
    assert bench.main(["--dry-run", "--no-compile", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    results = report["results"]
    assert {r["op"] for r in results} == set(bench.OPS)
    assert {"reference", "triton"} <= {r["backend"] for r in results}
    assert not [r for r in results if r.get("ms") is None], [r for r in results if r.get("ms") is None]
    assert {r["op"] for r in results if r["backend"] == "torch eager randn_like"} == {"gaussian_noise_fwd_bwd"}
    # the regulariser and the KL run on the real (tiny) super-networks' gated layers
    networks = {r["shape"].split(":")[0] for r in results if r["op"] in ("regularizer_fwd_bwd", "gaussian_kl_fwd_bwd")}
    assert networks == {"supnet-mi", "supnet-d121"}

    targets = report["targets"]
    assert [(t["issue"], t["target"], t["backend"]) for t in targets] == [
        (t.issue, t.text, t.backend) for t in bench.targets()]
    assert {t["issue"] for t in targets} == {"4", "5", "8"}
    assert all(t["verdict"] in ("PASS", "FAIL", "UNMEASURED") for t in targets)
    by_kind = {}
    for t in targets:
        by_kind.setdefault((t["kind"], t["backend"]), []).append(t)
    # triton runs here, so its %copy rows are measured and judged; the CPU dry run counts no launches
    assert all(t["value"] is not None and t["verdict"] != "UNMEASURED" for t in by_kind["pct_copy", "triton"])
    assert all(t["verdict"] == "UNMEASURED" and "CPU dry run" in t["why"] for t in by_kind["launches", "triton"])
    compiled = [t for t in targets if t["kind"] == "speedup" and "reference+compile" in t["target"]
                and t["backend"] == "triton"]
    assert [t["verdict"] for t in compiled] == ["UNMEASURED"] and "--no-compile" in compiled[0]["why"]
    if not any(r["backend"] == "cuda" for r in results):  # no cuda backend: its rows say why
        assert all(t["verdict"] == "UNMEASURED" and "cuda unavailable" in t["why"]
                   for t in targets if "cuda" in t["backend"])

    markdown = (tmp_path / "results.md").read_text()
    assert markdown.index("## Targets") < markdown.index("## All measurements") < markdown.index(
        "| gated_apply_fwd_bwd |")
    section = markdown[markdown.index("## Targets"):markdown.index("## All measurements")]
    assert sum(line.startswith(("| 4 |", "| 5 |", "| 8 |")) for line in section.splitlines()) == len(targets)


def test_op_benchmark_times_only_the_ops_asked_for(tmp_path, capsys):
    import json

    import pytest

    bench = _load("bench_gpu")
    assert bench.main(["--dry-run", "--no-compile", "--ops", "gate_keep,branch_combine", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert {r["op"] for r in results} == {"gate_keep", "branch_combine"}
    with pytest.raises(SystemExit):
        bench.main(["--dry-run", "--ops", "gated_aply", "--out", str(tmp_path)])
    assert "--ops: unknown ['gated_aply']" in capsys.readouterr().err


def test_tile_benchmark_dry_run(tmp_path):
    """benchmarks/bench_tiles.py: every tile shape it times writes the package rule's output and dx bits."""
    import json

    assert _load("bench_tiles").main(["--dry-run", "--out", str(tmp_path / "tiles.json")]) == 0
    rows = json.loads((tmp_path / "tiles.json").read_text())["rows"]
    assert {r["layout"] for r in rows} == {"nchw", "nhwc"}
    assert sum(r["rule"] for r in rows) == 4 and len(rows) > 8  # one rule row per shape and layout
    assert all(r["same_bits"] for r in rows), [r for r in rows if not r["same_bits"]]


def test_target_verdicts():
    """A target fails on any measured case past its threshold, passes only when every case is
    measured and within it, and is unmeasured otherwise (with the reason)."""
    judge = _load("bench_gpu").judge
    assert judge([(79.0, "a")], [], 80, True)["verdict"] == "FAIL"
    assert judge([(81.0, "a")], [], 80, True)["verdict"] == "PASS"
    assert judge([(80.0, "a")], [], 80, True)["verdict"] == "PASS"  # "at or above"
    assert judge([], [("a", "skipped: time budget")], 80, True) == {
        "verdict": "UNMEASURED", "value": None, "at": None, "why": "skipped: time budget"}
    partial = judge([(95.0, "a")], [("b", "error: X")], 80, True)
    assert partial["verdict"] == "UNMEASURED" and partial["why"] == "1 of 2 cases: error: X"
    assert judge([(95.0, "a"), (70.0, "b")], [("c", "error: X")], 80, True)["verdict"] == "FAIL"
    worst = judge([(95.0, "a"), (83.0, "b"), (90.0, "c")], [], 80, True)
    assert (worst["verdict"], worst["value"], worst["at"]) == ("PASS", 83.0, "b")  # the worst case, not the best
    assert judge([(2, "x")], [], 2, False)["verdict"] == "PASS"
    assert judge([(3, "x"), (1, "y")], [], 2, False) | {"why": None} == {
        "verdict": "FAIL", "value": 3, "at": "x", "why": None}
    assert judge([(float("nan"), "x")], [], 2, False)["verdict"] == "UNMEASURED"


def test_targets_judged_from_result_rows():
    """Targets rows from synthetic result rows: %copy, speed-ups, cuda-triton parity and launch counts."""
    bench = _load("bench_gpu")

    def row(op, shape, backend, ms, pct=None, note=None):
        return {"op": op, "shape": shape, "backend": backend, "ms": ms, "pct_copy": pct, "note": note}

    op = "gated_apply_fwd_bwd"
    cases = [(op, "big1", "large"), (op, "big2", "large"), (op, "small", None)]
    results = [row(op, "big1", "reference", 3.0, 30), row(op, "big1", "triton", 1.0, 81), row(op, "big1", "cuda", 1.1, 79),
               row(op, "big2", "reference", 3.3, 30), row(op, "big2", "triton", 1.0, 85),
               row(op, "big2", "cuda", None, note="skipped: time budget"),
               row(op, "small", "reference", 1.0, 1), row(op, "small", "triton", 1.0, 1), row(op, "small", "cuda", 1.0, 1)]
    absent = {"reference+compile": "reference+compile not run (--no-compile)"}

    def verdict(kind, backend, baseline=None, subset="large", threshold=80, launches=None):
        target = bench.Target("4", backend, kind, threshold, op, subset, baseline)
        return bench.evaluate(target, cases, results, launches or {}, absent)

    triton = verdict("pct_copy", "triton")  # the small shape is not judged
    assert (triton["verdict"], triton["value"], triton["at"]) == ("PASS", 81, "big1")
    cuda = verdict("pct_copy", "cuda")
    assert cuda["verdict"] == "FAIL" and cuda["at"] == "big1" and "skipped: time budget" in cuda["why"]
    speedup = verdict("speedup", "triton", "reference", threshold=3.0)
    assert (speedup["verdict"], speedup["value"]) == ("PASS", 3.0)
    assert verdict("speedup", "triton", "reference", threshold=3.1)["verdict"] == "FAIL"
    compiled = verdict("speedup", "triton", "reference+compile", threshold=1.5)
    assert compiled["verdict"] == "UNMEASURED" and compiled["why"] == absent["reference+compile"]
    parity = verdict("parity", "cuda vs triton", subset=None, threshold=15)
    assert parity["verdict"] == "UNMEASURED" and round(parity["value"]) == 10  # big1 10% apart; big2 skipped
    assert verdict("parity", "cuda vs triton", subset=None, threshold=5)["verdict"] == "FAIL"

    counts = {"supnet-mi": {"triton": {"forward": 1, "backward": 1}, "reference": {"forward": 300, "backward": 500}}}
    two = verdict("launches", "triton", subset="supnet-mi", threshold=2, launches=counts)
    assert (two["verdict"], two["value"], two["at"]) == ("PASS", 2, "fwd 1; bwd 1 (reference: 300; 500)")
    counts["supnet-mi"]["triton"] = {"forward": 2, "backward": 1}  # value and gradients together: 3 > 2
    three = verdict("launches", "triton", subset="supnet-mi", threshold=2, launches=counts)
    assert (three["verdict"], three["value"]) == ("FAIL", 3)
    uncounted = verdict("launches", "triton", subset="supnet-mi", threshold=2,
                        launches={"supnet-mi": {"triton": {"note": "not counted (CPU dry run)"}}})
    assert uncounted["verdict"] == "UNMEASURED" and uncounted["why"] == "not counted (CPU dry run)"


def test_launch_counting_reads_profiler_records():
    """The launch count's plumbing (profiler schedule, Chrome trace, per-call division) on CPU op
    records: a function that runs another twice leaves twice its records per call."""
    import torch
    from torch.profiler import ProfilerActivity

    bench = _load("bench_gpu")
    x = torch.randn(7, 5)

    def once():
        torch.mm(x, x.t()).relu_()

    def twice():
        once()
        once()

    one = bench.records_per_call(once, [ProfilerActivity.CPU], "cpu_op")
    assert one >= 2 and bench.records_per_call(twice, [ProfilerActivity.CPU], "cpu_op") == 2 * one
    # the counting loop over the (tiny) networks' gated layers, with CPU op records for kernels: the
    # reference's per-layer loop leaves records in proportion to its layers, a failing backend a note
    counts = bench.count_launches(True, torch.float32, lambda fn: bench.records_per_call(fn, [ProfilerActivity.CPU], "cpu_op"),
                                  backends=("reference",))
    assert set(counts) == {"supnet-mi", "supnet-d121"}
    assert all(c["reference"]["forward"] >= 18 and c["reference"]["backward"] >= 18 for c in counts.values()), counts

    def broken(fn):
        raise RuntimeError("no CUPTI")

    assert bench.count_launches(True, torch.float32, broken, backends=("reference",))["supnet-mi"] == {
        "reference": {"note": "error: RuntimeError: no CUPTI"}}
    trace = {"traceEvents": [{"cat": "kernel"}, {"cat": "Kernel"}, {"cat": "gpu_memcpy"}, {"cat": "gpu_memset"},
                             {"cat": "cuda_runtime", "name": "cudaLaunchKernel"}, {"ph": "M"}]}
    assert bench.trace_records(trace, "kernel") == 2


def test_rows_the_targets_read_are_timed_first():
    """The time budget cuts later rows: every row a target reads (kernel backends and the baselines
    of the judged cases) comes before the others, the compiled reference's judged rows right after
    the eager ones, the other compiled rows last."""
    bench = _load("bench_gpu")
    cases = [bench.Case("gated_apply_fwd_bwd", "small", 1, None, None),
             bench.Case("gated_apply_fwd_bwd", "big", 1, None, "large"),
             bench.Case("gated_apply", "big", 1, None, "large"),
             bench.Case("gaussian_noise_fwd_bwd", "cifar", 1, None, "cifar")]
    impls = dict.fromkeys(["reference", "triton", "cpu", bench.EAGER_BASELINE, bench.COMPILED])
    order = [(cases[index].op, cases[index].shape, name) for _, index, name in bench.plan(cases, impls)]
    first = {("gated_apply_fwd_bwd", "big", "reference"), ("gated_apply_fwd_bwd", "big", "triton"),
             ("gated_apply", "big", "triton"), ("gaussian_noise_fwd_bwd", "cifar", "triton"),
             ("gaussian_noise_fwd_bwd", "cifar", bench.EAGER_BASELINE)}
    assert set(order[:len(first)]) == first
    assert order[len(first)] == ("gated_apply_fwd_bwd", "big", bench.COMPILED)
    assert all(name == bench.COMPILED for _, _, name in order[-3:])
    assert len(order) == len(set(order)) == 4 * 4 + 1  # the eager baseline only on the Gaussian epilogue


def test_gpu_suite_script_dry_run(tmp_path):
    """benchmarks/gpu_suite.sh end to end on CPU (no install, the benchmarks' dry runs, no tests):
    every step exits 0, it writes its 8 files, and the Targets section is the output's tail (the
    device tool returns only the last 12,000 characters)."""
    import os
    import subprocess

    env = {**os.environ, "SKIP_INSTALL": "1", "DRY_RUN": "1", "OUT": str(tmp_path)}
    run = subprocess.run(["bash", str(BENCHMARKS / "gpu_suite.sh")], env=env, capture_output=True, text=True,
                         timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["install.log", "device.txt", "pytest.log", "bench.log", "rank.json", "train_step.log", "results.json",
         "results.md"])
    tail = run.stdout[-12000:]
    assert "## Targets" in tail and tail.rstrip().endswith("|"), tail[-2000:]
    assert "exit 0" in run.stdout and "exit 1" not in run.stdout and "exit 124" not in run.stdout, run.stdout[-4000:]
