"""The data layer, as a specification: CIFAR and ImageNet loaders on fixtures written in the standard
layouts, the held-out carve, the batched CIFAR augmentation and the ImageNet transforms."""
from __future__ import annotations

import os
import pickle
import re
import shutil

import numpy as np
import pytest
import torch
from data_fixtures import write_cifar10, write_cifar100, write_imagenet

from pgnas_fast.data import (
    CIFAR_LAYOUTS,
    CIFAR_STATS,
    CIFAR_URL,
    IMAGENET_MEAN,
    IMAGENET_STD,
    IMAGENET_URL,
    CifarTrainSet,
    DataError,
    Splits,
    ImageFolderDataset,
    augment_batch,
    augmentation_draws,
    carve_heldout,
    cifar_train_loader,
    cutout,
    epoch_order,
    imagenet_loader,
    load_cifar,
    load_imagenet_index,
    mirror,
    normalize,
    padded_crop,
)
from pgnas_fast.data.augment import DRAWS
from pgnas_fast.data.uniforms import uniform_index
from pgnas_fast.data.imagenet import load_eval_image, load_train_image, random_resized_crop_box

CIFAR10_LAYOUT = ("cifar-10-batches-py", "data_batch_1", "data_batch_5", "test_batch", CIFAR_URL)
CIFAR100_LAYOUT = ("cifar-100-python", "train", "test", CIFAR_URL)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory):
    root = tmp_path_factory.mktemp("c10")
    return root, write_cifar10(root)


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("inet")
    return root, write_imagenet(root)


# ---- the held-out carve ----


def test_carve_heldout_is_stratified_disjoint_and_seeded():
    labels = np.random.default_rng(1).integers(0, 7, 1000)
    train, heldout = carve_heldout(labels, 100, seed=3)
    assert len(heldout) == 100 and len(train) == 900
    assert np.array_equal(np.sort(np.concatenate([train, heldout])), np.arange(1000))
    expected = np.bincount(labels) * 100 / 1000
    assert np.all(np.abs(np.bincount(labels[heldout], minlength=7) - expected) < 1)
    assert np.array_equal(carve_heldout(labels, 100, seed=3)[1], heldout)
    assert not np.array_equal(carve_heldout(labels, 100, seed=4)[1], heldout)
    assert len(carve_heldout(labels, 0, seed=0)[1]) == 0
    with pytest.raises(ValueError):
        carve_heldout(labels, 1000, seed=0)


def test_carve_heldout_gives_the_leftovers_to_the_largest_remainders():
    """Class counts [6, 3, 1], 3 held out: quotas 1.8, 0.9, 0.3 floor to [1, 0, 0]; the 2 left over go to
    the remainders 0.9 and 0.8, so [2, 1, 0] whatever the seed ("proportional within one" also admits
    [2, 0, 1])."""
    labels = np.array([0] * 6 + [1] * 3 + [2])
    for seed in range(6):
        _, heldout = carve_heldout(labels, 3, seed=seed)
        assert np.bincount(labels[heldout], minlength=3).tolist() == [2, 1, 0], seed


def test_stratified_splits_seed_both_of_their_draws(monkeypatch):
    """The test split and the held-out split (drawn from the rest) both follow the seed: split_seed
    picks a digits search's held-out set as well as its test set."""
    import sklearn.model_selection

    from pgnas_fast.data.splits import stratified_splits

    real, seeds = sklearn.model_selection.train_test_split, []

    def recording(*arrays, **kwargs):
        seeds.append(kwargs["random_state"])
        return real(*arrays, **kwargs)

    monkeypatch.setattr(sklearn.model_selection, "train_test_split", recording)
    labels = np.random.default_rng(0).integers(0, 4, 200)
    stratified_splits(labels, test=40, heldout=30, seed=7)
    assert seeds == [7, 7]


def test_the_data_fingerprint_reads_the_pixels_as_well_as_the_labels():
    """Same labels, other pixels: another data set, which a resume or a `rank --data-dir` must refuse."""
    from pgnas_fast.search.run import data_fingerprint

    generator = torch.Generator().manual_seed(0)

    def splits(shift):
        part = lambda n: (torch.rand(n, 3, 4, 4, generator=generator) + shift, torch.arange(n) % 3)  # noqa: E731
        return Splits(train=part(200), heldout=part(40), test=part(40), num_classes=3)

    generator.manual_seed(0)
    a = data_fingerprint(splits(0.0))
    generator.manual_seed(0)
    assert data_fingerprint(splits(0.0)) == a
    generator.manual_seed(0)
    assert data_fingerprint(splits(1.0)) != a


# ---- CIFAR loaders ----


def test_load_cifar10_reads_what_was_written(cifar10):
    root, written = cifar10
    splits = load_cifar(root, num_classes=10, heldout=50, split_seed=0)
    train_idx, heldout_idx = carve_heldout(written["train_labels"], 50, 0)
    images = written["train_data"].reshape(-1, 3, 32, 32)
    for (x, y), idx in ((splits.train, train_idx), (splits.heldout, heldout_idx)):
        assert x.dtype == torch.uint8 and y.dtype == torch.int64 and x.shape[1:] == (3, 32, 32)
        assert np.array_equal(x.numpy(), images[idx]) and np.array_equal(y.numpy(), written["train_labels"][idx])
    x, y = splits.test
    assert np.array_equal(x.numpy(), written["test_data"].reshape(-1, 3, 32, 32))
    assert np.array_equal(y.numpy(), written["test_labels"])
    assert splits.num_classes == 10 and splits.sizes() == {"train": 350, "heldout": 50, "test": 60}
    assert splits.classes == [f"class{i}" for i in range(10)]  # batches.meta's label_names
    # Row layout: the first 1024 bytes are the red plane, row-major.
    assert np.array_equal(splits.test[0][0, 0].flatten().numpy(), written["test_data"][0, :1024])


@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_splits_say_how_their_images_become_the_network_s_input(tmp_path, num_classes):
    """Splits.inputs (what an export records for users of its network): (pixels * scale - mean) / std per
    channel is the evaluation feed's normalisation of the stored uint8 images."""
    from pgnas_fast.data import normalize

    (write_cifar10 if num_classes == 10 else write_cifar100)(tmp_path)
    splits = load_cifar(tmp_path, num_classes=num_classes, heldout=100, split_seed=0)
    recipe = splits.inputs
    assert recipe["pixels"].startswith("uint8 RGB, 32x32") and recipe["scale"] == 1 / 255
    assert (recipe["mean"], recipe["std"]) == tuple(list(stats) for stats in CIFAR_STATS[num_classes])
    images = splits.test[0]
    mean, std = (torch.tensor(recipe[key]).view(1, 3, 1, 1) for key in ("mean", "std"))
    expected = normalize(images, *CIFAR_STATS[num_classes])
    torch.testing.assert_close((images.float() * recipe["scale"] - mean) / std, expected, rtol=1e-5, atol=1e-5)


def test_load_cifar100_uses_fine_labels(tmp_path):
    written = write_cifar100(tmp_path)
    splits = load_cifar(tmp_path, num_classes=100, heldout=100, split_seed=1)
    assert splits.num_classes == 100 and splits.sizes() == {"train": 200, "heldout": 100, "test": 100}
    assert np.array_equal(splits.test[1].numpy(), written["test_labels"])  # fine, not coarse
    assert np.array_equal(splits.test[0].numpy(), written["test_data"].reshape(-1, 3, 32, 32))
    # Three images per class: the 100 held-out ones are one per class.
    assert np.array_equal(np.bincount(splits.heldout[1].numpy(), minlength=100), np.ones(100))
    assert splits.classes == [f"fine{i}" for i in range(100)]  # meta's fine_label_names


@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_without_its_meta_file_has_unnamed_classes(tmp_path, num_classes):
    (write_cifar10 if num_classes == 10 else write_cifar100)(tmp_path)
    layout = CIFAR_LAYOUTS[num_classes]
    (tmp_path / layout.folder / layout.meta_file).unlink()
    splits = load_cifar(tmp_path, num_classes=num_classes, heldout=100)
    assert splits.classes is None and splits.num_classes == num_classes


def test_cifar_splits_are_disjoint_stratified_and_seeded(cifar10):
    root, _ = cifar10
    a = load_cifar(root, heldout=100, split_seed=7)
    b = load_cifar(root, heldout=100, split_seed=7)
    c = load_cifar(root, heldout=100, split_seed=8)
    assert torch.equal(a.heldout[0], b.heldout[0]) and torch.equal(a.train[1], b.train[1])
    assert not torch.equal(a.heldout[0], c.heldout[0])
    # Random uint8 images are unique, so disjointness shows in the pixels.
    rows = {bytes(img.numpy().tobytes()) for img in a.train[0]}
    assert len(rows) == 300 and not rows & {bytes(img.numpy().tobytes()) for img in a.heldout[0]}
    assert torch.equal(torch.bincount(a.heldout[1], minlength=10), torch.full((10,), 10))


def test_cifar_accepts_the_batch_folder_itself_and_a_device(cifar10):
    root, _ = cifar10
    direct = load_cifar(root / "cifar-10-batches-py", heldout=50, device=torch.device("cpu"))
    assert torch.equal(direct.test[0], load_cifar(root, heldout=50).test[0])
    assert direct.train[0].device.type == "cpu"


def test_cifar_rejects_bad_arguments(cifar10):
    root, _ = cifar10
    with pytest.raises(ValueError, match="10 or 100"):
        load_cifar(root, num_classes=20)
    with pytest.raises(DataError, match="heldout_size=400 must be below 400: CIFAR-10 under .* has 400 training"):
        load_cifar(root, heldout=400)


def _read(path):
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _rewrite(path, **changes):
    """Rewrite a batch dict with some keys replaced (value None: key dropped)."""
    batch = _read(path)
    for key, value in changes.items():
        batch.pop(key.encode())
        if value is not None:
            batch[key.encode()] = value
    path.write_bytes(pickle.dumps(batch, protocol=2))


class _Exploit:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def _packed(root):
    shutil.rmtree(root / "cifar-10-batches-py")
    (root / "cifar-10-python.tar.gz").write_bytes(b"x")


def _batch(root, name):
    return root / "cifar-10-batches-py" / name


# case: (how to break a written CIFAR-10 tree under root, what the message says about it)
BROKEN_CIFAR = {
    "missing data dir": (shutil.rmtree, "does not exist"),
    "missing folder": (lambda root: shutil.rmtree(root / "cifar-10-batches-py"), "cifar-10-batches-py does not exist"),
    "still packed": (_packed, "tar xzf"),
    "missing batch file": (lambda root: _batch(root, "data_batch_3").unlink(), "missing file"),
    "corrupt pickle": (lambda root: _batch(root, "data_batch_2").write_bytes(b"not a pickle"), "not a readable CIFAR"),
    "truncated pickle": (
        lambda root: _batch(root, "test_batch").write_bytes(_batch(root, "test_batch").read_bytes()[:500]),
        "not a readable CIFAR",
    ),
    "foreign object": (
        lambda root: _batch(root, "data_batch_1").write_bytes(pickle.dumps(_Exploit())),
        "refusing to load builtins.print",
    ),
    "not a dict": (lambda root: _batch(root, "data_batch_1").write_bytes(pickle.dumps([1, 2])), "expected a dict"),
    "missing labels": (lambda root: _rewrite(_batch(root, "data_batch_4"), labels=None), "expected a dict"),
    "wrong array shape": (
        lambda root: _rewrite(_batch(root, "data_batch_1"), data=np.zeros((80, 3000), np.uint8)),
        "expected uint8 [N, 3072]",
    ),
    "wrong dtype": (
        lambda root: _rewrite(_batch(root, "data_batch_1"), data=np.zeros((80, 3072), np.float32)),
        "expected uint8 [N, 3072]",
    ),
    "label count": (lambda root: _rewrite(_batch(root, "data_batch_5"), labels=[0] * 79), "80 images but"),
    "label range": (lambda root: _rewrite(_batch(root, "test_batch"), labels=[10] * 60), "labels span"),
    "fractional label": (lambda root: _rewrite(_batch(root, "data_batch_5"), labels=[0] * 79 + [2.5]),
                         "b'labels' is not a list of integers"),
    "string labels": (lambda root: _rewrite(_batch(root, "data_batch_5"), labels=["cat"] * 80),
                      "b'labels' is not a list of integers"),
    "corrupt meta": (lambda root: _batch(root, "batches.meta").write_bytes(b"not a pickle"), "not a readable CIFAR"),
    "meta names count": (lambda root: _batch(root, "batches.meta").write_bytes(
        pickle.dumps({b"label_names": [b"cat"] * 9}, protocol=2)), "b'label_names' is not a list of 10 names"),
    "meta without names": (lambda root: _batch(root, "batches.meta").write_bytes(pickle.dumps({b"num_vis": 3072})),
                           "b'label_names' is not a list of 10 names"),
    "meta names not text": (lambda root: _batch(root, "batches.meta").write_bytes(
        pickle.dumps({b"label_names": [b"\xff"] * 10}, protocol=2)), "a class name is not UTF-8"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_CIFAR))
def test_broken_cifar_raises_data_error_naming_the_layout(tmp_path, case, capsys):
    break_it, problem = BROKEN_CIFAR[case]
    root = tmp_path / "data"
    write_cifar10(root, per_batch=80)
    break_it(root)
    with pytest.raises(DataError) as info:
        load_cifar(root, heldout=50)
    message = str(info.value)
    assert problem in message
    for part in CIFAR10_LAYOUT:
        assert part in message
    assert "pickle code ran" not in capsys.readouterr().out


def test_missing_cifar100_names_its_layout(tmp_path):
    with pytest.raises(DataError) as info:
        load_cifar(tmp_path, num_classes=100)
    assert isinstance(info.value, ValueError)
    for part in CIFAR100_LAYOUT:
        assert part in str(info.value)


def test_cifar_reads_protocol_5_pickles(tmp_path):
    written = write_cifar100(tmp_path)
    for name in ("train", "test"):
        path = tmp_path / "cifar-100-python" / name
        path.write_bytes(pickle.dumps(pickle.loads(path.read_bytes(), encoding="bytes"), protocol=5))
    images = load_cifar(tmp_path, num_classes=100, heldout=100).test[0]
    assert np.array_equal(images.numpy().reshape(100, -1), written["test_data"])


# ---- CIFAR augmentation ----


def distinct_images(n: int, h: int = 32, w: int = 32) -> torch.Tensor:
    """Float images whose pixels are all different (and non-zero), so any window identifies its offset."""
    return torch.arange(1, n * 3 * h * w + 1, dtype=torch.float32).view(n, 3, h, w)


def test_normalize_matches_the_formula():
    mean, std = CIFAR_STATS[10]
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    out = normalize(images, mean, std)
    expected = (torch.tensor([0, 51, 255]) / 255 - torch.tensor(mean)) / torch.tensor(std)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected.view(1, 3, 1, 1).expand(2, 3, 4, 4), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(normalize(images.float() / 255, mean, std), out, rtol=1e-6, atol=1e-6)
    assert CIFAR_STATS[10][0] == pytest.approx((0.4914, 0.4822, 0.4465))


def draws(n: int, seed: int = 0, epoch: int = 0) -> torch.Tensor:
    return augmentation_draws(seed, epoch, n)


def test_padded_crop_is_the_window_at_its_offset_of_the_zero_padded_image():
    images = distinct_images(81)
    rows, cols = torch.arange(81) // 9, torch.arange(81) % 9  # every offset once
    out = padded_crop(images, rows, cols, padding=4)
    assert out.shape == images.shape and out.dtype == images.dtype
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for i in range(len(images)):
        assert torch.equal(out[i], padded[i, :, rows[i]:rows[i] + 32, cols[i]:cols[i] + 32])
    # uint8 and channels_last inputs take the same path.
    as_u8 = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    rows, cols = torch.randint(0, 9, (8,)), torch.randint(0, 9, (8,))
    assert torch.equal(padded_crop(as_u8, rows, cols).float(), padded_crop(as_u8.float(), rows, cols))
    as_nhwc = as_u8.contiguous(memory_format=torch.channels_last)
    assert torch.equal(padded_crop(as_nhwc, rows, cols), padded_crop(as_u8, rows, cols))


def test_mirror_flips_exactly_the_chosen_images():
    images = distinct_images(6)
    flip = torch.tensor([True, False, False, True, True, False])
    out = mirror(images, flip)
    for i in range(6):
        assert torch.equal(out[i], images[i].flip(-1) if flip[i] else images[i])


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_cutout_zeroes_the_square_at_its_corner_clipped_at_the_border(dtype):
    images = torch.ones(4, 3, 32, 32, dtype=dtype)
    top, left = torch.tensor([-8, 0, 10, 23]), torch.tensor([5, -3, 10, 30])
    out = cutout(images, top, left, size=16)
    assert out.dtype == dtype and out.shape == images.shape
    for i in range(4):
        expected = torch.ones(32, 32, dtype=torch.bool)
        expected[max(0, top[i]):top[i] + 16, max(0, left[i]):left[i] + 16] = False
        assert torch.equal(out[i] != 0, expected.expand(3, 32, 32))


def test_uniform_index_is_in_range_and_uniform():
    largest = torch.tensor([1 - 2.0 ** -24])  # the contract's largest u
    assert [uniform_index(largest, high).item() for high in (1, 9, 32, 33)] == [0, 8, 31, 32]
    assert uniform_index(torch.tensor([2.0 ** -25]), 9).item() == 0
    u = augmentation_draws(0, 0, 20000)[:, 0]
    counts = torch.bincount(uniform_index(u, 9), minlength=9)
    assert len(counts) == 9 and counts.min() > 20000 / 9 * 0.9 and counts.max() < 20000 / 9 * 1.1


def test_the_epoch_order_is_a_permutation_sorted_by_the_contract_s_keys():
    """Image i's key is the 24 bits of elements 2 i and 2 i + 1 of stream (ORDER, epoch); every bit of the
    64-bit seed counts (torch's CPU generator reads only the low 32: seeds 2^32 apart shuffled alike)."""
    import pgnas_fast as pf
    from pgnas_fast.ops import Domain, stream_id

    for n in (1, 2, 37, 1000):
        order = epoch_order(11, 4, n)
        assert order.dtype == torch.int64 and torch.equal(order.sort().values, torch.arange(n))
    u = pf.ops.philox_uniform(2 * 37, seed=11, stream=stream_id(Domain.ORDER, 4)).view(37, 2)
    keys = (u[:, 0] * 2**24).long() * 2**24 + (u[:, 1] * 2**24).long()
    assert torch.equal(keys[epoch_order(11, 4, 37)], keys.sort().values)
    assert len(set(keys.tolist())) == 37
    assert not torch.equal(epoch_order(11, 4, 1000), epoch_order(11 + 2**32, 4, 1000))
    assert not torch.equal(epoch_order(11, 4, 1000), epoch_order(11, 5, 1000))
    assert torch.equal(epoch_order(2**63 - 1, 2**40 - 1, 50), epoch_order(2**63 - 1, 2**40 - 1, 50))
    firsts = torch.stack([epoch_order(seed, 0, 10)[0] for seed in range(2000)])  # uniform over positions
    counts = torch.bincount(firsts, minlength=10)
    assert counts.min() > 200 * 0.75 and counts.max() < 200 * 1.25


def test_augmentation_draws_are_the_contract_s_numbers_by_image_and_epoch():
    """Image i's row is elements 5 i .. 5 i + 4 of stream (AUGMENTATION, epoch): one image drawn alone (a
    DataLoader worker) gets its row of the whole epoch's draws (a batched pass), on every backend."""
    import pgnas_fast as pf
    from pgnas_fast.ops import Domain, stream_id

    whole = augmentation_draws(7, 3, 50)
    assert whole.shape == (50, DRAWS) and whole.dtype == torch.float32
    assert torch.equal(whole.flatten(), pf.ops.philox_uniform(250, seed=7, stream=stream_id(Domain.AUGMENTATION, 3)))
    for index in (0, 17, 49):
        assert torch.equal(augmentation_draws(7, 3, 1, first=index)[0], whole[index])
    assert not torch.equal(augmentation_draws(7, 4, 50), whole) and not torch.equal(augmentation_draws(8, 3, 50), whole)


def test_augmented_batches_cover_every_offset_flip_and_square():
    """The law: each image's crop offset (0..8 in both axes), flip and cutout square from its row of draws;
    over many images every offset, half the images mirrored, squares clipped at the border sometimes."""
    images, d = distinct_images(300), draws(300)
    out = augment_batch(images, d, cutout_size=0)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    rows, cols, flips = uniform_index(d[:, 0], 9), uniform_index(d[:, 1], 9), d[:, 4] < 0.5
    for i in range(len(images)):
        window = padded[i, :, rows[i]:rows[i] + 32, cols[i]:cols[i] + 32]
        assert torch.equal(out[i], window.flip(-1) if flips[i] else window)
    many = draws(5000, seed=3)
    assert len(set(zip(uniform_index(many[:, 0], 9).tolist(), uniform_index(many[:, 1], 9).tolist()))) == 81
    assert 2300 < (many[:, 4] < 0.5).sum() < 2700
    d = draws(300, seed=1)
    squares = augment_batch(torch.ones(300, 3, 32, 32), d, crop_padding=0, flip=False) == 0
    assert torch.equal(squares, squares[:, :1].expand_as(squares))
    tops, lefts = uniform_index(d[:, 2], 32) - 8, uniform_index(d[:, 3], 32) - 8  # centred on a uniform pixel
    for square, top, left in zip(squares[:, 0], tops, lefts, strict=True):
        expected = torch.zeros(32, 32, dtype=torch.bool)
        expected[max(0, top):top + 16, max(0, left):left + 16] = True
        assert torch.equal(square, expected)
    sides = [(int(sq.any(1).sum()), int(sq.any(0).sum())) for sq in squares[:, 0]]
    assert all(8 <= h <= 16 and 8 <= w <= 16 for h, w in sides) and 0 < sides.count((16, 16)) < 300


def test_augmentation_is_a_function_of_the_draws():
    images = normalize(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8))
    a = augment_batch(images, draws(64, seed=1))
    assert torch.equal(a, augment_batch(images, draws(64, seed=1)))
    assert not torch.equal(a, augment_batch(images, draws(64, seed=2)))
    assert a.shape == images.shape
    assert torch.equal(augment_batch(images, draws(64), crop_padding=0, flip=False, cutout_size=0), images)
    with pytest.raises(ValueError, match=r"draws must be \[64, 5\]"):
        augment_batch(images, draws(63))


@pytest.mark.gpu
def test_augmentation_on_cuda_equals_the_cpu_s(cifar10):
    """Draws made on the GPU (its own backend) augment CUDA data exactly as the CPU's do CPU data."""
    root, _ = cifar10
    images = normalize(load_cifar(root, heldout=50).train[0][:64], *CIFAR_STATS[10])
    cpu = augment_batch(images, augmentation_draws(1, 2, 64))
    cuda = augment_batch(normalize(load_cifar(root, heldout=50).train[0][:64].cuda(), *CIFAR_STATS[10]),
                         augmentation_draws(1, 2, 64, device="cuda"))
    assert cuda.is_cuda and not torch.equal(cpu, images)
    assert torch.equal(cpu, cuda.cpu())


# ---- ImageNet index ----


def test_imagenet_index_lists_every_file_with_its_class(imagenet):
    root, written = imagenet
    index = load_imagenet_index(root, heldout=3, split_seed=0)
    assert index.classes == sorted(written["train"]) and index.num_classes == 3
    assert index.sizes() == {"train": 15, "heldout": 3, "val": 6}
    expected = {str(p): index.classes.index(wnid) for wnid, paths in written["train"].items() for p in paths}
    got = dict(zip(index.train[0] + index.heldout[0], np.concatenate([index.train[1], index.heldout[1]]).tolist()))
    assert got == expected
    assert np.array_equal(np.bincount(index.heldout[1]), [1, 1, 1])
    val = {str(p): index.classes.index(wnid) for wnid, paths in written["val"].items() for p in paths}
    assert dict(zip(index.val[0], index.val[1].tolist())) == val
    assert index.train[1].dtype == np.int64
    again = load_imagenet_index(root, heldout=3, split_seed=0)
    assert again.heldout[0] == index.heldout[0]
    assert any(load_imagenet_index(root, heldout=3, split_seed=s).heldout[0] != index.heldout[0] for s in range(1, 5))


def test_imagenet_held_out_split_is_in_a_seeded_random_order(tmp_path):
    """train/ is listed class by class; racing scores prefixes of the held-out split, so every prefix
    must be a sample of all classes, not the first few."""
    write_imagenet(tmp_path, classes=tuple(f"n{c:02d}" for c in range(8)), train_per_class=4, val_per_class=1)
    index = load_imagenet_index(tmp_path, heldout=16, split_seed=0)
    labels = index.heldout[1].tolist()
    assert sorted(labels) == sorted(list(range(8)) * 2)  # stratified, as before
    assert labels != sorted(labels) and len(set(labels[:8])) >= 4
    assert load_imagenet_index(tmp_path, heldout=16, split_seed=0).heldout[0] == index.heldout[0]


def test_imagenet_recalibration_images_are_a_seeded_sample_of_all_classes(imagenet, monkeypatch):
    from pgnas_fast.search import feed as feed_module

    root, _ = imagenet
    index = load_imagenet_index(root, heldout=3, split_seed=0)
    read = []

    def loader(files, labels, **kwargs):
        read.append(list(labels))
        return [(torch.zeros(len(files), 3, 8, 8), torch.as_tensor(labels))]

    feed = feed_module.LoaderFeed(index, seed=0, batch_size=4, eval_batch_size=4, device=torch.device("cpu"),
                                  workers=0, channels_last=False, input_size=8)
    monkeypatch.setattr(feed_module, "imagenet_loader", loader)
    assert feed.recalibration_images(6).shape == (6, 3, 8, 8)
    assert read[0] != index.train[1][:6].tolist() and len(set(read[0])) > 1  # not train/'s first: class 0, 1
    feed.recalibration_images(6)
    assert read[1] == read[0]  # the run's seed fixes the sample


def test_imagenet_says_how_its_images_become_the_network_s_input(imagenet):
    """ImageNet's Splits.inputs (an export's `inputs`): the recipe applied to the evaluation crop is
    what the evaluation dataset hands the network; the feed carries the same recipe."""
    from pgnas_fast.data.imagenet import imagenet_inputs, load_eval_image
    from pgnas_fast.search import feed as feed_module

    root, _ = imagenet
    index = load_imagenet_index(root, heldout=3, split_seed=0)
    assert imagenet_inputs()["pixels"] == ("uint8 RGB: the short side resized to 256 (bilinear), the centre 224x224 "
                                           "cropped")
    recipe = imagenet_inputs(32)
    assert recipe["pixels"].startswith("uint8 RGB: the short side resized to 37 (bilinear), the centre 32x32")
    assert recipe["scale"] == 1 / 255
    assert (recipe["mean"], recipe["std"]) == (list(IMAGENET_MEAN), list(IMAGENET_STD))
    files, labels = index.heldout
    dataset = ImageFolderDataset(files, labels, train=False, size=32, resize=37)
    mean, std = (torch.tensor(recipe[key]).view(3, 1, 1) for key in ("mean", "std"))
    for i in range(len(files)):
        pixels = load_eval_image(files[i], 32, 37)
        torch.testing.assert_close((pixels.float() * recipe["scale"] - mean) / std, dataset[i][0], rtol=1e-5, atol=1e-5)
    feed = feed_module.LoaderFeed(index, seed=0, batch_size=4, eval_batch_size=4, device=torch.device("cpu"),
                                  workers=0, channels_last=False, input_size=32)
    assert feed.inputs == recipe


def test_a_held_out_split_as_large_as_the_training_set_is_a_data_error(imagenet, tmp_path):
    root, _ = imagenet
    with pytest.raises(DataError, match="heldout_size=18 must be below 18"):
        load_imagenet_index(root, heldout=18)
    write_cifar10(tmp_path)
    with pytest.raises(DataError, match="heldout_size=100000 must be below"):
        load_cifar(tmp_path, heldout=100000)


def test_a_negative_held_out_size_is_a_data_error(imagenet):
    """(named as the config's heldout_size, like a too large one; not the carve's bare ValueError)"""
    root, _ = imagenet
    with pytest.raises(DataError, match="heldout_size=-1 "):
        load_imagenet_index(root, heldout=-1)


def test_tensor_feed_augments_each_image_with_its_own_draws_of_the_epoch():
    """prepare_train gets each batch's images with their rows of the epoch's draws (by image index, not by
    position in the epoch); without prepare_train nothing is drawn."""
    from pgnas_fast.search.feed import TensorFeed

    images, labels = torch.randn(20, 1, 4, 4), torch.arange(20)
    seen = []

    def prepare_train(x, d):
        seen.append((x, d))
        return x

    splits = Splits((images, labels), (images[:2], labels[:2]), (images[:2], labels[:2]), 20)
    feed = TensorFeed(splits, batch_size=8, eval_batch_size=8, device="cpu", prepare_train=prepare_train)
    batches = list(feed.train_batches(epoch=2, seed=5))
    whole = augmentation_draws(5, 2, 20)
    for (x, d), (_, y) in zip(seen, batches):
        assert torch.equal(d, whole[y]) and torch.equal(x, images[y])  # (labels are the image indices)
    plain = TensorFeed(splits, batch_size=8, eval_batch_size=8, device="cpu")
    assert all(torch.equal(x, images[y]) for x, y in plain.train_batches(epoch=2, seed=5))


def test_an_epoch_without_a_training_batch_is_a_config_error():
    from pgnas_fast.configs import ConfigError
    from pgnas_fast.search.feed import check_shards
    from pgnas_fast.search.parallel import SINGLE_PROCESS

    with pytest.raises(ConfigError, match="an epoch has no training batch: the training split's 20 images are "
                                          "fewer than batch_size 32"):
        check_shards([], SINGLE_PROCESS, train_images=20, batch_size=32)


def test_imagenet_index_ignores_non_images(tmp_path):
    write_imagenet(tmp_path, classes=("a", "b"), train_per_class=2, val_per_class=1)
    (tmp_path / "train" / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "a" / ".hidden.JPEG").write_bytes(b"")
    for split in ("train", "val"):  # hidden folders (a notebook's, an editor's) are not classes
        (tmp_path / split / ".ipynb_checkpoints").mkdir()
    index = load_imagenet_index(tmp_path, heldout=0)
    assert index.sizes() == {"train": 4, "heldout": 0, "val": 2} and index.num_classes == 2


def _empty_class(root, *names):
    for name in names:
        (root / "train" / name).mkdir()
        (root / "val" / name).mkdir()


BROKEN_IMAGENET = {
    "missing data dir": (lambda root: shutil.rmtree(root), "does not exist"),
    "missing val": (lambda root: shutil.rmtree(root / "val"), "val does not exist"),
    "no class folders": (lambda root: shutil.rmtree(root / "train") or (root / "train").mkdir(), "no class folders"),
    "empty class": (lambda root: _empty_class(root, "n02"), "holds no images (n02; read are files directly in a "
                                                               "class folder, named *.jpeg, *.jpg, *.png"),
    "empty classes": (lambda root: _empty_class(root, "n02", "n03"), "2 class folders under"),
    "flat val": (
        lambda root: (root / "val" / "n00" / "n00_00000.JPEG").rename(root / "val" / "x.JPEG"),
        "holds 1 images directly",
    ),
    "different classes": (lambda root: (root / "val" / "n01").rename(root / "val" / "n09"), "different class folders"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_IMAGENET))
def test_broken_imagenet_raises_data_error_naming_the_layout(tmp_path, case):
    root = tmp_path / "imagenet"
    write_imagenet(root, classes=("n00", "n01"), train_per_class=2, val_per_class=1)
    BROKEN_IMAGENET[case][0](root)
    with pytest.raises(DataError) as info:
        load_imagenet_index(root, heldout=0)
    message = str(info.value)
    for part in (BROKEN_IMAGENET[case][1], f"ImageFolder data (ImageNet's or your own) under {root}: ",
                 "train/<class>/<images>", "val/<class>/<images>", IMAGENET_URL):
        assert part in message


# ---- ImageNet transforms, dataset and loader ----


def test_random_resized_crop_box_stays_inside_with_the_right_area_and_aspect():
    g = gen(0)
    for width, height in ((500, 375), (64, 300), (224, 224)):
        for _ in range(200):
            left, top, w, h = random_resized_crop_box(width, height, g)
            assert 0 <= left and 0 <= top and left + w <= width and top + h <= height and w > 0 and h > 0
            assert 0.07 <= w * h / (width * height) <= 1.0
            assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05
    # No try fits a 1000 x 10 strip: the fallback is the largest centred crop of aspect 4/3.
    assert random_resized_crop_box(1000, 10, gen(0)) == (493, 0, 13, 10)


def test_random_resized_crops_may_span_the_whole_width_or_height():
    """A drawn box as wide (or as tall) as the image fits, as torchvision's RandomResizedCrop takes it: such
    crops are drawn, not only the fallback's whole image."""
    width, height = 40, 32
    boxes = [random_resized_crop_box(width, height, gen(s)) for s in range(2000)]
    assert any(w == width and h < height for _, _, w, h in boxes)
    assert any(h == height and w < width for _, _, w, h in boxes)


def test_random_resized_crop_positions_cover_every_offset_both_edges_included():
    """A 10 x 10 box in a 20 x 20 image sits at any of the 11 offsets per axis, the last (touching the right or
    bottom edge) included."""
    g = gen(0)
    boxes = [random_resized_crop_box(20, 20, g, scale=(0.25, 0.25), ratio=(1.0, 1.0)) for _ in range(400)]
    assert {(w, h) for _, _, w, h in boxes} == {(10, 10)}
    assert {left for left, _, _, _ in boxes} == set(range(11)) and {top for _, top, _, _ in boxes} == set(range(11))


def _gradient(path, width, height):
    """x in red, y in green, constant blue: geometry shows in the values."""
    from PIL import Image

    xs = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    ys = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    Image.fromarray(np.stack([xs, ys, np.full_like(xs, 90)], -1).astype(np.uint8)).save(path, quality=95)


@pytest.mark.parametrize("size, suffix", [((300, 400), ".png"), ((1600, 1200), ".JPEG")])
def test_eval_transform_is_resize_256_then_centre_crop_224(tmp_path, size, suffix):
    from PIL import Image

    path = tmp_path / f"g{suffix}"
    _gradient(path, *size)
    out = load_eval_image(str(path))
    assert out.shape == (3, 224, 224) and out.dtype == torch.uint8
    # The plain recipe, from the fully decoded image (the JPEG case above decodes in draft mode).
    with Image.open(path) as image:
        w, h = image.size
        rw, rh = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
        resized = image.convert("RGB").resize((rw, rh), Image.Resampling.BILINEAR)
        left, top = round((rw - 224) / 2), round((rh - 224) / 2)
        expected = torch.from_numpy(np.array(resized.crop((left, top, left + 224, top + 224)))).permute(2, 0, 1)
    assert (out.float() - expected.float()).abs().mean() < 2.0


def test_train_transform_is_seeded_and_flips(tmp_path):
    path = tmp_path / "g.png"
    _gradient(path, 300, 200)
    a = load_train_image(str(path), gen(3))
    assert a.shape == (3, 224, 224) and a.dtype == torch.uint8
    assert torch.equal(a, load_train_image(str(path), gen(3)))
    crops = [load_train_image(str(path), gen(s)) for s in range(12)]
    assert len({c.numpy().tobytes() for c in crops}) == 12
    # Red grows with x: a flipped crop has red falling from left to right.
    directions = {bool(c[0, :, -1].float().mean() > c[0, :, 0].float().mean()) for c in crops}
    assert directions == {True, False}


def test_train_transform_s_crop_share_and_flip_are_settable(tmp_path):
    """data_args crop_scale and flip (small images of your own): the whole image and no flip is one image for
    every seed; flips alone mirror it or not; crops of at most a quarter of the area are smaller views."""
    path = tmp_path / "g.png"
    _gradient(path, 40, 40)
    whole = [load_train_image(str(path), gen(s), size=16, scale=(1.0, 1.0), flip=False) for s in range(6)]
    assert all(torch.equal(w, whole[0]) for w in whole)
    flipped = {load_train_image(str(path), gen(s), size=16, scale=(1.0, 1.0)).numpy().tobytes() for s in range(12)}
    assert flipped == {whole[0].numpy().tobytes(), whole[0].flip(-1).numpy().tobytes()}
    small = load_train_image(str(path), gen(0), size=16, scale=(0.1, 0.25), flip=False)
    span = lambda image: image[0].float().amax() - image[0].float().amin()  # noqa: E731 (red grows with x)
    assert span(small) < 0.75 * span(whole[0])


def test_wide_images_are_scaled_to_8_bits_and_float_ones_refused(tmp_path):
    """16-bit PNGs open in Pillow's 32-bit integer modes, which its RGB conversion clips at 255 (white)."""
    from PIL import Image

    wide = np.tile(np.linspace(0, 65535, 40), (30, 1)).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "16.png")
    Image.fromarray(np.rint(wide / 257).astype(np.uint8)).save(tmp_path / "8.png")
    for load in (lambda p: load_eval_image(p, 16, 18), lambda p: load_train_image(p, gen(2), size=16)):
        a, b = (load(str(tmp_path / name)).int() for name in ("16.png", "8.png"))
        assert (a - b).abs().max() <= 1 and a.float().std() > 30  # a gradient, not a white square
    Image.fromarray(wide.astype(np.float32) / 65535).save(tmp_path / "float.tif")
    Image.fromarray(wide.astype(np.int32) * 4).save(tmp_path / "wide.tif")
    for name, message in (("float.tif", "a floating-point image (mode F)"), ("wide.tif", "beyond 16 bits")):
        pattern = re.escape(f"cannot decode image {tmp_path / name}") + ".*" + re.escape(message)
        with pytest.raises(DataError, match=pattern):
            ImageFolderDataset([str(tmp_path / name)], [0], train=False, size=16, resize=18)[0]


def test_sixteen_bit_levels_become_their_eight_bit_levels_white_included(tmp_path):
    """v * 257 (16 bits) is v (8 bits): 65535 is white (255), not a value past 255 wrapped to black."""
    from PIL import Image

    for level in (0, 1, 128, 254, 255):
        Image.fromarray(np.full((24, 20), level * 257, dtype=np.uint16)).save(tmp_path / f"{level}.png")
        for image in (load_eval_image(str(tmp_path / f"{level}.png"), 16, 18),
                      load_train_image(str(tmp_path / f"{level}.png"), gen(1), size=16)):
            assert image.shape == (3, 16, 16) and bool((image == level).all()), level


def test_a_crop_draft_mode_would_decode_below_the_output_size_is_decoded_whole(tmp_path):
    """JPEG draft mode may only decode at 1/2 when the crop keeps at least `size` pixels there: a 31-pixel crop
    of a 60 x 60 JPEG for a 16-pixel output (15.5 pixels at 1/2) is read from the fully decoded image."""
    from PIL import Image

    xs = np.linspace(0, 255, 60)[None, :].repeat(60, 0)
    noise = np.random.default_rng(0).integers(0, 256, (60, 60))
    Image.fromarray(np.stack([xs, xs.T, noise], -1).astype(np.uint8)).save(tmp_path / "g.JPEG", quality=95)
    scale, ratio = (961 / 3600, 961 / 3600), (1.0, 1.0)  # a 31 x 31 box
    for seed in range(3):
        left, top, w, h = random_resized_crop_box(60, 60, gen(seed), scale, ratio)
        assert (w, h) == (31, 31)
        out = load_train_image(str(tmp_path / "g.JPEG"), gen(seed), size=16, scale=scale, ratio=ratio, flip=False)
        with Image.open(tmp_path / "g.JPEG") as image:
            whole = image.convert("RGB").resize((16, 16), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
        assert torch.equal(out, torch.from_numpy(np.array(whole)).permute(2, 0, 1))


def test_every_class_needs_training_and_held_out_images(tmp_path):
    write_imagenet(tmp_path, classes=("a", "b", "c", "d"), train_per_class=3, val_per_class=1)
    assert load_imagenet_index(tmp_path, heldout=4).sizes() == {"train": 8, "heldout": 4, "val": 4}
    with pytest.raises(DataError, match=r"heldout_size=2 leaves 2 of the 4 classes without a held-out image \(.*\): "
                                        r".*raise heldout_size: at least 4"):
        load_imagenet_index(tmp_path, heldout=2)
    with pytest.raises(DataError, match=r"heldout_size=10 leaves 2 of the 4 classes without a training image .*; "
                                        r"lower heldout_size, or add images to those classes"):
        load_imagenet_index(tmp_path, heldout=10)


def test_dataset_gives_normalised_float_images_and_labels(imagenet, tmp_path):
    root, _ = imagenet
    index = load_imagenet_index(root, heldout=3)
    for train, (files, labels) in ((True, index.train), (False, index.val)):
        data = ImageFolderDataset(files, labels, train=train, generator=gen(0))
        assert len(data) == len(files)
        for i in range(len(data)):
            image, label = data[i]
            assert image.shape == (3, 224, 224) and image.dtype == torch.float32 and label == labels[i]
    # A constant colour normalises to (c / 255 - mean) / std everywhere.
    from PIL import Image

    Image.new("RGB", (300, 260), (10, 128, 250)).save(tmp_path / "flat.png")
    image, label = ImageFolderDataset([str(tmp_path / "flat.png")], [7], train=False)[0]
    expected = (torch.tensor([10, 128, 250]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(image, expected.view(3, 1, 1).expand(3, 224, 224), rtol=1e-5, atol=1e-5)
    assert label == 7


def test_dataset_reports_an_unreadable_image(tmp_path):
    (tmp_path / "bad.JPEG").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="bad.JPEG"):
        ImageFolderDataset([str(tmp_path / "bad.JPEG")], [0], train=True)[0]


def test_dataset_refuses_files_and_labels_of_different_lengths(imagenet):
    root, _ = imagenet
    files, labels = load_imagenet_index(root, heldout=3).val
    with pytest.raises(ValueError, match="6 files but 5 labels"):
        ImageFolderDataset(files, labels[:-1], train=False)


def test_loader_batches_are_channels_last_and_independent_of_workers(imagenet):
    root, _ = imagenet
    index = load_imagenet_index(root, heldout=3)

    def epochs(num_workers):
        loader = imagenet_loader(*index.train, train=True, batch_size=4, num_workers=num_workers, seed=5)
        return loader, [list(loader) for _ in range(2)]

    loader, (first, second) = epochs(0)
    assert len(loader) == 3 == len(first)  # 15 images, the last partial batch dropped
    for x, y in first:
        assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(first[0][0], second[0][0])  # a new epoch, new order and crops
    _, (first_w, second_w) = epochs(2)
    for (x, y), (xw, yw) in zip(first + second, first_w + second_w, strict=True):
        assert torch.equal(x, xw) and torch.equal(y, yw)
    loader.set_epoch(1)  # a resume at epoch 1 redraws epoch 1
    assert all(torch.equal(a[0], b[0]) for a, b in zip(list(loader), second, strict=True))

    val = imagenet_loader(*index.val, train=False, batch_size=4, num_workers=0)
    # workers beyond the available cores are not started (the presets ask for 8; torch warned on 2 cores)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert imagenet_loader(*index.val, train=False, batch_size=4, num_workers=cores + 6).loader.num_workers == cores
    assert imagenet_loader(*index.val, train=False, batch_size=4, num_workers=0).loader.num_workers == 0
    batches = list(val)
    assert [len(y) for _, y in batches] == [4, 2]
    assert torch.equal(torch.cat([y for _, y in batches]), torch.from_numpy(index.val[1]))


def test_each_image_of_an_epoch_draws_its_own_crop_and_flip(tmp_path):
    """The sampler's per-image seeds differ within an epoch: one file listed eight times comes out as eight
    different training crops in one batch (one seed for the whole epoch would give eight copies)."""
    path = tmp_path / "g.png"
    _gradient(path, 300, 200)
    loader = imagenet_loader([str(path)] * 8, np.zeros(8, dtype=np.int64), train=True, batch_size=8, num_workers=0,
                             seed=3, size=32)
    (images, _), = list(loader)
    assert len({image.numpy().tobytes() for image in images}) == 8
    seeds = [seed for _, seed in loader.sampler]
    assert len(set(seeds)) == 8


def test_loader_drop_last_overrides_the_split_s_default(imagenet):
    """train drops the last partial batch and evaluation keeps it, unless drop_last says otherwise."""
    root, _ = imagenet
    index = load_imagenet_index(root, heldout=3)  # 15 training images, 6 validation ones

    def sizes(files, labels, **kwargs):
        return [len(y) for _, y in imagenet_loader(files, labels, batch_size=4, num_workers=0, size=32, **kwargs)]

    assert sizes(*index.train, train=True) == [4, 4, 4]
    assert sizes(*index.train, train=True, drop_last=False) == [4, 4, 4, 3]
    assert sizes(*index.val, train=False) == [4, 2]
    assert sizes(*index.val, train=False, drop_last=True) == [4]


# ---- CIFAR on the CPU: DataLoader workers augmenting image by image ----
def test_cifar_train_set_item_is_the_batched_law_on_one_image(cifar10):
    root, _ = cifar10
    images, labels = load_cifar(root, heldout=50).train
    mean, std = CIFAR_STATS[10]
    dataset = CifarTrainSet(images, labels, mean, std, seed=11)
    assert len(dataset) == len(labels)
    for index, epoch in [(0, 0), (7, 12), (len(labels) - 1, 2**39)]:
        image, label = dataset[(index, epoch)]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert label.dtype == torch.int64 and label == labels[index]
        # the image's row of the whole epoch's draws: what a batched pass gives it
        whole = augment_batch(normalize(images, mean, std), augmentation_draws(11, epoch, len(labels)))
        assert torch.equal(image, whole[index])
        assert not torch.equal(dataset[(index, epoch + 1)][0], image)
    assert not torch.equal(CifarTrainSet(images, labels, mean, std, seed=12)[(7, 12)][0], dataset[(7, 12)][0])
    with pytest.raises(ValueError, match="uint8"):
        CifarTrainSet(images.float(), labels, mean, std, seed=0)


def test_cifar_train_set_crops_within_the_padding_flips_and_cuts_out():
    """Over the epochs, one image's crop offsets cover 0..8 in both axes, about half are mirrored, and the
    cutout square is one square in every channel, nothing else changed."""
    image = torch.randint(1, 256, (1, 3, 32, 32), dtype=torch.uint8)  # no zero pixel: pads are told apart
    dataset = CifarTrainSet(image, torch.zeros(1, dtype=torch.int64), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), seed=0,
                            cutout_size=0)
    padded = torch.nn.functional.pad(image[0].float() / 255, (4, 4, 4, 4))
    shifts, flips = set(), 0
    for epoch in range(300):
        out, _ = dataset[(0, epoch)]
        found = [(dy, dx, mirrored) for dy in range(9) for dx in range(9) for mirrored in (False, True)
                 if torch.equal(out.flip(-1) if mirrored else out, padded[:, dy:dy + 32, dx:dx + 32])]
        assert len(found) == 1, epoch
        shifts.add(found[0][:2])
        flips += found[0][2]
    assert {dy for dy, _ in shifts} == set(range(9)) and {dx for _, dx in shifts} == set(range(9))
    assert 110 < flips < 190
    squares = CifarTrainSet(image, torch.zeros(1, dtype=torch.int64), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), seed=0,
                            crop_padding=0, flip=False)
    for epoch in range(20):
        out, _ = squares[(0, epoch)]
        zero = out == 0
        assert torch.equal(zero, zero[:1].expand_as(zero))  # the same square in every channel
        rows, cols = zero[0].any(1).nonzero().flatten(), zero[0].any(0).nonzero().flatten()
        height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert zero[0].sum() == height * width and 8 <= height <= 16 and 8 <= width <= 16
        assert torch.equal(out[~zero], image[0].float()[~zero] / 255)  # nothing else changed


def test_the_data_s_cpu_draws_ignore_a_network_backend_that_takes_no_cpu_tensors(cifar10, monkeypatch):
    """A CUDA search selects triton or cuda for its ops (cli: use_backend), backends that take CUDA tensors
    only, while its epoch order, and a DataLoader worker's augmentation numbers, are drawn on the CPU:
    those draws use a backend of their own device (the same bits), not the selection, which would refuse
    them. Here a CUDA-only backend is made to look available, and selected."""
    import pgnas_fast as pf
    from pgnas_fast.ops import dispatch

    root, _ = cifar10
    images, labels = load_cifar(root, heldout=50).train
    mean, std = CIFAR_STATS[10]

    def pipeline():
        loader, sampler = cifar_train_loader(images, labels, batch_size=64, seed=9, mean=mean, std=std, workers=0,
                                             autoaugment=True)
        sampler.set_epoch(1)
        return epoch_order(9, 1, 350), augmentation_draws(9, 1, 7, first=3, autoaugment=True), next(iter(loader))

    expected = pipeline()
    monkeypatch.setitem(dispatch._modules, "cuda", dispatch._load("reference"))  # "available", for CUDA tensors
    with dispatch.use_backend("cuda"):
        with pytest.raises(ValueError, match="backend 'cuda' takes cuda tensors"):  # what the draws escaped
            pf.ops.philox_uniform(4, seed=9, stream=1)
        got = pipeline()
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert all(torch.equal(a, b) for a, b in zip(got[2], expected[2]))


def test_cifar_train_loader_is_the_epoch_order_with_aligned_labels_whatever_the_workers(cifar10):
    root, _ = cifar10
    images, labels = load_cifar(root, heldout=50).train
    mean, std = CIFAR_STATS[10]
    epochs = {}
    for workers in (0, 2):
        loader, sampler = cifar_train_loader(images, labels, batch_size=64, seed=9, mean=mean, std=std,
                                             workers=workers)
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            batches = list(loader)
            assert [len(y) for _, y in batches] == [64, 64, 64, 64, 64, 30]  # 350 images, the last batch short
            assert all(x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32) and y.dtype == torch.int64
                       for x, y in batches)
            epochs[workers, epoch] = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
            items = list(sampler)  # (index, epoch) per image, in order
            order = epoch_order(9, epoch, len(labels))  # TensorFeed's order
            assert items == [(index, epoch) for index in order.tolist()]
            assert torch.equal(epochs[workers, epoch][1], labels[order])
            dataset = CifarTrainSet(images, labels, mean, std, seed=9)
            for k in (0, 100, 349):
                assert torch.equal(epochs[workers, epoch][0][k], dataset[items[k]][0])
    for epoch in (0, 1):  # workers change nothing
        assert all(torch.equal(a, b) for a, b in zip(epochs[0, epoch], epochs[2, epoch]))
    assert not torch.equal(epochs[0, 0][0], epochs[0, 1][0])


def test_cifar_feed_on_the_cpu_uses_the_loader_by_default(cifar10):
    from pgnas_fast import configs
    from pgnas_fast.search.feed import CifarLoaderFeed, TensorFeed
    from pgnas_fast.search.run import build_feed, load_data

    root, _ = cifar10
    config = configs.resolve("cifar10-supnet-m", {"heldout_size": 50, "batch_size": 100, "workers": 1})
    data = load_data(config, root)
    feed = build_feed(config, data, torch.device("cpu"), seed=4)
    assert isinstance(feed, CifarLoaderFeed)
    x, y = next(feed.train_batches(0, 4))
    assert x.shape == (100, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    order = epoch_order(4, 0, 350)[:100]
    assert torch.equal(y, data.train[1][order])
    again = next(build_feed(config, data, torch.device("cpu"), seed=4).train_batches(0, 4))
    assert torch.equal(again[0], x)  # a fixed seed reproduces the run
    tensors = build_feed({**config, "cifar_pipeline": "tensors"}, data, torch.device("cpu"), seed=4)
    assert type(tensors) is TensorFeed
    for epoch in (0, 3):  # the same batches: the epoch order and every image's augmentation
        for (x_t, y_t), (x_l, y_l) in zip(tensors.train_batches(epoch, 4), feed.train_batches(epoch, 4), strict=True):
            assert torch.equal(y_t, y_l) and torch.equal(x_t, x_l)
    with pytest.raises(ValueError, match="seed 4, not 5"):
        next(feed.train_batches(0, 5))


def test_cifar_tensor_feed_shards_augment_only_their_rows(cifar10):
    """The batched (GPU) pipeline's ranks prepare their rows of every global batch alone: images equal to the
    single process's rows and to the CPU loader's."""
    from pgnas_fast import configs
    from pgnas_fast.search.parallel import SINGLE_PROCESS, Parallel
    from pgnas_fast.search.run import build_feed, load_data

    root, _ = cifar10
    config = configs.resolve("cifar10-supnet-m", {"heldout_size": 50, "batch_size": 60, "workers": 0,
                                                  "cifar_pipeline": "tensors"})
    data = load_data(config, root)
    whole = list(build_feed(config, data, torch.device("cpu"), seed=4).train_shards(2, 4, SINGLE_PROCESS))
    loader = build_feed({**config, "cifar_pipeline": "loader"}, data, torch.device("cpu"), seed=4)
    assert all(torch.equal(x, x_l) for (x, *_), (x_l, _) in zip(whole, loader.train_batches(2, 4), strict=True))
    for rank in range(3):
        parallel = Parallel(rank=rank, world=3)
        feed = build_feed(config, data, torch.device("cpu"), seed=4, parallel=parallel)
        calls = []
        prepare = feed.prepare_train
        feed.prepare_train = lambda images, draws: calls.append(len(images)) or prepare(images, draws)
        shards = list(feed.train_shards(2, 4, parallel))
        last_start, last_end = parallel.rows(50)  # (350 images: the last global batch holds 50)
        assert len(shards) == len(whole) == 6 and calls == [20] * 5 + [last_end - last_start]
        for (x, y, first, rows), (x_all, y_all, _, rows_all) in zip(shards, whole):
            start, end = parallel.rows(rows_all)
            assert (first, rows) == (start, rows_all)
            assert torch.equal(x, x_all[start:end]) and torch.equal(y, y_all[start:end])


def test_cifar_loader_feed_shards_load_only_their_rows(cifar10):
    """Under data parallelism each rank's workers load and augment only its rows of every global batch
    (the last one short), and those rows equal the single process's, images and labels alike."""
    from pgnas_fast import configs
    from pgnas_fast.search.feed import CifarLoaderFeed
    from pgnas_fast.search.parallel import SINGLE_PROCESS, Parallel
    from pgnas_fast.search.run import build_feed, load_data

    root, _ = cifar10
    config = configs.resolve("cifar10-supnet-m", {"heldout_size": 50, "batch_size": 64, "workers": 0})
    data = load_data(config, root)
    whole = list(build_feed(config, data, torch.device("cpu"), seed=4).train_shards(1, 4, SINGLE_PROCESS))
    assert [len(y) for _, y, _, _ in whole] == [64, 64, 64, 64, 64, 30]
    for rank in (0, 1):
        parallel = Parallel(rank=rank, world=2)
        feed = build_feed(config, data, torch.device("cpu"), seed=4, parallel=parallel)
        assert isinstance(feed, CifarLoaderFeed)
        shards = list(feed.train_shards(1, 4, parallel))
        assert len(shards) == len(whole)
        for (x, y, first, rows), (x_all, y_all, _, rows_all) in zip(shards, whole):
            start, end = parallel.rows(rows_all)
            assert (first, rows, len(y)) == (start, rows_all, end - start)
            assert torch.equal(x, x_all[start:end]) and torch.equal(y, y_all[start:end])
        with pytest.raises(ValueError, match="built for"):
            next(feed.train_shards(1, 4, SINGLE_PROCESS))
