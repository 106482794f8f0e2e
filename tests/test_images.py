"""Image loading and torchvision-compatible preprocessing (vprkit.data.images)."""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vprkit.data.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageListDataset,
    ImageLoadError,
    Preprocess,
    center_crop,
    load_batch,
    load_image,
    normalize,
    resize,
    to_rgb,
    to_tensor,
)

RNG = np.random.default_rng(0)


def _save(img: Image.Image, path: Path, expected_mode: str | None = None, **kw) -> Path:
    """Save and check the file really reopens in the mode under test."""
    img.save(path, **kw)
    with Image.open(path) as reopened:
        assert reopened.mode == (expected_mode or img.mode), (path, reopened.mode)
    return path


def _rgb(path: Path) -> np.ndarray:
    img = load_image(path)
    assert img.mode == "RGB"
    return np.asarray(img)


def _grey3(a: np.ndarray) -> np.ndarray:
    return np.repeat(a[:, :, None], 3, axis=2)


# --------------------------------------------------------------------------- modes


def test_l_png_known_grey_levels(tmp_path):
    grey = np.array([[0, 1, 123], [200, 254, 255]], dtype=np.uint8)
    path = _save(Image.fromarray(grey, "L"), tmp_path / "l.png")
    np.testing.assert_array_equal(_rgb(path), _grey3(grey))


def test_l_jpeg_matches_pil_and_level(tmp_path):
    path = _save(Image.new("L", (16, 16), 123), tmp_path / "l.jpg")
    out = _rgb(path)
    np.testing.assert_array_equal(out, np.asarray(Image.open(path).convert("RGB")))
    assert np.abs(out.astype(int) - 123).max() <= 1


def test_la_drops_alpha_without_compositing(tmp_path):
    la = np.stack([np.full((3, 4), 77, np.uint8), np.arange(12, dtype=np.uint8).reshape(3, 4)], 2)
    path = _save(Image.fromarray(la, "LA"), tmp_path / "la.png")
    np.testing.assert_array_equal(_rgb(path), np.full((3, 4, 3), 77))


def _palette_image() -> Image.Image:
    p = Image.fromarray(np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8), "P")
    p.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    return p


_PALETTE_RGB = np.array(
    [[[255, 0, 0], [0, 255, 0], [0, 0, 255]], [[0, 0, 255], [0, 255, 0], [255, 0, 0]]]
)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("plain.png", {}),
        ("index.png", {"transparency": 1}),
        ("index.gif", {"transparency": 1}),
        ("bytes.png", {"transparency": bytes([255, 0, 128])}),
    ],
)
def test_palette_with_and_without_transparency(tmp_path, name, kwargs):
    path = _save(_palette_image(), tmp_path / name, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Palette images with Transparency ..." noise
        out = _rgb(path)
    # Transparent entries keep their palette colour: alpha is dropped, as .convert("RGB").
    np.testing.assert_array_equal(out, _PALETTE_RGB)


def test_rgba_drops_alpha_keeping_colour(tmp_path):
    rgba = RNG.integers(0, 256, (5, 6, 4), dtype=np.uint8)
    rgba[..., 3] = 0
    path = _save(Image.fromarray(rgba, "RGBA"), tmp_path / "rgba.png")
    np.testing.assert_array_equal(_rgb(path), rgba[..., :3])


@pytest.mark.parametrize("suffix", [".jpg", ".tif"])
def test_cmyk_matches_pil_conversion(tmp_path, suffix):
    cmyk = (
        np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255], [0, 255, 255, 0]]], dtype=np.uint8)
        .repeat(8, axis=0)
        .repeat(8, axis=1)
    )
    src = Image.fromarray(cmyk, "CMYK")
    path = _save(src, tmp_path / f"cmyk{suffix}", quality=100)
    out = _rgb(path)
    np.testing.assert_array_equal(out, np.asarray(Image.open(path).convert("RGB")))
    if suffix == ".tif":  # lossless: also the known colours white, cyan, black, red
        np.testing.assert_array_equal(out, np.asarray(src.convert("RGB")))
        np.testing.assert_array_equal(
            out[0, ::8], [[255, 255, 255], [0, 255, 255], [0, 0, 0], [255, 0, 0]]
        )


_RAMP16 = np.array([0, 128, 129, 257, 32767, 32768, 65279, 65535], dtype=np.uint16)
# value * 255 / 65535 rounded: 128 -> 0.498, 129 -> 0.502, 32767 -> 127.498, 32768 -> 127.502
_RAMP8 = np.array([0, 0, 1, 1, 127, 128, 254, 255], dtype=np.uint8)


@pytest.mark.parametrize(
    ("name", "dtype", "mode"),
    [("a.png", "<u2", "I;16"), ("a.tif", "<u2", "I;16"), ("b.tif", ">u2", "I;16B")],
)
def test_16bit_grey_scaled_not_clipped(tmp_path, name, dtype, mode):
    img = Image.fromarray(_RAMP16.astype(dtype).reshape(2, 4))
    path = _save(img, tmp_path / name, expected_mode=mode)
    np.testing.assert_array_equal(_rgb(path), _grey3(_RAMP8.reshape(2, 4)))


def test_16bit_full_range_rounding():
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    out = np.asarray(to_rgb(Image.fromarray(values)))[..., 0]
    np.testing.assert_array_equal(out, np.round(values / 65535 * 255).astype(np.uint8))


def test_32bit_int_treated_as_16bit_and_clipped(tmp_path):
    values = np.concatenate([_RAMP16, [-5, 70000]]).astype(np.int32).reshape(2, 5)
    path = _save(Image.fromarray(values), tmp_path / "i.tif", expected_mode="I")
    expected = np.concatenate([_RAMP8, [0, 255]]).reshape(2, 5)
    np.testing.assert_array_equal(_rgb(path), _grey3(expected))


def test_float_follows_pil_convention(tmp_path):
    values = np.array([[0.0, 100.0, 255.0, 300.0, -5.0]], dtype=np.float32)
    path = _save(Image.fromarray(values), tmp_path / "f.tif", expected_mode="F")
    out = _rgb(path)
    np.testing.assert_array_equal(out, _grey3(np.array([[0, 100, 255, 255, 0]])))
    np.testing.assert_array_equal(out, np.asarray(Image.open(path).convert("RGB")))


def test_bilevel(tmp_path):
    bits = (np.indices((4, 6)).sum(0) % 2).astype(bool)
    path = _save(Image.fromarray(bits), tmp_path / "one.png", expected_mode="1")
    np.testing.assert_array_equal(_rgb(path), _grey3(bits.astype(np.uint8) * 255))


def test_ycbcr(tmp_path):
    ycc = RNG.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    ycc[0, 0] = (128, 128, 128)
    src = Image.fromarray(ycc, "YCbCr")
    path = _save(src, tmp_path / "ycc.tif")
    out = _rgb(path)
    np.testing.assert_array_equal(out, np.asarray(src.convert("RGB")))
    np.testing.assert_array_equal(out[0, 0], [128, 128, 128])


def test_unconvertible_mode_raises_clearly():
    with pytest.raises(ValueError, match="'La'"):
        to_rgb(Image.new("La", (2, 2)))


# --------------------------------------------------------------------------- EXIF

_RED, _GREEN, _BLUE, _WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
@pytest.mark.parametrize(
    ("orientation", "size", "quadrants", "rot90_k"),
    [
        # quadrants: top-left, top-right, bottom-left, bottom-right of the displayed image
        (3, (64, 32), (_WHITE, _BLUE, _GREEN, _RED), 2),
        (6, (32, 64), (_BLUE, _RED, _WHITE, _GREEN), -1),  # stored image turned clockwise
        (8, (32, 64), (_GREEN, _WHITE, _RED, _BLUE), 1),  # stored image turned anticlockwise
    ],
)
def test_exif_orientation(tmp_path, suffix, orientation, size, quadrants, rot90_k):
    stored = np.zeros((32, 64, 3), np.uint8)  # 64 wide, 32 high
    stored[:16, :32], stored[:16, 32:] = _RED, _GREEN
    stored[16:, :32], stored[16:, 32:] = _BLUE, _WHITE
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}{suffix}"
    Image.fromarray(stored).save(path, exif=exif, quality=95)

    img = load_image(path)
    assert img.size == size
    out = np.asarray(img).astype(int)
    w, h = size
    centres = [
        (h // 4, w // 4),
        (h // 4, 3 * w // 4),
        (3 * h // 4, w // 4),
        (3 * h // 4, 3 * w // 4),
    ]
    for (y, x), colour in zip(centres, quadrants, strict=True):
        assert np.abs(out[y, x] - colour).max() <= 8, (orientation, (x, y), out[y, x], colour)
    # Exactly the decoded pixels, rotated (transposing is lossless).
    raw = load_image(path, exif_transpose=False)
    assert raw.size == (64, 32)
    np.testing.assert_array_equal(np.asarray(img), np.rot90(np.asarray(raw), rot90_k))


# --------------------------------------------------------------------------- errors


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _zero_byte(tmp_path):
    (p := tmp_path / "empty.jpg").write_bytes(b"")
    return p


def _truncated(tmp_path):
    data = _jpeg_bytes()
    (p := tmp_path / "half.jpg").write_bytes(data[: len(data) // 2])
    return p


def _random_bytes(tmp_path):
    (p := tmp_path / "noise.jpg").write_bytes(RNG.integers(0, 256, 4096, np.uint8).tobytes())
    return p


def _text(tmp_path):
    (p := tmp_path / "notes.txt").write_text("not an image\n" * 10)
    return p


def _missing(tmp_path):
    return tmp_path / "does_not_exist.jpg"


def _directory(tmp_path):
    (p := tmp_path / "folder.jpg").mkdir()
    return p


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (_zero_byte, "empty"),
        (_truncated, "truncated"),
        (_random_bytes, "not a recognised image"),
        (_text, "not a recognised image"),
        (_missing, "does not exist"),
        (_directory, "directory"),
    ],
)
def test_bad_files_raise_image_load_error_naming_path(tmp_path, make, problem):
    path = make(tmp_path)
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert str(path) in str(info.value)
    assert problem in str(info.value)
    assert info.value.path == path
    assert isinstance(info.value, ValueError)


def test_image_load_error_pickles_with_path(tmp_path):
    err = ImageLoadError(f"cannot load image {tmp_path}/x.jpg: bad", tmp_path / "x.jpg")
    back = pickle.loads(pickle.dumps(err))
    assert (str(back), back.path) == (str(err), err.path)
    assert str(ImageLoadError("just a message")) == "just a message"  # DataLoader re-raise form


# --------------------------------------------------------------------------- transforms


@pytest.mark.parametrize(
    ("wh", "size", "expected_wh"),
    [
        ((160, 120), 100, (133, 100)),  # landscape: 100 * 160 / 120 = 133.3
        ((120, 160), 100, (100, 133)),  # portrait
        ((3, 2), 5, (7, 5)),  # 7.5 truncates to 7, not rounded to 8
        ((960, 540), 224, (398, 224)),  # 398.2
        ((50, 50), 20, (20, 20)),
        ((160, 120), (50, 70), (70, 50)),  # (H, W) hard resize
        ((160, 120), [322, 322], (322, 322)),
    ],
)
def test_resize_sizes(wh, size, expected_wh):
    img = Image.fromarray(RNG.integers(0, 256, (wh[1], wh[0], 3), dtype=np.uint8))
    out = resize(img, size)
    assert out.size == expected_wh
    # torchvision's PIL path is exactly Pillow's bilinear (antialiased when shrinking).
    expected = img.resize(expected_wh, Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


def test_resize_same_size_is_unchanged():
    img = Image.new("RGB", (160, 120), (1, 2, 3))
    assert resize(img, 120) is img
    assert resize(img, (120, 160)) is img


@pytest.mark.parametrize("size", [0, -3, True, 2.5, (10,), (10, 0), "224", None])
def test_resize_rejects_bad_size(size):
    with pytest.raises(ValueError, match="resize size"):
        resize(Image.new("RGB", (8, 8)), size)


def _coded(w: int, h: int) -> Image.Image:
    """R = x, G = y, so any pixel tells where it came from."""
    yy, xx = np.indices((h, w))
    return Image.fromarray(np.stack([xx, yy, np.full_like(xx, 7)], 2).astype(np.uint8))


@pytest.mark.parametrize(
    ("wh", "crop", "top", "left"),
    [
        ((7, 5), (2, 2), 2, 2),  # round(1.5) = 2, round(2.5) = 2 (half to even)
        ((4, 4), (3, 3), 0, 0),  # round(0.5) = 0
        ((6, 9), (2, 3), 4, 2),  # round(3.5) = 4, round(1.5) = 2
        ((10, 8), (4, 6), 2, 2),  # even differences
        ((10, 8), 4, 2, 3),  # int = square
        ((5, 5), (5, 5), 0, 0),
    ],
)
def test_center_crop_offsets(wh, crop, top, left):
    out = center_crop(_coded(*wh), crop)
    ch, cw = (crop, crop) if isinstance(crop, int) else crop
    assert out.size == (cw, ch)
    arr = np.asarray(out)
    assert (arr[0, 0, 0], arr[0, 0, 1]) == (left, top)
    np.testing.assert_array_equal(arr, np.asarray(_coded(*wh))[top : top + ch, left : left + cw])


def test_center_crop_larger_than_image_pads_with_zeros():
    out = np.asarray(center_crop(_coded(3, 2), (5, 6)))  # pad l=1, t=1, r=2, b=2
    assert out.shape == (5, 6, 3)
    expected = np.zeros((5, 6, 3), np.uint8)
    expected[1:3, 1:4] = np.asarray(_coded(3, 2))
    np.testing.assert_array_equal(out, expected)


def test_center_crop_pads_one_side_crops_the_other():
    out = np.asarray(center_crop(_coded(7, 2), (4, 3)))  # pad rows 1+1, then left = 2
    expected = np.zeros((4, 3, 3), np.uint8)
    expected[1:3] = np.asarray(_coded(7, 2))[:, 2:5]
    np.testing.assert_array_equal(out, expected)


def test_to_tensor_matches_numpy():
    arr = np.arange(256, dtype=np.uint8).reshape(8, 32)
    arr = np.stack([arr, arr[::-1], RNG.integers(0, 256, (8, 32), dtype=np.uint8)], 2)
    t = to_tensor(Image.fromarray(arr))
    assert t.dtype == torch.float32 and t.shape == (3, 8, 32) and t.is_contiguous()
    expected = torch.from_numpy((arr / 255).transpose(2, 0, 1)).float()
    assert torch.equal(t, expected)


def test_to_tensor_requires_rgb():
    with pytest.raises(ValueError, match="mode 'L'"):
        to_tensor(Image.new("L", (2, 2)))
    with pytest.raises(TypeError):
        to_tensor(np.zeros((2, 2, 3), np.uint8))


def test_normalize_arithmetic():
    t = torch.empty(3, 2, 2)
    t[:, 0, 0] = torch.tensor(IMAGENET_MEAN)
    t[:, 0, 1], t[:, 1, 0], t[:, 1, 1] = 0.0, 1.0, 0.5
    before = t.clone()
    out = normalize(t)
    assert torch.equal(t, before)  # not in place
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    np.testing.assert_allclose(out[:, 0, 0], 0.0, atol=1e-7)
    np.testing.assert_allclose(out[:, 0, 1], -mean / std, rtol=1e-6)
    np.testing.assert_allclose(out[:, 1, 0], (1 - mean) / std, rtol=1e-6)
    assert out[0, 1, 0].item() == pytest.approx((1 - 0.485) / 0.229, rel=1e-6)  # 2.2489
    batch = normalize(torch.stack([before, before]), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert torch.equal(batch[1], before * 2 - 1)


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"std": (1, 0, 1)}, "non-zero"), ({"mean": (0, 0)}, "3 values")]
)
def test_normalize_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        normalize(torch.zeros(3, 2, 2), **kwargs)


# --------------------------------------------------------------------------- Preprocess


def test_preprocess_equals_manual_pipeline():
    img = Image.fromarray(RNG.integers(0, 256, (120, 160, 3), dtype=np.uint8))
    pre = Preprocess(image_size=100, crop=(96, 90))
    expected = normalize(to_tensor(center_crop(resize(img, 100), (96, 90))))
    assert torch.equal(pre(img), expected)
    assert pre(img).shape == (3, 96, 90)


@pytest.mark.parametrize(
    ("kwargs", "shape"),
    [
        ({}, (3, 120, 160)),
        ({"image_size": 224}, (3, 224, 298)),  # 224 * 160 / 120 = 298.7
        ({"image_size": 224, "crop": (224, 224)}, (3, 224, 224)),
        ({"image_size": (322, 322)}, (3, 322, 322)),
        ({"crop": 64}, (3, 64, 64)),
    ],
)
def test_preprocess_shapes(kwargs, shape):
    assert Preprocess(**kwargs)(Image.new("RGB", (160, 120))).shape == shape


def test_preprocess_without_normalize_is_to_tensor():
    img = Image.fromarray(RNG.integers(0, 256, (9, 11, 3), dtype=np.uint8))
    assert torch.equal(Preprocess(normalize=False)(img), to_tensor(img))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_size": 0}, "image_size"),
        ({"image_size": -1}, "image_size"),
        ({"image_size": True}, "image_size"),
        ({"image_size": "224"}, "image_size"),
        ({"image_size": (224,)}, "image_size"),
        ({"image_size": (224, 0)}, "image_size width"),
        ({"crop": (0, 5)}, "crop height"),
        ({"crop": 1.5}, "crop"),
        ({"normalize": "yes"}, "normalize"),
        ({"mean": (0.5, 0.5)}, "mean"),
        ({"std": (0.2, 0.0, 0.2)}, "non-zero"),
        ({"std": "abc"}, "std"),
    ],
)
def test_preprocess_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Preprocess(**kwargs)


def test_preprocess_repr_states_configuration():
    text = repr(Preprocess(image_size=[322, 322], crop=224))
    assert text == (
        "Preprocess(image_size=(322, 322), crop=(224, 224), normalize=True, "
        "mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))"
    )


def test_preprocess_pickles_for_dataloader_workers():
    pre = Preprocess(image_size=50, crop=(40, 40))
    back = pickle.loads(pickle.dumps(pre))
    assert back == pre and repr(back) == repr(pre)
    img = Image.fromarray(RNG.integers(0, 256, (60, 80, 3), dtype=np.uint8))
    assert torch.equal(back(img), pre(img))


def test_preprocess_rejects_non_image():
    with pytest.raises(TypeError, match="PIL image"):
        Preprocess()(np.zeros((4, 4, 3)))


# --------------------------------------------------------------------------- datasets


def _write_images(tmp_path: Path, sizes: list[tuple[int, int]]) -> list[Path]:
    paths = []
    for i, (w, h) in enumerate(sizes):
        arr = RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)
        paths.append(_save(Image.fromarray(arr), tmp_path / f"img{i}.png"))
    return paths


def test_image_list_dataset_and_dataloader(tmp_path):
    paths = _write_images(tmp_path, [(40, 30), (30, 40), (50, 50)])
    pre = Preprocess(image_size=(24, 32))
    ds = ImageListDataset(paths, pre)
    assert len(ds) == 3
    tensor, index = ds[1]
    assert index == 1 and torch.equal(tensor, pre(load_image(paths[1])))
    images, indices = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert images.shape == (3, 3, 24, 32) and indices.tolist() == [0, 1, 2]
    assert torch.equal(images, load_batch(paths, pre))


def test_image_list_dataset_reports_bad_file(tmp_path):
    ds = ImageListDataset([_zero_byte(tmp_path)], Preprocess())
    with pytest.raises(ImageLoadError, match="empty.jpg"):
        ds[0]


def test_single_path_instead_of_list_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="list of image paths"):
        ImageListDataset(str(tmp_path / "a.jpg"), Preprocess())
    with pytest.raises(ValueError, match="list of image paths"):
        load_batch(tmp_path / "a.jpg", Preprocess())


def test_load_batch_names_files_of_different_sizes(tmp_path):
    paths = _write_images(tmp_path, [(40, 30), (40, 30), (30, 40)])
    with pytest.raises(ValueError, match="image_size") as info:
        load_batch(paths, Preprocess())
    assert str(paths[0]) in str(info.value) and str(paths[2]) in str(info.value)
    assert load_batch(paths, Preprocess(image_size=(30, 30))).shape == (3, 3, 30, 30)


def test_load_batch_needs_paths():
    with pytest.raises(ValueError, match="at least one"):
        load_batch([], Preprocess())


# --------------------------------------------------------------------------- real photos


@pytest.fixture
def one_torch_thread():
    # Per-image tensors are small; on a busy 2-core machine intra-op threads only add
    # contention (seconds instead of milliseconds here). DataLoader workers run so anyway.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("folder", "count"),
    [("corridor/query", 111), ("gardenspoint10/query", 10), ("toy_unlabeled/database", 17)],
)
@pytest.mark.parametrize("side", [224, 322])
def test_real_photos(shared_data, one_torch_thread, folder, count, side):
    paths = sorted((shared_data / folder).glob("*.jpg"))
    assert len(paths) == count
    batch = load_batch(paths, Preprocess(image_size=(side, side)))
    assert batch.shape == (count, 3, side, side) and batch.dtype == torch.float32
    assert torch.isfinite(batch).all()
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    assert batch.min() >= (-mean / std).min() - 1e-5
    assert batch.max() <= ((1 - mean) / std).max() + 1e-5
    # Normalization roughly centres real photos: channel means near 0, spread near 1.
    assert batch.mean(dim=(0, 2, 3)).abs().max() < 0.75
    assert 0.5 < batch.std().item() < 2.0
    # Unnormalized, the same pixels come back by undoing the arithmetic.
    raw = load_batch(paths[:2], Preprocess(image_size=(side, side), normalize=False))
    torch.testing.assert_close(batch[:2], (raw - mean.view(3, 1, 1)) / std.view(3, 1, 1))
