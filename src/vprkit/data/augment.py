"""Training-time augmentations on PIL images, following torchvision's (0.15) PIL code paths.

The official CricaVPR training applies ``Resize`` + ``RandAugment(num_ops=3)`` +
``Normalize`` (Lu-Feng/CricaVPR's train.py); SelaVPR trains with ``Resize`` + ``Normalize``
and has optional horizontal flip and colour jitter (Lu-Feng/SelaVPR). torchvision is not a
dependency, so the transforms live here, each one doing what torchvision does on a PIL
image: the same Pillow calls (``ImageEnhance``, ``ImageOps``, ``Image.transform`` /
``Image.rotate`` with nearest sampling), the same parameter formulas and the same magnitude
tables.

Randomness: every random function takes a CPU ``torch.Generator`` as ``rng`` and never touches
a global RNG, so training is reproducible and resumable (save ``rng.get_state()``). The draws
are the very calls torchvision makes (``torch.randint``, ``torch.rand``, ``torch.randperm``,
``Tensor.uniform_``) in the same order, so ``rng = torch.Generator().manual_seed(s)`` gives the
parameters torchvision would draw after ``torch.manual_seed(s)``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from vprkit.data.images import IMAGENET_MEAN, IMAGENET_STD, normalize, resize, to_tensor

__all__ = [
    "RAND_AUGMENT_OPS",
    "TrainTransform",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "adjust_sharpness",
    "affine",
    "apply_op",
    "autocontrast",
    "color_jitter",
    "color_jitter_params",
    "cricavpr_train_transform",
    "equalize",
    "horizontal_flip",
    "posterize",
    "rand_augment",
    "rand_augment_magnitude",
    "random_horizontal_flip",
    "random_resized_crop",
    "random_resized_crop_params",
    "rotate",
    "selavpr_train_transform",
    "solarize",
]

Interpolation = Literal["nearest", "bilinear"]
Fill = float | Sequence[float] | None

# torchvision's RandAugment op list, in its order: the sampled index selects from it, so the
# order is part of the semantics.
RAND_AUGMENT_OPS: tuple[str, ...] = (
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
)

_PIL_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
}


# --------------------------------------------------------------------------- checks


def _check_image(img: object, what: str) -> Image.Image:
    if not isinstance(img, Image.Image):
        raise TypeError(f"{what} expects a PIL image, got {type(img).__name__}")
    if img.mode not in ("RGB", "L"):
        raise ValueError(
            f"{what} expects an RGB (or L) image, got mode {img.mode!r}; "
            "read files with vprkit.data.images.load_image or convert with to_rgb"
        )
    return img


def _check_rng(rng: object) -> torch.Generator:
    if not isinstance(rng, torch.Generator):
        raise TypeError(
            "rng must be a torch.Generator (e.g. torch.Generator().manual_seed(seed)), "
            f"got {type(rng).__name__}"
        )
    if rng.device.type != "cpu":
        raise ValueError(f"rng must be a CPU torch.Generator, got one on {rng.device}")
    return rng


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_factor(value: float, what: str) -> float:
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite non-negative number, got {value!r}")
    return float(value)


def _size_pair(size: object, what: str) -> tuple[int, int]:
    """``int`` (square) or ``(H, W)`` to a pair of positive ints."""
    if isinstance(size, int | np.integer) and not isinstance(size, bool):
        size = (size, size)
    if (
        isinstance(size, Sequence)
        and not isinstance(size, str)
        and len(size) == 2
        and all(isinstance(s, int | np.integer) and not isinstance(s, bool) for s in size)
        and all(s > 0 for s in size)
    ):
        return int(size[0]), int(size[1])
    raise ValueError(f"{what} must be a positive int or a (height, width) pair, got {size!r}")


def _float_pair(value: object, what: str) -> tuple[float, float]:
    if (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == 2
        and all(_is_number(v) and math.isfinite(v) for v in value)
    ):
        return float(value[0]), float(value[1])
    raise ValueError(f"{what} must be a pair of finite numbers, got {value!r}")


def _pil_fill(fill: Fill, img: Image.Image) -> int | tuple[int, ...]:
    """Fill for Pillow's ``fillcolor``, the way torchvision's ``_parse_fill`` builds it."""
    bands = len(img.getbands())
    if fill is None:
        fill = 0
    if _is_number(fill):
        values = [float(fill)] * bands
    elif isinstance(fill, Sequence) and not isinstance(fill, str):
        values = [float(f) for f in fill]
        if len(values) == 1:
            values = values * bands
        elif len(values) != bands:
            raise ValueError(
                f"fill needs 1 or {bands} values for a {img.mode} image, got {len(values)}"
            )
    else:
        raise ValueError(f"fill must be None, a number or a sequence of numbers, got {fill!r}")
    # torchvision truncates with int() for every non-float mode.
    ints = tuple(int(v) for v in values)
    return ints[0] if bands == 1 else ints


# --------------------------------------------------------------------------- geometry


def horizontal_flip(img: Image.Image) -> Image.Image:
    """Mirror left-right (``torchvision.transforms.functional.hflip``)."""
    _check_image(img, "horizontal_flip")
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def random_horizontal_flip(
    img: Image.Image, p: float = 0.5, *, rng: torch.Generator
) -> Image.Image:
    """Flip with probability ``p``, drawing ``torch.rand(1) < p`` as ``RandomHorizontalFlip``."""
    _check_image(img, "random_horizontal_flip")
    if not _is_number(p) or not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be a probability in [0, 1], got {p!r}")
    if torch.rand(1, generator=_check_rng(rng)).item() < p:
        return horizontal_flip(img)
    return img


def _crop_ranges(scale: object, ratio: object) -> tuple[tuple[float, float], tuple[float, float]]:
    scale = _float_pair(scale, "scale")
    ratio = _float_pair(ratio, "ratio")
    # torchvision only warns on (max, min) ranges; here they are errors.
    if not 0 <= scale[0] <= scale[1]:
        raise ValueError(f"scale must satisfy 0 <= min <= max, got {scale}")
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
    return scale, ratio


def random_resized_crop_params(
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    *,
    rng: torch.Generator,
) -> tuple[int, int, int, int]:
    """Sample ``(top, left, h, w)`` as ``RandomResizedCrop.get_params`` does.

    Up to 10 tries of an area fraction uniform in ``scale`` and a log-uniform aspect ratio in
    ``ratio``; if none fits, the centre crop of the whole image clamped to ``ratio``.
    """
    height, width = _size_pair((height, width), "image size")
    scale, ratio = _crop_ranges(scale, ratio)
    _check_rng(rng)
    area = height * width
    # float32 like torchvision's torch.log(torch.tensor(ratio)), so the draws agree bit for bit.
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=rng).item()
        log_r = torch.empty(1).uniform_(log_ratio[0].item(), log_ratio[1].item(), generator=rng)
        aspect_ratio = torch.exp(log_r).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=rng).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=rng).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(
    img: Image.Image,
    size: int | Sequence[int],
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    *,
    rng: torch.Generator,
) -> Image.Image:
    """``RandomResizedCrop(size, scale, ratio)`` on a PIL image: random crop, bilinear resize.

    ``size`` is ``(H, W)`` or an int for a square output (as torchvision, unlike ``Resize``).
    """
    _check_image(img, "random_resized_crop")
    out_size = _size_pair(size, "random_resized_crop size")
    w, h = img.size
    top, left, ch, cw = random_resized_crop_params(h, w, scale, ratio, rng=rng)
    return resize(img.crop((left, top, left + cw, top + ch)), out_size)


def _inverse_affine_matrix(
    center: Sequence[float],
    angle: float,
    translate: Sequence[float],
    scale: float,
    shear: Sequence[float],
) -> list[float]:
    """Output-to-input affine coefficients, with torchvision's rotation/shear convention.

    The forward map is ``T * C * R * S * Sh * C^-1`` (angle clockwise on screen, shear in
    degrees); Pillow's ``Image.transform`` wants its inverse.
    """
    rot = math.radians(angle)
    sx, sy = math.radians(shear[0]), math.radians(shear[1])
    cx, cy = center
    tx, ty = translate
    # Rotation times shear (without scale); its determinant is 1.
    a = math.cos(rot - sy) / math.cos(sy)
    b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
    c = math.sin(rot - sy) / math.cos(sy)
    d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
    m = [d / scale, -b / scale, 0.0, -c / scale, a / scale, 0.0]
    m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty)
    m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty)
    m[2] += cx
    m[5] += cy
    return m


def affine(
    img: Image.Image,
    *,
    angle: float = 0.0,
    translate: Sequence[float] = (0, 0),
    scale: float = 1.0,
    shear: Sequence[float] = (0.0, 0.0),
    center: Sequence[float] | None = None,
    interpolation: Interpolation = "nearest",
    fill: Fill = None,
) -> Image.Image:
    """``torchvision.transforms.functional.affine`` on a PIL image (same size output).

    ``angle`` is in degrees, clockwise (unlike :func:`rotate`, as in torchvision);
    ``center`` is in pixels, default the image centre ``(w / 2, h / 2)`` (no half-pixel
    offset, as torchvision); ``translate`` is ``(dx, dy)`` in pixels; ``shear`` is
    ``(x_degrees, y_degrees)``; pixels mapped from outside the image get ``fill`` (default 0).
    """
    _check_image(img, "affine")
    if interpolation not in _PIL_RESAMPLE:
        raise ValueError(f"interpolation must be 'nearest' or 'bilinear', got {interpolation!r}")
    if not _is_number(scale) or scale <= 0:
        raise ValueError(f"scale must be positive, got {scale!r}")
    translate = _float_pair(translate, "translate")
    shear = _float_pair(shear, "shear")
    w, h = img.size
    center = (w * 0.5, h * 0.5) if center is None else _float_pair(center, "center")
    matrix = _inverse_affine_matrix(center, float(angle), translate, float(scale), shear)
    return img.transform(
        img.size,
        Image.Transform.AFFINE,
        matrix,
        _PIL_RESAMPLE[interpolation],
        fillcolor=_pil_fill(fill, img),
    )


def rotate(
    img: Image.Image,
    angle: float,
    *,
    interpolation: Interpolation = "nearest",
    fill: Fill = None,
) -> Image.Image:
    """Rotate counter-clockwise by ``angle`` degrees about the centre, keeping the size
    (``torchvision.transforms.functional.rotate`` on PIL, i.e. ``Image.rotate``)."""
    _check_image(img, "rotate")
    if interpolation not in _PIL_RESAMPLE:
        raise ValueError(f"interpolation must be 'nearest' or 'bilinear', got {interpolation!r}")
    return img.rotate(
        float(angle), _PIL_RESAMPLE[interpolation], expand=False, fillcolor=_pil_fill(fill, img)
    )


# --------------------------------------------------------------------------- colour


def adjust_brightness(img: Image.Image, factor: float) -> Image.Image:
    """Blend with black: 0 black, 1 unchanged (``ImageEnhance.Brightness``, as torchvision)."""
    _check_image(img, "adjust_brightness")
    return ImageEnhance.Brightness(img).enhance(_check_factor(factor, "brightness factor"))


def adjust_contrast(img: Image.Image, factor: float) -> Image.Image:
    """Blend with the mean grey: 0 flat grey, 1 unchanged (``ImageEnhance.Contrast``)."""
    _check_image(img, "adjust_contrast")
    return ImageEnhance.Contrast(img).enhance(_check_factor(factor, "contrast factor"))


def adjust_saturation(img: Image.Image, factor: float) -> Image.Image:
    """Blend with greyscale: 0 grey, 1 unchanged (``ImageEnhance.Color``)."""
    _check_image(img, "adjust_saturation")
    return ImageEnhance.Color(img).enhance(_check_factor(factor, "saturation factor"))


def adjust_sharpness(img: Image.Image, factor: float) -> Image.Image:
    """Blend with a smoothed copy: 0 blurred, 1 unchanged (``ImageEnhance.Sharpness``)."""
    _check_image(img, "adjust_sharpness")
    return ImageEnhance.Sharpness(img).enhance(_check_factor(factor, "sharpness factor"))


def adjust_hue(img: Image.Image, hue_factor: float) -> Image.Image:
    """Rotate hue by ``hue_factor`` turns, in [-0.5, 0.5], as torchvision's PIL path does.

    The 8-bit H channel of Pillow's HSV gets ``int(hue_factor * 255)`` added modulo 256 (that
    is ``np.uint8(hue_factor * 255)`` under NumPy 1, which wraps negative shifts). L images
    are returned unchanged.
    """
    _check_image(img, "adjust_hue")
    if not _is_number(hue_factor) or not -0.5 <= hue_factor <= 0.5:
        raise ValueError(f"hue_factor must be in [-0.5, 0.5], got {hue_factor!r}")
    if img.mode == "L":
        return img
    h, s, v = img.convert("HSV").split()
    shift = int(hue_factor * 255) % 256
    hue = ((np.asarray(h, dtype=np.uint16) + shift) % 256).astype(np.uint8)
    return Image.merge("HSV", (Image.fromarray(hue, "L"), s, v)).convert(img.mode)


def posterize(img: Image.Image, bits: int) -> Image.Image:
    """Keep the top ``bits`` (0..8) bits of each channel (``ImageOps.posterize``)."""
    _check_image(img, "posterize")
    if isinstance(bits, bool) or not isinstance(bits, int | np.integer) or not 0 <= bits <= 8:
        raise ValueError(f"bits must be an integer in [0, 8], got {bits!r}")
    if bits == 0:
        # torchvision allows 0 bits (all black); recent Pillow rejects it.
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, int(bits))


def solarize(img: Image.Image, threshold: float) -> Image.Image:
    """Invert every value ``>= threshold`` (``ImageOps.solarize``)."""
    _check_image(img, "solarize")
    if not _is_number(threshold):
        raise ValueError(f"threshold must be a number, got {threshold!r}")
    return ImageOps.solarize(img, threshold)


def autocontrast(img: Image.Image) -> Image.Image:
    """Stretch each channel to the full 0..255 range (``ImageOps.autocontrast``)."""
    return ImageOps.autocontrast(_check_image(img, "autocontrast"))


def equalize(img: Image.Image) -> Image.Image:
    """Histogram-equalize each channel (``ImageOps.equalize``)."""
    return ImageOps.equalize(_check_image(img, "equalize"))


# (name, identity value, allowed range) of ColorJitter's four parameters, in its op order.
_JITTER_LIMITS: tuple[tuple[str, float, tuple[float, float]], ...] = (
    ("brightness", 1.0, (0.0, math.inf)),
    ("contrast", 1.0, (0.0, math.inf)),
    ("saturation", 1.0, (0.0, math.inf)),
    ("hue", 0.0, (-0.5, 0.5)),
)


def _jitter_range(
    value: float | Sequence[float], name: str, center: float, bound: tuple[float, float]
) -> tuple[float, float] | None:
    """``ColorJitter._check_input``: a number ``v`` means ``[center - v, center + v]``."""
    if _is_number(value):
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"{name}, as a single number, must be finite and non-negative")
        lo, hi = center - float(value), center + float(value)
        if center == 1.0:
            lo = max(lo, 0.0)
    else:
        lo, hi = _float_pair(value, name)
    if not bound[0] <= lo <= hi <= bound[1]:
        raise ValueError(f"{name} range must lie within {bound} with min <= max, got {(lo, hi)}")
    if lo == hi == center:
        return None
    return lo, hi


def color_jitter_params(
    brightness: float | Sequence[float] = 0,
    contrast: float | Sequence[float] = 0,
    saturation: float | Sequence[float] = 0,
    hue: float | Sequence[float] = 0,
    *,
    rng: torch.Generator,
) -> tuple[list[int], float | None, float | None, float | None, float | None]:
    """Draw ``(order, b, c, s, h)`` as ``ColorJitter.get_params``: a random permutation of the
    four ops (0 brightness, 1 contrast, 2 saturation, 3 hue), then one uniform factor per
    enabled op; a disabled op gives None and consumes no draw."""
    values = (brightness, contrast, saturation, hue)
    ranges = [_jitter_range(v, *spec) for v, spec in zip(values, _JITTER_LIMITS, strict=True)]
    _check_rng(rng)
    order = [int(i) for i in torch.randperm(4, generator=rng)]
    factors = [
        None if r is None else float(torch.empty(1).uniform_(r[0], r[1], generator=rng))
        for r in ranges
    ]
    return order, factors[0], factors[1], factors[2], factors[3]


def color_jitter(
    img: Image.Image,
    brightness: float | Sequence[float] = 0,
    contrast: float | Sequence[float] = 0,
    saturation: float | Sequence[float] = 0,
    hue: float | Sequence[float] = 0,
    *,
    rng: torch.Generator,
) -> Image.Image:
    """``ColorJitter(brightness, contrast, saturation, hue)`` on a PIL image.

    A number ``v`` samples a factor in ``[max(0, 1 - v), 1 + v]`` (hue: ``[-v, v]``, v <= 0.5);
    a pair gives the range itself. The four adjustments run in a random order.
    """
    _check_image(img, "color_jitter")
    order, b, c, s, h = color_jitter_params(brightness, contrast, saturation, hue, rng=rng)
    for op in order:
        if op == 0 and b is not None:
            img = adjust_brightness(img, b)
        elif op == 1 and c is not None:
            img = adjust_contrast(img, c)
        elif op == 2 and s is not None:
            img = adjust_saturation(img, s)
        elif op == 3 and h is not None:
            img = adjust_hue(img, h)
    return img


# --------------------------------------------------------------------------- RandAugment


def _magnitude_table(
    num_bins: int, height: int, width: int
) -> dict[str, tuple[torch.Tensor, bool]]:
    """torchvision's ``RandAugment._augmentation_space``: per op, (magnitudes, signed).

    Built with the same torch float32 ops so every bin's value is bit-identical.
    """
    return {
        "Identity": (torch.tensor(0.0), False),
        "ShearX": (torch.linspace(0.0, 0.3, num_bins), True),
        "ShearY": (torch.linspace(0.0, 0.3, num_bins), True),
        "TranslateX": (torch.linspace(0.0, 150.0 / 331.0 * width, num_bins), True),
        "TranslateY": (torch.linspace(0.0, 150.0 / 331.0 * height, num_bins), True),
        "Rotate": (torch.linspace(0.0, 30.0, num_bins), True),
        "Brightness": (torch.linspace(0.0, 0.9, num_bins), True),
        "Color": (torch.linspace(0.0, 0.9, num_bins), True),
        "Contrast": (torch.linspace(0.0, 0.9, num_bins), True),
        "Sharpness": (torch.linspace(0.0, 0.9, num_bins), True),
        "Posterize": (8 - (torch.arange(num_bins) / ((num_bins - 1) / 4)).round().int(), False),
        "Solarize": (torch.linspace(255.0, 0.0, num_bins), False),
        "AutoContrast": (torch.tensor(0.0), False),
        "Equalize": (torch.tensor(0.0), False),
    }


def _check_bins(magnitude: int, num_magnitude_bins: int) -> None:
    for name, value in (("magnitude", magnitude), ("num_magnitude_bins", num_magnitude_bins)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if num_magnitude_bins < 2:
        raise ValueError(f"num_magnitude_bins must be at least 2, got {num_magnitude_bins}")
    if not 0 <= magnitude < num_magnitude_bins:
        raise ValueError(
            f"magnitude must be in [0, num_magnitude_bins - 1] = [0, {num_magnitude_bins - 1}], "
            f"got {magnitude}"
        )


def rand_augment_magnitude(
    op: str,
    magnitude: int = 9,
    num_magnitude_bins: int = 31,
    image_size: tuple[int, int] | None = None,
) -> tuple[float, bool]:
    """``(value, signed)`` of RandAugment op ``op`` at bin ``magnitude``, before the random sign.

    E.g. ShearX: ``0.3 * m / (bins - 1)``, TranslateX: ``150 / 331 * width * m / (bins - 1)``,
    Posterize: ``8 - round(m / ((bins - 1) / 4))``, Solarize: ``255 * (1 - m / (bins - 1))``;
    ops without a magnitude give 0.0. ``image_size`` is ``(H, W)``, needed by the translations.
    """
    if op not in RAND_AUGMENT_OPS:
        raise ValueError(f"unknown RandAugment op {op!r}; known: {', '.join(RAND_AUGMENT_OPS)}")
    _check_bins(magnitude, num_magnitude_bins)
    if image_size is None:
        if op in ("TranslateX", "TranslateY"):
            raise ValueError(f"{op} magnitude depends on the image size; pass image_size=(H, W)")
        image_size = (1, 1)
    height, width = _size_pair(image_size, "image_size")
    values, signed = _magnitude_table(num_magnitude_bins, height, width)[op]
    value = float(values[magnitude].item()) if values.ndim > 0 else 0.0
    return value, signed


def apply_op(
    img: Image.Image,
    op: str,
    magnitude: float,
    *,
    interpolation: Interpolation = "nearest",
    fill: Fill = None,
) -> Image.Image:
    """Apply one RandAugment op with a signed ``magnitude``, as torchvision's ``_apply_op``.

    Shears are about the top-left corner with factor ``magnitude`` (``x' = x + m * y``);
    translations move the content by ``int(magnitude)`` pixels; Rotate is in degrees
    (counter-clockwise); the enhance ops use factor ``1 + magnitude``; Posterize keeps
    ``int(magnitude)`` bits; Solarize inverts values ``>= magnitude``.
    """
    _check_image(img, "apply_op")
    if op == "Identity":
        return img
    if op in ("ShearX", "ShearY"):
        # Shear is given in degrees; atan(m) makes the sampling x_in = x + m * y, the
        # convention of the original AutoAugment code.
        degrees = math.degrees(math.atan(magnitude))
        shear = (degrees, 0.0) if op == "ShearX" else (0.0, degrees)
        return affine(img, shear=shear, center=(0, 0), interpolation=interpolation, fill=fill)
    if op == "TranslateX":
        return affine(img, translate=(int(magnitude), 0), interpolation=interpolation, fill=fill)
    if op == "TranslateY":
        return affine(img, translate=(0, int(magnitude)), interpolation=interpolation, fill=fill)
    if op == "Rotate":
        return rotate(img, magnitude, interpolation=interpolation, fill=fill)
    if op == "Brightness":
        return adjust_brightness(img, 1.0 + magnitude)
    if op == "Color":
        return adjust_saturation(img, 1.0 + magnitude)
    if op == "Contrast":
        return adjust_contrast(img, 1.0 + magnitude)
    if op == "Sharpness":
        return adjust_sharpness(img, 1.0 + magnitude)
    if op == "Posterize":
        return posterize(img, int(magnitude))
    if op == "Solarize":
        return solarize(img, magnitude)
    if op == "AutoContrast":
        return autocontrast(img)
    if op == "Equalize":
        return equalize(img)
    raise ValueError(f"unknown RandAugment op {op!r}; known: {', '.join(RAND_AUGMENT_OPS)}")


def rand_augment(
    img: Image.Image,
    num_ops: int = 2,
    magnitude: int = 9,
    num_magnitude_bins: int = 31,
    fill: Fill = None,
    *,
    interpolation: Interpolation = "nearest",
    rng: torch.Generator,
) -> Image.Image:
    """``RandAugment(num_ops, magnitude, num_magnitude_bins, fill=fill)`` on a PIL image.

    Each of the ``num_ops`` steps draws an op uniformly from :data:`RAND_AUGMENT_OPS` (with
    replacement), takes its value at bin ``magnitude``, and, for signed ops only, draws a sign.
    """
    _check_image(img, "rand_augment")
    if isinstance(num_ops, bool) or not isinstance(num_ops, int | np.integer) or num_ops < 0:
        raise ValueError(f"num_ops must be a non-negative integer, got {num_ops!r}")
    _check_bins(magnitude, num_magnitude_bins)
    _check_rng(rng)
    for _ in range(int(num_ops)):
        w, h = img.size
        table = _magnitude_table(num_magnitude_bins, h, w)
        op = RAND_AUGMENT_OPS[int(torch.randint(len(table), (1,), generator=rng).item())]
        values, signed = table[op]
        value = float(values[magnitude].item()) if values.ndim > 0 else 0.0
        # Short-circuit as torchvision: unsigned ops consume no sign draw.
        if signed and torch.randint(2, (1,), generator=rng).item():
            value = -value
        img = apply_op(img, op, value, interpolation=interpolation, fill=fill)
    return img


# --------------------------------------------------------------------------- composition


@dataclass(frozen=True)
class TrainTransform:
    """Picklable training transform: PIL RGB image + generator -> float32 ``(3, H, W)`` tensor.

    Steps, in order, each skipped when off: resize to ``image_size`` (bilinear; an int sets the
    short side, as ``Resize``), ``RandomResizedCrop(crop_size, crop_scale, crop_ratio)``,
    horizontal flip with probability ``horizontal_flip_p``, ``ColorJitter(brightness, contrast,
    saturation, hue)``, ``RandAugment(rand_augment_num_ops, rand_augment_magnitude,
    rand_augment_num_bins, fill=rand_augment_fill)``, then ``to_tensor`` and (if ``normalize``)
    ImageNet normalization. Steps that are off draw nothing from the generator.
    """

    image_size: int | tuple[int, int] | None = (224, 224)
    crop_size: int | tuple[int, int] | None = None
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    horizontal_flip_p: float = 0.0
    brightness: float | tuple[float, float] = 0.0
    contrast: float | tuple[float, float] = 0.0
    saturation: float | tuple[float, float] = 0.0
    hue: float | tuple[float, float] = 0.0
    rand_augment_num_ops: int = 0
    rand_augment_magnitude: int = 9
    rand_augment_num_bins: int = 31
    rand_augment_fill: float | tuple[float, ...] | None = None
    normalize: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        # Canonical forms (tuples, plain numbers) keep repr, equality and pickles stable.
        canon: dict[str, object] = {}
        size = self.image_size
        if size is not None:
            if isinstance(size, int | np.integer) and not isinstance(size, bool):
                size = _size_pair(size, "image_size")[0]
            else:
                size = _size_pair(size, "image_size")
        canon["image_size"] = size
        if self.crop_size is not None:
            canon["crop_size"] = _size_pair(self.crop_size, "crop_size")
        canon["crop_scale"], canon["crop_ratio"] = _crop_ranges(self.crop_scale, self.crop_ratio)
        p = self.horizontal_flip_p
        if not _is_number(p) or not 0.0 <= p <= 1.0:
            raise ValueError(f"horizontal_flip_p must be a probability in [0, 1], got {p!r}")
        canon["horizontal_flip_p"] = float(p)
        for name, center, bound in _JITTER_LIMITS:
            value = getattr(self, name)
            _jitter_range(value, name, center, bound)
            canon[name] = float(value) if _is_number(value) else _float_pair(value, name)
        n = self.rand_augment_num_ops
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
            raise ValueError(f"rand_augment_num_ops must be a non-negative integer, got {n!r}")
        canon["rand_augment_num_ops"] = int(n)
        _check_bins(self.rand_augment_magnitude, self.rand_augment_num_bins)
        canon["rand_augment_magnitude"] = int(self.rand_augment_magnitude)
        canon["rand_augment_num_bins"] = int(self.rand_augment_num_bins)
        fill = self.rand_augment_fill
        if fill is not None:
            _pil_fill(fill, Image.new("RGB", (1, 1)))
            canon["rand_augment_fill"] = (
                float(fill) if _is_number(fill) else tuple(float(f) for f in fill)
            )
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be True or False, got {self.normalize!r}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if (
                not isinstance(values, Sequence)
                or len(values) != 3
                or not all(_is_number(v) and math.isfinite(v) for v in values)
            ):
                raise ValueError(f"{name} must be 3 finite numbers (R, G, B), got {values!r}")
            canon[name] = tuple(float(v) for v in values)
        if any(s == 0 for s in canon["std"]):  # type: ignore[attr-defined]
            raise ValueError(f"std must be non-zero, got {self.std}")
        for name, value in canon.items():
            object.__setattr__(self, name, value)

    @property
    def jitter(self) -> bool:
        """Whether the colour jitter step is on (any of its four ranges is not the identity)."""
        return any(
            _jitter_range(getattr(self, n), n, c, b) is not None for n, c, b in _JITTER_LIMITS
        )

    def describe(self) -> str:
        """The enabled steps, in order, as a torchvision-like ``Compose`` listing."""
        steps = []
        if self.image_size is not None:
            steps.append(f"Resize({self.image_size}, interpolation=bilinear)")
        if self.crop_size is not None:
            steps.append(
                f"RandomResizedCrop({self.crop_size}, scale={self.crop_scale}, "
                f"ratio={self.crop_ratio}, interpolation=bilinear)"
            )
        if self.horizontal_flip_p > 0:
            steps.append(f"RandomHorizontalFlip(p={self.horizontal_flip_p})")
        if self.jitter:
            steps.append(
                f"ColorJitter(brightness={self.brightness}, contrast={self.contrast}, "
                f"saturation={self.saturation}, hue={self.hue})"
            )
        if self.rand_augment_num_ops > 0:
            steps.append(
                f"RandAugment(num_ops={self.rand_augment_num_ops}, "
                f"magnitude={self.rand_augment_magnitude}, "
                f"num_magnitude_bins={self.rand_augment_num_bins}, interpolation=nearest, "
                f"fill={self.rand_augment_fill})"
            )
        steps.append("ToTensor()")
        if self.normalize:
            steps.append(f"Normalize(mean={self.mean}, std={self.std})")
        return "Compose(\n" + "".join(f"    {s}\n" for s in steps) + ")"

    def __call__(self, img: Image.Image, rng: torch.Generator) -> torch.Tensor:
        """Augment one RGB PIL image with draws from ``rng`` (a CPU ``torch.Generator``)."""
        if not isinstance(img, Image.Image):
            raise TypeError(f"TrainTransform expects a PIL image, got {type(img).__name__}")
        _check_rng(rng)
        if self.image_size is not None:
            img = resize(img, self.image_size)
        if self.crop_size is not None:
            img = random_resized_crop(
                img, self.crop_size, self.crop_scale, self.crop_ratio, rng=rng
            )
        if self.horizontal_flip_p > 0:
            img = random_horizontal_flip(img, self.horizontal_flip_p, rng=rng)
        if self.jitter:
            img = color_jitter(
                img, self.brightness, self.contrast, self.saturation, self.hue, rng=rng
            )
        if self.rand_augment_num_ops > 0:
            img = rand_augment(
                img,
                self.rand_augment_num_ops,
                self.rand_augment_magnitude,
                self.rand_augment_num_bins,
                self.rand_augment_fill,
                rng=rng,
            )
        tensor = to_tensor(img)
        if self.normalize:
            tensor = normalize(tensor, self.mean, self.std)
        return tensor


def cricavpr_train_transform(
    image_size: int | tuple[int, int] = (224, 224), **overrides: object
) -> TrainTransform:
    """CricaVPR training (its official train.py): bilinear resize, ``RandAugment(num_ops=3)``,
    ImageNet normalization. ``overrides`` replace any :class:`TrainTransform` field."""
    base = TrainTransform(image_size=image_size, rand_augment_num_ops=3)
    return dataclasses.replace(base, **overrides)


def selavpr_train_transform(
    image_size: int | tuple[int, int] = (224, 224), **overrides: object
) -> TrainTransform:
    """SelaVPR training (its official code): bilinear resize and ImageNet normalization, no
    augmentation (its off-by-default flip and colour jitter can be turned on through
    ``overrides``)."""
    base = TrainTransform(image_size=image_size)
    return dataclasses.replace(base, **overrides)
