"""Host-to-device copies that do not stall the GPU.

A copy from pageable host memory to a CUDA tensor (`torch.tensor(data, device="cuda")`,
`.to("cuda")`) synchronises the stream: the host waits until the device has finished everything
queued, and the launch queue runs dry. A copy from pinned memory is asynchronous. Every small
per-step host value on the training and ranking paths (random draws, launch tables, stream words,
candidate ids) goes through `to_device`; the GPU tests run a training step and a candidate pass
under `torch.cuda.set_sync_debug_mode("error")` to keep it so.
"""
from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device, what: str = "a host tensor") -> torch.Tensor:
    """`tensor` on `device`: CPU -> CUDA through pinned memory (asynchronous), anything else as `.to`.

    Refused while a CUDA graph is being captured on the current stream: the graph would record a copy
    from this call's pinned buffer, and every replay would re-read that buffer after it has been
    freed and reused. `what` names the values in that error."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{what} must be copied from the host to the device on every call, which a CUDA "
                               "graph cannot capture (a replay would re-read a host buffer reused since): run this "
                               "op outside the capture")
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
