"""Backend registry and selection (design.md "Backends" and "Selection").

Every backend is a module providing the same functions (the op set and its backward ops, see
`pgnas_fast.reference`). Callers never branch on a backend: the public ops resolve a name here and
the custom ops call `implementation(name, op)`.

Precedence: a call's `backend=` (modules pass their own), then the innermost `use_backend` block,
then `set_backend`, then the environment variable PGNAS_FAST_BACKEND, then `auto`.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
from dataclasses import dataclass
from types import ModuleType

import torch

ENV_VAR = "PGNAS_FAST_BACKEND"


@dataclass(frozen=True)
class BackendInfo:
    name: str
    module: str  # import path of the implementation module
    devices: tuple[str, ...]  # device types whose tensors it takes


BACKENDS = {
    info.name: info
    for info in (
        BackendInfo("reference", "pgnas_fast.reference", ("cpu", "cuda")),
        BackendInfo("triton", "pgnas_fast.triton", ("cuda",)),
        BackendInfo("cuda", "pgnas_fast.cuda_backend", ("cuda",)),
        BackendInfo("cpu", "pgnas_fast.cpu_backend", ("cpu",)),
    )
}
SELECTABLE = ("auto", *BACKENDS)


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run here; the message says why."""


_modules: dict[str, ModuleType | str] = {}  # name -> loaded module, or the reason it is off
_context: contextvars.ContextVar[str | None] = contextvars.ContextVar("pgnas_fast_backend", default=None)
_default: str | None = None


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _devices(name: str) -> tuple[str, ...]:
    if name == "triton" and _triton_interpreted():
        return ("cuda", "cpu")  # the interpreter runs the kernels on CPU tensors, for tests
    return BACKENDS[name].devices


def _load(name: str) -> ModuleType | str:
    if name not in _modules:
        try:
            module = importlib.import_module(BACKENDS[name].module)
            reason = getattr(module, "unavailable_reason", lambda: None)()
            _modules[name] = reason if reason else module
        except ImportError as err:
            _modules[name] = f"{BACKENDS[name].module} is not in this build ({err})"
    return _modules[name]


def backends() -> dict[str, tuple[bool, str]]:
    """{name: (available, reason)} for every backend."""
    out = {}
    for name in BACKENDS:
        loaded = _load(name)
        if isinstance(loaded, str):
            out[name] = (False, loaded)
        else:
            out[name] = (True, f"available for {', '.join(_devices(name))} tensors")
    return out


def check_backend_name(name: str, where: str = "backend") -> str:
    """`name` if it is a selectable backend ('auto' or one of BACKENDS), else a ValueError naming `where`."""
    if name not in SELECTABLE:
        raise ValueError(f"{where} must be one of {', '.join(SELECTABLE)}; got {name!r}")
    return name


def set_backend(name: str | None) -> None:
    """Process-wide default backend (None: back to PGNAS_FAST_BACKEND or auto)."""
    global _default
    _default = None if name is None else check_backend_name(name, "backend")


@contextlib.contextmanager
def use_backend(name: str):
    """Select a backend for the ops called inside the block."""
    token = _context.set(check_backend_name(name, "backend"))
    try:
        yield
    finally:
        _context.reset(token)


def selected() -> str:
    """The name in force without a per-call choice (may be 'auto')."""
    name = _context.get() or _default
    if name is None:
        name = check_backend_name(os.environ.get(ENV_VAR, "auto") or "auto", f"environment variable {ENV_VAR}")
    return name


# torch.compile runs this once while tracing and bakes the name into the graph (context variables,
# environment reads and first-time backend imports are not traceable): the backend of a compiled
# function is the one selected when it was compiled.
@torch.compiler.assume_constant_result
def resolve(requested: str | None, device: torch.device) -> str:
    """The concrete backend that runs an op on tensors of `device`; raises if it cannot."""
    name = check_backend_name(requested, "backend") if requested is not None else selected()
    if name == "auto":
        order = ("triton", "cuda", "reference") if device.type == "cuda" else ("cpu", "reference")
        for candidate in order:
            if not isinstance(_load(candidate), str) and device.type in _devices(candidate):
                return candidate
        raise BackendUnavailableError(f"no backend runs on {device.type} tensors")
    loaded = _load(name)
    if isinstance(loaded, str):
        raise BackendUnavailableError(f"backend {name!r} is not available: {loaded}")
    if device.type not in _devices(name):
        raise ValueError(
            f"backend {name!r} takes {' or '.join(_devices(name))} tensors; the inputs are on {device}"
        )
    return name


def implementation(name: str, op: str):
    """The function of backend `name` for `op`. Ops a backend has not implemented yet (see
    `missing_ops`) run on the reference backend, which takes every device."""
    loaded = _load(name)
    if isinstance(loaded, str):
        raise BackendUnavailableError(f"backend {name!r} is not available: {loaded}")
    return getattr(loaded, op, None) or getattr(_load("reference"), op)


def own_implementation(name: str, op: str):
    """Backend `name`'s function for an optional op that only some backends have (no reference
    fallback), or None: `regularizer_with_grad`, the eager regulariser's fused path."""
    loaded = _load(name)
    return None if isinstance(loaded, str) else getattr(loaded, op, None)


def missing_ops(name: str) -> list[str]:
    """Ops of the reference backend that backend `name` does not implement (they run on reference)."""
    loaded, reference = _load(name), _load("reference")
    if isinstance(loaded, str):
        return []
    return sorted(op for op in OPS if not hasattr(loaded, op) and hasattr(reference, op))


OPS = ("philox_uniform", "gate_keep", "gate_keep_backward", "candidate_keep", "gated_apply",
       "gated_apply_backward", "gated_copies", "gated_copies_backward", "affine_relu_gate",
       "affine_relu_gate_backward", "branch_combine", "branch_combine_backward", "regularizer",
       "regularizer_backward", "gaussian_noise", "gaussian_noise_backward", "gaussian_kl", "gaussian_kl_backward")
