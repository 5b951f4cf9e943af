"""SupNet-E and SupNet-EI: the fixed ENAS micro cell with gates, for CIFAR (design.md layer 3).

The network is ENAS's `MicroChild` with a fixed architecture (Pham et al. 2018; PGNAS forks its TF
code): a stem conv3x3 (3 -> 3F) + BN, then `num_layers` normal cells plus 2 reduction cells (at
layers num_layers // 3 and 2 * (num_layers // 3) + 1, each doubling F), then ReLU, global average
pool, linear. F = 36 gives SupNet-E (published 4.6M parameters), F = 72 SupNet-EI (15.3M); see
Sizes.

A cell takes the outputs of the two previous cells, brings both to F channels (`calibrate`: a
ReLU-conv1x1-BN, or a factorized reduction when the older one has twice the spatial size; the newer
one a ReLU-conv1x1-BN if its width differs, then always one more, ENAS's "layer_base"), then builds
5 nodes, each op(input x) + op(input y), inputs 0 / 1 the two calibrated cell inputs and 2.. earlier
nodes. Operations: 0 sep3x3, 1 sep5x5, 2 avgpool3x3, 3 maxpool3x3, 4 identity; in a reduction cell
the ops reading inputs 0 / 1 have stride 2 (an identity there becomes a factorized reduction). The
cell output is the concatenation of the nodes no other node reads (ENAS convention), so 5F channels
for the normal cell and 4F for the reduction cell below.

A separable op is ENAS's stack of two ReLU - depthwise kxk - [gate] - pointwise 1x1 - BN
(`_fixed_conv(stack_convs=2)` of ENAS's code; a single one would be far under the published sizes).

Gates (one p per gated layer, gate_groups=None as the authors' TF code): the input of every 1x1 and
pointwise conv (calibration, layer_base, factorized reductions, the pointwise half of every
separable conv), the stem and the classifier. Pools and identities carry none; neither does the
auxiliary head, which is a training aid dropped from every candidate.

Drop-path (ENAS `_apply_drop_path`): in training, the output of every non-identity op is zeroed per
example with probability `drop_prob = (1 - drop_path_keep_prob) * (layer + 1) / (num_layers + 2) *
progress` and otherwise divided by (1 - drop_prob). `drop_path_keep_prob` defaults to 0.6, the value
of the authors' (ENAS) flag `child_drop_path_keep_prob`: 0.6 is a KEEP probability, so the deepest
cell drops with at most 0.4. `progress` is ENAS's linear schedule min(1, (step + 1) / total steps);
it starts at 1.0 (no schedule) and the training loop may call `set_drop_path_progress` each step.
The random numbers come from the RNG contract (see `DropPath`).

Auxiliary head (ENAS's, after the cell following the second reduction): ReLU, avgpool 5x5 stride 3,
conv1x1 -> 128 - BN - ReLU, conv 2x2 -> 768 ("same" padding) - BN - ReLU, global average pool,
linear. Contract: with `aux_head=True`, `forward` returns `(logits, aux_logits)` in training mode
and plain `logits` in eval mode; the loss is CE(logits) + aux_weight * CE(aux_logits) with ENAS's
aux_weight 0.4. With `aux_head=False` forward always returns logits.

Sizes. Built as ENAS's code builds it (15 layers), F = 36 has 3,894,635 parameters (its 263 p values
included) plus 494,848 in the aux head, 4,389,483 in all; F = 72 has 14,784,815 plus 587,008,
15,371,823 in all. We count the aux head (it is trained with the super-network): EI then matches the
published 15.3M (+0.5%), E is 4.6% under the quoted 4.6M. (ENAS's own count leaves the aux head out;
4.6M is what the same cell gives without aux head at num_layers=18, 4,587,680, so the quoted E size
may come from there.)

What was checked for the E gap (no construction detail explains it, so nothing was changed):
- against ENAS's micro child (`_model`, `_fixed_layer`, `_maybe_calibrate_size`, `_fixed_conv`,
  `_factorized_reduction`, aux head) and its final CIFAR-10 settings (15 layers, F = 36, 5 nodes,
  aux head): stem 3x3 to 3F + BN; reductions at num_layers // 3 and 2 (num_layers // 3) + 1 doubling F;
  calibration of both inputs, then "layer_base" on the newer one; separable ops as 2 stacked
  ReLU-depthwise-pointwise-BN; pools and identities without a conv (every op input already has F
  channels); factorized reduction for stride-2 identities and for unused inputs of reduction cells;
  aux head 1x1 -> 128, 2x2 -> 768, linear without bias; classifier linear without bias. BN scale and
  offset count (ENAS counts trainable variables); its moving statistics would add 46,720
  (4,436,203: still 3.6% under).
- the two published sizes are not one construction at two widths: ours splits into parts linear in F
  (depthwise 341,424 -> 682,848, BN 46,720 -> 91,648), the aux head (494,848 -> 587,008) and a
  quadratic rest (3,506,491 -> 14,010,319, x 4.0). A 4.6M E (4.55M to 4.65M after rounding) leaves
  3.67M to 3.77M quadratic, which at F = 72 gives 16.0M to 16.4M, not 15.3M. So E and EI cannot both
  match; we match EI at the stated depth and width and report E as it comes (-4.6%).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..nn import GatedConv2d, GatedLinear, StochasticModule
from ..ops.streams import Domain
from . import check_sizes, register
from .shake_shake import TwoPathShortcut

# ENAS's published micro architecture (arc = per node: x_id, x_op, y_id, y_op)
NORMAL_ARC = (0, 2, 0, 0, 0, 4, 0, 1, 0, 4, 1, 1, 1, 0, 0, 1, 0, 2, 1, 1)
REDUCE_ARC = (1, 0, 1, 0, 0, 3, 0, 2, 1, 1, 3, 1, 1, 0, 0, 4, 0, 3, 1, 1)
OPS = ("sep3x3", "sep5x5", "avgpool3x3", "maxpool3x3", "identity")
SEP_STACK = 2  # ENAS `_fixed_conv(stack_convs=2)`


class DropPath(StochasticModule):
    """Zero a whole op output per example with probability `drop_prob`, rescale the kept ones.

    Its uniforms come from `ops.philox_uniform` on the (seed, stream) that `set_gates(model,
    'relaxed', seed=, step=)` hands every StochasticModule; the stream's layer field is the module's
    index among the network's stochastic modules, so no two modules (shake-shake or drop-path)
    share numbers. Example b (global row, see `StochasticModule.rng_row_offset`) uses element b, so a
    data-parallel shard draws its rows of the concatenated batch's decisions.
    """

    rng_domain = Domain.DROP_PATH

    def __init__(self, layer_scale: float, backend: str | None = None):
        super().__init__()
        self.layer_scale = layer_scale  # (layer + 1) / (num_layers + 2): deeper cells drop more
        self.drop_prob = 0.0
        self.backend = backend

    def evaluation_module(self) -> nn.Module:
        return nn.Identity()  # drop-path is the identity in evaluation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob <= 0.0:
            return x
        if self.rng_stream is None:
            raise RuntimeError("DropPath in training mode needs set_gates(model, 'relaxed', seed=, step=) first")
        keep_prob = 1.0 - self.drop_prob
        u = ops.philox_uniform(x.shape[0], seed=self.rng_seed, stream=self.rng_stream, offset=self.rng_row_offset,
                               device=x.device, backend=self.backend)
        keep = (u < keep_prob).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        return x * (keep / keep_prob)

    def extra_repr(self) -> str:
        return f"layer_scale={self.layer_scale:.3f}, drop_prob={self.drop_prob:.3f}"


class ReLUConvBN(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, gate_kw: dict):
        super().__init__(nn.ReLU(), GatedConv2d(c_in, c_out, 1, bias=False, **gate_kw), nn.BatchNorm2d(c_out))


class FactorizedReduction(TwoPathShortcut):
    """ENAS's stride-2 1x1 reduction: Shake-Shake's two-path shortcut at stride 2, after a ReLU when `relu`."""

    stride = 2  # (an export pickled before this class shared TwoPathShortcut's code holds no stride)

    def __init__(self, c_in: int, c_out: int, gate_kw: dict, relu: bool = False):
        super().__init__(c_in, c_out, 2, gate_kw)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.relu(x) if self.relu else x)


class SepConv(nn.Sequential):
    """ENAS separable op: SEP_STACK x (ReLU - depthwise - [gate] - pointwise - BN), stride on the first."""

    def __init__(self, c: int, kernel: int, stride: int, gate_kw: dict):
        layers = []
        for i in range(SEP_STACK):
            layers += [
                nn.ReLU(),
                nn.Conv2d(c, c, kernel, stride=stride if i == 0 else 1, padding=kernel // 2, groups=c, bias=False),
                GatedConv2d(c, c, 1, bias=False, **gate_kw),
                nn.BatchNorm2d(c),
            ]
        super().__init__(*layers)


def make_op(op: int, c: int, stride: int, gate_kw: dict) -> nn.Module:
    if op in (0, 1):
        return SepConv(c, 3 if op == 0 else 5, stride, gate_kw)
    if op == 2:  # TF "SAME" average pooling does not count the padding
        return nn.AvgPool2d(3, stride, padding=1, count_include_pad=False)
    if op == 3:
        return nn.MaxPool2d(3, stride, padding=1)
    if op == 4:
        return nn.Identity() if stride == 1 else FactorizedReduction(c, c, gate_kw)
    raise ValueError(f"unknown ENAS op {op}; ops are 0..4 = {', '.join(OPS)}")


class Cell(nn.Module):
    def __init__(self, arc, c_prev_prev: int, c_prev: int, c: int, *, reduction: bool, reduce_prev: bool,
                 layer_scale: float, gate_kw: dict, backend: str | None):
        super().__init__()
        if len(arc) % 4:
            raise ValueError(f"an arc has 4 entries per node, got {len(arc)} entries")
        n_nodes = len(arc) // 4
        stride = 2 if reduction else 1
        # calibrate: the older input to the newer one's spatial size and c channels
        if reduce_prev:
            self.calibrate0 = FactorizedReduction(c_prev_prev, c, gate_kw, relu=True)
        elif c_prev_prev != c:
            self.calibrate0 = ReLUConvBN(c_prev_prev, c, gate_kw)
        else:
            self.calibrate0 = nn.Identity()
        # ENAS passes the newer input through a ReLU-conv1x1-BN twice when its width differs ("pool_y"
        # then "layer_base"), once otherwise
        self.calibrate1 = ReLUConvBN(c_prev, c, gate_kw) if c_prev != c else nn.Identity()
        self.layer_base = ReLUConvBN(c, c, gate_kw)
        self.inputs = [arc[4 * i + j] for i in range(n_nodes) for j in (0, 2)]
        if any(not 0 <= x < i // 2 + 2 for i, x in enumerate(self.inputs)):
            raise ValueError(f"arc {list(arc)}: node inputs must index the two cell inputs or earlier nodes")
        op_ids = [arc[4 * i + j] for i in range(n_nodes) for j in (1, 3)]
        self.ops = nn.ModuleList()
        self.drop_paths = nn.ModuleList()
        for x, op in zip(self.inputs, op_ids):
            self.ops.append(make_op(op, c, stride if x < 2 else 1, gate_kw))
            self.drop_paths.append(DropPath(layer_scale, backend) if op != 4 else nn.Identity())
        used = set(self.inputs)
        self.concat = [i for i in range(n_nodes + 2) if i not in used]
        # an unused cell input of a reduction cell is still at the input's size: reduce it too
        self.out_calibrate = nn.ModuleDict({
            str(i): FactorizedReduction(c, c, gate_kw) for i in self.concat if i < 2 and reduction})
        self.out_channels = c * len(self.concat)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        states = [self.calibrate0(s0), self.layer_base(self.calibrate1(s1))]
        for i in range(0, len(self.ops), 2):
            x = self.drop_paths[i](self.ops[i](states[self.inputs[i]]))
            y = self.drop_paths[i + 1](self.ops[i + 1](states[self.inputs[i + 1]]))
            states.append(x + y)
        outs = [self.out_calibrate[str(i)](states[i]) if str(i) in self.out_calibrate else states[i]
                for i in self.concat]
        return torch.cat(outs, 1)


class AuxHead(nn.Module):
    """ENAS auxiliary classifier (plain layers: it is not part of any candidate)."""

    def __init__(self, c_in: int, num_classes: int):
        super().__init__()
        self.pool = nn.AvgPool2d(5, 3)
        self.proj = nn.Sequential(nn.Conv2d(c_in, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU())
        self.conv = nn.Sequential(nn.Conv2d(128, 768, 2, bias=False), nn.BatchNorm2d(768), nn.ReLU())
        self.fc = nn.Linear(768, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.pool(F.relu(x)))
        x = self.conv(F.pad(x, (0, 1, 0, 1)))  # TF "SAME" for the even 2x2 kernel: pad right/bottom
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class EnasSupernet(nn.Module):
    training_only_modules = ("aux",)  # materialize removes it: a training aid, never run in evaluation

    def __init__(self, filters: int = 36, num_classes: int = 10, *, num_layers: int = 15,
                 normal_arc=NORMAL_ARC, reduce_arc=REDUCE_ARC, drop_path_keep_prob: float = 0.6,
                 aux_head: bool = True, p_init: float = 0.1, tau: float = 0.2, backend: str | None = None):
        super().__init__()
        check_sizes("ENAS super-network", filters=filters)
        if not 0.0 < drop_path_keep_prob <= 1.0:
            raise ValueError(f"drop_path_keep_prob must be in (0, 1], got {drop_path_keep_prob}")
        if num_layers < 3:
            raise ValueError(f"num_layers must be >= 3 (two reductions at num_layers // 3 and after), got {num_layers}")
        gate_kw = dict(gate_groups=None, p_init=p_init, tau=tau, backend=backend)
        self.drop_path_keep_prob = drop_path_keep_prob
        c = filters
        self.stem = nn.Sequential(GatedConv2d(3, 3 * c, 3, padding=1, bias=False, **gate_kw), nn.BatchNorm2d(3 * c))
        pool_distance = num_layers // 3
        self.reduction_layers = (pool_distance, 2 * pool_distance + 1)
        self.aux_layer = self.reduction_layers[-1] + 1
        total = num_layers + 2
        self.cells = nn.ModuleList()
        c_prev_prev = c_prev = 3 * c
        reduce_prev = False
        self.aux = None
        for layer in range(total):
            reduction = layer in self.reduction_layers
            if reduction:
                c *= 2
            cell = Cell(reduce_arc if reduction else normal_arc, c_prev_prev, c_prev, c, reduction=reduction,
                        reduce_prev=reduce_prev, layer_scale=(layer + 1) / total, gate_kw=gate_kw, backend=backend)
            self.cells.append(cell)
            c_prev_prev, c_prev, reduce_prev = c_prev, cell.out_channels, reduction
            if aux_head and layer == self.aux_layer:
                self.aux = AuxHead(c_prev, num_classes)
        self.classifier = GatedLinear(c_prev, num_classes, bias=False, **gate_kw)
        self.set_drop_path_progress(1.0)

    def set_drop_path_progress(self, progress: float) -> None:
        """ENAS's linear drop-path schedule: progress = min(1, (step + 1) / total steps); 1.0 = full rate."""
        progress = min(max(float(progress), 0.0), 1.0)
        for m in self.modules():
            if isinstance(m, DropPath):
                m.drop_prob = (1.0 - self.drop_path_keep_prob) * m.layer_scale * progress

    def forward(self, x: torch.Tensor):
        s0 = s1 = self.stem(x)
        aux_logits = None
        for layer, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1)
            if self.aux is not None and self.training and layer == self.aux_layer:
                aux_logits = self.aux(s1)
        logits = self.classifier(F.adaptive_avg_pool2d(F.relu(s1), 1).flatten(1))
        return logits if aux_logits is None else (logits, aux_logits)


@register("supnet-e")
def supnet_e(num_classes: int = 10, p_init: float = 0.1, tau: float = 0.2, backend: str | None = None,
             filters: int = 36, **kwargs) -> EnasSupernet:
    """SupNet-E: fixed ENAS micro cell, 15 layers + 2 reductions, F = 36: 4.39M parameters
    (the paper: 4.6M; see the module docstring)."""
    return EnasSupernet(filters, num_classes, p_init=p_init, tau=tau, backend=backend, **kwargs)


@register("supnet-ei")
def supnet_ei(num_classes: int = 10, p_init: float = 0.1, tau: float = 0.2, backend: str | None = None,
              filters: int = 72, **kwargs) -> EnasSupernet:
    """SupNet-EI ("inflated"): fixed ENAS micro cell, 15 layers + 2 reductions, F = 72, 15.3M parameters."""
    return EnasSupernet(filters, num_classes, p_init=p_init, tau=tau, backend=backend, **kwargs)
