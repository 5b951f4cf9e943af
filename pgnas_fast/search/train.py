"""Posterior training: the super-network with relaxed gates, loss = mean cross-entropy + R.

Nesterov SGD, cosine learning rate per step down to 0, no weight decay (the regulariser replaces it),
optional gradient-norm clipping. Every random number is a function of (seed, epoch, step): the data
order from a generator seeded per epoch, the gates and shake weights from the Philox streams of the
step, so a run resumed from an epoch checkpoint continues exactly as if never stopped.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ..nn import gated_layers, network_regularizer, set_gates

_GOLDEN = 0x9E3779B97F4A7C15


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The example order of one epoch, a function of (seed, epoch) alone."""
    generator = torch.Generator().manual_seed((seed + (epoch + 1) * _GOLDEN) % (1 << 63))
    return torch.randperm(n, generator=generator)


def make_optimizer(model: nn.Module, config: dict) -> torch.optim.Optimizer:
    """Nesterov SGD without weight decay; the drop logits may take a larger step (`p_lr_scale`)."""
    p_logits = [layer.p_logit for _, layer in gated_layers(model)]
    chosen = {id(p) for p in p_logits}
    others = [p for p in model.parameters() if id(p) not in chosen]
    groups = [{"params": others, "lr_scale": 1.0}, {"params": p_logits, "lr_scale": config["p_lr_scale"]}]
    return torch.optim.SGD(groups, lr=config["lr"], momentum=config["momentum"],
                           nesterov=config["momentum"] > 0, weight_decay=0.0)


def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * step / total_steps))


def mean_drop_probability(model: nn.Module) -> float:
    """Mean p over every gated input channel."""
    with torch.no_grad():
        ps = [torch.sigmoid(layer.p_logit_per_channel()) for _, layer in gated_layers(model)]
        return torch.cat(ps).mean().item()


def train_posterior(model: nn.Module, optimizer: torch.optim.Optimizer, train: tuple[torch.Tensor, torch.Tensor],
                    config: dict, *, seed: int, start_epoch: int = 0, n_train: float,
                    on_epoch_end: Callable[[int, dict], None] | None = None, progress: bool = True) -> None:
    """Train from `start_epoch` to config['epochs']; `on_epoch_end(epoch, stats)` checkpoints."""
    images, labels = train
    batch_size = config["batch_size"]
    steps_per_epoch = math.ceil(len(labels) / batch_size)
    total_steps = config["epochs"] * steps_per_epoch
    bar = tqdm(range(start_epoch, config["epochs"]), desc="posterior training", unit="epoch",
               disable=not progress, dynamic_ncols=True, initial=start_epoch, total=config["epochs"])
    for epoch in bar:
        model.train()
        order = epoch_order(seed, epoch, len(labels))
        loss_sum = correct = seen = 0.0
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            idx = order[i * batch_size:(i + 1) * batch_size]
            x, y = images[idx], labels[idx]
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(config["lr"] * group["lr_scale"], step, total_steps)
            set_gates(model, "relaxed", seed=seed, step=step)
            logits = model(x)
            loss = F.cross_entropy(logits, y) + network_regularizer(
                model, weight_reg=config["weight_reg"], drop_reg=config["drop_reg"], n_train=n_train)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config["grad_clip"] > 0:
                nn.utils.clip_grad_norm_(model.parameters(), config["grad_clip"])
            optimizer.step()
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
        stats = {"epoch": epoch + 1, "loss": loss_sum / seen, "train_accuracy": correct / seen,
                 "mean_p": mean_drop_probability(model)}
        bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['train_accuracy']:.3f}",
                        mean_p=f"{stats['mean_p']:.3f}")
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, stats)
