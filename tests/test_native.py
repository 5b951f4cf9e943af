"""The native extension `pgnas_fast._C` (csrc/, kernels/), issue 5: built, checked at its own entry
points, and buildable standalone (CMake + CTest) and as plain nvcc objects.

The op semantics of the `cpu` backend are covered by tests/test_ops.py and tests/test_philox.py, which
run against every live backend (conftest's `backend` fixture); this file covers what is particular to
the native build. GPU tests (marked `gpu`) compare the `cuda` backend with the reference.
"""
from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pgnas_fast as pf
from pgnas_fast import cpu_backend, cuda_backend
from pgnas_fast.ops.streams import Domain, stream_id

from conftest import TOLERANCE, rel_err

ROOT = Path(__file__).resolve().parents[1]
KERNELS = sorted((ROOT / "kernels").glob("*.cu"))
SEED, STREAM = 20200207, stream_id(Domain.TRAIN, 3, 1)

native = pytest.mark.skipif(
    cpu_backend.unavailable_reason() is not None,
    reason=f"pgnas_fast._C did not build here: {cpu_backend.unavailable_reason()}",
)


# ---- the build --------------------------------------------------------------------------------------
def _listed_sources() -> list[tuple[str, str]]:
    """(kind, path) of csrc/sources.txt, in order."""
    listed = []
    for line in (ROOT / "csrc" / "sources.txt").read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        if fields:
            assert len(fields) == 2 and fields[0] in ("cpu", "cuda"), line
            listed.append((fields[0], fields[1]))
    return listed


def test_sources_list_names_existing_files_and_every_kernel():
    """csrc/sources.txt, read by setup.py and CMakeLists.txt, lists every kernel and only real files."""
    listed = [path for _kind, path in _listed_sources()]
    for path in listed:
        assert (ROOT / path).is_file(), path
    assert {f"kernels/{k.name}" for k in KERNELS} <= set(listed)


@native
def test_extension_is_built_and_cpu_backend_is_live():
    from pgnas_fast import _C

    available, reason = pf.backends()["cpu"]
    assert available, reason
    assert _C.openmp > 0  # built with OpenMP
    assert hasattr(_C, "cpu") and isinstance(_C.with_cuda, bool)


def test_every_backend_implements_the_whole_op_set():
    """No op of a native or Triton backend falls back to the reference backend (dispatch.missing_ops),
    and the custom ops are exactly the listed ones."""
    from pgnas_fast.ops import _library, dispatch
    from torch._library.custom_ops import CustomOpDef

    assert {op._name for op in vars(_library).values() if isinstance(op, CustomOpDef)} == set(dispatch.OPS)
    for name in ("cpu", "cuda", "triton"):
        module = importlib.import_module(dispatch.BACKENDS[name].module)
        assert [op for op in dispatch.OPS if not callable(getattr(module, op, None))] == [], name


def test_unavailable_reasons_are_sentences():
    for module in (cpu_backend, cuda_backend):
        reason = module.unavailable_reason()
        assert reason is None or (isinstance(reason, str) and len(reason) > 20)
    if not torch.cuda.is_available():
        assert pf.backends()["cuda"][0] is False


def test_doctor_reports_the_native_backends():
    out = subprocess.run([sys.executable, "-m", "pgnas_fast.cli", "doctor"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "cpu" in out.stdout and "cuda" in out.stdout


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("kernel", KERNELS, ids=[k.name for k in KERNELS])
def test_kernel_compiles_with_plain_nvcc_warnings_as_errors(kernel, tmp_path):
    """Raw-pointer CUDA with no torch headers: plain nvcc for sm_90, every warning an error."""
    cmd = ["nvcc", "-arch=sm_90", "-Werror", "all-warnings", "-c", str(kernel), "-o", str(tmp_path / "k.o")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "#include <torch" not in kernel.read_text() and "ATen" not in kernel.read_text()


# ---- the CUDA build's host C++, checked without a CUDA torch -----------------------------------------
def _cuda_host_sources() -> list[str]:
    """The C++ that only the CUDA build compiles as such: the `cuda` sources that are not kernels
    (csrc/cuda/*.cpp, the cuda bindings) and the `cpu` ones with a PGNAS_WITH_CUDA branch."""
    return [path for kind, path in _listed_sources() if path.endswith(".cpp") and (
        kind == "cuda" or "PGNAS_WITH_CUDA" in (ROOT / path).read_text())]


def _setup_cxx_flags() -> list[str]:
    """setup.py's `cxx_flags` list (its one place), read without running setup.py."""
    import ast

    for node in ast.walk(ast.parse((ROOT / "setup.py").read_text())):
        if isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == ["cxx_flags"]:
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no `cxx_flags = [...]` list any more: update this test")


def _setup_functions(*names: str) -> dict:
    """setup.py's functions `names`, compiled without running setup.py (its module level builds)."""
    import ast

    tree = ast.parse((ROOT / "setup.py").read_text())
    module = ast.Module([n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names], [])
    namespace = {"os": os, "shutil": shutil, "subprocess": subprocess, "Path": Path}
    exec(compile(module, "setup.py", "exec"), namespace)
    assert all(name in namespace for name in names), "setup.py lost one of these functions: update this test"
    return namespace


def test_setup_finds_the_cuda_toolkit_behind_an_nvcc_wrapper(tmp_path, monkeypatch):
    """An nvcc on PATH that is a wrapper script (/usr/local/bin/nvcc exec'ing the toolkit's) makes torch
    guess CUDA_HOME=/usr/local, which holds no headers, and the whole _C failed to build: setup.py asks
    nvcc's dry run for its toolkit instead, and names what is missing when that has no headers either."""
    import types

    found = _setup_functions("_has_cuda_headers", "_nvcc_toolkit", "_cuda_toolkit")["_cuda_toolkit"]
    toolkit = tmp_path / "cuda-13.0"
    (toolkit / "include").mkdir(parents=True)
    (toolkit / "include" / "cuda_runtime_api.h").write_text("")
    wrapper = tmp_path / "local" / "bin" / "nvcc"
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text(f'#!/bin/sh\necho "#$ TOP={toolkit}/bin/.." >&2\n')  # (what nvcc --dryrun prints)
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")
    torch_guess = types.SimpleNamespace(CUDA_HOME=str(tmp_path / "local"))
    assert found(torch_guess) == (toolkit.resolve(), "")
    (toolkit / "bin").mkdir()
    (toolkit / "bin" / "nvcc").write_text("")  # torch's CUDA_HOME is taken as it is when it holds both
    assert found(types.SimpleNamespace(CUDA_HOME=str(toolkit))) == (toolkit, "")
    (toolkit / "include" / "cuda_runtime_api.h").unlink()
    home, why = found(torch_guess)
    assert home is None and f"the CUDA toolkit of {wrapper} was not found with its headers" in why
    assert "set CUDA_HOME to the toolkit holding include/cuda_runtime_api.h" in why


def _cuda_home() -> Path | None:
    """Where the CUDA headers are (CUDA_HOME, CUDA_PATH, nvcc's install, /usr/local/cuda), or None."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                  nvcc and Path(nvcc).resolve().parents[1], "/usr/local/cuda"]
    return next((Path(c) for c in candidates if c and (Path(c) / "include" / "cuda_runtime_api.h").is_file()), None)


TORCH_INCLUDE = Path(torch.__file__).parent / "include"


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")
@pytest.mark.skipif(_cuda_home() is None, reason="no CUDA headers (cuda_runtime_api.h under CUDA_HOME, nvcc's "
                    "install or /usr/local/cuda)")
@pytest.mark.skipif(not (TORCH_INCLUDE / "c10" / "cuda" / "CUDAStream.h").is_file(),
                    reason="this torch wheel ships no c10/cuda headers")
def test_cuda_bindings_compile_without_a_cuda_torch():
    """csrc/cuda/*.cpp is compiled only where torch has CUDA, so no CPU machine builds it: check it
    with g++ here as setup.py's CUDAExtension would compile it (its cxx flags, torch's extension
    defines, PGNAS_WITH_CUDA), syntax and types only, every warning of our code an error. A CPU wheel
    lacks only c10/cuda's generated cuda_cmake_macros.h, which holds nothing a Linux build reads:
    torch's C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips its include."""
    import sysconfig

    from torch.utils import cpp_extension

    sources = _cuda_host_sources()
    cuda_cpp = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cpp")}
    assert cuda_cpp and cuda_cpp <= set(sources), f"csrc/cuda/*.cpp missing from csrc/sources.txt: {cuda_cpp}"
    system_includes = [*cpp_extension.include_paths(), str(_cuda_home() / "include"), sysconfig.get_paths()["include"]]
    flags = [*_setup_cxx_flags(), "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-DPGNAS_WITH_CUDA",
             "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
             *(f"-isystem{path}" for path in system_includes)]
    # -isystem: warnings of torch's, CUDA's and Python's headers are theirs (torch's want C++20)
    compiles = {path: subprocess.Popen(["g++", *flags, path], cwd=ROOT, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True) for path in sources}
    logs = {path: p.communicate(timeout=600)[0] for path, p in compiles.items()}
    failed = {path: log[-4000:] for path, log in logs.items() if compiles[path].returncode != 0}
    assert not failed, "\n".join(f"{path}:\n{log}" for path, log in failed.items())


def _cmake(tmp_path: Path, *options: str) -> None:
    build = tmp_path / "build"
    env = dict(os.environ)
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    steps = [
        ["cmake", "-S", str(ROOT), "-B", str(build), *generator, *options],
        ["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)],
        ["ctest", "--test-dir", str(build), "--output-on-failure"],
    ]
    for cmd in steps:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
        assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_builds_the_kernels_and_ctest_passes(tmp_path):
    """Configure, build the C++ tests and run ctest (the CUDA objects: the nvcc test above and the slow test)."""
    _cmake(tmp_path, "-DPGNAS_BUILD_EXTENSION=OFF", "-DPGNAS_BUILD_CUDA=OFF")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_builds_the_extension(tmp_path):
    """The full standalone build: the extension against torch's CMake package, plus the tests."""
    _cmake(tmp_path, f"-DPython3_EXECUTABLE={sys.executable}")
    assert list((tmp_path / "build").glob("_C*.so"))


# ---- the bindings' own checks -----------------------------------------------------------------------
def _ops():
    from pgnas_fast import _C

    return _C.cpu


X = torch.randn(3, 7, 5, 5)
P = torch.randn(7)

BAD_NATIVE_CALLS = [
    ("x int", lambda c: c.gated_apply(X.long(), P, 0, 0, 0.2, "relaxed"), TypeError, r"\bx must have dtype"),
    ("x strided", lambda c: c.gated_apply(X[:, ::2], P[:4], 0, 0, 0.2, "relaxed"), ValueError,
     r"\bx must be contiguous or channels_last"),
    ("p_logit length", lambda c: c.gated_apply(X, torch.randn(6), 0, 0, 0.2, "relaxed"), ValueError,
     r"p_logit must have shape \[7\]"),
    ("p_logit half", lambda c: c.gated_apply(X, P.half(), 0, 0, 0.2, "relaxed"), TypeError, "p_logit"),
    ("seed negative", lambda c: c.gated_apply(X, P, -1, 0, 0.2, "relaxed"), ValueError, "seed"),
    ("stream negative", lambda c: c.gate_keep(P, 2, 0, -3, 0.2, "relaxed"), ValueError, "stream"),
    ("tau zero", lambda c: c.gate_keep(P, 2, 0, 0, 0.0, "relaxed"), ValueError, "tau"),
    ("mode", lambda c: c.gate_keep(P, 2, 0, 0, 0.2, "soft"), ValueError, "mode"),
    ("batch", lambda c: c.gate_keep(P, 0, 0, 0, 0.2, "relaxed"), ValueError, "batch"),
    ("offset negative", lambda c: c.gate_keep(P, 2, 0, 0, 0.2, "relaxed", -1), ValueError, r"\boffset must"),
    ("offset past 2^63", lambda c: c.gated_apply(X, P, 0, 0, 0.2, "relaxed", (1 << 63) - 20), ValueError,
     r"offset \+ batch \* C"),
    ("backward offset", lambda c: c.gated_apply_backward(X, X, P, 0, 0, 0.2, "relaxed", -2), ValueError,
     r"\boffset must"),
    ("grad layout", lambda c: c.gated_apply_backward(X.to(memory_format=torch.channels_last), X, P, 0, 0, 0.2,
                                                     "relaxed"), ValueError, r"grad must have the memory layout of x"),
    ("grad dtype", lambda c: c.gated_apply_backward(X.double(), X, P, 0, 0, 0.2, "relaxed"), TypeError, r"\bgrad"),
    ("philox out dtype", lambda c: c.philox_uniform_out(torch.empty(4, dtype=torch.float64), 0, 0, 0), TypeError,
     r"\bout"),
    ("ys empty", lambda c: c.branch_combine([], torch.rand(2), None), ValueError, r"\bys"),
    ("ys mismatch", lambda c: c.branch_combine([X, X[:2]], torch.rand(2), None), ValueError, r"ys\[1\]"),
    ("weights shape", lambda c: c.branch_combine([X, X], torch.rand(3), None), ValueError, "weights must have shape"),
    ("skip dtype", lambda c: c.branch_combine([X, X], torch.rand(2), X.double()), TypeError, "skip"),
    ("backward_weights", lambda c: c.branch_combine_backward(X, [X, X], torch.rand(3, 2), torch.rand(2)), ValueError,
     "backward_weights"),
    ("reg lengths", lambda c: c.regularizer([torch.randn(4, 3)], [], 1.0, 1.0, 1.0), ValueError, "p_logits"),
    ("reg fit", lambda c: c.regularizer([torch.randn(4, 3)], [torch.randn(5)], 1.0, 1.0, 1.0), ValueError,
     r"p_logits\[0\]"),
    ("reg no outputs", lambda c: c.regularizer([torch.randn(0, 3, 3, 3)], [torch.randn(3)], 1.0, 1.0, 1.0), ValueError,
     r"weights\[0\] must have at least one output channel"),
    ("reg weight strided", lambda c: c.regularizer([torch.randn(3, 4).t()], [torch.randn(3)], 1.0, 1.0, 1.0),
     ValueError, r"weights\[0\] must be contiguous"),
    ("reg n_train", lambda c: c.regularizer([torch.randn(4, 3)], [torch.randn(3)], 1.0, 1.0, 0.0), ValueError,
     "n_train"),
    ("reg backward mixed weights", lambda c: c.regularizer_backward(
        torch.tensor(1.0), [torch.randn(4, 3), torch.randn(4, 3).double()], [torch.randn(3), torch.randn(3)], 1.0, 1.0,
        1.0), ValueError, r"weights\[1\] must have the dtype of weights\[0\] \(Float"),
    ("reg fused lengths", lambda c: c.regularizer_with_grad([torch.randn(4, 3)], [], 1.0, 1.0, 1.0), ValueError,
     "p_logits"),
    ("reg fused n_train", lambda c: c.regularizer_with_grad([torch.randn(4, 3)], [torch.randn(3)], 1.0, 1.0, -1.0),
     ValueError, "n_train"),
    ("reg fused mixed weights", lambda c: c.regularizer_with_grad(
        [torch.randn(4, 3), torch.randn(4, 3).double()], [torch.randn(3), torch.randn(3)], 1.0, 1.0, 1.0), ValueError,
     r"weights\[1\] must have the dtype of weights\[0\] \(Float"),
    ("kl backward mixed", lambda c: c.gaussian_kl_backward(torch.tensor(1.0), [P, P.double()], [1, 1], 1.0), ValueError,
     r"log_alphas\[1\] must have the dtype of log_alphas\[0\]"),
    ("candidates dtype", lambda c: c.candidate_keep(P, torch.tensor([1.0]), 0, 0, 2), TypeError, "candidates"),
    ("candidates range", lambda c: c.candidate_keep(P, torch.tensor([1 << 40]), 0, 0, 2), ValueError,
     r"candidates must be ids in \[0, 2\^40\)"),
    ("candidate layer", lambda c: c.candidate_keep(P, torch.tensor([1]), 0, 1 << 16, 2), ValueError, r"\blayer"),
    ("candidate domain", lambda c: c.candidate_keep(P, torch.tensor([1]), 0, 0, 256), ValueError, r"\bdomain"),
    ("fused scale length", lambda c: c.affine_relu_gate(X, P[:3], P, P, 0, 0, 0.2, "relaxed", 0), ValueError,
     r"scale must have shape"),
    ("fused shift dtype", lambda c: c.affine_relu_gate(X, P, P.double(), P, 0, 0, 0.2, "relaxed", 0), TypeError,
     r"shift must have the dtype of p_logit"),
    ("copies count", lambda c: c.gated_copies(X, P.view(1, -1).expand(2, -1).contiguous(), 0, [1], 0.2, "relaxed", 0,
                                              True), ValueError, r"p_logits must be a contiguous \[1, "),
    ("copies too many", lambda c: c.gated_copies(X, P.repeat(17, 1), 0, list(range(17)), 0.2, "relaxed", 0, True),
     ValueError, "streams must name 1 to 16"),
]


@native
@pytest.mark.parametrize("call, error, match", [c[1:] for c in BAD_NATIVE_CALLS], ids=[c[0] for c in BAD_NATIVE_CALLS])
def test_bindings_reject_bad_input_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call(_ops())


@native
def test_cpu_backend_outputs_follow_empty_like_for_strided_views():
    """Views the kernels do not read directly are copied once; outputs still follow empty_like(x)."""
    x = torch.randn(4, 12, 5, 5)[:, ::2]
    p = torch.randn(6)
    out = pf.ops.gated_apply(x, p, seed=SEED, stream=STREAM, backend="cpu")
    ref = pf.ops.gated_apply(x, p, seed=SEED, stream=STREAM, backend="reference")
    assert out.stride() == torch.empty_like(x).stride()
    assert rel_err(out, ref) < TOLERANCE[torch.float32]


def _dense_permuted(shape, order, dtype, gen):
    """Random data (never zero) of logical `shape`, dense in memory with its dims laid out in `order`
    (outermost first): neither contiguous nor channels_last, but without gaps, so empty_like keeps its
    strides."""
    stored = torch.randn([shape[d] for d in order], generator=gen).to(dtype)
    x = stored.permute([order.index(d) for d in range(len(shape))])
    assert tuple(x.shape) == tuple(shape) and not x.is_contiguous()
    assert x.untyped_storage().nbytes() == x.numel() * x.element_size()  # no gaps
    assert not (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
    return x


# (logical shape, memory order of its dims): batch and channel swapped, the spatial dims swapped, a
# 4-D order that is neither, and a 3-D (conv1d-like) one
DENSE_PERMUTATIONS = [((3, 5, 4, 6), (1, 0, 2, 3)), ((3, 5, 4, 6), (0, 1, 3, 2)), ((3, 5, 4, 6), (2, 0, 3, 1)),
                      ((4, 6, 5), (2, 0, 1))]


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, order", DENSE_PERMUTATIONS, ids=[f"order{''.join(map(str, o))}"
                                                                   for _, o in DENSE_PERMUTATIONS])
def test_cpu_backend_outputs_of_dense_permuted_inputs_keep_their_strides(shape, order, dtype):
    """The cpu layer reads a dense permuted tensor after one contiguous copy, and its outputs and
    input gradients still have the layout of torch.empty_like(input) (the custom ops' fake kernels),
    as the reference's do: same strides and the reference's values."""
    gen = torch.Generator().manual_seed(len(shape) * 10 + order[0])
    x = _dense_permuted(shape, order, dtype, gen)
    other = _dense_permuted(shape, order, dtype, gen)  # a second branch / var, in the same layout
    dy = _dense_permuted(shape, order, dtype, gen)
    C = shape[1]
    p, scale, shift = torch.randn(C, generator=gen), torch.rand(C, generator=gen) + 0.5, torch.randn(C, generator=gen)
    weights = torch.rand(shape[0], 2, generator=gen)
    p_copies = torch.randn(2, C, generator=gen)
    var = other.abs() + 0.1

    def run(backend):
        leaves = [t.clone().requires_grad_() for t in (x, other, var)]
        xl, yl, vl = leaves
        outs = {
            "gated_apply": pf.ops.gated_apply(xl, p, seed=SEED, stream=STREAM, backend=backend),
            "affine_relu_gate": pf.ops.affine_relu_gate(xl, scale, shift, p, seed=SEED, stream=STREAM, mode="hard",
                                                        backend=backend),
            "branch_combine": pf.ops.branch_combine([xl, yl], weights, backend=backend),
            "gaussian_noise": pf.ops.gaussian_noise(xl, vl, seed=SEED, stream=STREAM, offset=3, backend=backend),
        }
        grads = {}
        for name, out in outs.items():
            grads[name] = torch.autograd.grad(out, leaves, dy, allow_unused=True)
        copies = pf.ops.gated_copies(xl, p_copies, seed=SEED, streams=[STREAM, STREAM + 1], mode="hard",
                                     backend=backend)
        grads["gated_copies"] = torch.autograd.grad(copies, [xl], torch.stack([dy, dy]))
        return outs, grads

    (ours, our_grads), (ref, ref_grads) = run("cpu"), run("reference")
    like = torch.empty_like(x).stride()
    assert like == x.stride()  # (dense: empty_like keeps the permutation)
    for name in ours:
        assert ours[name].stride() == ref[name].stride() == like, name
        assert rel_err(ours[name], ref[name]) < TOLERANCE[dtype], name
    for name in our_grads:
        for got, want in zip(our_grads[name], ref_grads[name]):
            if want is None:
                assert got is None, name
                continue
            assert got.dtype == want.dtype and got.stride() == want.stride() == like, name
            assert rel_err(got, want) < TOLERANCE[dtype], name


@native
@pytest.mark.parametrize("batch, channels, size", [(64, 128, 16), (2, 3, 1), (5, 1000, 3)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_cpu_gated_apply_parallel_sizes_match_reference(batch, channels, size, memory_format):
    """Sizes above the OpenMP grain (parallel loops), float32, forward and backward."""
    gen = torch.Generator().manual_seed(batch + channels)
    x = torch.randn(batch, channels, size, size, generator=gen).contiguous(memory_format=memory_format)
    p = torch.randn(channels, generator=gen)
    dy = torch.randn(x.shape, generator=gen).contiguous(memory_format=memory_format)
    results = {}
    for name in ("cpu", "reference"):
        xr, pr = x.clone().requires_grad_(), p.clone().requires_grad_()
        out = pf.ops.gated_apply(xr, pr, seed=SEED, stream=STREAM, backend=name)
        out.backward(dy)
        results[name] = (out, xr.grad, pr.grad)
    for ours, ref in zip(results["cpu"], results["reference"]):
        assert rel_err(ours, ref) < TOLERANCE[torch.float32]
    assert results["cpu"][0].stride() == x.stride()


@native
@pytest.mark.parametrize("gate_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch, channels, offset", [(128, 16, 0), (7, 33, 12345), (64, 128, (1 << 32) - 5)])
def test_cpu_keeps_equal_the_reference_bit_for_bit(batch, channels, offset, gate_dtype):
    """The cpu gates are the contract's u followed by the reference's own torch ops: relaxed keeps and
    hard masks are the reference's exactly (offsets past a 32-bit carry included), and so are the
    outputs of gated_apply and gated_copies."""
    gen = torch.Generator().manual_seed(batch + channels)
    p = (2 * torch.randn(channels, generator=gen)).to(gate_dtype)
    x = torch.randn(batch, channels, 3, 3, generator=gen, dtype=gate_dtype)
    for mode in ("relaxed", "hard"):
        keeps = [pf.ops.gate_keep(p, batch, seed=SEED, stream=STREAM, mode=mode, offset=offset, backend=b)
                 for b in ("cpu", "reference")]
        assert torch.equal(*keeps)
        outs = [pf.ops.gated_apply(x, p, seed=SEED, stream=STREAM, mode=mode, offset=offset, backend=b)
                for b in ("cpu", "reference")]
        assert torch.equal(*outs)
        # each copy's keeps on their own [B, C], as the reference draws them: torch's vectorised loops
        # compute a tail of elements with the scalar function, so [K, B, C] at once differs in the last bit
        copies = [pf.ops.gated_copies(x, torch.stack([p, -p, 0.5 * p]), seed=SEED, streams=[STREAM, 7, 8], mode=mode,
                                      offset=offset, relu=True, backend=b) for b in ("cpu", "reference")]
        assert torch.equal(*copies)


def test_cpu_regularizer_is_the_same_on_any_thread_count():
    """Work items combine in a fixed order, so value and gradients are bit-identical on 1 and 2
    threads (the op adds nothing thread-dependent to a search; torch's CPU BatchNorm and weight
    gradients do, which is why a run records its thread count)."""
    gen = torch.Generator().manual_seed(8)
    shapes = [((40, 24, 3, 3), 24), ((70, 33, 1, 1), 33), ((24, 1, 3, 3), 24), ((48, 12, 3, 3), 24), ((10, 70), 70)]
    weights = [torch.randn(s, generator=gen) for s, _ in shapes]
    p_logits = [torch.randn(c, generator=gen) for _, c in shapes]
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            ws = [w.clone().requires_grad_() for w in weights]
            ps = [p.clone().requires_grad_() for p in p_logits]
            r = pf.ops.regularizer(ws, ps, weight_reg=3.0, drop_reg=1.0, n_train=20.0, backend="cpu")
            r.backward()
            results.append([r] + [t.grad for t in ws + ps])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def _mixed_network(seed: int, weight_dtype=torch.float32, p_dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    shapes = [((40, 24, 3, 3), 24), ((70, 33, 1, 1), 33), ((24, 1, 3, 3), 24), ((48, 12, 3, 3), 24),
              ((10, 70), 70), ((5, 3, 7), 3)]
    weights = [torch.randn(s, generator=gen).to(weight_dtype).requires_grad_() for s, _ in shapes]
    p_logits = [(2 * torch.randn(c, generator=gen)).to(p_dtype).requires_grad_() for _, c in shapes]
    return weights, p_logits


@native
@pytest.mark.parametrize("weight_dtype,p_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                                  (torch.float64, torch.float64)])
@pytest.mark.parametrize("upstream", [1.0, 0.37])
def test_cpu_eager_regularizer_fuses_the_gradient_into_the_forward(monkeypatch, weight_dtype, p_dtype, upstream):
    """With a gradient to come, the eager cpu regulariser computes R and its gradients for an upstream
    gradient of 1 in one pass (`regularizer_with_grad`); backward then calls no kernel at 1 and the
    backward op otherwise. Values and gradients are the custom op's (forward + backward op) bit for bit."""
    from pgnas_fast.ops import _library

    calls = []
    backward_op = cpu_backend.regularizer_backward
    monkeypatch.setattr(cpu_backend, "regularizer_backward", lambda *a: calls.append(1) or backward_op(*a))
    results = []
    for run in (lambda *a: _library.call("regularizer", *a), _library._custom["regularizer"]):
        weights, p_logits = _mixed_network(3, weight_dtype, p_dtype)
        r = run(weights, p_logits, 3.0, 0.5, 20.0, "cpu")
        (upstream * r).backward()
        results.append([r.detach()] + [t.grad for t in weights + p_logits])
    assert len(calls) == (1 if upstream == 1.0 else 2)  # the custom op's backward, and eager's unless fused
    for eager, custom in zip(*results):
        assert eager.dtype == custom.dtype and torch.equal(eager, custom)


@native
def test_cpu_fused_regularizer_gradients_survive_a_second_backward():
    """retain_graph: the fused gradients are handed out once, since autograd then sums later backwards
    into them in place (as .grad); later backwards recompute, so .grad is exactly 3x the first after 3."""
    weights, p_logits = _mixed_network(4)
    r = pf.ops.regularizer(weights, p_logits, weight_reg=3.0, drop_reg=0.5, n_train=20.0, backend="cpu")
    r.backward(retain_graph=True)
    first = [t.grad.clone() for t in weights + p_logits]
    r.backward(retain_graph=True)
    r.backward()
    assert all(torch.equal(t.grad, 3 * g) for t, g in zip(weights + p_logits, first))


@native
def test_cpu_regularizer_reuses_its_large_gradient_buffer_only_when_free():
    """The weights' flat gradient of a large network (over 32 MB) reuses the last call's buffer once
    nothing holds it (page faults of a fresh mapping cost more than the pass); while an earlier
    gradient is alive it gets a new one and the earlier values stay as they were."""
    gen = torch.Generator().manual_seed(5)
    weights = [torch.randn(1024, 1024, 3, generator=gen) for _ in range(3)]  # 36 MB
    p_logits = [torch.randn(1024, generator=gen) for _ in range(3)]
    args = (weights, p_logits, 3.0, 0.5, 20.0)

    def gradient(scale, args=args):
        return cpu_backend.regularizer_backward(torch.tensor(scale), *args)[0]

    def owners(t):  # of its storage: the tensor, the storage object asked, and the cache if it holds it
        return torch._C._storage_Use_Count(t.untyped_storage()._cdata)

    small = gradient(1.0, ([w[:100] for w in weights], *args[1:]))  # 3.6 MB: the heap reuses it anyway
    assert owners(small) == owners(torch.empty(1))

    held = gradient(1.0)
    kept = held.clone()
    second = gradient(2.0)  # `held` is alive: a new buffer
    assert second.data_ptr() != held.data_ptr()
    address = second.data_ptr()
    del second
    third = gradient(4.0)  # free again: reused (the same address, and the cache still owns it)
    assert third.data_ptr() == address and owners(third) == owners(torch.empty(1)) + 1
    assert torch.equal(third, 4 * kept)
    tail = third[7:]  # a view holds the storage too
    del third
    fourth = gradient(1.0)
    assert fourth.data_ptr() != address
    assert torch.equal(tail, 4 * kept[7:]) and torch.equal(held, kept) and torch.equal(fourth, kept)


@native
def test_cpu_regularizer_backward_at_another_weight_maps_no_new_buffer():
    """Upstream gradient != 1: the fused forward's gradients are freed before the backward op asks for
    its buffer, so the large buffer is reused and no fresh pages are faulted in (36 MB: 9,216 pages)."""
    import resource

    gen = torch.Generator().manual_seed(6)
    weights = [torch.randn(1024, 1024, 3, generator=gen).requires_grad_() for _ in range(3)]
    p_logits = [torch.randn(1024, generator=gen).requires_grad_() for _ in range(3)]

    def step():
        for t in weights + p_logits:
            t.grad = None
        (0.5 * pf.ops.regularizer(weights, p_logits, weight_reg=3.0, drop_reg=0.5, n_train=20.0,
                                  backend="cpu")).backward()

    step()  # maps the buffer once
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults < 2000


# ---- the cuda backend (GPU machines) ----------------------------------------------------------------
gpu = pytest.mark.gpu


def _needs_cuda_backend():
    if not pf.backends()["cuda"][0]:
        pytest.skip(f"cuda backend unavailable: {pf.backends()['cuda'][1]}")


@gpu
def test_cuda_philox_bit_identical():
    _needs_cuda_backend()
    for seed, stream, offset in [(0, 0, 0), (SEED, STREAM, 12345), ((1 << 62) + 3, (1 << 60) + 9, (1 << 34) + 1)]:
        ours = pf.ops.philox_uniform(100_003, seed=seed, stream=stream, offset=offset, device="cuda", backend="cuda")
        ref = pf.ops.philox_uniform(100_003, seed=seed, stream=stream, offset=offset, device="cpu", backend="reference")
        assert torch.equal(ours.cpu(), ref)


@gpu
@pytest.mark.parametrize("mode", ["relaxed", "hard", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape, memory_format", [((8, 16, 8, 8), torch.contiguous_format),
                                                  ((8, 16, 8, 8), torch.channels_last),
                                                  ((3, 7, 5, 5), torch.contiguous_format),
                                                  ((3, 7, 5, 5), torch.channels_last),
                                                  ((6, 10), torch.contiguous_format)])
def test_cuda_gated_apply_matches_reference(mode, dtype, shape, memory_format):
    _needs_cuda_backend()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen).to(dtype).cuda().contiguous(memory_format=memory_format)
    dy = torch.randn(shape, generator=gen).to(dtype).cuda().contiguous(memory_format=memory_format)
    p = torch.randn(shape[1], generator=gen).cuda()
    results = {}
    for name in ("cuda", "reference"):
        xr, pr = x.clone().requires_grad_(), p.clone().requires_grad_()
        out = pf.ops.gated_apply(xr, pr, seed=SEED, stream=STREAM, mode=mode, backend=name)
        out.backward(dy)
        results[name] = (out, xr.grad, pr.grad)
    tol = TOLERANCE[dtype] if dtype != torch.float64 else 1e-5
    for ours, ref in zip(results["cuda"], results["reference"]):
        assert rel_err(ours, ref) < tol
    assert results["cuda"][0].stride() == x.stride()


@gpu
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_cuda_gate_offset_matches_reference(memory_format):
    """Element offsets (a data-parallel rank's rows), past 2^32 and up to the last one below 2^63."""
    _needs_cuda_backend()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 7, 5, 3, generator=gen).cuda().contiguous(memory_format=memory_format)
    dy = torch.randn(x.shape, generator=gen).cuda().contiguous(memory_format=memory_format)
    p = torch.randn(7, generator=gen).cuda()
    for offset in (0, 3 * 7, (1 << 40) + 1, (1 << 63) - 4 * 7):
        for mode in ("relaxed", "hard"):
            keep = {name: pf.ops.gate_keep(p, 4, seed=SEED, stream=STREAM, mode=mode, offset=offset, backend=name)
                    for name in ("cuda", "reference")}
            if mode == "hard":
                assert torch.equal(keep["cuda"], keep["reference"])
            assert rel_err(keep["cuda"], keep["reference"]) < 1e-6
        results = {}
        for name in ("cuda", "reference"):
            xr, pr = x.clone().requires_grad_(), p.clone().requires_grad_()
            out = pf.ops.gated_apply(xr, pr, seed=SEED, stream=STREAM, offset=offset, backend=name)
            out.backward(dy)
            results[name] = (out, xr.grad, pr.grad)
        for ours, ref in zip(results["cuda"], results["reference"]):
            assert rel_err(ours, ref) < 1e-5


@gpu
@pytest.mark.parametrize("per_example", [True, False])
@pytest.mark.parametrize("n_branches", [1, 3, 9, 10, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cuda_branch_combine_matches_reference(per_example, n_branches, dtype):
    _needs_cuda_backend()
    gen = torch.Generator().manual_seed(2)
    ys = [torch.randn(4, 6, 5, 8, generator=gen).to(dtype).cuda() for _ in range(n_branches)]
    w = (torch.rand((4, n_branches) if per_example else (n_branches,), generator=gen) + 0.1).cuda()
    skip = torch.randn(4, 6, 5, 8, generator=gen).to(dtype).cuda()
    dy = torch.randn(4, 6, 5, 8, generator=gen).to(dtype).cuda()
    results = {}
    for name in ("cuda", "reference"):
        yr = [y.clone().requires_grad_() for y in ys]
        wr = w.clone().requires_grad_()
        pf.ops.branch_combine(yr, wr, skip=skip, backend=name).backward(dy)
        results[name] = (pf.ops.branch_combine(ys, w, skip=skip, backend=name), wr.grad, *[y.grad for y in yr])
    tol = TOLERANCE[dtype] if dtype != torch.float64 else 1e-5
    for ours, ref in zip(results["cuda"], results["reference"]):
        assert rel_err(ours, ref) < tol


@gpu
@pytest.mark.parametrize("n_branches", [10, 16])
def test_cuda_branch_combine_of_up_to_16_branches_rounds_bfloat16_once(n_branches):
    """Up to 16 branches the forward is one launch: the bfloat16 output is the float32 sum
    skip + w_0 y_0 + w_1 y_1 + ..., each operation rounded to float32 (no FMA), rounded once."""
    _needs_cuda_backend()
    gen = torch.Generator().manual_seed(5)
    ys = [torch.randn(3, 4, 5, 6, generator=gen).to(torch.bfloat16) for _ in range(n_branches)]
    skip = torch.randn(3, 4, 5, 6, generator=gen).to(torch.bfloat16)
    w = torch.rand(3, n_branches, generator=gen)
    expected = skip.float()
    for s, y in enumerate(ys):
        expected = expected + w[:, s].view(3, 1, 1, 1) * y.float()
    out = pf.ops.branch_combine([y.cuda() for y in ys], w.cuda(), skip=skip.cuda(), backend="cuda")
    assert torch.equal(out.cpu(), expected.to(torch.bfloat16))


@gpu
def test_cuda_regularizer_matches_reference():
    _needs_cuda_backend()
    gen = torch.Generator().manual_seed(3)
    shapes = [((8, 3, 3, 3), 3), ((10, 6), 6), ((8, 2, 3, 3), 4), ((6, 1, 3, 3), 6), ((9, 2, 1, 1), 6),
              ((256, 256, 3, 3), 256)]
    for dtype in (torch.float32, torch.bfloat16):
        weights = [(0.5 * torch.randn(s, generator=gen)).to(dtype).cuda().requires_grad_() for s, _ in shapes]
        p_logits = [torch.randn(c, generator=gen).cuda().requires_grad_() for _, c in shapes]
        grads = {}
        for name in ("cuda", "reference"):
            for t in (*weights, *p_logits):
                t.grad = None
            r = pf.ops.regularizer(weights, p_logits, weight_reg=10.0, drop_reg=1.0, n_train=1e3, backend=name)
            r.backward()
            grads[name] = (r.detach().clone(), *[w.grad.clone() for w in weights], *[p.grad.clone() for p in p_logits])
        for ours, ref in zip(grads["cuda"], grads["reference"]):
            assert rel_err(ours, ref) < TOLERANCE[dtype]


@gpu
def test_cuda_bad_device_is_rejected_naming_the_argument():
    _needs_cuda_backend()
    from pgnas_fast import _C

    with pytest.raises(ValueError, match=r"\bx must be a CUDA tensor"):
        _C.cuda.gated_apply(X, P, 0, 0, 0.2, "relaxed")
    with pytest.raises(ValueError, match="p_logit"):
        _C.cuda.gated_apply(X.cuda(), P, 0, 0, 0.2, "relaxed")


@gpu
def test_cuda_gradcheck_and_opcheck():
    """float64 gradients by finite differences, and torch.library.opcheck (fake kernels, strides) on CUDA."""
    _needs_cuda_backend()
    from pgnas_fast.ops import _library

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 4, 2, 3, dtype=torch.float64, generator=gen).cuda().requires_grad_()
    p = torch.randn(4, dtype=torch.float64, generator=gen).cuda().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, p: pf.ops.gated_apply(x, p, seed=SEED, stream=STREAM, backend="cuda"),
                                    (x, p))
    ys = [torch.randn(3, 4, 2, 2, dtype=torch.float64, generator=gen).cuda().requires_grad_() for _ in range(2)]
    w = torch.rand(3, 2, dtype=torch.float64, generator=gen).cuda().requires_grad_()
    assert torch.autograd.gradcheck(lambda w, a, b: pf.ops.branch_combine([a, b], w, backend="cuda"), (w, *ys))
    weight = torch.randn(6, 2, 2, 2, dtype=torch.float64, generator=gen).cuda().requires_grad_()
    z = torch.randn(6, dtype=torch.float64, generator=gen).cuda().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda w, z: pf.ops.regularizer([w], [z], weight_reg=30.0, drop_reg=2.0, n_train=10.0, backend="cuda"),
        (weight, z))
    cases = [
        (_library.gated_apply, (torch.randn(3, 7, 5, 5, device="cuda").requires_grad_(),
                                torch.randn(7, device="cuda").requires_grad_(), SEED, STREAM, 0.2, "relaxed", 0,
                                "cuda")),
        (_library.gated_apply, (torch.randn(3, 8, 4, 4, device="cuda").to(memory_format=torch.channels_last)
                                .requires_grad_(), torch.randn(8, device="cuda").requires_grad_(), SEED, STREAM, 0.5,
                                "hard", 24, "cuda")),
        (_library.branch_combine, ([torch.randn(3, 4, 2, 2, device="cuda").requires_grad_() for _ in range(2)],
                                   torch.rand(3, 2, device="cuda").requires_grad_(), None, None, "cuda")),
        (_library.regularizer, ([torch.randn(8, 3, 3, 3, device="cuda").requires_grad_()],
                                [torch.randn(3, device="cuda").requires_grad_()], 10.0, 1.0, 1e3, "cuda")),
        (_library.philox_uniform, (257, SEED, STREAM, 5, torch.device("cuda"), "cuda")),
    ]
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


@gpu
def test_cuda_regularizer_is_deterministic():
    _needs_cuda_backend()
    gen = torch.Generator().manual_seed(5)
    weights = [torch.randn(256, 256, 3, 3, generator=gen).cuda() for _ in range(4)]
    p_logits = [torch.randn(256, generator=gen).cuda() for _ in range(4)]
    values = {pf.ops.regularizer(weights, p_logits, weight_reg=1.0, drop_reg=1.0, n_train=10.0, backend="cuda").item()
              for _ in range(5)}
    assert len(values) == 1


# ---- the Gaussian family on the cuda backend (GPU machines) -----------------------------------------
GAUSSIAN_STREAM = stream_id(Domain.GAUSSIAN, 3, 1)


def _on_cuda(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t on the GPU in `layout`: contiguous, channels_last, or misaligned (storage offset 1: the
    kernels' scalar path)."""
    if layout == "channels_last":
        return t.cuda().contiguous(memory_format=torch.channels_last)
    if layout == "misaligned":
        flat = torch.empty(t.numel() + 1, dtype=t.dtype, device="cuda")
        view = flat[1:].view(t.shape)
        view.copy_(t)
        return view
    return t.cuda()


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape, layout", [((8, 16, 8, 8), "contiguous"), ((8, 16, 8, 8), "channels_last"),
                                           ((3, 7, 5, 5), "channels_last"), ((1001,), "misaligned"),
                                           ((6, 10), "contiguous")])
def test_cuda_gaussian_noise_matches_reference(dtype, shape, layout):
    """eps bit-identical (mu = 0, var = 1 - 1e-8: out is eps), values and d mu, d var within tolerance."""
    _needs_cuda_backend()
    zeros, ones = torch.zeros(shape), torch.full(shape, 1.0 - 1e-8)
    eps = pf.ops.gaussian_noise(_on_cuda(zeros, layout), _on_cuda(ones, layout), seed=SEED, stream=GAUSSIAN_STREAM,
                                offset=7, backend="cuda")
    ref_eps = pf.ops.gaussian_noise(zeros, ones, seed=SEED, stream=GAUSSIAN_STREAM, offset=7, backend="reference")
    assert torch.equal(eps.cpu(), ref_eps)
    gen = torch.Generator().manual_seed(6)
    mu = torch.randn(shape, generator=gen).to(dtype)
    var = (torch.rand(shape, generator=gen) * 2.0 - 0.2).to(dtype)  # some negative: clamped, zero d var
    dy = torch.randn(shape, generator=gen).to(dtype)
    results = {}
    for name, device_layout in (("cuda", layout), ("reference", "cpu")):
        move = (lambda t: t) if device_layout == "cpu" else (lambda t: _on_cuda(t, layout))  # noqa: E731
        m, v = move(mu).requires_grad_(), move(var).requires_grad_()
        out = pf.ops.gaussian_noise(m, v, seed=SEED, stream=GAUSSIAN_STREAM, offset=7, backend=name)
        out.backward(move(dy))
        results[name] = [t.cpu() for t in (out, m.grad, v.grad)]
        if name == "cuda":
            assert out.stride() == torch.empty_like(m).stride() and v.grad.stride() == torch.empty_like(v).stride()
    tol = 1e-12 if dtype == torch.float64 else TOLERANCE[dtype]
    for ours, ref in zip(results["cuda"], results["reference"]):
        assert rel_err(ours, ref) < tol
    assert torch.equal(results["cuda"][2][var <= 0], torch.zeros_like(var[var <= 0]))


@gpu
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_cuda_gaussian_eps_of_a_large_draw_across_the_counter_carry(memory_format):
    _needs_cuda_backend()
    shape, offset = (16, 64, 32, 32), (1 << 32) - 1000
    zeros = torch.zeros(shape, device="cuda").contiguous(memory_format=memory_format)
    ones = torch.ones(shape, device="cuda").contiguous(memory_format=memory_format)
    ours = pf.ops.gaussian_noise(zeros, ones, seed=SEED, stream=GAUSSIAN_STREAM, offset=offset, backend="cuda")
    ref = pf.ops.gaussian_noise(torch.zeros(shape), torch.ones(shape), seed=SEED, stream=GAUSSIAN_STREAM,
                                offset=offset, backend="reference")
    assert torch.equal(ours.cpu(), ref)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_gaussian_kl_matches_reference_and_is_deterministic(dtype):
    _needs_cuda_backend()
    gen = torch.Generator().manual_seed(7)
    sizes = [1, 3, 2048, 700] + [int(s) for s in torch.randint(1, 600, (60,), generator=gen)]
    log_alphas = [(16.0 * torch.rand(s, generator=gen) - 8.0).to(dtype) for s in sizes]
    counts = [int(c) for c in torch.randint(1, 5000, (len(sizes),), generator=gen)]
    results = {}
    for name, device in (("cuda", "cuda"), ("reference", "cpu")):
        leaves = [a.to(device).requires_grad_() for a in log_alphas]
        kl = pf.ops.gaussian_kl(leaves, counts, n_train=50_000, backend=name)
        kl.backward(torch.tensor(1.3, dtype=dtype, device=device))
        results[name] = (kl.detach().cpu(), torch.cat([a.grad for a in leaves]).cpu())
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for ours, ref in zip(results["cuda"], results["reference"]):
        assert ours.dtype == ref.dtype and rel_err(ours, ref) < tol
    cuda_alphas = [a.cuda() for a in log_alphas]
    values = {pf.ops.gaussian_kl(cuda_alphas, counts, n_train=50_000, backend="cuda").item() for _ in range(5)}
    assert len(values) == 1


@gpu
def test_cuda_gaussian_gradcheck_and_opcheck():
    _needs_cuda_backend()
    from pgnas_fast.ops import _library

    gen = torch.Generator().manual_seed(8)
    mu = torch.randn(3, 4, 2, 3, dtype=torch.float64, generator=gen).cuda().requires_grad_()
    var = (0.2 + torch.rand(3, 4, 2, 3, dtype=torch.float64, generator=gen)).cuda().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda m, v: pf.ops.gaussian_noise(m, v, seed=SEED, stream=GAUSSIAN_STREAM, offset=3, backend="cuda"),
        (mu, var))
    alphas = [(6.0 * torch.rand(s, dtype=torch.float64, generator=gen) - 3.0).cuda().requires_grad_() for s in (3, 5)]
    assert torch.autograd.gradcheck(
        lambda a, b: pf.ops.gaussian_kl([a, b], [9, 40], n_train=7.0, backend="cuda"), tuple(alphas))
    cl = torch.channels_last
    cases = [
        (_library.gaussian_noise, (torch.randn(3, 8, 4, 4, device="cuda").to(memory_format=cl).requires_grad_(),
                                   torch.rand(3, 8, 4, 4, device="cuda").to(memory_format=cl).requires_grad_(), SEED,
                                   GAUSSIAN_STREAM, 5, "cuda")),
        (_library.gaussian_noise_backward, (torch.randn(5, 7, device="cuda"), torch.rand(5, 7, device="cuda"), SEED,
                                            GAUSSIAN_STREAM, 0, "cuda")),
        (_library.gaussian_kl, ([torch.randn(5, device="cuda").requires_grad_(),
                                 torch.randn(300, device="cuda").requires_grad_()], [3, 9], 1e3, "cuda")),
    ]
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)
