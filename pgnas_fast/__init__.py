"""pgnas_fast: fast Posterior-Guided Neural Architecture Search (Zhou et al., AAAI 2020).

Layers (design.md), each importing only those below it: cli -> search -> supernets -> nn / compat
-> ops -> backends (reference, triton, cuda, cpu).
"""
from . import ops
from ._version import __version__
from .ops import BackendUnavailableError, backends, set_backend, use_backend

__all__ = ["BackendUnavailableError", "__version__", "backends", "ops", "set_backend", "use_backend"]
