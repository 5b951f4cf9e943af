"""Branch combination ("mixed-operation forward") in Triton: sum_s w[b, s] y_s (+ skip) and its backward.

Branches come as separate tensors (no stacking copy): a launch takes up to MAX_BRANCHES pointers;
more branches run in further launches that accumulate into the output (for 16-bit data, a rounding
of the partial sum per extra launch; super-networks have at most a handful of branches). Every
tensor is read as [B, R] rows in one shared dense, batch-outermost layout (that of the output, so
contiguous and channels_last need no copy); an input in another layout is copied once into it.
On a GPU one program per (row chunk, example), so the per-example weight is one scalar per program
(the CPU interpreter takes several examples per tile); the backward's weight gradients are
per-program partial sums reduced by one deterministic torch sum.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .philox import EXACT

MAX_BRANCHES = 4


@triton.jit
def _pick(k: tl.constexpr, p0, p1, p2, p3):
    # one return at the end: branches are resolved at compile time (k is a constexpr)
    if k == 0:
        p = p0
    elif k == 1:
        p = p1
    elif k == 2:
        p = p2
    else:
        p = p3
    return p


@triton.jit
def _branch_weight(w_ptr, b, bmask, s_total, k, PER_EXAMPLE: tl.constexpr):
    """Weight of branch k for the examples b of the tile, as a [BLOCK_B, 1] column."""
    if PER_EXAMPLE:
        w = tl.load(w_ptr + b * s_total + k, mask=bmask, other=0.0)
    else:
        w = tl.load(w_ptr + k + 0 * b, mask=bmask, other=0.0)
    return w[:, None]


@triton.jit
def _tile(R, B, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr):
    """A tile is BLOCK_B examples x BLOCK_R positions of their rows (BLOCK_B is 1 on a GPU)."""
    b = tl.program_id(1).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    bmask = b < B
    return b, bmask, b[:, None] * R + r[None, :], bmask[:, None] & (r < R)[None, :]


@triton.jit
def _combine_kernel(y0, y1, y2, y3, w_ptr, skip_ptr, out_ptr, R, B, s_total, s_base,
                    N_BRANCH: tl.constexpr, PER_EXAMPLE: tl.constexpr, HAS_SKIP: tl.constexpr,
                    ACCUMULATE: tl.constexpr, COMPUTE_F64: tl.constexpr, BLOCK_B: tl.constexpr,
                    BLOCK_R: tl.constexpr):
    b, bmask, at, mask = _tile(R, B, BLOCK_B, BLOCK_R)
    acc = tl.zeros([BLOCK_B, BLOCK_R], tl.float64 if COMPUTE_F64 else tl.float32)
    if HAS_SKIP:
        acc += tl.load(skip_ptr + at, mask=mask, other=0.0).to(acc.dtype)
    if ACCUMULATE:  # a further group of branches adds to the output of the previous launch
        acc += tl.load(out_ptr + at, mask=mask, other=0.0).to(acc.dtype)
    for k in tl.static_range(N_BRANCH):
        w = _branch_weight(w_ptr, b, bmask, s_total, s_base + k, PER_EXAMPLE).to(acc.dtype)
        y = tl.load(_pick(k, y0, y1, y2, y3) + at, mask=mask, other=0.0)
        acc += w * y.to(acc.dtype)
    tl.store(out_ptr + at, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_backward_kernel(g_ptr, y0, y1, y2, y3, d0, d1, d2, d3, wb_ptr, partial_ptr, R, B, s_total, s_base,
                             N_BRANCH: tl.constexpr, PER_EXAMPLE: tl.constexpr, WANT_WEIGHT_GRAD: tl.constexpr,
                             COMPUTE_F64: tl.constexpr, W_F64: tl.constexpr, BLOCK_B: tl.constexpr,
                             BLOCK_R: tl.constexpr):
    """dy_s = g * wb[b, s]; and (unless shake-shake) partial[b, chunk, s] = sum over the chunk of g y_s."""
    b, bmask, at, mask = _tile(R, B, BLOCK_B, BLOCK_R)
    g = tl.load(g_ptr + at, mask=mask, other=0.0)
    compute = tl.float64 if COMPUTE_F64 else tl.float32
    wdtype = tl.float64 if W_F64 else tl.float32
    for k in tl.static_range(N_BRANCH):
        wb = _branch_weight(wb_ptr, b, bmask, s_total, s_base + k, PER_EXAMPLE).to(compute)
        d = _pick(k, d0, d1, d2, d3)
        tl.store(d + at, (g.to(compute) * wb).to(d.dtype.element_ty), mask=mask)
        if WANT_WEIGHT_GRAD:
            y = tl.load(_pick(k, y0, y1, y2, y3) + at, mask=mask, other=0.0)
            part = tl.sum(g.to(wdtype) * y.to(wdtype), axis=1)
            tl.store(partial_ptr + (b * tl.num_programs(0) + tl.program_id(0)) * s_total + s_base + k, part,
                     mask=bmask)


# ---- wrappers (inputs are validated by pgnas_fast.ops) --------------------------------------------
def _blocks(B: int, R: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_B, BLOCK_R): one example per program on a GPU; the CPU interpreter pays per program,
    so there a tile spans as many examples as fit."""
    if device.type == "cuda":  # (grid axis 1 holds at most 65535 example blocks)
        return triton.next_power_of_2(triton.cdiv(B, 65535)), min(triton.next_power_of_2(R), 2048)
    block_r = min(triton.next_power_of_2(R), 1 << 15)
    return max(1, min(triton.next_power_of_2(B), (1 << 15) // block_r)), block_r


def _work_layout(like: torch.Tensor) -> torch.Tensor:
    """An empty tensor in the layout the kernels read: that of empty_like(like) when it is
    batch-outermost (contiguous, channels_last, ...), else contiguous."""
    t = torch.empty_like(like)
    if t.dim() == 0 or t.shape[0] <= 1 or t.stride(0) * t.shape[0] == t.numel():
        return t
    return torch.empty(like.shape, dtype=like.dtype, device=like.device)


def _in_layout(t: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    return t if t.stride() == work.stride() else torch.empty_like(work, dtype=t.dtype).copy_(t)


def _groups(n: int):
    return [(s, min(MAX_BRANCHES, n - s)) for s in range(0, n, MAX_BRANCHES)]


def _padded(ts: list[torch.Tensor], base: int, count: int) -> list[torch.Tensor]:
    group = ts[base : base + count]
    return group + [group[0]] * (MAX_BRANCHES - count)  # unused pointer slots


def branch_combine(ys, weights, skip):
    out = _work_layout(ys[0])
    final = torch.empty_like(ys[0])
    B = ys[0].shape[0] if ys[0].dim() else 1
    if out.numel() == 0:
        return final
    R = out.numel() // B
    ys_w = [_in_layout(y, out) for y in ys]
    skip_w = _in_layout(skip, out) if skip is not None else out
    block_b, block_r = _blocks(B, R, out.device)
    weights = weights.contiguous()
    compute_f64 = torch.float64 in (ys[0].dtype, weights.dtype) or (skip is not None and skip.dtype == torch.float64)
    if len(ys) > MAX_BRANCHES:  # several launches: the running sum in the compute dtype, rounded once at the end
        out = torch.empty_like(out, dtype=torch.float64 if compute_f64 else torch.float32)
    for base, count in _groups(len(ys)):
        _combine_kernel[(triton.cdiv(R, block_r), triton.cdiv(B, block_b))](
            *_padded(ys_w, base, count), weights, skip_w, out, R, B, len(ys), base,
            N_BRANCH=count, PER_EXAMPLE=weights.dim() == 2, HAS_SKIP=skip is not None and base == 0,
            ACCUMULATE=base > 0, COMPUTE_F64=compute_f64, BLOCK_B=block_b, BLOCK_R=block_r, **EXACT)
    return out if out.stride() == final.stride() and out.dtype == final.dtype else final.copy_(out)


def branch_combine_backward(grad, ys, weights, backward_weights):
    n = len(ys)
    work = _work_layout(ys[0])
    B = ys[0].shape[0] if ys[0].dim() else 1
    grad_ys = [torch.empty_like(y) for y in ys]
    want_weight_grad = backward_weights is None
    if work.numel() == 0:
        return grad_ys, torch.zeros_like(weights)
    R = work.numel() // B
    block_b, block_r = _blocks(B, R, work.device)
    chunks = triton.cdiv(R, block_r)
    weights = weights.contiguous()
    backward_weights = None if backward_weights is None else backward_weights.contiguous()
    g_w = _in_layout(grad, work)
    ys_w = [_in_layout(y, work) for y in ys] if want_weight_grad else [g_w] * n
    # write straight into the outputs when they share the working layout (the usual case)
    d_w = [d if d.stride() == work.stride() else torch.empty_like(work) for d in grad_ys]
    partial = torch.empty(B, chunks, n, dtype=weights.dtype, device=work.device) if want_weight_grad else weights
    compute_f64 = torch.float64 in (grad.dtype, weights.dtype)
    for base, count in _groups(n):
        _combine_backward_kernel[(chunks, triton.cdiv(B, block_b))](
            g_w, *_padded(ys_w, base, count), *_padded(d_w, base, count),
            weights if want_weight_grad else backward_weights, partial, R, B, n, base,
            N_BRANCH=count, PER_EXAMPLE=weights.dim() == 2, WANT_WEIGHT_GRAD=want_weight_grad,
            COMPUTE_F64=compute_f64, W_F64=weights.dtype == torch.float64, BLOCK_B=block_b, BLOCK_R=block_r,
            **EXACT)
    for d, dw in zip(grad_ys, d_w):
        if dw is not d:
            d.copy_(dw)
    if not want_weight_grad:  # shake-shake: the forward weights are random constants
        return grad_ys, torch.zeros_like(weights)
    return grad_ys, partial.sum(1) if weights.dim() == 2 else partial.sum((0, 1))
