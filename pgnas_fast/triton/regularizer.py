"""The whole network's regulariser R (pgnas-method.md section 2) and its gradients in Triton, in O(1) launches.

Multi-tensor mechanism (pgnas_fast.triton.tables): a cached int64 *layer table* holds, per gated
layer, the addresses of its weight and p_logit, its shape numbers and where its gradients start in
the flat gradient buffers (the op contract, pgnas_fast.ops._library); a cached int32 *block table*
lists the work items, (layer, first channel) blocks of input channels and (layer, first element)
blocks of weights. A launch covers every layer: a program reads its block, then its layer's row, and
casts the stored addresses back to pointers. Nothing is copied to the device per call once the
tables are cached, so a CUDA graph can capture either launch.

- value: one launch over channel blocks computes, per input channel c, sq_c = sum of W^2 over the
  outputs and taps reading c, and (wr/N)(1 - p_c) sq_c + (dr/N) H'(p_c) summed per block; the last
  program adds the blocks' partials (`tables.sum_when_last`).
- backward: one launch; programs below the channel-block count recompute sq_c and write d p_logit
  = g p (1 - p) (dr/N z - wr/N sq_c), the others write dW = g 2 wr/N (1 - p_c) W elementwise, both
  into flat buffers.

Grouped convolutions as in the reference: weight [O, J, K...] with C_in = G J inputs; output o is in
group o // (O / G) and reads input channel (o // (O / G)) J + j. All weights of a call share one
dtype in the kernel (a mixed list is promoted by a copy) and are read contiguous (a non-contiguous
weight, e.g. a channels_last conv weight, is copied once; autograd lays its gradient out like it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import common_dtype, math_dtype
from . import tables
from .gates import log1p
from .philox import EXACT, joined, split_f64

# w, p_logit addresses; C_in, J, O / G, taps K; the layer's first element / channel in the flat gradients
LAYER_COLUMNS = tl.constexpr(8)
BLOCK_C = 32
BLOCK_R = 32
BLOCK_W = 1024


@triton.jit
def log_sigmoid(z):
    return tl.minimum(z, 0.0) - log1p(tl.exp(-tl.abs(z)))


@triton.jit
def _infinite(z):
    return tl.abs(z) == float("inf")


@triton.jit
def _layer(table_ptr, layer, w_like, p_like):
    """One layer's row; the stored addresses become pointers typed like w_like / p_like (pointer
    arguments of the weight and gate dtypes)."""
    row = table_ptr + layer * LAYER_COLUMNS
    w = tl.load(row + 0).to(w_like.dtype)
    p = tl.load(row + 1).to(p_like.dtype)
    return w, p, tl.load(row + 2), tl.load(row + 3), tl.load(row + 4), tl.load(row + 5)


@triton.jit
def _grads(table_ptr, layer, grad_w_flat, grad_p_flat):
    """Where one layer's gradients start in the flat buffers."""
    row = table_ptr + layer * LAYER_COLUMNS
    return grad_w_flat + tl.load(row + 6), grad_p_flat + tl.load(row + 7)


@triton.jit
def _squared_norm_per_input_channel(w, c, cmask, J, opg, K, G_TYPE: tl.constexpr, BLOCK_C: tl.constexpr,
                                    BLOCK_R: tl.constexpr):
    """sq[c] = sum over the outputs o of c's group and taps k of W[o, j, k]^2."""
    group = c // J
    j = c % J
    acc = tl.zeros([BLOCK_R, BLOCK_C], G_TYPE)
    n_rows = opg * K
    for r0 in range(0, n_rows, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        o = group[None, :] * opg + (r // K)[:, None]
        at = (o * J + j[None, :]) * K + (r % K)[:, None]
        v = tl.load(w + at, mask=(r < n_rows)[:, None] & cmask[None, :], other=0.0).to(G_TYPE)
        acc += v * v
    return tl.sum(acc, axis=0)


@triton.jit
def _regularizer_kernel(table_ptr, blocks_ptr, partial_ptr, counter_ptr, out_ptr, n_programs, w_like, p_like, wr_hi,
                        wr_lo, dr_hi, dr_lo, G_TYPE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    layer = tl.load(blocks_ptr + 2 * pid)
    c = tl.load(blocks_ptr + 2 * pid + 1) + tl.arange(0, BLOCK_C)
    w, p_ptr, C, J, opg, K = _layer(table_ptr, layer, w_like, p_like)
    cmask = c < C
    z = tl.load(p_ptr + c, mask=cmask, other=0.0).to(G_TYPE)
    sq = _squared_norm_per_input_channel(w, c, cmask, J, opg, K, G_TYPE, BLOCK_C, BLOCK_R)
    wr = joined(wr_hi, wr_lo, G_TYPE)  # weight_reg / n_train
    dr = joined(dr_hi, dr_lo, G_TYPE)  # drop_reg / n_train
    ls_pos = log_sigmoid(z)  # log p
    ls_neg = log_sigmoid(-z)  # log (1 - p)
    keep_prob = tl.exp(ls_neg)
    neg_entropy = tl.exp(ls_pos) * ls_pos + keep_prob * ls_neg  # H'(p) = p log p + (1 - p) log (1 - p)
    neg_entropy = tl.where(_infinite(z), 0.0, neg_entropy)  # its limit at p exactly 0 or 1, not 0 * inf
    term = tl.where(cmask, wr * keep_prob * sq + dr * neg_entropy, 0.0)
    tables.sum_when_last(partial_ptr, tl.sum(term, axis=0), counter_ptr, out_ptr, n_programs, G_TYPE)


@triton.jit
def _weight_grad_block(w, gw, p_ptr, start, C, J, opg, K, g, wr, G_TYPE: tl.constexpr, BLOCK_W: tl.constexpr):
    """dW = g 2 wr (1 - p_c) W for BLOCK_W elements of one weight, c the element's input channel."""
    e = start.to(tl.int64) + tl.arange(0, BLOCK_W)
    emask = e < opg * (C // J) * J * K
    cin = (e // (J * K) // opg) * J + (e // K) % J
    z = tl.load(p_ptr + cin, mask=emask, other=0.0).to(G_TYPE)
    v = tl.load(w + e, mask=emask, other=0.0).to(G_TYPE)
    keep_prob = 1.0 / (1.0 + tl.exp(z))
    tl.store(gw + e, (g * 2.0 * wr * keep_prob * v).to(gw.dtype.element_ty), mask=emask)


@triton.jit
def _p_logit_grad_block(w, p_ptr, gp, start, C, J, opg, K, g, wr, dr, G_TYPE: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """d p_logit for BLOCK_C channels: d/dz (1 - p) = -p (1 - p); d/dz H'(p) = z p (1 - p)."""
    c = start + tl.arange(0, BLOCK_C)
    cmask = c < C
    z = tl.load(p_ptr + c, mask=cmask, other=0.0).to(G_TYPE)
    sq = _squared_norm_per_input_channel(w, c, cmask, J, opg, K, G_TYPE, BLOCK_C, BLOCK_R)
    p = 1.0 / (1.0 + tl.exp(-z))
    keep_prob = 1.0 / (1.0 + tl.exp(z))
    grad_z = tl.where(_infinite(z), 0.0, g * (p * keep_prob) * (dr * z - wr * sq))  # p (1 - p) = 0 at z = +-inf
    tl.store(gp + c, grad_z, mask=cmask)


@triton.jit
def _regularizer_backward_kernel(table_ptr, blocks_ptr, n_channel_blocks, grad_ptr, grad_w_flat, grad_p_flat,
                                 w_like, p_like, wr_hi, wr_lo, dr_hi, dr_lo, G_TYPE: tl.constexpr,
                                 BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """Programs below n_channel_blocks write p_logit gradients, the others weight gradients."""
    pid = tl.program_id(0)
    layer = tl.load(blocks_ptr + 2 * pid)
    start = tl.load(blocks_ptr + 2 * pid + 1)
    w, p_ptr, C, J, opg, K = _layer(table_ptr, layer, w_like, p_like)
    gw, gp = _grads(table_ptr, layer, grad_w_flat, grad_p_flat)
    g = tl.load(grad_ptr).to(G_TYPE)
    wr = joined(wr_hi, wr_lo, G_TYPE)
    dr = joined(dr_hi, dr_lo, G_TYPE)
    if pid < n_channel_blocks:
        _p_logit_grad_block(w, p_ptr, gp, start, C, J, opg, K, g, wr, dr, G_TYPE, BLOCK_C, BLOCK_R)
    else:
        _weight_grad_block(w, gw, p_ptr, start, C, J, opg, K, g, wr, G_TYPE, BLOCK_W)


# ---- wrappers (inputs are validated by pgnas_fast.ops) --------------------------------------------

def _prepared(weights, p_logits):
    """Weights in one dtype and contiguous, p_logits in the gate dtype (copies only where needed)."""
    wdtype, gdtype = common_dtype(weights), math_dtype(*p_logits)
    return tables.dense(weights, wdtype), tables.dense(p_logits, gdtype), wdtype, gdtype


def _shape_numbers(w, p):
    """C_in, J (inputs per group), O / G (outputs per group), taps K of a gated weight."""
    in_channels, per_group, out_channels = p.shape[0], w.shape[1], w.shape[0]
    return in_channels, per_group, out_channels // (in_channels // per_group), w.numel() // (out_channels * per_group)


def _tables(ws, ps, with_weight_blocks: bool):
    """(layer table, block table, channel block count), cached on the device (`tables`). The block
    table lists channel blocks first, since each walks a whole weight column, the longest work of a
    launch: started first, they overlap the weight blocks instead of trailing them. The keys are built
    from the tensors' addresses and torch.Size objects as they are: a host step of a 119-layer network
    is then ~0.1 ms, where per-tensor tuples and no-op copies took 0.4."""
    w_shapes, p_shapes = tuple([w.shape for w in ws]), tuple([p.shape for p in ps])

    def layer_rows():
        rows, first_element, first_channel = [], 0, 0
        for w, p in zip(ws, ps):
            rows.append([w.data_ptr(), p.data_ptr(), *_shape_numbers(w, p), first_element, first_channel])
            first_element, first_channel = first_element + w.numel(), first_channel + p.shape[0]
        return rows

    def channel_rows():
        return [[layer, c] for layer, p in enumerate(ps) for c in range(0, p.shape[0], BLOCK_C)]

    def all_rows():
        return channel_rows() + [[layer, e] for layer, w in enumerate(ws) for e in range(0, w.numel(), BLOCK_W)]

    device = ws[0].device
    addresses = (tuple([w.data_ptr() for w in ws]), tuple([p.data_ptr() for p in ps]))
    table = tables.cached(("regularizer layers", addresses, w_shapes, p_shapes), layer_rows, torch.int64, device)
    channel_blocks = tables.cached(("regularizer blocks", w_shapes, p_shapes, False), channel_rows, torch.int32, device)
    blocks = (tables.cached(("regularizer blocks", w_shapes, p_shapes, True), all_rows, torch.int32, device)
              if with_weight_blocks else channel_blocks)
    return table, blocks, channel_blocks.shape[0]


_TL_TYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


def regularizer(weights, p_logits, weight_reg, drop_reg, n_train):
    ws, ps, _, gdtype = _prepared(weights, p_logits)
    table, blocks, n_blocks = _tables(ws, ps, with_weight_blocks=False)
    device = ws[0].device
    partial = torch.empty(n_blocks, dtype=gdtype, device=device)
    out = torch.empty((), dtype=gdtype, device=device)
    _regularizer_kernel[(n_blocks,)](
        table, blocks, partial, tables.ticket_counter(device), out, n_blocks, ws[0], ps[0],
        *split_f64(weight_reg / n_train), *split_f64(drop_reg / n_train), G_TYPE=_TL_TYPES[gdtype], BLOCK_C=BLOCK_C,
        BLOCK_R=BLOCK_R, **EXACT)
    return out


def regularizer_backward(grad, weights, p_logits, weight_reg, drop_reg, n_train):
    ws, ps, wdtype, gdtype = _prepared(weights, p_logits)
    device = ws[0].device
    grad_w_flat = torch.empty(sum(w.numel() for w in ws), dtype=wdtype, device=device)
    grad_p_flat = torch.empty(sum(p.shape[0] for p in ps), dtype=gdtype, device=device)
    table, blocks, n_channel_blocks = _tables(ws, ps, with_weight_blocks=True)
    _regularizer_backward_kernel[(blocks.shape[0],)](
        table, blocks, n_channel_blocks, grad.to(gdtype), grad_w_flat, grad_p_flat, ws[0], ps[0],
        *split_f64(weight_reg / n_train), *split_f64(drop_reg / n_train), G_TYPE=_TL_TYPES[gdtype], BLOCK_W=BLOCK_W,
        BLOCK_C=BLOCK_C, BLOCK_R=BLOCK_R, **EXACT)
    return grad_w_flat, grad_p_flat
