"""Ctrl-C (SIGINT) and SIGTERM held back over the steps that a stop would leave broken, and taken when
the step ends: a file being written (torch.save's zip writer, interrupted mid-file, finishes the file on
its way out and raises its own error, or aborts the process from C++) and the first import of a
library with compiled parts (numpy, scipy, scikit-learn and matplotlib, interrupted while loading,
stay half-initialised and fail with an ImportError, AttributeError or RecursionError in place of the
KeyboardInterrupt). The `pgnas-fast` command takes a SIGTERM (a scheduler's preemption, `kill`,
`docker stop`) as it takes a Ctrl-C (`terminations_raised`): the same clean stop and resume hint.
Standard library only: the command uses it before torch loads.
"""
from __future__ import annotations

import contextlib
import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """A SIGTERM, raised where the process is (as Ctrl-C raises KeyboardInterrupt) by `terminations_raised`."""


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def terminations_raised():
    """Inside the block a SIGTERM raises Terminated in the main thread (finally blocks run, locks and
    process groups are left) instead of ending the process at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextlib.contextmanager
def interrupts_deferred():
    """A SIGINT or SIGTERM met inside the block is taken when the block ends (as the signal would have been)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # (only the main thread receives signals)
        return
    received = []
    previous = {signum: signal.signal(signum, lambda signum, frame: received.append(signum))
                for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        for signum in dict.fromkeys(received):  # (two presses: one interrupt)
            signal.raise_signal(signum)  # what the signal would have done, now


__all__ = ["Terminated", "interrupts_deferred", "terminations_raised"]
