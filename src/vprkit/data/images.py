"""Image loading and preprocessing, pixel-exact with torchvision on PIL images.

The official VPR code reads images with ``Image.open(p).convert("RGB")`` and preprocesses them
with ``torchvision.transforms`` (``Resize``, ``CenterCrop``, ``ToTensor``, ``Normalize``) on PIL
images. torchvision is not a dependency of vprkit, so the same operations live here as small
pure functions, each following torchvision's arithmetic (size rounding, crop offsets, padding,
float32 division) so that released checkpoints see the same input tensors.

Deliberate departures from ``Image.open(p).convert("RGB")``, both only for files the official
pipeline would get wrong: EXIF orientation is applied (``exif_transpose=False`` turns it off),
and 16-bit greyscale is scaled to 8 bits instead of being clipped at 255.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from vprkit.errors import VprkitError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageListDataset",
    "ImageLoadError",
    "Preprocess",
    "input_hw",
    "center_crop",
    "load_batch",
    "load_image",
    "normalize",
    "resize",
    "to_rgb",
    "to_tensor",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})

PathLike = str | os.PathLike


class ImageLoadError(VprkitError):
    """An image file could not be read; the message names the file and the problem."""

    def __init__(self, message: str, path: PathLike | None = None) -> None:
        super().__init__(message)
        self.path = path

    def __reduce__(self):
        # Keeps `path` across pickling, e.g. when raised inside a DataLoader worker.
        return (type(self), (str(self), self.path))


# --------------------------------------------------------------------------- loading


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a PIL image of any common mode to 8-bit RGB.

    Matches ``img.convert("RGB")`` (what the official pipelines do) for every mode except
    16-bit greyscale (``I;16*`` and ``I``), which is scaled by 255/65535 and rounded rather
    than clipped at 255. ``I`` is read as 16-bit data (its usual source: 16-bit PNG/TIFF) and
    clipped to [0, 65535]. ``F`` keeps Pillow's convention (values on a 0..255 scale, clipped).
    Alpha is dropped without compositing, as ``.convert("RGB")`` does in the official code.
    """
    if img.mode == "RGB":
        # A copy, never the opened file object: callers get a plain, file-independent image.
        return img.copy()
    if img.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(img).astype(np.int64)
        values = np.clip(values, 0, 65535)
        # value * 255 / 65535, rounded half up, in exact integer arithmetic.
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))
    if img.mode == "P" and "transparency" in img.info:
        # Same pixels as .convert("RGB"), without Pillow's warning about byte transparency.
        return img.convert("RGBA").convert("RGB")
    try:
        # Alpha (LA, PA, RGBA, ...) is dropped, not composited onto a background: that is what
        # the official pipelines' Image.open(p).convert("RGB") does, so features match theirs.
        return img.convert("RGB")
    except ValueError as exc:
        raise ValueError(f"cannot convert image mode {img.mode!r} to RGB: {exc}") from exc


def load_image(path: PathLike, *, exif_transpose: bool = True) -> Image.Image:
    """Read an image file as an RGB PIL image, fully decoded.

    EXIF orientation is applied unless ``exif_transpose=False``, which (16-bit greyscale apart,
    see :func:`to_rgb`) gives exactly the official ``Image.open(p).convert("RGB")``. Any
    failure (missing file, directory, empty, truncated, corrupt or not an image) raises
    :class:`ImageLoadError` naming ``path``.
    """
    p = Path(path)
    name = str(path)
    if not p.exists():
        raise ImageLoadError(f"cannot load image {name}: file does not exist", path)
    if p.is_dir():
        raise ImageLoadError(f"cannot load image {name}: is a directory, not an image file", path)
    try:
        size = p.stat().st_size
        if size == 0:
            raise ImageLoadError(f"cannot load image {name}: file is empty (0 bytes)", path)
        with Image.open(p) as im:
            # Image.open only reads the header; decode now so a truncated or corrupt file
            # fails here, with its name, rather than later inside a transform.
            im.load()
            if exif_transpose:
                im = ImageOps.exif_transpose(im)
            return to_rgb(im)
    except ImageLoadError:
        raise
    except Image.UnidentifiedImageError as exc:
        raise ImageLoadError(
            f"cannot load image {name}: not a recognised image format, or the file is corrupt",
            path,
        ) from exc
    except Exception as exc:  # Pillow decoders raise many types (OSError, SyntaxError, ...).
        raise ImageLoadError(
            f"cannot load image {name}: {type(exc).__name__}: {exc}", path
        ) from exc


# --------------------------------------------------------------------------- transforms


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _size_pair(size: object, what: str) -> tuple[int, int]:
    """Parse ``int`` (square) or ``(H, W)`` into a pair of positive ints."""
    if isinstance(size, int | np.integer) and not isinstance(size, bool):
        s = _positive_int(size, what)
        return s, s
    if isinstance(size, Sequence) and not isinstance(size, str) and len(size) == 2:
        return _positive_int(size[0], f"{what} height"), _positive_int(size[1], f"{what} width")
    raise ValueError(f"{what} must be an int or a (height, width) pair, got {size!r}")


def resize(img: Image.Image, size: int | Sequence[int]) -> Image.Image:
    """Resize like ``torchvision.transforms.Resize(size)`` on a PIL image (bilinear).

    ``size=(H, W)`` resizes to exactly that. ``size=int`` sets the short side to ``size`` and
    the long side to ``int(size * long / short)`` (truncated, as torchvision does). Pillow's
    bilinear filter antialiases when downscaling, as torchvision's PIL path does.
    """
    w, h = img.size
    if isinstance(size, int | np.integer) and not isinstance(size, bool):
        new_short = _positive_int(size, "resize size")
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(new_short * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    else:
        new_h, new_w = _size_pair(size, "resize size")
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), Image.Resampling.BILINEAR)


def center_crop(img: Image.Image, size: int | Sequence[int]) -> Image.Image:
    """Crop the centre like ``torchvision.transforms.CenterCrop(size)`` on a PIL image.

    ``size`` is ``(H, W)`` or an int for a square. Offsets are
    ``top = int(round((h - H) / 2))`` and ``left = int(round((w - W) / 2))`` (Python's
    round-half-to-even, as torchvision). A crop larger than the image pads with black, the
    extra pixel of an odd padding going to the right/bottom, exactly as torchvision does.
    """
    crop_h, crop_w = _size_pair(size, "crop size")
    w, h = img.size
    if crop_w > w or crop_h > h:
        pad_left = (crop_w - w) // 2 if crop_w > w else 0
        pad_top = (crop_h - h) // 2 if crop_h > h else 0
        pad_right = (crop_w - w + 1) // 2 if crop_w > w else 0
        pad_bottom = (crop_h - h + 1) // 2 if crop_h > h else 0
        img = ImageOps.expand(img, border=(pad_left, pad_top, pad_right, pad_bottom), fill=0)
        w, h = img.size
        if (crop_w, crop_h) == (w, h):
            return img
    top = int(round((h - crop_h) / 2.0))
    left = int(round((w - crop_w) / 2.0))
    return img.crop((left, top, left + crop_w, top + crop_h))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image to a float32 ``(3, H, W)`` tensor in [0, 1], as ``ToTensor`` does."""
    if not isinstance(img, Image.Image):
        raise TypeError(f"to_tensor expects a PIL image, got {type(img).__name__}")
    if img.mode != "RGB":
        raise ValueError(
            f"to_tensor expects an RGB image, got mode {img.mode!r}; "
            "read files with load_image or convert with to_rgb"
        )
    arr = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))
    return arr.permute(2, 0, 1).contiguous().to(torch.float32).div(255)


def normalize(
    tensor: torch.Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """``(t - mean) / std`` per channel on ``(..., C, H, W)``; a new tensor, like ``Normalize``."""
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.ndim < 3:
        raise ValueError("normalize expects a float tensor of shape (..., C, H, W)")
    channels = tensor.shape[-3]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(
            f"normalize: mean and std need {channels} values (one per channel), "
            f"got {len(mean)} and {len(std)}"
        )
    mean_t = torch.as_tensor(mean, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
    if (std_t == 0).any():
        raise ValueError(f"normalize: std must be non-zero, got {tuple(std)}")
    return tensor.sub(mean_t).div(std_t)


@dataclass(frozen=True)
class Preprocess:
    """Picklable image -> tensor transform: optional resize, optional centre crop, to_tensor,
    optional normalize; the same as the torchvision ``Compose`` of the official code.

    ``image_size``: None keeps the size, an int sets the short side, ``(H, W)`` resizes to
    exactly that. ``crop``: ``(H, W)`` (or an int for a square) centre crop after resizing.
    """

    image_size: int | tuple[int, int] | None = None
    crop: tuple[int, int] | None = None
    normalize: bool = True
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        size = self.image_size
        if size is not None:
            if isinstance(size, int | np.integer) and not isinstance(size, bool):
                size = _positive_int(size, "image_size")
            else:
                size = _size_pair(size, "image_size")
        crop = None if self.crop is None else _size_pair(self.crop, "crop")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be True or False, got {self.normalize!r}")
        mean = self._three_floats(self.mean, "mean")
        std = self._three_floats(self.std, "std")
        if any(s == 0 for s in std):
            raise ValueError(f"std must be non-zero, got {std}")
        # Frozen dataclass: store the canonical (tuple, plain int) forms so repr and equality
        # are stable whatever sequence types were passed in.
        object.__setattr__(self, "image_size", size)
        object.__setattr__(self, "crop", crop)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @staticmethod
    def _three_floats(values: object, what: str) -> tuple[float, float, float]:
        try:
            out = tuple(float(v) for v in values)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            out = ()
        if len(out) != 3 or not all(np.isfinite(out)):
            raise ValueError(f"{what} must be 3 finite numbers (R, G, B), got {values!r}")
        return out  # type: ignore[return-value]

    @property
    def fixed_hw(self) -> tuple[int, int] | None:
        """The output ``(H, W)`` when it does not depend on the image (a crop, or
        ``image_size=(H, W)``), else None."""
        if self.crop is not None:
            return self.crop
        return self.image_size if isinstance(self.image_size, tuple) else None

    def output_hw(self, width: int, height: int) -> tuple[int, int]:
        """The ``(H, W)`` of the tensor made from an image of ``width`` x ``height`` pixels,
        by the same arithmetic as :func:`resize` and :func:`center_crop`."""
        if self.fixed_hw is not None:
            return self.fixed_hw
        if self.image_size is None:
            return height, width
        short, long = sorted((width, height))
        new_long = int(self.image_size * long / short)
        return (new_long, self.image_size) if width <= height else (self.image_size, new_long)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """Transform one RGB PIL image to a float32 ``(3, H, W)`` tensor."""
        if not isinstance(img, Image.Image):
            raise TypeError(f"Preprocess expects a PIL image, got {type(img).__name__}")
        if self.image_size is not None:
            img = resize(img, self.image_size)
        if self.crop is not None:
            img = center_crop(img, self.crop)
        tensor = to_tensor(img)
        if self.normalize:
            tensor = normalize(tensor, self.mean, self.std)
        return tensor


# --------------------------------------------------------------------------- datasets


def _check_paths(paths: object) -> list[PathLike]:
    if isinstance(paths, str | os.PathLike):
        raise ValueError(f"expected a list of image paths, got a single path {paths!r}")
    return list(paths)  # type: ignore[call-overload]


class ImageListDataset(torch.utils.data.Dataset):
    """Images from a list of paths; item ``i`` is ``(preprocess(load_image(paths[i])), i)``."""

    def __init__(
        self, paths: Sequence[PathLike], preprocess: Preprocess, *, exif_transpose: bool = True
    ) -> None:
        self.paths = _check_paths(paths)
        if not callable(preprocess):
            raise ValueError(f"preprocess must be callable, got {preprocess!r}")
        self.preprocess = preprocess
        self.exif_transpose = exif_transpose

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = load_image(self.paths[index], exif_transpose=self.exif_transpose)
        return self.preprocess(img), index


# EXIF orientations that swap width and height (transpose, rotations by 90 and 270 degrees).
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})


def input_hw(path: PathLike, preprocess: Preprocess, *, exif_transpose: bool = True) -> tuple:
    """The ``(H, W)`` that ``preprocess(load_image(path))`` has, read from the file's header
    and EXIF orientation without decoding the pixels (PNG aside: Pillow may decode it to find
    EXIF data at its end). A file that cannot be read gets ``("unreadable", path)``: loading
    it reports why."""
    if preprocess.fixed_hw is not None:
        return preprocess.fixed_hw
    try:
        with Image.open(path) as im:
            width, height = im.size
            if exif_transpose and im.getexif().get(0x0112, 1) in _SWAPPING_ORIENTATIONS:
                width, height = height, width
    except Exception:  # Pillow raises many types; load_image names the file and the problem.
        return ("unreadable", str(path))
    return preprocess.output_hw(width, height)


def load_batch(
    paths: Sequence[PathLike], preprocess: Preprocess, *, exif_transpose: bool = True
) -> torch.Tensor:
    """Load and preprocess images into one ``(B, 3, H, W)`` tensor; all must end the same size."""
    paths = _check_paths(paths)
    if not paths:
        raise ValueError("load_batch needs at least one image path")
    tensors = []
    for path in paths:
        tensors.append(preprocess(load_image(path, exif_transpose=exif_transpose)))
        if tensors[-1].shape != tensors[0].shape:
            raise ValueError(
                f"images differ in size after preprocessing: {paths[0]} gives "
                f"{tuple(tensors[0].shape)} but {path} gives {tuple(tensors[-1].shape)}; "
                "set image_size (e.g. Preprocess(image_size=(322, 322))) to batch them"
            )
    return torch.stack(tensors)
