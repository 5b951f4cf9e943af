"""Size of a super-network (design.md layer 3; what `pgnas-fast info` reports): parameters, gates, MACs;
and the largest activation of one image (what a batched ranking pass may hold: search/rank.py)."""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn as nn

from ..nn import gated_layers, training_modes_kept


def _input_shape(input_size: int | Sequence[int]) -> tuple[int, int, int]:
    """(C, H, W) from an int (square RGB), (H, W) (RGB) or (C, H, W)."""
    if isinstance(input_size, int):
        return (3, input_size, input_size)
    size = tuple(int(s) for s in input_size)
    if len(size) == 2:
        return (3, *size)
    if len(size) == 3:
        return size
    raise ValueError(f"input_size must be an int, (H, W) or (C, H, W), got {input_size!r}")


def count_macs(model: nn.Module, input_size: int | Sequence[int]) -> int:
    """Multiply-accumulates of every Conv2d and Linear in one eval-mode forward of one image.

    Runs the model as it is (gate modes untouched); `describe` puts the gates in 'full' first.
    """
    shape = _input_shape(input_size)
    total = 0

    def conv_hook(module: nn.Conv2d, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        total += output[0].numel() * (module.in_channels // module.groups) * kh * kw

    def linear_hook(module: nn.Linear, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        total += (output.numel() // output.shape[0]) * module.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    try:
        one_image_pass(model, shape)
    finally:
        for h in handles:
            h.remove()
    return total


@contextlib.contextmanager
def full_gates(model: nn.Module):
    """Every gated layer in mode 'full' within the block, each layer's own mode and mask given back after."""
    layers = [layer for _, layer in gated_layers(model)]
    saved = [(layer.gate_mode, layer.gate_mask) for layer in layers]
    try:
        for layer in layers:
            layer.gate_mode, layer.gate_mask = "full", None
        yield model
    finally:
        for layer, (mode, mask) in zip(layers, saved):
            layer.gate_mode, layer.gate_mask = mode, mask


def largest_activation_bytes(model: nn.Module, shape: Sequence[int]) -> int:
    """Bytes of the largest tensor any module of `model` outputs for one image of `shape` [C, H, W] (an
    eval-mode forward with every gate 'full': the gates change no shape, and a candidate's stacked masks
    would need their row groups): a pass of n images holds about n times this."""
    largest = 0

    def hook(_module, _inputs, output) -> None:
        nonlocal largest
        for out in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(out, torch.Tensor):
                largest = max(largest, out.numel() * out.element_size())

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with full_gates(model):
            one_image_pass(model, shape)
    finally:
        for h in handles:
            h.remove()
    return largest


@torch.no_grad()
def one_image_pass(model: nn.Module, shape: Sequence[int]) -> None:
    """One eval-mode forward of a zero image of `shape` [C, H, W] on the model's device, in its (first
    floating weight's) dtype, every module's mode given back afterwards: for hooks that read the sizes a
    network computes with."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    floating = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = floating.dtype if floating is not None else torch.get_default_dtype()
    with training_modes_kept(model):
        model.eval()(torch.zeros(1, *shape, device=device, dtype=dtype))


def count_parameters(model: nn.Module) -> int:
    """Every parameter of `model`, the drop logits included."""
    return sum(p.numel() for p in model.parameters())


def describe(model: nn.Module, input_size: int | Sequence[int]) -> dict:
    """{params, gated_layers, gate_params, macs, input_size} of `model` for images of `input_size`.

    params counts every parameter, the drop logits included; gate_params is the number of p values
    (drop logits); macs is per image with every gate 'full' (the whole super-network). The model's
    gate modes and train/eval mode are restored afterwards.
    """
    layers = [layer for _, layer in gated_layers(model)]
    with full_gates(model):
        macs = count_macs(model, input_size)
    return {
        "params": count_parameters(model),
        "gated_layers": len(layers),
        "gate_params": sum(layer.p_logit.numel() for layer in layers),
        "macs": macs,
        "input_size": list(_input_shape(input_size)),
    }
