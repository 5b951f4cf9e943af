"""The op set declared once as torch.library custom ops, with fake (meta) kernels and autograd.

Each op takes the name of an already-resolved backend as its last argument and forwards to that
backend's function of the same name (`dispatch.implementation`), so torch.compile sees one opaque op
whatever runs inside. Backward passes are custom ops too, so every backend supplies its own.
Validation happens before these are called, in `pgnas_fast.ops`, which calls them through `call`:
eager calls run the same bodies and autograd formulas without the dispatcher's host cost.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch._library.custom_ops import CustomOpDef
from torch._utils import _unflatten_dense_tensors

from ..reference import common_dtype, math_dtype, stacked_empty_like
from .dispatch import implementation, own_implementation

NAMESPACE = "pgnas_fast"

_custom: dict[str, CustomOpDef] = {}  # name -> the op as the dispatcher, torch.compile and opcheck see it
_body: dict[str, Callable] = {}  # name -> the Python function inside it
_autograd: dict[str, tuple[Callable, Callable]] = {}  # name -> (setup_context, grad formula)
_eager_forward: dict[str, Callable] = {}  # name -> forward(ctx, *args) that `_Eager` runs instead of the body


def _op(name: str):
    def declare(body: Callable) -> CustomOpDef:
        _body[name] = body
        _custom[name] = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=())(body)
        return _custom[name]

    return declare


def _register_autograd(op: CustomOpDef, grad: Callable, setup: Callable) -> None:
    op.register_autograd(grad, setup_context=setup)
    _autograd[op._name] = (setup, grad)


def call(name: str, *args):
    """Op `name` on its custom op's arguments (backend last).

    Eager calls skip the torch.library dispatcher, which costs more host time than a small op's GPU
    kernel (on the 2-core CPU machine about 30 us a call, 100 us a call with autograd, forward and
    backward): they run the op's body, through `_Eager` when a gradient is wanted, with the same
    formulas as the custom op's autograd. Under torch.compile, export or torch.jit.trace (which would
    otherwise record the op's outputs as constants), inside a TorchDispatchMode
    (fake tensors, FLOP counters) and under torch.func transforms, the custom op runs: the graph holds
    one opaque op (torch's custom-op autograd does not support torch.func's gradient transforms, grad,
    jacrev, hessian: they raise).
    """
    if (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._are_functorch_transforms_active()):
        return _custom[name](*args)
    if name in _autograd and torch.is_grad_enabled() and any(t.requires_grad for t in _tensors(args)):
        structure, leaves = _flatten(args)
        return _Eager.apply(name, structure, *leaves)
    return _body[name](*args)


def _backward(ctx, name: str, *args):
    """Backward op `name` from a grad formula: its body under `_Eager`, else the custom op."""
    return (_body if getattr(ctx, "eager", False) else _custom)[name](*args)


def _is_tensor_list(arg) -> bool:
    return isinstance(arg, list) and len(arg) > 0 and all(isinstance(t, Tensor) for t in arg)


def _tensors(args) -> Iterator[Tensor]:
    for arg in args:
        if isinstance(arg, Tensor):
            yield arg
        elif _is_tensor_list(arg):
            yield from arg


def _flatten(args) -> tuple[tuple[int, ...], list]:
    """(structure, leaves): lists of tensors spread into the leaves (autograd.Function sees top-level
    tensors only); structure holds each such list's length, -1 for any other argument."""
    structure, leaves = [], []
    for arg in args:
        if _is_tensor_list(arg):
            structure.append(len(arg))
            leaves.extend(arg)
        else:
            structure.append(-1)
            leaves.append(arg)
    return tuple(structure), leaves


def _unflatten(structure: tuple[int, ...], leaves) -> list:
    args, at = [], 0
    for length in structure:
        if length < 0:
            args.append(leaves[at])
            at += 1
        else:
            args.append(list(leaves[at : at + length]))
            at += length
    return args


class _Eager(torch.autograd.Function):
    """An op with a gradient, run in eager mode without the dispatcher (see `call`)."""

    @staticmethod
    def forward(ctx, name, structure, *leaves):  # not setup_context: apply() then binds arguments by inspect, 35 us
        args = _unflatten(structure, leaves)
        ctx.eager, ctx.op, ctx.structure = True, name, structure
        output = _eager_forward[name](ctx, *args) if name in _eager_forward else _body[name](*args)
        _autograd[name][0](ctx, args, output)
        return output

    @staticmethod
    def backward(ctx, grad):
        with torch.no_grad():
            grads = _autograd[ctx.op][1](ctx, grad)
        leaves = []
        for length, g in zip(ctx.structure, grads):
            if length < 0:
                leaves.append(g)
            else:
                leaves.extend(g if g is not None else [None] * length)
        if torch.is_grad_enabled():  # create_graph=True: the gradients may be differentiated again
            leaves = no_second_derivative(ctx.op, leaves, (grad, *ctx.saved_tensors))
        return (None, None, *leaves)


def no_second_derivative(op: str, grads: list, inputs) -> list:
    """`grads` (create_graph=True) as tensors whose backward raises: the backward ops are kernels with no
    derivative of their own. Hung on what they were computed from (`inputs`: the incoming gradient and
    the saved tensors), so that a second derivative with respect to anything upstream runs into the
    error rather than around it (torch's once_differentiable raises only when the incoming gradient
    needs a gradient, and otherwise lets a second derivative through the op come out as zero)."""
    positions = [i for i, g in enumerate(grads) if isinstance(g, Tensor)]
    if not positions:
        return grads
    upstream = [t for t in inputs if isinstance(t, Tensor) and t.requires_grad]
    error = torch._C._functions.DelayedError(
        f"pgnas_fast op {op} has no second derivative (its backward is a kernel): differentiate through it "
        "once (create_graph=False)".encode(), len(positions) + len(upstream))
    wrapped = error(*[grads[i].detach().requires_grad_() for i in positions], *upstream)
    out = list(grads)
    for i, tensor in zip(positions, wrapped if isinstance(wrapped, tuple) else (wrapped,)):
        out[i] = tensor
    return out


# ---- philox_uniform -------------------------------------------------------------------------------
@_op("philox_uniform")
def philox_uniform(n: int, seed: int, stream: int, offset: int, device: torch.device, backend: str) -> Tensor:
    return implementation(backend, "philox_uniform")(n, seed, stream, offset, device)


@philox_uniform.register_fake
def _(n, seed, stream, offset, device, backend):
    return torch.empty(n, dtype=torch.float32, device=device)


# ---- gate_keep ------------------------------------------------------------------------------------
@_op("gate_keep")
def gate_keep(
    p_logit: Tensor, batch: int, seed: int, stream: int, tau: float, mode: str, offset: int, backend: str
) -> Tensor:
    return implementation(backend, "gate_keep")(p_logit, batch, seed, stream, tau, mode, offset)


@gate_keep.register_fake
def _(p_logit, batch, seed, stream, tau, mode, offset, backend):
    return p_logit.new_empty(batch, p_logit.shape[0])


@_op("gate_keep_backward")
def gate_keep_backward(grad: Tensor, keep: Tensor, tau: float, mode: str, backend: str) -> Tensor:
    return implementation(backend, "gate_keep_backward")(grad, keep, tau, mode)


@gate_keep_backward.register_fake
def _(grad, keep, tau, mode, backend):
    return keep.new_empty(keep.shape[1])


def _gate_keep_setup(ctx, inputs, output):
    _, _, _, _, ctx.tau, ctx.mode, _, ctx.backend = inputs
    ctx.save_for_backward(output)  # [B, C]: the gates themselves, nothing bigger


def _gate_keep_grad(ctx, grad):
    (keep,) = ctx.saved_tensors
    grad_p = _backward(ctx, "gate_keep_backward", grad, keep, ctx.tau, ctx.mode, ctx.backend)
    return grad_p, None, None, None, None, None, None, None


_register_autograd(gate_keep, _gate_keep_grad, _gate_keep_setup)


# ---- candidate_keep -------------------------------------------------------------------------------
@_op("candidate_keep")
def candidate_keep(p_logit: Tensor, candidates: Tensor, seed: int, layer: int, domain: int, backend: str) -> Tensor:
    return implementation(backend, "candidate_keep")(p_logit, candidates, seed, layer, domain)


@candidate_keep.register_fake
def _(p_logit, candidates, seed, layer, domain, backend):
    return p_logit.new_empty(candidates.shape[0], p_logit.shape[0])


def _candidate_keep_setup(ctx, inputs, output):
    ctx.channels, ctx.dtype, ctx.device = inputs[0].shape[0], inputs[0].dtype, inputs[0].device


def _candidate_keep_grad(ctx, grad):
    # hard gates do not depend on p_logit differentiably, as gate_keep(mode="hard")
    return torch.zeros(ctx.channels, dtype=ctx.dtype, device=ctx.device), None, None, None, None, None


_register_autograd(candidate_keep, _candidate_keep_grad, _candidate_keep_setup)


# ---- gated_apply ----------------------------------------------------------------------------------
@_op("gated_apply")
def gated_apply(
    x: Tensor, p_logit: Tensor, seed: int, stream: int, tau: float, mode: str, offset: int, backend: str
) -> Tensor:
    return implementation(backend, "gated_apply")(x, p_logit, seed, stream, tau, mode, offset)


@gated_apply.register_fake
def _(x, p_logit, seed, stream, tau, mode, offset, backend):
    return torch.empty_like(x)


@_op("gated_apply_backward")
def gated_apply_backward(
    grad: Tensor, x: Tensor, p_logit: Tensor, seed: int, stream: int, tau: float, mode: str, offset: int, backend: str
) -> tuple[Tensor, Tensor]:
    return implementation(backend, "gated_apply_backward")(grad, x, p_logit, seed, stream, tau, mode, offset)


@gated_apply_backward.register_fake
def _(grad, x, p_logit, seed, stream, tau, mode, offset, backend):
    return torch.empty_like(x), torch.empty_like(p_logit)


def _gated_apply_setup(ctx, inputs, output):
    x, p_logit, ctx.seed, ctx.stream, ctx.tau, ctx.mode, ctx.offset, ctx.backend = inputs
    ctx.save_for_backward(x, p_logit)


def _gated_apply_grad(ctx, grad):
    x, p_logit = ctx.saved_tensors
    grad_x, grad_p = _backward(
        ctx, "gated_apply_backward", grad, x, p_logit, ctx.seed, ctx.stream, ctx.tau, ctx.mode, ctx.offset, ctx.backend
    )
    return grad_x, grad_p, None, None, None, None, None, None


_register_autograd(gated_apply, _gated_apply_grad, _gated_apply_setup)


# ---- affine_relu_gate (fused BN affine -> ReLU -> gate) -------------------------------------------
@_op("affine_relu_gate")
def affine_relu_gate(x: Tensor, scale: Tensor, shift: Tensor, p_logit: Tensor, seed: int, stream: int, tau: float,
                     mode: str, offset: int, backend: str) -> Tensor:
    return implementation(backend, "affine_relu_gate")(x, scale, shift, p_logit, seed, stream, tau, mode, offset)


@affine_relu_gate.register_fake
def _(x, scale, shift, p_logit, seed, stream, tau, mode, offset, backend):
    return torch.empty_like(x)


@_op("affine_relu_gate_backward")
def affine_relu_gate_backward(
    grad: Tensor, x: Tensor, scale: Tensor, shift: Tensor, p_logit: Tensor, seed: int, stream: int, tau: float,
    mode: str, offset: int, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return implementation(backend, "affine_relu_gate_backward")(grad, x, scale, shift, p_logit, seed, stream, tau, mode,
                                                                offset)


@affine_relu_gate_backward.register_fake
def _(grad, x, scale, shift, p_logit, seed, stream, tau, mode, offset, backend):
    return torch.empty_like(x), torch.empty_like(scale), torch.empty_like(shift), torch.empty_like(p_logit)


def _affine_relu_gate_setup(ctx, inputs, output):
    x, scale, shift, p_logit, ctx.seed, ctx.stream, ctx.tau, ctx.mode, ctx.offset, ctx.backend = inputs
    ctx.save_for_backward(x, scale, shift, p_logit)  # not the output: the backward recomputes it from x


def _affine_relu_gate_grad(ctx, grad):
    x, scale, shift, p_logit = ctx.saved_tensors
    grads = _backward(ctx, "affine_relu_gate_backward", grad, x, scale, shift, p_logit, ctx.seed, ctx.stream, ctx.tau,
                      ctx.mode, ctx.offset, ctx.backend)
    return (*grads, None, None, None, None, None, None)


_register_autograd(affine_relu_gate, _affine_relu_gate_grad, _affine_relu_gate_setup)


# ---- gated_copies (one input -> S gated copies) ---------------------------------------------------
@_op("gated_copies")
def gated_copies(x: Tensor, p_logits: Tensor, seed: int, streams: list[int], tau: float, mode: str, offset: int,
                 relu: bool, backend: str) -> Tensor:
    return implementation(backend, "gated_copies")(x, p_logits, seed, streams, tau, mode, offset, relu)


@gated_copies.register_fake
def _(x, p_logits, seed, streams, tau, mode, offset, relu, backend):
    return stacked_empty_like(x, p_logits.shape[0])


@_op("gated_copies_backward")
def gated_copies_backward(grad: Tensor, x: Tensor, p_logits: Tensor, seed: int, streams: list[int], tau: float,
                          mode: str, offset: int, relu: bool, backend: str) -> tuple[Tensor, Tensor]:
    return implementation(backend, "gated_copies_backward")(grad, x, p_logits, seed, streams, tau, mode, offset, relu)


@gated_copies_backward.register_fake
def _(grad, x, p_logits, seed, streams, tau, mode, offset, relu, backend):
    return torch.empty_like(x), torch.empty_like(p_logits)


def _gated_copies_setup(ctx, inputs, output):
    x, p_logits, ctx.seed, ctx.streams, ctx.tau, ctx.mode, ctx.offset, ctx.relu, ctx.backend = inputs
    ctx.save_for_backward(x, p_logits)


def _gated_copies_grad(ctx, grad):
    x, p_logits = ctx.saved_tensors
    grad_x, grad_p = _backward(ctx, "gated_copies_backward", grad, x, p_logits, ctx.seed, ctx.streams, ctx.tau,
                               ctx.mode, ctx.offset, ctx.relu, ctx.backend)
    return grad_x, grad_p, None, None, None, None, None, None, None


_register_autograd(gated_copies, _gated_copies_grad, _gated_copies_setup)


# ---- branch_combine -------------------------------------------------------------------------------
@_op("branch_combine")
def branch_combine(
    ys: list[Tensor], weights: Tensor, skip: Tensor | None, backward_weights: Tensor | None, backend: str
) -> Tensor:
    return implementation(backend, "branch_combine")(ys, weights, skip)


@branch_combine.register_fake
def _(ys, weights, skip, backward_weights, backend):
    return torch.empty_like(ys[0])


@_op("branch_combine_backward")
def branch_combine_backward(
    grad: Tensor, ys: list[Tensor], weights: Tensor, backward_weights: Tensor | None, backend: str
) -> tuple[list[Tensor], Tensor]:
    return implementation(backend, "branch_combine_backward")(grad, ys, weights, backward_weights)


@branch_combine_backward.register_fake
def _(grad, ys, weights, backward_weights, backend):
    return [torch.empty_like(y) for y in ys], torch.empty_like(weights)


def _branch_combine_setup(ctx, inputs, output):
    ys, weights, skip, backward_weights, ctx.backend = inputs
    ctx.has_skip = skip is not None
    ctx.save_for_backward(weights, backward_weights, *ys)


def _branch_combine_grad(ctx, grad):
    weights, backward_weights, *ys = ctx.saved_tensors
    grad_ys, grad_weights = _backward(ctx, "branch_combine_backward", grad, ys, weights, backward_weights, ctx.backend)
    grad_skip = grad if ctx.has_skip else None
    return grad_ys, grad_weights, grad_skip, None, None


_register_autograd(branch_combine, _branch_combine_grad, _branch_combine_setup)


# ---- regularizer ----------------------------------------------------------------------------------
@_op("regularizer")
def regularizer(
    weights: list[Tensor], p_logits: list[Tensor], weight_reg: float, drop_reg: float, n_train: float, backend: str
) -> Tensor:
    return implementation(backend, "regularizer")(weights, p_logits, weight_reg, drop_reg, n_train)


@regularizer.register_fake
def _(weights, p_logits, weight_reg, drop_reg, n_train, backend):
    return p_logits[0].new_empty((), dtype=math_dtype(*p_logits))


# The whole-network backwards return flat gradients, one buffer per kind (every weight's, row-major in
# list order, in the weights' common dtype; every p_logit's / log alpha's in the math dtype), and the
# autograd formulas hand out views of them. A custom op may not return outputs that share storage, and
# one buffer keeps the GPU kernels free of a per-call table of gradient addresses: their tables then
# depend only on the parameters, stay cached, and a CUDA graph can capture the call.
def _flat_views(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    """Views of `flat` shaped as each tensor of `like` (cast where its dtype differs, for mixed lists)."""
    if isinstance(flat.shape[0], int) and all(t.dtype == flat.dtype for t in like):
        # torch's own C++ loop (DDP's bucket views): a third of the host time of views made in Python,
        # 0.2 against 0.6 ms for a 119-layer network's weights and drop logits; it needs concrete
        # sizes (tracing with symbolic shapes takes the Python loop)
        return list(_unflatten_dense_tensors(flat, like))
    parts = flat.split([t.numel() for t in like])
    return [part.view(t.shape) if part.dtype == t.dtype else part.view(t.shape).to(t.dtype)
            for part, t in zip(parts, like)]


def _numel(tensors: list[Tensor]) -> int:
    return sum(t.numel() for t in tensors)


@_op("regularizer_backward")
def regularizer_backward(
    grad: Tensor,
    weights: list[Tensor],
    p_logits: list[Tensor],
    weight_reg: float,
    drop_reg: float,
    n_train: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return implementation(backend, "regularizer_backward")(grad, weights, p_logits, weight_reg, drop_reg, n_train)


@regularizer_backward.register_fake
def _(grad, weights, p_logits, weight_reg, drop_reg, n_train, backend):
    return (weights[0].new_empty(_numel(weights), dtype=common_dtype(weights)),
            p_logits[0].new_empty(_numel(p_logits), dtype=math_dtype(*p_logits)))


def _regularizer_setup(ctx, inputs, output):
    weights, p_logits, ctx.weight_reg, ctx.drop_reg, ctx.n_train, ctx.backend = inputs
    ctx.n_tensors = len(weights)
    ctx.save_for_backward(*weights, *p_logits)


def _regularizer_eager_forward(ctx, weights, p_logits, weight_reg, drop_reg, n_train, backend):
    """R in eager mode with a gradient to come. Where the backend has `regularizer_with_grad` (the
    `cpu` backend), R and its gradients for an upstream gradient of 1 come from one read of the weights
    instead of two; the search adds R to its loss with weight 1, so backward then only hands them out.
    Same bits as the forward and the backward op. (A value that never reaches backward, e.g. one only
    logged, is best computed under torch.no_grad(): this path would write its gradients for nothing.)"""
    fused = own_implementation(backend, "regularizer_with_grad")
    if fused is None:
        return _body["regularizer"](weights, p_logits, weight_reg, drop_reg, n_train, backend)
    value, *ctx.unit_grads = fused(weights, p_logits, weight_reg, drop_reg, n_train)
    return value


def _regularizer_grad(ctx, grad):
    saved = ctx.saved_tensors
    weights, p_logits = list(saved[: ctx.n_tensors]), list(saved[ctx.n_tensors :])
    # handed out once: after a retain_graph backward autograd may have summed into them
    unit_grads, ctx.unit_grads = getattr(ctx, "unit_grads", None), None
    if unit_grads is not None and grad.item() == 1.0:  # only a cpu backend has them: no device sync
        grad_weights, grad_p_logits = unit_grads
    else:
        del unit_grads  # freed first, the cpu backend reuses their large buffer instead of mapping a new one
        grad_weights, grad_p_logits = _backward(
            ctx, "regularizer_backward", grad, weights, p_logits, ctx.weight_reg, ctx.drop_reg, ctx.n_train,
            ctx.backend
        )
    return _flat_views(grad_weights, weights), _flat_views(grad_p_logits, p_logits), None, None, None, None


_register_autograd(regularizer, _regularizer_grad, _regularizer_setup)
_eager_forward["regularizer"] = _regularizer_eager_forward


# ---- gaussian_noise (the Gaussian family's local-reparameterization epilogue) ----------------------
@_op("gaussian_noise")
def gaussian_noise(mu: Tensor, var: Tensor, seed: int, stream: int, offset: int, backend: str) -> Tensor:
    return implementation(backend, "gaussian_noise")(mu, var, seed, stream, offset)


@gaussian_noise.register_fake
def _(mu, var, seed, stream, offset, backend):
    return torch.empty_like(mu)


@_op("gaussian_noise_backward")
def gaussian_noise_backward(grad: Tensor, var: Tensor, seed: int, stream: int, offset: int, backend: str) -> Tensor:
    return implementation(backend, "gaussian_noise_backward")(grad, var, seed, stream, offset)


@gaussian_noise_backward.register_fake
def _(grad, var, seed, stream, offset, backend):
    return torch.empty_like(var)


def _gaussian_noise_setup(ctx, inputs, output):
    _, var, ctx.seed, ctx.stream, ctx.offset, ctx.backend = inputs
    ctx.save_for_backward(var)  # eps is regenerated in backward, never stored


def _gaussian_noise_grad(ctx, grad):
    (var,) = ctx.saved_tensors
    grad_var = _backward(ctx, "gaussian_noise_backward", grad, var, ctx.seed, ctx.stream, ctx.offset, ctx.backend)
    return grad, grad_var, None, None, None, None


_register_autograd(gaussian_noise, _gaussian_noise_grad, _gaussian_noise_setup)


# ---- gaussian_kl (the whole network's Molchanov KL) ------------------------------------------------
@_op("gaussian_kl")
def gaussian_kl(log_alphas: list[Tensor], weights_per_channel: list[int], n_train: float, backend: str) -> Tensor:
    return implementation(backend, "gaussian_kl")(log_alphas, weights_per_channel, n_train)


@gaussian_kl.register_fake
def _(log_alphas, weights_per_channel, n_train, backend):
    return log_alphas[0].new_empty((), dtype=math_dtype(*log_alphas))


@_op("gaussian_kl_backward")
def gaussian_kl_backward(
    grad: Tensor, log_alphas: list[Tensor], weights_per_channel: list[int], n_train: float, backend: str
) -> Tensor:
    return implementation(backend, "gaussian_kl_backward")(grad, log_alphas, weights_per_channel, n_train)


@gaussian_kl_backward.register_fake
def _(grad, log_alphas, weights_per_channel, n_train, backend):
    return log_alphas[0].new_empty(_numel(log_alphas), dtype=math_dtype(*log_alphas))


def _gaussian_kl_setup(ctx, inputs, output):
    log_alphas, ctx.weights_per_channel, ctx.n_train, ctx.backend = inputs
    ctx.save_for_backward(*log_alphas)


def _gaussian_kl_grad(ctx, grad):
    log_alphas = list(ctx.saved_tensors)
    flat = _backward(ctx, "gaussian_kl_backward", grad, log_alphas, ctx.weights_per_channel, ctx.n_train, ctx.backend)
    return _flat_views(flat, log_alphas), None, None, None


_register_autograd(gaussian_kl, _gaussian_kl_grad, _gaussian_kl_setup)
