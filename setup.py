"""Build script: the pure-Python package plus the native extension `pgnas_fast._C` (design.md layer 6).

`_C` holds the C++/OpenMP `cpu` backend (always built) and the `cuda` backend (built when torch has
CUDA and nvcc is found; arch list `TORCH_CUDA_ARCH_LIST`, default 9.0). Its sources are listed once
in csrc/sources.txt, which CMakeLists.txt reads too.

The extension is optional: if it cannot be built (no compiler, no OpenMP, a compile error), the
install still succeeds with the pure-Python package and a warning, and the reason is written to
pgnas_fast/_C.unavailable.txt, which `pgnas-fast doctor` and `pgnas_fast.backends()` report.
Set PGNAS_FAST_NO_EXTENSION=1 to skip the build, PGNAS_FAST_NO_CUDA=1 to build the CPU part only.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
NOTE = Path("pgnas_fast") / "_C.unavailable.txt"  # why _C is missing, relative to a package root


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


def _write_note(roots: list[Path], reason: str | None) -> None:
    for root in roots:
        note = root / NOTE
        if reason is None:
            note.unlink(missing_ok=True)
        elif note.parent.is_dir():
            note.write_text(reason + "\n")


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

    nvcc = None
    if cpp_extension.CUDA_HOME is not None:
        candidate = Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc"
        nvcc = candidate if candidate.exists() else shutil.which("nvcc")
    with_cuda = (
        torch.version.cuda is not None
        and nvcc is not None
        and os.environ.get("PGNAS_FAST_NO_CUDA", "0") in ("", "0")
    )
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
            try:
                super().run()
            except Exception as err:  # noqa: BLE001
                self._failed(err)
            if self._failure is None:
                _write_note(self._roots(), None)

        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as err:  # noqa: BLE001
                self._failed(err)

        def _failed(self, err):
            reason = (
                f"pgnas_fast._C was not built ({type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}); "
                "the reference backend still works. Fix the compiler and reinstall (pip install -v -e . shows the log)."
            )
            self._failure = reason
            _warn(reason)
            _write_note(self._roots(), reason)

    return [ext], {"build_ext": OptionalBuildExt}


ext_modules, cmdclass = _native_build()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
