"""The feeds (search/feed.py): each epoch's order from (seed, epoch), the rows a data-parallel shard
names, the BatchNorm-rows probe leaving no hook behind, and the recalibration samples."""
from __future__ import annotations

import pytest
import torch

from pgnas_fast import configs
from pgnas_fast.data import Splits, epoch_order
from pgnas_fast.search.feed import TensorFeed, check_batchnorm_rows, checked_recalibration_images
from pgnas_fast.search.parallel import Parallel


def _splits(n: int = 20, seed: int = 0) -> Splits:
    gen = torch.Generator().manual_seed(seed)
    images, labels = torch.randn(n, 2, 4, 4, generator=gen), torch.randint(0, 3, (n,), generator=gen)
    return Splits(train=(images, labels), heldout=(images[:4], labels[:4]), test=(images[:4], labels[:4]),
                  num_classes=3)


def test_tensor_feed_orders_each_epoch_from_seed_and_epoch():
    """Mutant: the order drawn from (seed, 0) whatever the epoch, every epoch the same batches."""
    splits = _splits()
    feed = TensorFeed(splits, batch_size=8, eval_batch_size=8, device="cpu")
    for epoch in (0, 1, 2):
        labels = torch.cat([y for _, y in feed.train_batches(epoch, seed=3)])
        assert torch.equal(labels, splits.train[1][epoch_order(3, epoch, 20)])
    assert not torch.equal(torch.cat([x for x, _ in feed.train_batches(1, 3)]),
                           torch.cat([x for x, _ in feed.train_batches(2, 3)]))


def test_batchnorm_rows_probe_leaves_no_hook_behind():
    """Mutant: the forward pre-hooks stay registered (each later forward records into a dead dict)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(12, 2), torch.nn.BatchNorm1d(2))
    check_batchnorm_rows(model, (2, 4, 4), [4, 3], Parallel())
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_recalibration_may_read_every_training_image():
    """The first n training images as model inputs (prepare_eval applied), n up to the whole split.
    Mutants: `n >= available` refused N = the training split's size; prepare_eval skipped."""
    splits = _splits()
    feed = TensorFeed(splits, batch_size=8, eval_batch_size=8, device="cpu", prepare_eval=lambda x: 2 * x)
    assert torch.equal(checked_recalibration_images(feed, 20), 2 * splits.train[0])
    with pytest.raises(configs.ConfigError, match="--bn-recalibrate 21 asks for more images than the run's 20"):
        checked_recalibration_images(feed, 21)


class _FakeImageNetLoader:
    """imagenet_loader's stand-in: zeros and the labels of the sampler's indices (all files in order
    without one), in batches of `batch_size`, the last partial batch dropped."""

    def __init__(self, files, labels, *, batch_size, sampler=None, **kwargs):
        self.labels, self.batch_size = torch.as_tensor(labels), batch_size
        self.sampler = sampler if sampler is not None else range(len(files))

    def set_epoch(self, epoch):
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self):
        return len(self.sampler) // self.batch_size

    def __iter__(self):
        indices = list(self.sampler)
        for i in range(len(self)):
            rows = indices[i * self.batch_size:(i + 1) * self.batch_size]
            yield torch.zeros(len(rows), 3, 4, 4), self.labels[rows]


def _imagenet_feed(monkeypatch, *, seed=0, parallel=None):
    from types import SimpleNamespace

    from pgnas_fast.search import feed as feed_module

    monkeypatch.setattr(feed_module, "imagenet_loader", _FakeImageNetLoader)
    index = SimpleNamespace(num_classes=5, classes=list("abcde"),
                            train=([f"f{i}" for i in range(40)], torch.arange(40)))
    return feed_module.LoaderFeed(index, seed=seed, batch_size=8, eval_batch_size=8, device=torch.device("cpu"),
                                  workers=0, channels_last=False, input_size=4, parallel=parallel or Parallel())


def test_imagenet_evaluation_resizes_by_256_over_224(monkeypatch):
    """The standard evaluation transform: resize the short side to 256/224 of the crop, centre crop."""
    from types import SimpleNamespace

    from pgnas_fast.search import feed as feed_module

    index = SimpleNamespace(num_classes=5, classes=list("abcde"),
                            train=([f"f{i}" for i in range(40)], torch.arange(40)))
    for size, resize in ((224, 256), (128, 146), (4, 5)):
        feed = feed_module.LoaderFeed(index, seed=0, batch_size=8, eval_batch_size=8, device=torch.device("cpu"),
                                      workers=0, channels_last=False, input_size=size, parallel=Parallel())
        assert (feed.loader_args["size"], feed.loader_args["resize"]) == (size, resize)


def test_imagenet_shards_name_their_first_row_of_the_global_batch(monkeypatch):
    """Mutant: every rank's shard said it starts at row 0 (rank r > 0 would draw rank 0's gates)."""
    order = epoch_order(0, 3, 40)  # the epoch's shuffle
    for rank in range(4):
        parallel = Parallel(rank, 4)
        shards = list(_imagenet_feed(monkeypatch, parallel=parallel).train_shards(3, 0, parallel))
        assert [(len(y), first, rows) for _, y, first, rows in shards] == [(2, 2 * rank, 8)] * 5, rank
        for b, (_, y, first, _) in enumerate(shards):  # the stand-in's labels are the file indices
            assert torch.equal(y, order[8 * b + first:8 * b + first + 2])


def test_imagenet_recalibration_sample_follows_the_run_s_seed(monkeypatch):
    """Mutant: the sample drawn with seed 0 whatever the run's seed."""
    from pgnas_fast.search import feed as feed_module

    picks = set()
    for seed in (0, 1, 2):
        feed = _imagenet_feed(monkeypatch, seed=seed)
        # a stand-in loader whose images are the files' labels, here the files' indices
        monkeypatch.setattr(feed_module, "imagenet_loader",
                            lambda files, labels, **kwargs: [(torch.as_tensor(labels)[:, None], labels)])
        drawn = feed.recalibration_images(6).flatten().tolist()
        assert drawn == torch.randperm(40, generator=torch.Generator().manual_seed(seed))[:6].tolist()
        picks.add(tuple(drawn))
    assert len(picks) == 3
