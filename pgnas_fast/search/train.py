"""Posterior training: the super-network with relaxed gates, loss = mean cross-entropy + R, R the KL
term of the config's posterior family (concrete or gaussian, see pgnas_fast.nn), optionally warmed up.
The same loop trains one candidate alone (`masks`, search/standalone.py): its hard gates fixed, the
cross-entropy only, weight decay in the optimizer instead of R.

Nesterov SGD with the config's schedule per step (cosine down to lr_min, step decay at milestones, or
SGDR warm restarts: `learning_rate`), no weight decay (the regulariser replaces it),
optional gradient-norm clipping. Every random number is a function of (seed, epoch, step): the data
order and CIFAR's augmentation from the Philox streams of the epoch (data/augment.py), the gates and
shake weights from the Philox streams of the step, so a run resumed from an epoch checkpoint continues
exactly as if never stopped.

Data parallel (torchrun, see parallel.py): each rank trains on its rows of every global batch, with
the random numbers of those rows, and DDP averages the gradients: the step a single process takes on
the concatenated batch (BatchNorm statistics aside).
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ..nn import clip_log_alpha_, gated_layers, network_regularizer, set_gates, set_posterior, set_step_streams
from .parallel import SINGLE_PROCESS, Parallel, has_size_one_dims, shard_loss, stride_hint_off


def make_optimizer(model: nn.Module, config: dict, *, weight_decay: float | None = None) -> torch.optim.Optimizer:
    """Nesterov SGD. The posterior: no weight decay (the regulariser replaces it); the drop logits may
    take a larger step (`p_lr_scale`). A candidate trained alone (`weight_decay` given): the drop
    logits are not trained (its gates are fixed) and every other parameter decays by `weight_decay`."""
    p_logits = [layer.p_logit for _, layer in gated_layers(model)]
    chosen = {id(p) for p in p_logits}
    others = [p for p in model.parameters() if id(p) not in chosen]
    groups = [{"params": others, "lr_scale": 1.0}]
    if weight_decay is None:
        groups.append({"params": p_logits, "lr_scale": config["p_lr_scale"]})
    return torch.optim.SGD(groups, lr=config["lr"], momentum=config["momentum"],
                           nesterov=config["momentum"] > 0, weight_decay=weight_decay or 0.0)


def learning_rate(config: dict, step: int, steps_per_epoch: int) -> float:
    """The schedule's rate at a training step: cosine (per step, to lr_min), step (x gamma at each
    milestone epoch) or sgdr (cosine with warm restarts, periods sgdr_t0 * sgdr_tmul^i epochs)."""
    lr, lr_min = config["lr"], config["lr_min"]
    epoch = step / steps_per_epoch  # fractional
    if config["schedule"] == "step":
        return lr * config["gamma"] ** sum(epoch >= m for m in config["milestones"])
    if config["schedule"] == "sgdr":
        period, start = config["sgdr_t0"], 0
        while epoch >= start + period:
            start, period = start + period, period * config["sgdr_tmul"]
        fraction = (epoch - start) / period
    else:
        fraction = step / (config["epochs"] * steps_per_epoch)
    return lr_min + 0.5 * (lr - lr_min) * (1.0 + math.cos(math.pi * fraction))


def regularizer_weight(config: dict, step: int, steps_per_epoch: int) -> float:
    """The KL warm-up: R's weight in the loss at a training step, linear per step from 0 at step 0 to
    1 after kl_warmup_epochs epochs (1 throughout when kl_warmup_epochs is 0)."""
    warmup_steps = config["kl_warmup_epochs"] * steps_per_epoch
    return min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0


def mean_drop_probability(model: nn.Module) -> float:
    """Mean p over every gated input channel (a group's p counted once per channel of it)."""
    with torch.no_grad():
        ps = [torch.sigmoid(layer.drop_logit_per_channel()) for _, layer in gated_layers(model)]
        return torch.cat(ps).mean().item()


def mean_drop_probability_per_layer(model: nn.Module) -> dict[str, float]:
    """Each gated layer's mean p over its input channels, as mean_drop_probability counts them."""
    with torch.no_grad():
        return {name: torch.sigmoid(layer.drop_logit_per_channel()).mean().item()
                for name, layer in gated_layers(model)}


def _forward_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: dict, amp: bool):
    """(logits, the mean cross-entropy of the logits, the auxiliary head's weighted by aux_weight or None).
    ENAS cells return (logits, aux) in training; the objective adds both."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        out = model(x)
    logits, aux = out if isinstance(out, tuple) else (out, None)
    ce = F.cross_entropy(logits.float(), y)
    aux_ce = (config["aux_weight"] * F.cross_entropy(aux.float(), y) if aux is not None and config["aux_weight"] > 0
              else None)
    return logits, ce, aux_ce


def train_posterior(model: nn.Module, optimizer: torch.optim.Optimizer, feed, config: dict, *, seed: int,
                    start_epoch: int = 0, n_train: float, on_epoch_end: Callable[[int, dict], None] | None = None,
                    progress: bool = True, parallel: Parallel = SINGLE_PROCESS,
                    masks: Mapping[str, torch.Tensor] | None = None) -> None:
    """Train from `start_epoch` to config['epochs'] on `feed` (see feed.py); `on_epoch_end(epoch,
    stats)` checkpoints (called on every rank; the stats are the whole batch's). bf16 autocast
    (config amp) applies on CUDA only; the regulariser and the loss stay in float32. The logged `loss`
    is the full objective CE + R (comparable across epochs, so the best checkpoint too), whatever R's
    warm-up weight in the step's gradient; with an auxiliary head it adds that head's weighted CE
    (logged apart as `aux_cross_entropy`; `cross_entropy` is the network's own logits').

    `masks` (a candidate's hard keep masks, candidate_masks): train that candidate alone, its gates
    fixed; the objective has no R (the optimizer's weight decay, make_optimizer, stands for it), the
    drop logits are frozen (requires_grad off), and the stats have no regulariser or drop probabilities."""
    set_posterior(model, config["posterior"])
    candidate = masks is not None
    if candidate:
        set_gates(model, "hard", masks=masks)
        for _, layer in gated_layers(model):  # (frozen: data parallel expects a gradient for every trained one)
            layer.p_logit.requires_grad_(False)
    steps_per_epoch = feed.steps_per_epoch()
    amp = config["amp"] == "bf16" and feed.device.type == "cuda"
    memory_format = torch.channels_last if config["channels_last"] else torch.contiguous_format
    # what the forward calls; an auxiliary head outside the loss (aux_weight 0) gets no gradient
    net = parallel.wrap(model, feed.device, sync_bn=config["sync_bn"],
                        unused_parameters=getattr(model, "aux", None) is not None and config["aux_weight"] == 0)
    quiet_strides = parallel.enabled and has_size_one_dims(model)
    bar = tqdm(range(start_epoch, config["epochs"]), desc="candidate training" if candidate else "posterior training",
               unit="epoch", disable=not (progress and parallel.is_main), dynamic_ncols=True, initial=start_epoch,
               total=config["epochs"])
    for epoch in bar:
        model.train()
        started = time.perf_counter()
        # running sums (loss, CE, R, correct, rows, auxiliary CE) stay on the device: one host sync per
        # epoch, not per step; summed over the ranks at the epoch's end
        sums = torch.zeros(6, dtype=torch.float64, device=feed.device)
        for i, (x, y, first_row, global_rows) in enumerate(feed.train_shards(epoch, seed, parallel)):
            step = epoch * steps_per_epoch + i
            lr = learning_rate(config, step, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            # the last step's gradients go before this step's are made: a lower peak, and the cpu
            # regulariser's large gradient buffer is free to be reused (csrc/cpu/ops.cpp)
            optimizer.zero_grad(set_to_none=True)
            if candidate:  # (the gates stay; shake-shake and drop-path draw the step's numbers)
                set_step_streams(model, seed=seed, step=step, row_offset=first_row)
            else:
                set_gates(model, "relaxed", seed=seed, step=step, row_offset=first_row)
            if hasattr(model, "set_drop_path_progress"):  # ENAS cells: drop-path ramps up over training
                model.set_drop_path_progress(min(1.0, (step + 1) / (config["epochs"] * steps_per_epoch)))
            if x.dim() == 4:
                x = x.contiguous(memory_format=memory_format)
            logits, ce, aux_ce = _forward_loss(net, x, y, config, amp)
            reg = (ce.new_zeros(()) if candidate else
                   network_regularizer(model, weight_reg=config["weight_reg"], drop_reg=config["drop_reg"],
                                       n_train=n_train))
            objective = ce if aux_ce is None else ce + aux_ce
            loss = objective + reg
            reg_weight = 0.0 if candidate else regularizer_weight(config, step, steps_per_epoch)
            with stride_hint_off() if quiet_strides else contextlib.nullcontext():
                (shard_loss(objective, len(y), global_rows, parallel.world) + reg_weight * reg).backward()
            if config["grad_clip"] > 0:
                nn.utils.clip_grad_norm_(model.parameters(), config["grad_clip"])
            optimizer.step()
            if not candidate:
                clip_log_alpha_(model)
            n = len(y)
            sums[:4] += torch.stack([loss.detach() * n, ce.detach() * n, reg.detach() * n,
                                     (logits.argmax(1) == y).sum()]).to(sums.dtype)
            sums[4] += n  # a scalar argument: a tensor made from n would be a synchronising copy
            if aux_ce is not None:
                sums[5] += aux_ce.detach() * n
        loss_sum, ce_sum, reg_sum, correct, seen, aux_sum = parallel.sum(sums).tolist()
        seconds = time.perf_counter() - started
        stats = {"epoch": epoch + 1, "loss": loss_sum / seen, "cross_entropy": ce_sum / seen,
                 "train_accuracy": correct / seen, "lr": lr, "images_per_second": seen / seconds, "seconds": seconds}
        if not candidate:  # (a candidate's architecture is fixed: no regulariser, no p moving)
            stats.update({"regularizer": reg_sum / seen, "regularizer_weight": reg_weight,
                          "mean_p": mean_drop_probability(model),
                          "mean_p_per_layer": mean_drop_probability_per_layer(model)})
        if getattr(model, "aux", None) is not None and config["aux_weight"] > 0:  # (in the objective)
            stats["aux_cross_entropy"] = aux_sum / seen
        bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['train_accuracy']:.3f}",
                        **({} if candidate else {"mean_p": f"{stats['mean_p']:.3f}"}))
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, stats)
