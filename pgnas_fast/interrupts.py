"""Ctrl-C (SIGINT) held back over the steps that an interrupt would leave broken, and taken when the
step ends: a file being written (torch.save's zip writer, interrupted mid-file, finishes the file on
its way out and raises its own error, or aborts the process from C++) and the first import of a
library with compiled parts (numpy, scipy, scikit-learn and matplotlib, interrupted while loading,
stay half-initialised and fail with an ImportError, AttributeError or RecursionError in place of the
KeyboardInterrupt). Standard library only: the `pgnas-fast` command uses it before torch loads.
"""
from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def interrupts_deferred():
    """A SIGINT met inside the block is taken when the block ends (as the signal would have been)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # (only the main thread receives signals)
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
        if received:
            signal.raise_signal(signal.SIGINT)  # what the signal would have done, now


__all__ = ["interrupts_deferred"]
