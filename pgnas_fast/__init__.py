"""pgnas_fast: fast Posterior-Guided Neural Architecture Search (Zhou et al., AAAI 2020).

Layers (design.md), each importing only those below it: cli -> search -> supernets -> nn / compat
-> ops -> backends (reference, triton, cuda, cpu).

torch loads with the first use of `ops` or its names below, not with the package: the `pgnas-fast`
command imports the package before it can answer a Ctrl-C, and torch takes 1-2 s to load.
"""
import importlib

from ._version import __version__

_FROM_OPS = ("BackendUnavailableError", "backends", "set_backend", "use_backend")


def __getattr__(name: str):
    if name == "ops" or name in _FROM_OPS:
        ops = importlib.import_module(f"{__name__}.ops")  # (`from . import ops` would ask __getattr__ again)
        return ops if name == "ops" else getattr(ops, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_subnet(directory, map_location="cpu"):
    """The network of a `pgnas-fast export` directory (a plain nn.Module in eval mode)."""
    from .search.materialize import load_subnet as load

    return load(directory, map_location=map_location)


__all__ = ["BackendUnavailableError", "__version__", "backends", "load_subnet", "ops", "set_backend", "use_backend"]
