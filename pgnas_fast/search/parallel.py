"""Data parallelism under torchrun: one process per device, DistributedDataParallel, rank 0 writes.

`torchrun --nproc_per_node N -m pgnas_fast.cli search ...` starts N copies of the search with
WORLD_SIZE, RANK and LOCAL_RANK set; `join` puts each into the process group (NCCL on CUDA, gloo on
CPU). Every global batch (the preset's `batch_size` rows) is cut into equal consecutive shares: rank
r takes rows [r B / N, (r + 1) B / N) and draws the gate, shake and drop-path numbers of exactly those
rows of the concatenated batch (`set_gates(row_offset=)`). Its loss is the sum of its rows' CE over
B / N plus R (see `shard_loss`); DDP averages the gradients, which gives the single-process gradient of
mean CE + R on the concatenated batch. Only BatchNorm's batch statistics differ: each rank normalises
with its own rows' (`sync_bn` makes them global on CUDA).
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass(frozen=True)
class Parallel:
    """This process's place in the run: rank of world (1 when not launched by torchrun)."""

    rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files, logs and the progress bar."""
        return self.rank == 0

    def rows(self, batch: int) -> tuple[int, int]:
        """[start, end) of this rank's rows of a global batch of `batch` rows."""
        return self.rank * batch // self.world, (self.rank + 1) * batch // self.world

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum over ranks (in place)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers on every rank. DDP sends them before each training forward, so after the
        last one each rank holds the BatchNorm running statistics of its own rows; rank 0's are the
        checkpoint's, which every rank must then evaluate with."""
        if self.enabled:
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)

    def all_gather(self, rows: list) -> list:
        """Every rank's list, concatenated in rank order."""
        if not self.enabled:
            return list(rows)
        gathered = [None] * self.world
        dist.all_gather_object(gathered, rows)
        return [row for part in gathered for row in part]

    def wrap(self, model: nn.Module, device: torch.device, *, sync_bn: bool = False,
             unused_parameters: bool = False) -> nn.Module:
        """The module to call in training: DDP around `model` when data parallel, else `model`.
        `unused_parameters`: some parameters get no gradient (DDP must look for them each step)."""
        if not self.enabled:
            return model
        if sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # converts in place below the root
        device_ids = [device] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                                   find_unused_parameters=unused_parameters)


def has_size_one_dims(model: nn.Module) -> bool:
    """A weight with a size-1 dimension past the first (the digits stem's 1 input channel) gets
    gradients whose stride there differs from the parameter's, the same memory layout: DDP then warns
    of a slow copy into its bucket that costs nothing at that size (see stride_hint_off)."""
    return any(p.dim() > 1 and 1 in p.shape[1:] for p in model.parameters())


@contextlib.contextmanager
def stride_hint_off():
    """Around a data-parallel backward of a model with size-1 dims: DDP's stride warning off; other
    models keep it, and so does everything outside this block."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides",
                                category=UserWarning)
        yield


SINGLE_PROCESS = Parallel()  # a run not started by torchrun


def join(device: str | torch.device) -> tuple[Parallel, torch.device]:
    """(this process's Parallel, its device). Under torchrun (WORLD_SIZE > 1) joins the process group,
    NCCL for a CUDA device (then cuda:LOCAL_RANK) and gloo for the CPU; otherwise SINGLE_PROCESS."""
    device = torch.device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE_PROCESS, device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Parallel(dist.get_rank(), dist.get_world_size()), device


def leave() -> None:
    """Leave the process group `join` joined (at the end of a command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_loss(ce: torch.Tensor, rows: int, global_rows: int, world: int) -> torch.Tensor:
    """This rank's share of the concatenated batch's mean CE, scaled for DDP's gradient average.

    `ce` is the mean over this rank's `rows`; world * rows / global_rows * ce averages over the ranks
    to the mean over all `global_rows` (1 in a single process). R is added on every rank unscaled:
    the average of N copies of its gradient is its gradient once.
    """
    return ce * (world * rows / global_rows)
