"""AutoAugment's CIFAR policy as the authors' Shake-Shake code applied it: batched, and PIL's bits.

The policy is the AutoAugment release's CIFAR set (Cubuk et al. 2019, `good_policies` of
tensorflow/models research/autoaugment): 95 sub-policies of two (operation, probability, level) steps.
Each training image draws one sub-policy uniformly; each step applies with its probability; shears,
translations and rotations take a random sign. The release runs it on the image before the pad-crop,
flip and cutout, so here it runs on the uint8 image before normalisation (augment.training_inputs).

The operations are the PIL ones the release calls, computed so that a batch on the GPU and one
image in a DataLoader worker get the same bits, and the same as PIL (tests/test_autoaugment.py):
- geometry (ShearX/Y, TranslateX/Y, Rotate): nearest-neighbour sampling at pixel centres through a 2x3
  matrix in 1/65536 fixed point (PIL's AFFINE transform, and rotate about the centre);
- one lookup table per image and channel (Invert, Solarize, Posterize, AutoContrast, Equalize), in
  integers, but AutoContrast's scale, which is PIL's float64 formula;
- a blend with a degenerate image (Color: grey; Contrast: the mean grey; Brightness: black; Sharpness:
  the 3x3 smoothed image, borders kept) with factor 0.1 + 1.8 l / 10, PIL's float32 formula.
Floating-point steps are one IEEE operation per torch op (a multiply, then an add: never fused), so
they round alike on every device.

The release works on RGBA images: pixels a geometric step brings in from outside are transparent, as is
the policy's own Cutout square; at the end transparent pixels become 0 after normalisation, i.e. the mean
colour. A later step that converts to RGB (the lookup-table operations) makes them opaque first: black,
or Cutout's (125, 122, 113). `apply_policy` returns that transparency as `empty`.

Per image 9 uniforms of the RNG contract (augment.augmentation_draws): the sub-policy, then per step
whether it applies, its sign, and the centre row and column of a Cutout step.
"""
from __future__ import annotations

import functools
import math

import torch

from ..ops.transfer import to_device
from .uniforms import uniform_index

# The release's good_policies(): exp0_0 .. exp0_3, exp1_0 .. exp1_6, exp2_0 .. exp2_7 in its order.
CIFAR_POLICY: tuple[tuple[tuple[str, float, int], tuple[str, float, int]], ...] = (
    (("Invert", 0.1, 7), ("Contrast", 0.2, 6)), (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)), (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, 8), ("Equalize", 0.9, 2)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, 3)), (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, 2), ("Solarize", 0.8, 3)), (("Equalize", 0.8, 8), ("Invert", 0.1, 3)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, 1)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.0, 2)), (("TranslateY", 0.7, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, 0), ("Solarize", 0.4, 3)), (("Equalize", 0.7, 5), ("Invert", 0.1, 3)),
    (("TranslateY", 0.7, 9), ("TranslateY", 0.7, 9)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, 1)), (("TranslateY", 0.8, 9), ("TranslateY", 0.9, 9)),
    (("AutoContrast", 0.8, 0), ("TranslateY", 0.7, 9)), (("TranslateY", 0.2, 7), ("Color", 0.9, 6)),
    (("Equalize", 0.7, 6), ("Color", 0.4, 9)),
    (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)), (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
    (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)), (("Equalize", 0.6, 5), ("Equalize", 0.5, 1)),
    (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Brightness", 0.3, 7), ("AutoContrast", 0.5, 8)), (("AutoContrast", 0.9, 4), ("AutoContrast", 0.5, 6)),
    (("Solarize", 0.3, 5), ("Equalize", 0.6, 5)), (("TranslateY", 0.2, 4), ("Sharpness", 0.3, 3)),
    (("Brightness", 0.0, 8), ("Color", 0.8, 8)),
    (("Solarize", 0.2, 6), ("Color", 0.8, 6)), (("Solarize", 0.2, 6), ("AutoContrast", 0.8, 1)),
    (("Solarize", 0.4, 1), ("Equalize", 0.6, 5)), (("Brightness", 0.0, 0), ("Solarize", 0.5, 2)),
    (("AutoContrast", 0.9, 5), ("Brightness", 0.5, 3)),
    (("Contrast", 0.7, 5), ("Brightness", 0.0, 2)), (("Solarize", 0.2, 8), ("Solarize", 0.1, 5)),
    (("Contrast", 0.5, 1), ("TranslateY", 0.2, 9)), (("AutoContrast", 0.6, 5), ("TranslateY", 0.0, 9)),
    (("AutoContrast", 0.9, 4), ("Equalize", 0.8, 4)),
    (("Brightness", 0.0, 7), ("Equalize", 0.4, 7)), (("Solarize", 0.2, 5), ("Equalize", 0.7, 5)),
    (("Equalize", 0.6, 8), ("Color", 0.6, 2)), (("Color", 0.3, 7), ("Color", 0.2, 4)),
    (("AutoContrast", 0.5, 2), ("Solarize", 0.7, 2)),
    (("AutoContrast", 0.2, 0), ("Equalize", 0.1, 0)), (("ShearY", 0.6, 5), ("Equalize", 0.6, 5)),
    (("Brightness", 0.9, 3), ("AutoContrast", 0.4, 1)), (("Equalize", 0.8, 8), ("Equalize", 0.7, 7)),
    (("Equalize", 0.7, 7), ("Solarize", 0.5, 0)),
    (("Equalize", 0.8, 4), ("TranslateY", 0.8, 9)), (("TranslateY", 0.8, 9), ("TranslateY", 0.6, 9)),
    (("TranslateY", 0.9, 0), ("TranslateY", 0.5, 9)), (("AutoContrast", 0.5, 3), ("Solarize", 0.3, 4)),
    (("Solarize", 0.5, 3), ("Equalize", 0.4, 4)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)), (("Equalize", 0.3, 7), ("AutoContrast", 0.4, 8)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)), (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, 3)),
    (("AutoContrast", 0.1, 5), ("Brightness", 0.0, 0)), (("Cutout", 0.2, 4), ("Equalize", 0.1, 1)),
    (("Equalize", 0.7, 7), ("AutoContrast", 0.6, 4)), (("Color", 0.1, 8), ("ShearY", 0.2, 3)),
    (("ShearY", 0.4, 2), ("Rotate", 0.7, 0)),
    (("ShearY", 0.1, 3), ("AutoContrast", 0.9, 5)), (("TranslateY", 0.3, 6), ("Cutout", 0.3, 3)),
    (("Equalize", 0.5, 0), ("Solarize", 0.6, 6)), (("AutoContrast", 0.3, 5), ("Rotate", 0.2, 7)),
    (("Equalize", 0.8, 2), ("Invert", 0.4, 0)),
    (("Equalize", 0.9, 5), ("Color", 0.7, 0)), (("Equalize", 0.1, 1), ("ShearY", 0.1, 3)),
    (("AutoContrast", 0.7, 3), ("Equalize", 0.7, 0)), (("Brightness", 0.5, 1), ("Contrast", 0.1, 7)),
    (("Contrast", 0.1, 4), ("Solarize", 0.6, 5)),
    (("Solarize", 0.2, 3), ("ShearX", 0.0, 0)), (("TranslateX", 0.3, 0), ("TranslateX", 0.6, 0)),
    (("Equalize", 0.5, 9), ("TranslateY", 0.6, 7)), (("ShearX", 0.1, 0), ("Sharpness", 0.5, 1)),
    (("Equalize", 0.8, 6), ("Invert", 0.3, 6)),
    (("AutoContrast", 0.3, 9), ("Cutout", 0.5, 3)), (("ShearX", 0.4, 4), ("AutoContrast", 0.9, 2)),
    (("ShearX", 0.0, 3), ("Posterize", 0.0, 3)), (("Solarize", 0.4, 3), ("Color", 0.2, 4)),
    (("Equalize", 0.1, 4), ("Equalize", 0.7, 6)),
    (("Equalize", 0.3, 8), ("AutoContrast", 0.4, 3)), (("Solarize", 0.6, 4), ("AutoContrast", 0.7, 6)),
    (("AutoContrast", 0.2, 9), ("Brightness", 0.4, 8)), (("Equalize", 0.1, 0), ("Equalize", 0.0, 6)),
    (("Equalize", 0.8, 4), ("Equalize", 0.0, 4)),
    (("Equalize", 0.5, 5), ("AutoContrast", 0.1, 2)), (("Solarize", 0.5, 5), ("AutoContrast", 0.9, 5)),
    (("AutoContrast", 0.6, 1), ("AutoContrast", 0.7, 8)), (("Equalize", 0.2, 0), ("AutoContrast", 0.1, 2)),
    (("Equalize", 0.6, 9), ("Equalize", 0.4, 4)),
)

# Operation ids; 0 is a step that does not apply.
OPERATIONS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Invert", "Solarize",
              "Posterize", "AutoContrast", "Equalize", "Color", "Contrast", "Brightness", "Sharpness", "Cutout")
OP = {name: i for i, name in enumerate(OPERATIONS)}
LOOKUP = ("Invert", "Solarize", "Posterize", "AutoContrast", "Equalize")  # through RGB: transparency ends
BLENDS = ("Color", "Contrast", "Brightness", "Sharpness")
LEVELS = 10  # the release's PARAMETER_MAX: a level l scales an operation's range by l / 10
CUTOUT_FILL = (125, 122, 113)  # the release's Cutout colour (transparent, so the mean unless made opaque)

# uniforms per image: the sub-policy, then per step: applies, sign, Cutout centre row and column
POLICY_DRAWS = 9
_Q = 1 << 16  # fixed point of the geometric matrices


def _int_parameter(level: int, maxval: int) -> int:
    return int(level * maxval / LEVELS)  # the release's int_parameter


def geometry_matrix(name: str, level: int, negative: bool, height: int, width: int) -> tuple[int, ...]:
    """(a, b, c, d, e, f) in 1/(2 * 65536): output pixel (x, y) samples input column
    floor((a (2x + 1) + b (2y + 1) + c) / 2^17) and row floor((d (2x + 1) + e (2y + 1) + f) / 2^17), PIL's
    nearest-neighbour AFFINE transform at pixel centres."""
    sign = -1 if negative else 1
    if name in ("ShearX", "ShearY"):  # PIL (1, l, 0, 0, 1, 0) / (1, 0, 0, l, 1, 0): about the origin
        shear = round(sign * level * 0.3 / LEVELS * _Q)
        return (_Q, shear, 0, 0, _Q, 0) if name == "ShearX" else (_Q, 0, 0, shear, _Q, 0)
    if name in ("TranslateX", "TranslateY"):  # PIL (1, 0, t, 0, 1, 0) / (1, 0, 0, 0, 1, t): t pixels
        shift = 2 * _Q * sign * _int_parameter(level, 10)
        return (_Q, 0, shift, 0, _Q, 0) if name == "TranslateX" else (_Q, 0, 0, 0, _Q, shift)
    if name == "Rotate":  # PIL rotate(degrees): counter-clockwise about (w / 2, h / 2)
        angle = -math.radians(sign * _int_parameter(level, 30))
        cos, sin = math.cos(angle), math.sin(angle)
        cx, cy = width / 2, height / 2
        return (round(cos * _Q), round(sin * _Q), round(2 * _Q * (cx - cos * cx - sin * cy)),
                round(-sin * _Q), round(cos * _Q), round(2 * _Q * (cy + sin * cx - cos * cy)))
    return (_Q, 0, 0, 0, _Q, 0)


def static_table(name: str, level: int) -> list[int]:
    """The 256-entry lookup table of an operation that does not depend on the image (identity otherwise)."""
    values = range(256)
    if name == "Invert":
        return [255 - v for v in values]
    if name == "Solarize":
        threshold = 256 - _int_parameter(level, 256)
        return [v if v < threshold else 255 - v for v in values]
    if name == "Posterize":  # the release keeps 4 - int(4 l / 10) bits
        bits = 4 - _int_parameter(level, 4)
        mask = ~((1 << (8 - bits)) - 1) & 0xFF
        return [v & mask for v in values]
    return list(values)


def blend_factor(name: str, level: int) -> float:
    """The release's enhance factor 0.1 + 1.8 l / 10 (1 for an operation that is not a blend: the image)."""
    return float(level) * 1.8 / LEVELS + 0.1 if name in BLENDS else 1.0


@functools.lru_cache(maxsize=16)
def _tables(height: int, width: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Per (sub-policy, step): operation id, probability, level; per (operation, level, sign): geometry
    matrix, static lookup table, blend factor; per operation: whether it is a lookup; Cutout's colour.
    Made once per device and size (no host copy per batch)."""
    ops = torch.tensor([[OP[name] for name, _, _ in sub] for sub in CIFAR_POLICY])
    probs = torch.tensor([[p for _, p, _ in sub] for sub in CIFAR_POLICY], dtype=torch.float32)
    levels = torch.tensor([[lv for _, _, lv in sub] for sub in CIFAR_POLICY])
    keys = [(name, level, negative) for name in OPERATIONS for level in range(LEVELS) for negative in (False, True)]
    matrices = torch.tensor([geometry_matrix(n, lv, neg, height, width) for n, lv, neg in keys], dtype=torch.int64)
    luts = torch.tensor([static_table(n, lv) for n, lv, _ in keys], dtype=torch.int32)
    blends = torch.tensor([blend_factor(n, lv) for n, lv, _ in keys], dtype=torch.float32)  # PIL's float alpha
    lookup = torch.tensor([name in LOOKUP for name in OPERATIONS])  # by operation id
    tables = {"ops": ops, "probs": probs, "levels": levels, "matrices": matrices, "luts": luts, "blends": blends,
              "lookup": lookup, "cutout_fill": torch.tensor(CUTOUT_FILL, dtype=torch.int32)}
    return {key: to_device(value, device) for key, value in tables.items()}


def _grey(images: torch.Tensor) -> torch.Tensor:
    """int32 [N, 1, H, W]: PIL's RGB -> L, (19595 R + 38470 G + 7471 B + 2^15) >> 16."""
    r, g, b = images.unbind(1)
    return ((19595 * r + 38470 * g + 7471 * b + (1 << 15)) >> 16).unsqueeze(1)


def _smoothed(images: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH filter (3x3 kernel of ones with 5 in the centre, / 13, rounded), border pixels kept."""
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1))
    h, w = images.shape[-2:]
    total = sum(padded[..., i:i + h, j:j + w] for i in range(3) for j in range(3)) + 4 * images
    out = torch.div(total + 6, 13, rounding_mode="floor")
    inner = torch.zeros_like(images, dtype=torch.bool)
    inner[..., 1:-1, 1:-1] = True
    return torch.where(inner, out, images)


def _geometry(images: torch.Tensor, empty: torch.Tensor, matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image resampled through its matrix [N, 6]; pixels from outside are black and empty."""
    n, c, h, w = images.shape
    xs = (2 * torch.arange(w, device=images.device) + 1).view(1, 1, w)
    ys = (2 * torch.arange(h, device=images.device) + 1).view(1, h, 1)
    a, b, cc, d, e, f = (m.view(n, 1, 1) for m in matrices.unbind(1))
    col = torch.div(a * xs + b * ys + cc, 2 * _Q, rounding_mode="floor")  # [N, H, W]
    row = torch.div(d * xs + e * ys + f, 2 * _Q, rounding_mode="floor")
    inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    source = torch.where(inside, row * w + col, 0).view(n, 1, h * w)
    moved = images.reshape(n, c, h * w).gather(2, source.expand(n, c, h * w)).view(n, c, h, w)
    moved_empty = empty.reshape(n, 1, h * w).gather(2, source).view(n, 1, h, w)
    inside = inside.unsqueeze(1)
    return torch.where(inside, moved, 0), moved_empty | ~inside


def _lookup(images: torch.Tensor, op: torch.Tensor, static: torch.Tensor) -> torch.Tensor:
    """Each image through its per-channel table: `static` [N, 256], or AutoContrast's or Equalize's, which
    read the image's histograms."""
    n, c, h, w = images.shape
    values = images.reshape(n * c, h * w).long()
    counts = torch.zeros(n * c, 256, dtype=torch.int64, device=images.device).scatter_add_(
        1, values, torch.ones_like(values))
    levels = torch.arange(256, device=images.device)
    present = counts > 0
    low = torch.where(present, levels, 256).amin(1, keepdim=True)  # PIL autocontrast, cutoff 0
    high = torch.where(present, levels, -1).amax(1, keepdim=True)
    # PIL: scale = 255 / (hi - lo), offset = -lo * scale, lut[v] = int(v * scale + offset), in float64
    span = (high - low).clamp(min=1).double()
    scale = torch.full_like(span, 255.0) / span  # (not 255.0 / span: torch takes a reciprocal, then multiplies)
    offset = -low.double() * scale
    stretched = (levels.double() * scale + offset).trunc().clamp(0, 255).long()
    autocontrast = torch.where(high > low, stretched, levels)
    # PIL equalize: step = (pixels - count of the highest present value) // 255, lut[v] = (step // 2 +
    # pixels below v) // step; the image as it is when fewer than two values are present or step is 0
    top_count = counts.gather(1, high.clamp(min=0))
    step = torch.div(h * w - top_count, 255, rounding_mode="floor")
    below = counts.cumsum(1) - counts
    spread = torch.div(torch.div(step, 2, rounding_mode="floor") + below, step.clamp(min=1), rounding_mode="floor")
    equalize = torch.where((present.sum(1, keepdim=True) > 1) & (step > 0), spread.clamp(max=255), levels)
    op = op.repeat_interleave(c).view(n * c, 1)
    table = torch.where(op == OP["AutoContrast"], autocontrast,
                        torch.where(op == OP["Equalize"], equalize, static.repeat_interleave(c, 0).long()))
    return table.gather(1, values).view(n, c, h, w).to(images.dtype)


def _blend(images: torch.Tensor, op: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance (ImagingBlend): degenerate + factor (image - degenerate) in float32, truncated,
    clipped to 0..255."""
    n, _, h, w = images.shape
    grey = _grey(images)
    mean_grey = torch.div(2 * grey.sum((2, 3), keepdim=True) + h * w, 2 * h * w, rounding_mode="floor")
    op = op.view(n, 1, 1, 1)
    degenerate = torch.where(op == OP["Color"], grey, 0)
    degenerate = torch.where(op == OP["Contrast"], mean_grey, degenerate)
    degenerate = torch.where(op == OP["Sharpness"], _smoothed(images), degenerate)
    mixed = degenerate.float() + factor.view(n, 1, 1, 1) * (images - degenerate).float()
    return mixed.floor().clamp(0, 255).to(images.dtype)  # (floor = PIL's truncation once clipped at 0)


def _cutout(images: torch.Tensor, empty: torch.Tensor, fill: torch.Tensor, op: torch.Tensor, level: torch.Tensor,
            centre_row: torch.Tensor, centre_col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The release's policy Cutout (size 2 l): it fills rows AND columns [max(0, row - size / 2),
    min(W, col + size / 2)), both from the centre row's start and the centre column's end, as its loop does."""
    _, _, h, w = images.shape
    half = torch.where(op == OP["Cutout"], level, 0)  # size // 2 = l; 0: no square
    start = (centre_row - half).clamp(min=0).view(-1, 1)
    end = (centre_col + half).clamp(max=w).view(-1, 1)
    end = torch.where(half.view(-1, 1) > 0, end, start)
    ys = torch.arange(h, device=images.device)
    xs = torch.arange(w, device=images.device)
    square = (((ys >= start) & (ys < end))[:, None, :, None] & ((xs >= start) & (xs < end))[:, None, None, :])
    return torch.where(square, fill.view(1, 3, 1, 1), images), empty | square


def apply_policy(images: torch.Tensor, draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 [N, 3, H, W], bool [N, 1, H, W] empty): each image through its sub-policy of CIFAR_POLICY,
    with its row of `draws` (float32 [N, POLICY_DRAWS] uniforms); `empty` marks the release's transparent
    pixels (the mean colour after normalisation). No host synchronisation."""
    n, _, h, w = _check_images(images)
    if draws.shape != (n, POLICY_DRAWS):
        raise ValueError(f"draws must be [{n}, {POLICY_DRAWS}] (the policy's numbers per image), "
                         f"got {list(draws.shape)}")
    tables = _tables(h, w, images.device)
    draws = to_device(draws, images.device)
    sub = uniform_index(draws[:, 0], len(CIFAR_POLICY))
    x = images.to(torch.int32)
    empty = torch.zeros(n, 1, h, w, dtype=torch.bool, device=images.device)
    for step in range(2):
        applies, negative, centre_row, centre_col = draws[:, 1 + 4 * step:5 + 4 * step].unbind(1)
        op = torch.where(applies < tables["probs"][sub, step], tables["ops"][sub, step], 0)
        x, empty = _step(x, empty, tables, op, tables["levels"][sub, step],
                         negative > 0.5,  # the release negates when random() > 0.5
                         uniform_index(centre_row, h), uniform_index(centre_col, w))
    return x.to(torch.uint8), empty


def apply_operation(images: torch.Tensor, name: str, level: int, *, negative: bool = False,
                    centre: tuple[int, int] = (0, 0)) -> tuple[torch.Tensor, torch.Tensor]:
    """One operation at one level on every image (uint8 [N, 3, H, W]), as a policy step applies it:
    (images, empty). `negative` flips a geometric step's sign; `centre` places a Cutout square."""
    if name not in OP or not 0 <= level < LEVELS:
        raise ValueError(f"name must be one of {', '.join(OPERATIONS)} and level in [0, {LEVELS}), "
                         f"got {name!r}, {level!r}")
    n, _, h, w = _check_images(images)
    tables = _tables(h, w, images.device)

    def full(value):
        return torch.full((n,), value, dtype=torch.int64, device=images.device)

    empty = torch.zeros(n, 1, h, w, dtype=torch.bool, device=images.device)
    x, empty = _step(images.to(torch.int32), empty, tables, full(OP[name]), full(level), full(negative).bool(),
                     full(centre[0]), full(centre[1]))
    return x.to(torch.uint8), empty


def _check_images(images: torch.Tensor) -> torch.Size:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 [N, 3, H, W] (RGB), got {images.dtype} {list(images.shape)}")
    return images.shape


def _step(x: torch.Tensor, empty: torch.Tensor, tables: dict[str, torch.Tensor], op: torch.Tensor,
          level: torch.Tensor, negative: torch.Tensor, centre_row: torch.Tensor,
          centre_col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One policy step: each image's operation `op` [N] (0: none) at its level. The four kinds run over
    the whole batch, each the identity for the images that have another kind, so nothing waits on the
    host to split the batch."""
    key = (op * LEVELS + level) * 2 + negative.long()
    x, empty = _geometry(x, empty, tables["matrices"][key])
    x = _lookup(x, op, tables["luts"][key])
    empty = empty & ~tables["lookup"][op].view(-1, 1, 1, 1)  # (converted to RGB: opaque from here on)
    x = _blend(x, op, tables["blends"][key])
    return _cutout(x, empty, tables["cutout_fill"], op, level, centre_row, centre_col)
