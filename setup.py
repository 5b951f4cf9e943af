"""Build script: the pure-Python package plus the native extension `pgnas_fast._C` (design.md layer 6).

`_C` holds the C++/OpenMP `cpu` backend (always built) and the `cuda` backend (built when torch has
CUDA and a CUDA toolkit with nvcc and its headers is found; arch list `TORCH_CUDA_ARCH_LIST`, default
9.0). Its sources are listed once in csrc/sources.txt, which CMakeLists.txt reads too.

The extension is optional: if it cannot be built (no compiler, no OpenMP, a compile error), the
install still succeeds with the pure-Python package and a warning, and the reason is written to
pgnas_fast/_C.unavailable.txt, which `pgnas-fast doctor` and `pgnas_fast.backends()` report. If only
its CUDA part fails (or no toolkit is found for a torch with CUDA), the CPU part is built alone and
the reason goes to pgnas_fast/_C.cuda_unavailable.txt.
Set PGNAS_FAST_NO_EXTENSION=1 to skip the build, PGNAS_FAST_NO_CUDA=1 to build the CPU part only.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
NOTE = Path("pgnas_fast") / "_C.unavailable.txt"  # why _C is missing, relative to a package root
CUDA_NOTE = Path("pgnas_fast") / "_C.cuda_unavailable.txt"  # why _C has no cuda part (torch has CUDA)


def _sources(kind: str) -> list[str]:
    out = []
    for line in (ROOT / "csrc" / "sources.txt").read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) == 2 and fields[0] == kind:
            out.append(fields[1])  # relative: setuptools wants paths relative to setup.py
    return out


def _warn(message: str) -> None:
    bar = "!" * 78
    print(f"\n{bar}\npgnas_fast: {message}\n{bar}\n", file=sys.stderr, flush=True)


def _write_note(roots: list[Path], reason: str | None, note_path: Path = NOTE) -> None:
    for root in roots:
        note = root / note_path
        if reason is None:
            note.unlink(missing_ok=True)
        elif note.parent.is_dir():
            note.write_text(reason + "\n")


def _last_line(err: Exception) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[-1] if text else ''}"


def _has_cuda_headers(home) -> bool:
    return home is not None and (Path(home) / "include" / "cuda_runtime_api.h").exists()


def _nvcc_toolkit(nvcc: str) -> Path | None:
    """The toolkit an nvcc compiles with, as its dry run reports it (`#$ TOP=...`): an nvcc on PATH may be
    a wrapper script (e.g. /usr/local/bin/nvcc), from which torch guesses CUDA_HOME=/usr/local."""
    try:
        run = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (run.stdout + run.stderr).splitlines():
        if line.startswith("#$ TOP="):
            return Path(line.split("=", 1)[1].strip()).resolve()
    return None


def _cuda_toolkit(cpp_extension) -> tuple[Path | None, str]:
    """(the CUDA toolkit to build the cuda part with, or None; why not): torch's CUDA_HOME when it holds
    nvcc and the runtime headers, else the toolkit that nvcc reports."""
    home = cpp_extension.CUDA_HOME
    if home is not None and (Path(home) / "bin" / "nvcc").exists() and _has_cuda_headers(home):
        return Path(home), ""
    nvcc = shutil.which("nvcc") or (str(Path(home) / "bin" / "nvcc") if home is not None else None)
    if nvcc is None or not Path(nvcc).exists():
        return None, "no nvcc was found (set CUDA_HOME to the CUDA toolkit)"
    toolkit = _nvcc_toolkit(nvcc)
    if toolkit is not None and _has_cuda_headers(toolkit):
        return toolkit, ""
    return None, (f"the CUDA toolkit of {nvcc} was not found with its headers (CUDA_HOME={home}, nvcc reports "
                  f"{toolkit}; set CUDA_HOME to the toolkit holding include/cuda_runtime_api.h)")


def _native_build():
    """(ext_modules, cmdclass), or ([], {}) with a note when the extension cannot be built."""
    if os.environ.get("PGNAS_FAST_NO_EXTENSION", "0") not in ("", "0"):
        _write_note([ROOT], "pgnas_fast._C was not built: PGNAS_FAST_NO_EXTENSION was set at install time")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as err:  # noqa: BLE001 - any failure means: no extension, pure Python
        reason = f"pgnas_fast._C was not built: torch could not be imported at build time ({err})"
        _warn(reason)
        _write_note([ROOT], reason)
        return [], {}

    toolkit, no_toolkit = None, ""
    if torch.version.cuda is not None and os.environ.get("PGNAS_FAST_NO_CUDA", "0") in ("", "0"):
        toolkit, no_toolkit = _cuda_toolkit(cpp_extension)
        if toolkit is not None:  # (cpp_extension reads its CUDA_HOME when it builds)
            cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"] = str(toolkit)
        else:
            _warn(f"the cuda backend is not built: {no_toolkit}; building the CPU part")
    with_cuda = toolkit is not None
    # -g0: no debug info (a 17 MB .so otherwise); -ffp-contract=off: no fused multiply-add, so that the
    # Gaussian normal (kernels/philox.h) rounds every product and sum as the reference does;
    # -fno-math-errno: sqrt becomes the (correctly rounded) instruction, so its loops vectorise
    cxx_flags = ["-O3", "-g0", "-std=c++17", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]
    define_macros = []
    sources = _sources("cpu")
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        sources += _sources("cuda")
        define_macros.append(("PGNAS_WITH_CUDA", None))
        ext = cpp_extension.CUDAExtension(
            "pgnas_fast._C",
            sources,
            define_macros=define_macros,
            # --fmad=false: nvcc's default fuses x * a + b into one rounding, where the reference and the
            # cpu backend round twice (a ReLU then switches at pre ~ 0 on one backend only)
            extra_compile_args={"cxx": cxx_flags,
                                "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "--fmad=false"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "pgnas_fast._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"]
        )

    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class OptionalBuildExt(base):
        """Builds _C, or warns and leaves the package pure Python: a broken compiler never fails the install."""

        def _roots(self) -> list[Path]:
            return [ROOT, Path(self.build_lib)]

        def run(self):
            self._failure = None
            self._cuda_failure = (f"pgnas_fast._C was built without its cuda part: {no_toolkit}"
                                  if no_toolkit else None)
            try:
                super().run()
            except Exception as err:  # noqa: BLE001
                self._failed(err)
            if self._failure is None:
                _write_note(self._roots(), None)
            _write_note(self._roots(), None if self._failure else self._cuda_failure, CUDA_NOTE)

        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as err:  # noqa: BLE001
                if not with_cuda:
                    self._failed(err)
                    return
                # the cuda part failed: the cpu backend still gets built, alone
                self._cuda_failure = ("pgnas_fast._C was built without its cuda part, which failed "
                                      f"({_last_line(err)}; pip install -v -e . shows the compiler's errors)")
                _warn(self._cuda_failure + "; building the CPU part alone")
                cpu_part = cpp_extension.CppExtension(
                    extension.name, _sources("cpu"),
                    # (build_extensions already added torch's flags to the cxx list)
                    extra_compile_args={"cxx": list(extension.extra_compile_args["cxx"])},
                    extra_link_args=list(extension.extra_link_args))
                # the same Extension object, rewritten (setuptools keeps its own state on it)
                for field in ("sources", "include_dirs", "library_dirs", "libraries", "define_macros",
                              "extra_compile_args", "extra_link_args"):
                    setattr(extension, field, getattr(cpu_part, field))
                try:
                    super().build_extension(extension)
                except Exception as cpu_err:  # noqa: BLE001
                    self._failed(cpu_err)

        def _failed(self, err):
            reason = (
                f"pgnas_fast._C was not built ({_last_line(err)}); "
                "the reference backend still works. Fix the compiler and reinstall (pip install -v -e . shows the log)."
            )
            self._failure = reason
            _warn(reason)
            _write_note(self._roots(), reason)

    return [ext], {"build_ext": OptionalBuildExt}


ext_modules, cmdclass = _native_build()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
