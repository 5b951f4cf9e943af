"""nn.Conv2d clear of a oneDNN defect in strided 1x1 convolutions on the CPU.

oneDNN, which runs torch's CPU convolutions, computes a strided 1x1 convolution as a unit-stride one on
a copy of the input taken at the stride ("reduce to unit stride"). Its weight-gradient pass writes past
that copy when the input is channels-last and has fewer channels than oneDNN's channel block (8 with
AVX2, 16 with AVX-512). The result is heap corruption, a hang, or wrong weight gradients
(uxlfoundation/oneDNN#6035). Seen here with torch 2.13.0 on an AVX2 CPU: a digits search at width 4
(block 2's 4 -> 8 stride-2 1x1 convs) aborted with "corrupted double-linked list", and a bare
4 -> 8 stride-2 1x1 conv of a channels_last input got a weight gradient off by about 200.

`Conv2d` runs such a convolution as oneDNN would reduce it, but in torch: the input is taken at the
stride first, then convolved at unit stride. Each output is the same sum of products. Only the
affected shapes take this path, so every other convolution runs as before, to the bit.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

CHANNEL_BLOCK = 16  # the largest f32 input-channel block of oneDNN's 1x1 kernels (AVX-512; AVX2's is 8)


def reduces_to_unit_stride(x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int]) -> bool:
    """Whether the convolution of `x` by `weight` is one that oneDNN would get wrong (see the module's
    docstring): on the CPU, 1x1, strided, with fewer input channels per group than CHANNEL_BLOCK."""
    return (x.device.type == "cpu" and tuple(weight.shape[-2:]) == (1, 1) and tuple(stride) != (1, 1)
            and weight.shape[1] < CHANNEL_BLOCK)


class Conv2d(nn.Conv2d):
    """nn.Conv2d, except that a convolution that `reduces_to_unit_stride` takes its input at the stride
    first and runs at unit stride (same parameters, state dict and outputs)."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if not reduces_to_unit_stride(input, weight, self.stride):
            return super()._conv_forward(input, weight, bias)
        # (padding: a strided conv's is a number per side, never "same"; "valid" is zeros)
        if any(self._reversed_padding_repeated_twice):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=mode)
        # a 1x1 kernel reads no neighbours: its dilation changes nothing
        return F.conv2d(input[..., ::self.stride[0], ::self.stride[1]], weight, bias, 1, 0, 1, self.groups)
