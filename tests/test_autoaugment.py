"""AutoAugment's CIFAR policy (pgnas_fast.data.autoaugment) against PIL, the library the AutoAugment
release (and so the authors' Shake-Shake code) ran it with, bit for bit: every operation at every
level and sign, and whole sub-policies on RGBA images as the release applies them; then the batched
form against one image at a time, its random numbers, its place in the training inputs, and bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps
from scipy import stats

from pgnas_fast.data import CIFAR_STATS, augment_batch, augmentation_draws, normalize, training_inputs
from pgnas_fast.data import autoaugment as aa
from pgnas_fast.data.augment import DRAWS
from pgnas_fast.data.uniforms import uniform_index
from pgnas_fast.ops import philox_uniform
from pgnas_fast.ops.streams import Domain, stream_id


# ---- the oracle: the release's steps, written against PIL's API -------------------------------------
def release_step(img: Image.Image, name: str, level: int, negative: bool, centre: tuple[int, int]) -> Image.Image:
    """One step of the release on an RGBA PIL image (its ranges: shear 0.3, translate 10 px, rotate 30
    degrees, enhance 0.1 + 1.8 l / 10, solarize 256 - 256 l / 10, posterize 4 - 4 l / 10 bits)."""
    sign = -1 if negative else 1
    width, height = img.size
    if name == "ShearX":
        return img.transform((width, height), Image.AFFINE, (1, sign * level * 0.3 / 10, 0, 0, 1, 0))
    if name == "ShearY":
        return img.transform((width, height), Image.AFFINE, (1, 0, 0, sign * level * 0.3 / 10, 1, 0))
    if name == "TranslateX":
        return img.transform((width, height), Image.AFFINE, (1, 0, sign * int(level * 10 / 10), 0, 1, 0))
    if name == "TranslateY":
        return img.transform((width, height), Image.AFFINE, (1, 0, 0, 0, 1, sign * int(level * 10 / 10)))
    if name == "Rotate":
        return img.rotate(sign * int(level * 30 / 10))
    if name == "Invert":
        return ImageOps.invert(img.convert("RGB")).convert("RGBA")
    if name == "Solarize":
        return ImageOps.solarize(img.convert("RGB"), 256 - int(level * 256 / 10)).convert("RGBA")
    if name == "Posterize":
        return ImageOps.posterize(img.convert("RGB"), 4 - int(level * 4 / 10)).convert("RGBA")
    if name == "AutoContrast":
        return ImageOps.autocontrast(img.convert("RGB")).convert("RGBA")
    if name == "Equalize":
        return ImageOps.equalize(img.convert("RGB")).convert("RGBA")
    if name in aa.BLENDS:
        return getattr(ImageEnhance, name)(img).enhance(level * 1.8 / 10 + 0.1)
    if name == "Cutout":  # the release's loop: both axes over [row start, column end)
        size = int(level * 20 / 10)
        if size > 0:
            start, end = max(0, centre[0] - size // 2), min(width, centre[1] + size // 2)
            pixels = img.load()
            for i in range(start, end):
                for j in range(start, end):
                    pixels[i, j] = (125, 122, 113, 0)
        return img
    raise AssertionError(name)


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).numpy(), "RGB").convert("RGBA")


def from_pil(img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    """(RGB [3, H, W] int32, transparent [H, W])."""
    array = np.asarray(img)
    return torch.from_numpy(array[..., :3].copy()).permute(2, 0, 1).int(), torch.from_numpy(array[..., 3] == 0)


def release_policy(image: torch.Tensor, row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The release's apply_policy on one image, its choices taken from `row` (POLICY_DRAWS uniforms)."""
    height, width = image.shape[1:]
    img = to_pil(image)
    for step, (name, probability, level) in enumerate(aa.CIFAR_POLICY[int(uniform_index(row[0], 95))]):
        applies, sign, centre_row, centre_col = row[1 + 4 * step:5 + 4 * step]
        if applies < probability:
            img = release_step(img, name, level, bool(sign > 0.5),
                               (int(uniform_index(centre_row, height)), int(uniform_index(centre_col, width))))
    return from_pil(img)


def sample_images(height: int, width: int, seed: int) -> torch.Tensor:
    """Random RGB, a low-contrast one, a grey one, and one with few values (histograms with gaps)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (4, 3, height, width), generator=g, dtype=torch.uint8)
    images[1] = images[1] // 5 + 70
    images[2] = images[2, :1].expand(3, height, width)
    images[3] = images[3] // 64 * 60
    return images


def assert_like_release(ours: torch.Tensor, empty: torch.Tensor, expected: list, what) -> None:
    """Transparency equal and every opaque value equal (transparent pixels' values are not read)."""
    for i, (rgb, transparent) in enumerate(expected):
        assert torch.equal(empty[i, 0], transparent), (what, i)
        assert torch.equal(ours[i].int()[:, ~transparent], rgb[:, ~transparent]), (what, i)


@pytest.mark.parametrize("size", [(32, 32), (19, 19), (17, 23)], ids=["32x32", "19x19", "17x23"])
@pytest.mark.parametrize("name", aa.OPERATIONS[1:])
def test_each_operation_at_every_level_and_sign_is_pil_s(name, size):
    height, width = size
    if name == "Cutout" and height != width:
        pytest.skip("the release's Cutout loop runs both axes over one range: square images only")
    for level in range(aa.LEVELS):
        for negative in (False, True):
            images = sample_images(height, width, seed=level * 2 + negative)
            centre = (level * 3 % height, (level * 7 + 5) % width)
            ours, empty = aa.apply_operation(images, name, level, negative=negative, centre=centre)
            expected = [from_pil(release_step(to_pil(image), name, level, negative, centre)) for image in images]
            assert_like_release(ours, empty, expected, (name, level, negative))


def test_whole_sub_policies_are_the_release_s_on_pil_images():
    """Every sub-policy, both steps forced on where they can apply, and random choices: the chained steps
    keep the release's transparency (a geometric step's border stays transparent through an enhance
    step and turns black through an RGB lookup step)."""
    images = torch.cat([sample_images(32, 32, seed) for seed in range(48)])  # 192 images, 2 per sub-policy
    g = torch.Generator().manual_seed(5)
    draws = torch.rand(len(images), aa.POLICY_DRAWS, generator=g).clamp(1e-6, 1 - 1e-6)
    draws[:, 0] = (torch.arange(len(images)) % 95 + 0.5) / 95  # each sub-policy twice
    draws[::2, 1] = draws[::2, 5] = 1e-6  # every second image: both steps apply (if their probability > 0)
    ours, empty = aa.apply_policy(images, draws)
    assert_like_release(ours, empty, [release_policy(image, row) for image, row in zip(images, draws)], "policy")
    assert empty.any() and (~empty).any()
    assert not torch.equal(ours, images)


def test_a_batch_equals_its_images_one_at_a_time_whatever_the_layout():
    images = sample_images(32, 32, 0).repeat(4, 1, 1, 1)
    draws = augmentation_draws(3, 1, len(images), autoaugment=True)[:, DRAWS:]
    whole, empty = aa.apply_policy(images, draws)
    for i in range(len(images)):
        one, one_empty = aa.apply_policy(images[i:i + 1], draws[i:i + 1])
        assert torch.equal(one[0], whole[i]) and torch.equal(one_empty[0], empty[i])
    strided = torch.zeros(len(images), 3, 32, 64, dtype=torch.uint8)[..., ::2]
    strided.copy_(images)
    for layout in (images.contiguous(memory_format=torch.channels_last), strided):
        again, again_empty = aa.apply_policy(layout, draws)
        assert torch.equal(again, whole) and torch.equal(again_empty, empty)


def test_the_policy_numbers_are_the_contract_s_and_leave_crop_flip_cutout_alone():
    with_policy = augmentation_draws(7, 2, 40, autoaugment=True)
    assert with_policy.shape == (40, DRAWS + aa.POLICY_DRAWS)
    assert torch.equal(with_policy[:, :DRAWS], augmentation_draws(7, 2, 40))  # same crops, flips, squares
    expected = philox_uniform(40 * aa.POLICY_DRAWS, seed=7, stream=stream_id(Domain.AUTOAUGMENT, 2))
    assert torch.equal(with_policy[:, DRAWS:].flatten(), expected)
    assert torch.equal(augmentation_draws(7, 2, 1, first=13, autoaugment=True)[0], with_policy[13])


def test_sub_policies_are_drawn_uniformly_and_steps_with_their_probability():
    n = 95 * 400
    draws = augmentation_draws(0, 0, n, autoaugment=True)[:, DRAWS:]
    sub = uniform_index(draws[:, 0], 95)
    counts = torch.bincount(sub, minlength=95).numpy()
    assert stats.chisquare(counts).pvalue > 1e-3
    probability = torch.tensor([[p for _, p, _ in s] for s in aa.CIFAR_POLICY])[sub]  # [n, 2]
    applied = draws[:, [1, 5]] < probability
    expected = probability.sum().item()
    assert abs(applied.sum().item() - expected) < 5 * expected ** 0.5
    assert abs((draws[:, [2, 6]] > 0.5).float().mean().item() - 0.5) < 0.01  # the signs


def test_training_inputs_run_the_policy_first_and_empty_pixels_are_the_mean():
    images = sample_images(32, 32, 1).repeat(8, 1, 1, 1)
    mean, std = CIFAR_STATS[10]
    draws = augmentation_draws(2, 0, len(images), autoaugment=True)
    policy, empty = aa.apply_policy(images, draws[:, DRAWS:])
    expected = augment_batch(normalize(policy, mean, std).masked_fill(empty, 0), draws[:, :DRAWS])
    assert torch.equal(training_inputs(images, draws, mean, std, autoaugment=True), expected)
    plain = training_inputs(images, draws[:, :DRAWS], mean, std)  # without: the paper's crop, flip, cutout
    assert torch.equal(plain, augment_batch(normalize(images, mean, std), draws[:, :DRAWS]))
    assert not torch.equal(plain, expected)
    # a translation's border: the mean colour (0 once normalised), not black
    moved, moved_empty = aa.apply_operation(images[:1], "TranslateX", 9)
    assert moved_empty[0, 0, :, -9:].all() and not moved_empty[0, 0, :, :-9].any()
    row = torch.full((1, DRAWS + aa.POLICY_DRAWS), 0.5)
    row[0, DRAWS] = (1 + 0.5) / 95  # sub-policy 1: Rotate 0.7 level 2, then TranslateX 0.3 level 9
    row[0, DRAWS + 1] = 0.9  # the rotation does not apply
    row[0, DRAWS + 5], row[0, DRAWS + 6] = 0.1, 0.2  # the translation applies, positive
    out = training_inputs(images[:1], row, mean, std, autoaugment=True, crop_padding=0, flip=False, cutout_size=0)
    assert torch.equal(out[0, :, :, -9:], torch.zeros(3, 32, 9))
    assert torch.equal(out[0, :, :, :-9], normalize(images[:1], mean, std)[0, :, :, 9:])


def test_bad_input_is_named():
    images = sample_images(8, 8, 0)
    with pytest.raises(ValueError, match=r"images must be uint8 \[N, 3, H, W\]"):
        aa.apply_policy(images.float(), torch.rand(4, aa.POLICY_DRAWS))
    with pytest.raises(ValueError, match=r"images must be uint8 \[N, 3, H, W\]"):
        aa.apply_policy(images[:, :1], torch.rand(4, aa.POLICY_DRAWS))
    with pytest.raises(ValueError, match=r"draws must be \[4, 9\]"):
        aa.apply_policy(images, torch.rand(4, 5))
    with pytest.raises(ValueError, match="name must be one of Identity, ShearX"):
        aa.apply_operation(images, "Blur", 3)
    with pytest.raises(ValueError, match=r"level in \[0, 10\)"):
        aa.apply_operation(images, "Rotate", 10)
    mean, std = CIFAR_STATS[10]
    with pytest.raises(ValueError, match=r"draws must be \[N, 14\] \(augmentation_draws with autoaugment=True\)"):
        training_inputs(images, torch.rand(4, DRAWS), mean, std, autoaugment=True)
    with pytest.raises(ValueError, match=r"draws must be \[N, 5\]"):
        training_inputs(images, torch.rand(4, DRAWS + aa.POLICY_DRAWS), mean, std)


def test_the_config_key_is_checked_against_the_dataset():
    from pgnas_fast import configs

    assert configs.resolve("cifar10-supnet-m")["autoaugment"] is False  # the paper's protocol by default
    assert configs.resolve("cifar10-supnet-m", {"autoaugment": True})["autoaugment"] is True
    with pytest.raises(configs.ConfigError, match="'autoaugment' applies to CIFAR.*dataset digits takes false"):
        configs.resolve("digits-tiny", {"autoaugment": True})
    with pytest.raises(configs.ConfigError, match="'autoaugment' must be true or false, got 'yes'"):
        configs.resolve("cifar10-supnet-m", {"autoaugment": "yes"})


@pytest.mark.gpu
def test_the_policy_on_cuda_is_the_cpu_s_bit_for_bit():
    images = torch.cat([sample_images(32, 32, seed) for seed in range(64)])
    draws = augmentation_draws(4, 3, len(images), autoaugment=True)
    ours, empty = aa.apply_policy(images.cuda(), draws[:, DRAWS:].cuda())
    cpu, cpu_empty = aa.apply_policy(images, draws[:, DRAWS:])
    assert torch.equal(ours.cpu(), cpu) and torch.equal(empty.cpu(), cpu_empty)
    mean, std = CIFAR_STATS[10]
    assert torch.equal(training_inputs(images.cuda(), draws.cuda(), mean, std, autoaugment=True).cpu(),
                       training_inputs(images, draws, mean, std, autoaugment=True))
