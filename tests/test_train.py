"""The posterior-training loop's wiring (pgnas_fast/search/train.py), on a tiny gated network: the
optimizer's groups, the KL warm-up reaching the gradient, clipping, train mode, the auxiliary loss
weight, drop-path progress and the logged statistics. The end-to-end search and its schedules are in
test_search.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pgnas_fast import configs
from pgnas_fast.data import Splits
from pgnas_fast.nn import GatedConv2d, GatedLinear, gated_layers
from pgnas_fast.search.feed import TensorFeed
from pgnas_fast.search.train import _forward_loss, make_optimizer, train_posterior


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = GatedConv2d(2, 4, 3, padding=1, p_init=0.3)
        self.head = GatedLinear(4, 3, p_init=0.2)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def tiny_feed(n=16, batch=16):
    gen = torch.Generator().manual_seed(5)
    images, labels = torch.randn(n, 2, 5, 5, generator=gen), torch.randint(0, 3, (n,), generator=gen)
    splits = Splits(train=(images, labels), heldout=(images[:4], labels[:4]), test=(images[:4], labels[:4]),
                    num_classes=3)
    return TensorFeed(splits, batch_size=batch, eval_batch_size=8, device=torch.device("cpu"))


def train(overrides, model=None, feed=None):
    """One epoch (unless overridden) of the digits preset's training on `model` (default TinyNet)."""
    config = configs.resolve("digits-tiny", {"epochs": 1, "threads": 1, **overrides})
    torch.manual_seed(0)
    model = model or TinyNet()
    feed = feed or tiny_feed()
    optimizer = make_optimizer(model, config)
    stats = []
    train_posterior(model, optimizer, feed, config, seed=3, n_train=feed.n_train, progress=False,
                    on_epoch_end=lambda epoch, row: stats.append(row))
    return model, optimizer, stats


def test_optimizer_groups_nesterov_without_weight_decay_and_a_larger_step_for_the_logits():
    config = configs.resolve("digits-tiny", {"p_lr_scale": 30.0, "momentum": 0.9})
    model = TinyNet()
    others, logits = make_optimizer(model, config).param_groups
    assert {id(p) for p in logits["params"]} == {id(layer.p_logit) for _, layer in gated_layers(model)}
    assert logits["lr_scale"] == 30.0 and others["lr_scale"] == 1.0
    assert all(group["nesterov"] and group["weight_decay"] == 0 for group in (others, logits))
    _, optimizer, _ = train({"p_lr_scale": 30.0}, model=model)
    assert optimizer.param_groups[1]["lr"] == pytest.approx(30 * optimizer.param_groups[0]["lr"])


def test_the_kl_warm_up_weights_the_gradient():
    """At step 0 of a warm-up R's weight is 0: the step equals one without any regulariser."""
    warm, _, _ = train({"kl_warmup_epochs": 1, "weight_reg": 50.0})
    plain, _, _ = train({"kl_warmup_epochs": 0, "weight_reg": 0.0, "drop_reg": 0.0})
    without_warm_up, _, _ = train({"kl_warmup_epochs": 0, "weight_reg": 50.0})
    for name, value in warm.state_dict().items():
        torch.testing.assert_close(value, plain.state_dict()[name], msg=name)
    assert not torch.equal(warm.conv.p_logit, without_warm_up.conv.p_logit)  # R does move p without warm-up


def test_gradients_are_clipped_by_their_global_norm():
    torch.manual_seed(0)
    before = {name: value.clone() for name, value in TinyNet().state_dict().items()}
    model, _, _ = train({"grad_clip": 1e-3, "momentum": 0.0, "lr": 1.0, "lr_min": 1.0, "p_lr_scale": 1.0})
    step = torch.cat([(value - before[name]).flatten() for name, value in model.state_dict().items()])
    assert step.norm().item() == pytest.approx(1e-3, rel=1e-4)


def test_training_puts_the_model_in_train_mode():
    model = nn.Sequential(GatedConv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), GatedLinear(4, 3)).eval()
    train({}, model=model)
    assert model.training and model[1].num_batches_tracked.item() == 1


def test_the_auxiliary_head_loss_is_weighted():
    class WithAux(nn.Module):
        def forward(self, x):
            return x, 2 * x

    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    _, ce, aux = _forward_loss(WithAux(), x, y, {"aux_weight": 0.4}, False)
    assert ce.item() == pytest.approx(F.cross_entropy(x, y).item())  # (the logits' own, logged as such)
    assert aux.item() == pytest.approx(0.4 * F.cross_entropy(2 * x, y).item())
    assert _forward_loss(WithAux(), x, y, {"aux_weight": 0.0}, False)[2] is None  # (not in the objective)


def test_drop_path_progress_reaches_one_at_the_last_step():
    seen = []

    class Recording(TinyNet):
        def set_drop_path_progress(self, progress):
            seen.append(progress)

    train({"epochs": 2}, model=Recording(), feed=tiny_feed(n=16, batch=8))
    assert seen == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_logged_statistics_are_what_they_say():
    """train_accuracy is the fraction right over the epoch; mean_p_per_layer is each layer's mean drop
    probability over its input channels, as mean_p counts them (a group of 3 channels weighs 3, not 1)."""
    model = TinyNet()
    model.head = GatedLinear(4, 3, gate_groups=[1, 3], p_init=0.2)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([100.0, 0.0, 0.0]))  # class 0 always, even after a small step
        model.head.p_logit.copy_(torch.tensor([2.0, -3.0]))
    feed = tiny_feed(n=16, batch=8)
    _, _, stats = train({}, model=model, feed=feed)
    assert stats[0]["train_accuracy"] == (feed.splits["train"][1] == 0).float().mean().item()
    for name, layer in gated_layers(model):
        channel_p = torch.sigmoid(layer.p_logit.repeat_interleave(torch.tensor(layer.gate_group_sizes)))
        assert stats[0]["mean_p_per_layer"][name] == pytest.approx(channel_p.mean().item())
    channels = torch.cat([torch.sigmoid(layer.p_logit).repeat_interleave(torch.tensor(layer.gate_group_sizes))
                          for _, layer in gated_layers(model)])
    assert stats[0]["mean_p"] == pytest.approx(channels.mean().item())


def test_gaussian_training_puts_log_alpha_back_inside_its_clip():
    """The forward reads log alpha clipped to +-8 (no gradient beyond): training clips the parameter
    after every step, so a logit past the limit trains again from it; the logged p is the clipped one."""
    model = TinyNet()
    with torch.no_grad():
        model.conv.p_logit.fill_(20.0)
        model.head.p_logit.fill_(-20.0)
    _, _, stats = train({"posterior": "gaussian", "n_train": 16.0, "kl_warmup_epochs": 0}, model=model,
                        feed=tiny_feed(n=32, batch=8))
    for _, layer in gated_layers(model):
        assert layer.p_logit.abs().max().item() <= 8.0
    assert (model.head.p_logit > -8.0).all()  # the KL pulls a low log alpha up, once it has a gradient again
    assert stats[0]["mean_p_per_layer"]["conv"] == pytest.approx(torch.sigmoid(model.conv.p_logit).mean().item())
