"""Shared helpers: the backends under test, a float64 error measure and a log of dispatched ops (op
tests); a small digits search, run once per session, and the comparison of two runs (search-level
tests)."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors only under its interpreter; it must be on before triton is
    # imported. The `triton` backend then joins the `backend` fixture below.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import pgnas_fast as pf
from pgnas_fast.ops import dispatch


def _cpu_backends() -> list[str]:
    """Available backends that take CPU tensors (triton only under TRITON_INTERPRET=1)."""
    names = []
    for name, (available, _reason) in pf.backends().items():
        if not available:
            continue
        try:
            dispatch.resolve(name, torch.device("cpu"))
        except (ValueError, pf.BackendUnavailableError):
            continue
        names.append(name)
    return names


BACKENDS_UNDER_TEST = _cpu_backends()


@pytest.fixture(params=BACKENDS_UNDER_TEST)
def backend(request) -> str:
    """Each live backend in turn; every one is checked against formulas written in the tests."""
    return request.param


@pytest.fixture(autouse=True)
def _clean_backend_selection(monkeypatch):
    """No test sees another test's set_backend or an inherited PGNAS_FAST_BACKEND."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    pf.set_backend(None)
    yield
    pf.set_backend(None)


def interpreted(backend: str) -> bool:
    """True when `backend` runs under the Triton interpreter, where every kernel launch costs ~0.1 s
    on CPU: launch-hungry checks (gradcheck's full Jacobian) then use their fast mode."""
    return backend == "triton" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64 (the absolute error when expected is 0)."""
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    scale = e.norm()
    return ((a - e).norm() / (scale if scale > 0 else 1.0)).item()


class DispatchLog(TorchDispatchMode):
    """Records the name of every op dispatched inside it (`names`), then runs the op."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


# design.md "Numerics": float32 data within 1e-5, bfloat16/float16 data within 1e-2.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module (the GPU script's parts are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow (a minute or more)")


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--run-slow") or "slow" in (config.getoption("-m") or "")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: run with --run-slow"))
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="gpu: needs a CUDA device"))


# ---- a small search, shared by the search-level test files (read-only: tests copy it to change it)
SMALL = {"epochs": 2, "candidates": 6, "random_baseline": 4}
TIMINGS = {"images_per_second", "seconds"}


def small_config(**overrides):
    from pgnas_fast import configs

    return configs.resolve("digits-tiny", {**SMALL, **overrides})


def same_run_files(a, b, names=("architecture.json", "candidates.jsonl", "random_candidates.jsonl")):
    """Byte-identical result files, and identical training logs but for the wall-clock timings."""
    from pgnas_fast.search.io import read_jsonl

    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name

    def log(d):
        return [{k: v for k, v in row.items() if k not in TIMINGS} for row in read_jsonl(d / "train_log.jsonl")]

    assert log(a) == log(b)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """(run directory, SearchResult) of small_config() with seed 3."""
    from pgnas_fast.search import run_search

    out = tmp_path_factory.mktemp("run")
    return out, run_search(small_config(), seed=3, out_dir=out, progress=False)
