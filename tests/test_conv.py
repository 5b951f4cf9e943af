"""nn.conv.Conv2d: strided 1x1 convs with few input channels run at unit stride on their input taken at
the stride (a oneDNN defect wrote past its workspace there: wrong weight gradients, heap corruption), with
nn.Conv2d's values and gradients; every other conv runs as nn.Conv2d does."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from pgnas_fast.compat import Conv2d_with_CD
from pgnas_fast.nn import GatedConv2d, set_gates
from pgnas_fast.nn.conv import CHANNEL_BLOCK, Conv2d, reduces_to_unit_stride

AFFECTED = [  # (in, out, stride, padding, groups, padding_mode, input size)
    (4, 8, 2, 0, 1, "zeros", (8, 8)),  # the digits network's block 2 at width 4
    (1, 5, 3, 0, 1, "zeros", (10, 7)),
    (7, 16, (2, 1), 1, 1, "zeros", (9, 9)),
    (15, 16, 2, (1, 0), 1, "reflect", (11, 6)),
    (6, 4, 2, 1, 2, "circular", (7, 9)),  # 3 channels per group
]


def _input(c, size, layout, dtype, seed=0):
    x = torch.randn(3, c, size[0], size[1] * 2, generator=torch.Generator().manual_seed(seed)).to(dtype)
    if layout == "strided":  # (every other column: not contiguous in any format)
        return x[..., ::2]
    x = x[..., :size[1]].contiguous()
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def _pair(c_in, c_out, stride, padding, groups, mode, dtype):
    torch.manual_seed(1)
    plain = nn.Conv2d(c_in, c_out, 1, stride=stride, padding=padding, groups=groups, padding_mode=mode).to(dtype)
    ours = Conv2d(c_in, c_out, 1, stride=stride, padding=padding, groups=groups, padding_mode=mode).to(dtype)
    ours.load_state_dict(plain.state_dict())
    return plain, ours


@pytest.mark.parametrize("shape", AFFECTED)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_an_affected_conv_takes_nn_conv2ds_values_and_gradients(shape, layout):
    """Values against nn.Conv2d's forward (unaffected); gradients against float64 (oneDNN does not run it)."""
    c_in, c_out, stride, padding, groups, mode, size = shape
    plain, ours = _pair(c_in, c_out, stride, padding, groups, mode, torch.float32)
    x = _input(c_in, size, layout, torch.float32).requires_grad_()
    assert reduces_to_unit_stride(x, ours.weight, ours.stride)
    out = ours(x)
    torch.testing.assert_close(out, plain(x), rtol=1e-6, atol=1e-6)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * upstream).sum().backward()
    exact = plain.double()
    x64 = x.detach().double().requires_grad_()
    (exact(x64) * upstream.double()).sum().backward()
    torch.testing.assert_close(x.grad, x64.grad.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.weight.grad, exact.weight.grad.float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ours.bias.grad, exact.bias.grad.float(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes_and_an_unbatched_input(dtype):
    plain, ours = _pair(4, 8, 2, 1, 1, "zeros", dtype)
    x = _input(4, (9, 8), "channels_last", dtype)
    tolerance = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(ours(x), plain(x), **tolerance)
    torch.testing.assert_close(ours(x[0]), plain(x[0]), **tolerance)


@pytest.mark.parametrize("c_in, kernel, stride", [(CHANNEL_BLOCK, 1, 2), (4, 1, 1), (4, 3, 2)])
def test_every_other_conv_is_nn_conv2ds_own(monkeypatch, c_in, kernel, stride):
    calls = []
    real = nn.Conv2d._conv_forward
    monkeypatch.setattr(nn.Conv2d, "_conv_forward", lambda self, *a: calls.append(1) or real(self, *a))
    conv = Conv2d(c_in, 8, kernel, stride=stride)
    x = torch.randn(2, c_in, 6, 6)
    assert not reduces_to_unit_stride(x, conv.weight, conv.stride)
    conv(x)
    assert calls == [1]
    calls.clear()
    Conv2d(4, 8, 1, stride=2)(torch.randn(2, 4, 6, 6))
    assert calls == []  # (the affected shape: its own path)


def test_a_gated_conv_trains_the_affected_shape_right():
    """The digits network's shortcut at width 4 (4 -> 8, 1x1, stride 2), channels_last as its training runs
    it: before this path its weight gradient was off by about 200 on an AVX2 CPU, or the heap corrupted."""
    torch.manual_seed(0)
    gated = GatedConv2d(4, 8, 1, stride=2, bias=False, gate_groups=1, p_init=0.1)
    set_gates(gated, "full")
    x = torch.randn(32, 4, 32, 32).contiguous(memory_format=torch.channels_last)
    upstream = torch.randn(32, 8, 16, 16)
    for _ in range(3):  # (the corruption showed on a later step as often as on the first)
        gated.zero_grad()
        (gated(x) * upstream).sum().backward()
    weight = gated.weight.detach().double().requires_grad_()
    (torch.nn.functional.conv2d(x.double(), weight, stride=2) * upstream.double()).sum().backward()
    torch.testing.assert_close(gated.weight.grad, weight.grad.float(), rtol=1e-5, atol=1e-3)


@pytest.mark.filterwarnings("ignore:Conv2d_with_CD\\(deterministic=True\\):UserWarning")  # (noise loaded below)
def test_the_drop_in_conv_takes_the_same_path():
    torch.manual_seed(0)
    layer = Conv2d_with_CD(4, 8, 1, stride=2, bias=False)  # (deterministic: hard gates from its loaded noise)
    layer.unif_noise_var = torch.tensor([0.95, 0.2, 0.5, 0.99]).view(layer.unif_noise_variable.shape)  # p = 0.1
    x = torch.randn(16, 4, 10, 10).contiguous(memory_format=torch.channels_last)
    (layer(x) ** 2).sum().backward()
    gated = layer._concrete_dropout(x).detach()
    assert 0 < (gated == 0).float().mean() < 1  # (some channels dropped, not all)
    weight = layer.weight.detach().double().requires_grad_()
    (torch.nn.functional.conv2d(gated.double(), weight, stride=2) ** 2).sum().backward()
    torch.testing.assert_close(layer.weight.grad, weight.grad.float(), rtol=1e-5, atol=1e-3)


def test_reduces_to_unit_stride_only_on_the_cpu():
    weight = torch.randn(8, 4, 1, 1)
    assert reduces_to_unit_stride(torch.randn(1, 4, 4, 4), weight, (2, 2))
    assert not reduces_to_unit_stride(torch.randn(1, 4, 4, 4, device="meta"), weight, (2, 2))


def test_an_export_of_the_affected_shape_keeps_the_path_and_the_values():
    """The digits network at width 4: materialize's sliced convs of block 2 (at most 4 -> 8, 1x1, stride 2)
    are Conv2d; the module and its torch.export program give the masked super-network's outputs."""
    from pgnas_fast import supernets
    from pgnas_fast.nn import candidate_masks
    from pgnas_fast.search.materialize import materialize

    torch.manual_seed(0)
    model = supernets.create("digits-tiny", num_classes=10, width=4, gate_group_size=1, p_init=0.3).eval()
    masks = candidate_masks(model, 0, 3)
    set_gates(model, "hard", masks=masks)
    subnet = materialize(model, masks)
    strided = [m for m in subnet.modules()
               if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride == (2, 2)]
    assert strided and all(type(m) is Conv2d for m in strided)
    x = torch.randn(5, 1, 8, 8).contiguous(memory_format=torch.channels_last)
    assert reduces_to_unit_stride(x, strided[0].weight, strided[0].stride)
    torch.testing.assert_close(subnet(x), model(x), rtol=1e-5, atol=1e-5)
    program = torch.export.export(subnet, (x,))
    torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)
