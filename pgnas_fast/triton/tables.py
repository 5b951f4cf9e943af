"""Launch tables and the one-launch sum of the multi-tensor kernels (regulariser, Gaussian KL).

A multi-tensor launch (apex's `multi_tensor_apply` habit) reads an int64 *row table* (per layer: the
addresses of its inputs and its shape numbers) and an int32 *block table* ((layer, start) per
program). Building a block table in Python costs more than the kernels themselves (a SupNet-MI
backward has tens of thousands of weight blocks), and a host-to-device copy per call stalls the
launch queue, so tables are cached on the device, keyed by what they encode:
- block tables by the layers' shapes only;
- row tables by the inputs' addresses and shapes, which stay fixed for parameters across steps (the
  per-channel drop logits `network_regularizer` expands from group logits are new tensors at every
  call, at the addresses the caching allocator happens to give, so a training step may build and
  copy their row table again: one small copy, which keeps that call out of a CUDA graph; a caller
  that passes the same tensors always hits the cache).
A stale entry is never wrong: a table holds nothing but its key. Gradients go to flat buffers whose
addresses are kernel arguments, the tables holding only offsets into them: with the tables cached,
nothing is copied to the device per call, so a CUDA graph can capture these launches.

`sum_when_last`: programs store their partial sums, and the last program to finish (an atomic
ticket) adds them in index order, so a value needs one launch and stays deterministic (an atomic
float sum would not be).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch
import triton
import triton.language as tl

from ..ops.transfer import to_device

CACHE_ENTRIES = 64  # tables of a few networks and dtypes; least recently used go first
_cache: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
_counters: dict[Hashable, torch.Tensor] = {}
# tables a CUDA graph has captured a launch with: kept for the process, whatever the cache evicts, since
# every replay reads them again
_captured: dict[int, torch.Tensor] = {}
SUM_BLOCK = tl.constexpr(128)


def _on_device(rows: list[list[int]], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A [len(rows), width] table on `device` (pinned, asynchronous copy on CUDA)."""
    return to_device(torch.tensor(rows, dtype=dtype), device)


def cached(key: Hashable, build: Callable[[], list[list[int]]], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The device table of `key`, built by `build()` on a miss."""
    key = (key, dtype, device)
    table = _cache.get(key)
    if table is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # a host-to-device copy captured in a CUDA graph would re-read a pinned buffer reused since
            raise RuntimeError(f"no {key[0][0]} table is cached for these tensors, and none can be copied to the "
                               "device while a CUDA graph is being captured: run the same call (same tensors) once "
                               "before the capture")
        table = _on_device(build(), dtype, device)
        _cache[key] = table
        if len(_cache) > CACHE_ENTRIES:
            _cache.popitem(last=False)
    else:
        _cache.move_to_end(key)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            _captured[table.data_ptr()] = table
    return table


def dense(tensors: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """The tensors in `dtype` and contiguous: the list itself when they all are (checking costs ~0.1 us
    a tensor; a no-op .to().contiguous() ~0.8 us, which for a network's hundreds of tensors is most
    of a multi-tensor call's host time)."""
    if all(t.dtype == dtype and t.is_contiguous() for t in tensors):
        return tensors
    return [t.to(dtype).contiguous() for t in tensors]


def ticket_counter(device: torch.device) -> torch.Tensor:
    """An int32 zero for `sum_when_last`, one per device and CUDA stream (the last program resets it,
    so calls on one stream reuse it; calls on two streams at once must not share one).

    During a CUDA graph capture, a fresh zero of that call instead: its fill is captured and runs at
    every replay. A cached one made during a capture would be zeroed only by that graph's replays, so
    another graph captured on the same stream (torch.cuda.graph captures every graph on one stream) or
    an eager call there would take its tickets from uninitialised memory."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(1, dtype=torch.int32, device=device)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    counter = _counters.get((device, stream))
    if counter is None:
        counter = _counters[device, stream] = torch.zeros(1, dtype=torch.int32, device=device)
    return counter


@triton.jit
def sum_when_last(partial_ptr, partial, counter_ptr, out_ptr, n_programs, G_TYPE: tl.constexpr):
    """Stores this program's `partial`; the last program of the launch writes sum(partials) to out_ptr
    (in index order) and resets the counter."""
    tl.store(partial_ptr + tl.program_id(0), partial)
    tl.debug_barrier()  # the whole program's stores before its ticket (released by the atomic)
    ticket = tl.atomic_add(counter_ptr, 1)
    if ticket == n_programs - 1:
        acc = tl.zeros([SUM_BLOCK], G_TYPE)
        for start in range(0, n_programs, SUM_BLOCK):
            i = start + tl.arange(0, SUM_BLOCK)
            acc += tl.load(partial_ptr + i, mask=i < n_programs, other=0.0, cache_modifier=".cg")
        tl.store(out_ptr, tl.sum(acc, axis=0))
        tl.atomic_xchg(counter_ptr, 0)


def clear() -> None:
    """Forget every cached table (tests)."""
    _cache.clear()
