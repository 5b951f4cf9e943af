"""pgnas_fast: fast Posterior-Guided Neural Architecture Search (Zhou et al., AAAI 2020).

Layers (design.md), each importing only those below it: cli -> search -> supernets -> nn / compat
-> ops -> backends (reference, triton, cuda, cpu).
"""
from . import ops
from ._version import __version__
from .ops import BackendUnavailableError, backends, set_backend, use_backend


def load_subnet(directory, map_location="cpu"):
    """The network of a `pgnas-fast export` directory (a plain nn.Module in eval mode)."""
    from .search.materialize import load_subnet as load

    return load(directory, map_location=map_location)


__all__ = ["BackendUnavailableError", "__version__", "backends", "load_subnet", "ops", "set_backend", "use_backend"]
