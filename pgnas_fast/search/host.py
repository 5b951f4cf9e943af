"""The host process's memory allocator, set by the `pgnas-fast` commands (which own their process).

glibc hands a freed block of more than a few MB back to the kernel (munmap, or a trim of the heap's
top) and page-faults fresh zeroed pages in on the next allocation of that size. An evaluation pass
allocates and frees the same large activations again and again: on the 2-core CPU a batched ranking
pass of the digits network (tensors of about 5 MB) spent a third of its time so. Kept instead:
blocks up to glibc's ceiling of 32 MB come from the heap, which is trimmed only past 1 GB free (the
process's resident memory stays at its peak). Elsewhere than glibc nothing changes.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 1 << 30


def keep_freed_host_memory() -> bool:
    """Set glibc's thresholds (process-wide); True where they were set."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD,
                                                                                        TRIM_THRESHOLD))


__all__ = ["keep_freed_host_memory"]
