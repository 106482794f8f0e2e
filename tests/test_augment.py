from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from vprkit.data import augment as A
from vprkit.data.images import IMAGENET_MEAN, IMAGENET_STD, Preprocess


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _textured(h: int = 24, w: int = 32, seed: int = 0) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr)


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img).copy()


def _marked(h: int, w: int, y: int, x: int) -> Image.Image:
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[y, x] = (255, 128, 7)
    return Image.fromarray(arr)


def _nearest_affine(arr: np.ndarray, matrix: list[float], fill: int = 0) -> np.ndarray:
    """Reference inverse-affine warp: sample the input at the image of each output pixel
    centre, nearest by flooring (Pillow's NEAREST for affine transforms)."""
    h, w = arr.shape[:2]
    a, b, c, d, e, f = matrix
    out = np.full_like(arr, fill)
    for y in range(h):
        for x in range(w):
            sx = a * (x + 0.5) + b * (y + 0.5) + c
            sy = d * (x + 0.5) + e * (y + 0.5) + f
            if 0 <= sx < w and 0 <= sy < h:
                out[y, x] = arr[int(sy), int(sx)]
    return out


# --------------------------------------------------------------------------- geometry


def test_horizontal_flip_is_exact_mirror():
    img = _textured(5, 7)
    assert np.array_equal(_arr(A.horizontal_flip(img)), _arr(img)[:, ::-1])


def test_random_horizontal_flip_probability_and_draw():
    img = _textured(4, 6)
    flipped = _arr(img)[:, ::-1]
    assert np.array_equal(_arr(A.random_horizontal_flip(img, 1.0, rng=_gen(0))), flipped)
    assert np.array_equal(_arr(A.random_horizontal_flip(img, 0.0, rng=_gen(0))), _arr(img))
    outcomes = set()
    for seed in range(20):
        expect_flip = torch.rand(1, generator=_gen(seed)).item() < 0.5
        out = _arr(A.random_horizontal_flip(img, 0.5, rng=_gen(seed)))
        assert np.array_equal(out, flipped if expect_flip else _arr(img))
        outcomes.add(expect_flip)
    assert outcomes == {True, False}
    with pytest.raises(ValueError, match="probability"):
        A.random_horizontal_flip(img, 1.5, rng=_gen(0))


@pytest.mark.parametrize(
    ("height", "width", "scale", "ratio"),
    [
        (24, 32, (0.08, 1.0), (3 / 4, 4 / 3)),
        (50, 13, (0.08, 1.0), (3 / 4, 4 / 3)),
        (7, 90, (0.05, 1.0), (0.2, 5.0)),
        (31, 31, (0.9, 1.0), (1.0, 1.0)),
    ],
)
def test_random_resized_crop_box_stays_inside(height, width, scale, ratio):
    g = _gen(0)
    boxes = set()
    for _ in range(300):
        top, left, h, w = A.random_resized_crop_params(height, width, scale, ratio, rng=g)
        assert 0 < h <= height and 0 < w <= width
        assert 0 <= top and top + h <= height
        assert 0 <= left and left + w <= width
        boxes.add((top, left, h, w))
    assert len(boxes) > 1


def test_random_resized_crop_fallback_is_centre_crop():
    # An area of 2x-3x the image never fits, so all 10 tries fail and the fallback is used.
    impossible = (2.0, 3.0)
    assert A.random_resized_crop_params(30, 40, impossible, rng=_gen(0)) == (0, 0, 30, 40)
    # Too wide for ratio <= 4/3: full height, width round(10 * 4/3) = 13, centred.
    assert A.random_resized_crop_params(10, 100, impossible, rng=_gen(0)) == (0, 43, 10, 13)
    # Too tall for ratio >= 3/4: full width, height round(10 / (3/4)) = 13, centred.
    assert A.random_resized_crop_params(100, 10, impossible, rng=_gen(0)) == (43, 0, 13, 10)


def _torchvision_rrc_params(height, width, scale, ratio):
    """RandomResizedCrop.get_params as torchvision writes it, on the global RNG."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,)).item()
            j = torch.randint(0, width - w + 1, size=(1,)).item()
            return i, j, h, w
    raise AssertionError("test draws should not hit the fallback")


def test_random_resized_crop_draws_match_torchvision_global_rng_sequence():
    g = _gen(123)
    with torch.random.fork_rng():
        torch.manual_seed(123)
        for _ in range(50):
            expected = _torchvision_rrc_params(48, 64, (0.08, 1.0), (3 / 4, 4 / 3))
            assert A.random_resized_crop_params(48, 64, rng=g) == expected


def test_random_resized_crop_output_and_determinism():
    img = _textured(40, 60)
    out = A.random_resized_crop(img, (16, 24), rng=_gen(5))
    assert out.size == (24, 16) and out.mode == "RGB"
    assert A.random_resized_crop(img, 20, rng=_gen(5)).size == (20, 20)
    again = A.random_resized_crop(img, (16, 24), rng=_gen(5))
    assert np.array_equal(_arr(out), _arr(again))
    others = [_arr(A.random_resized_crop(img, (16, 24), rng=_gen(s))) for s in range(6, 10)]
    assert any(not np.array_equal(_arr(out), o) for o in others)
    # The output is the sampled box, resized bilinearly.
    top, left, h, w = A.random_resized_crop_params(40, 60, rng=_gen(5))
    box = img.crop((left, top, left + w, top + h)).resize((24, 16), Image.Resampling.BILINEAR)
    assert np.array_equal(_arr(out), _arr(box))


def test_random_resized_crop_rejects_bad_ranges():
    with pytest.raises(ValueError, match="scale"):
        A.random_resized_crop_params(10, 10, (0.9, 0.1), rng=_gen(0))
    with pytest.raises(ValueError, match="ratio"):
        A.random_resized_crop_params(10, 10, (0.1, 0.9), (0.0, 1.0), rng=_gen(0))


@pytest.mark.parametrize("magnitude", [5.7, -5.7, 3.0])
def test_translate_x_moves_marked_pixel(magnitude):
    img = _marked(12, 16, 6, 7)
    out = _arr(A.apply_op(img, "TranslateX", magnitude))
    ys, xs = np.nonzero(out.any(axis=2))
    # torchvision translates by int(magnitude): truncation toward zero.
    assert list(ys) == [6] and list(xs) == [7 + int(magnitude)]
    assert tuple(out[6, 7 + int(magnitude)]) == (255, 128, 7)


def test_translate_y_moves_marked_pixel_and_fills():
    img = Image.new("RGB", (10, 8), (200, 200, 200))
    img.putpixel((3, 2), (255, 0, 0))
    out = _arr(A.apply_op(img, "TranslateY", 4.9, fill=(1, 2, 3)))
    assert tuple(out[6, 3]) == (255, 0, 0)
    # The 4 rows shifted in from above come from outside the image: fill.
    assert (out[:4] == (1, 2, 3)).all() and (out[4:6] == 200).all()


def test_shear_x_matches_reference_warp():
    arr = _arr(_textured(16, 20, seed=3))
    m, _ = A.rand_augment_magnitude("ShearX", 9, 31)
    for signed in (m, -m):
        out = _arr(A.apply_op(Image.fromarray(arr), "ShearX", signed))
        # torchvision: shear about the top-left corner, x_in = x + m * y.
        assert np.array_equal(out, _nearest_affine(arr, [1, signed, 0, 0, 1, 0]))


def test_shear_y_matches_reference_warp():
    arr = _arr(_textured(16, 20, seed=4))
    out = _arr(A.apply_op(Image.fromarray(arr), "ShearY", 0.3))
    assert np.array_equal(out, _nearest_affine(arr, [1, 0, 0, 0.3, 1, 0]))


def test_rotate_90_is_transpose_based_rotation():
    arr = _arr(_textured(12, 12, seed=5))
    img = Image.fromarray(arr)
    # Counter-clockwise for positive angles: rot90 == transpose then flip rows.
    ccw = arr.transpose(1, 0, 2)[::-1]
    assert np.array_equal(_arr(A.apply_op(img, "Rotate", 90.0)), ccw)
    assert np.array_equal(_arr(A.rotate(img, -90.0)), np.rot90(arr, k=-1))
    # affine's angle is clockwise, as torchvision's.
    assert np.array_equal(_arr(A.affine(img, angle=90.0)), np.rot90(arr, k=-1))


def test_rotate_small_angle_keeps_centre_and_fills_corners():
    img = Image.new("RGB", (21, 21), (9, 9, 9))
    img.putpixel((10, 10), (255, 0, 0))
    out = _arr(A.apply_op(img, "Rotate", -9.0, fill=77))
    assert out.shape == (21, 21, 3)
    assert tuple(out[10, 10]) == (255, 0, 0)
    assert tuple(out[0, 0]) == (77, 77, 77)


# --------------------------------------------------------------------------- colour


def test_brightness_scales_values_as_pil_blend():
    arr = np.array([[[0, 1, 101], [100, 200, 255]]], dtype=np.uint8)
    img = Image.fromarray(arr)
    for factor in (0.5, 1.27, 1.5, 0.0):
        # Pillow blends with black in float32 arithmetic, truncates, then clips to 255.
        scaled = np.float32(factor) * arr.astype(np.float32)
        expected = np.clip(np.floor(scaled), 0, 255)
        assert np.array_equal(_arr(A.adjust_brightness(img, factor)), expected.astype(np.uint8))
    assert np.array_equal(_arr(A.adjust_brightness(img, 1.0)), arr)
    with pytest.raises(ValueError, match="non-negative"):
        A.adjust_brightness(img, -0.1)


def test_saturation_and_contrast_extremes():
    img = _textured(6, 8)
    grey = _arr(img.convert("L").convert("RGB"))
    assert np.array_equal(_arr(A.adjust_saturation(img, 0.0)), grey)
    assert np.array_equal(_arr(A.adjust_saturation(img, 1.0)), _arr(img))
    flat = _arr(A.adjust_contrast(img, 0.0))
    assert (flat == flat[0, 0]).all()
    assert np.array_equal(_arr(A.adjust_contrast(img, 1.0)), _arr(img))
    assert np.array_equal(_arr(A.adjust_sharpness(img, 1.0)), _arr(img))


def test_hue_shift_wraps_like_torchvision():
    red = Image.new("RGB", (2, 2), (255, 0, 0))
    assert tuple(_arr(A.adjust_hue(red, 1 / 3))[0, 0]) == (0, 255, 0)
    # int(-1/3 * 255) = -85 wraps to +171 on the 8-bit hue circle (~241 degrees: blue).
    back = _arr(A.adjust_hue(red, -1 / 3))[0, 0]
    assert back[1] == 0 and back[2] == 255 and back[0] < 10
    img = _textured(5, 5)
    h, s, v = img.convert("HSV").split()
    shifted = ((np.asarray(h).astype(int) + 256 - 25) % 256).astype(np.uint8)
    manual = Image.merge("HSV", (Image.fromarray(shifted, "L"), s, v)).convert("RGB")
    assert np.array_equal(_arr(A.adjust_hue(img, -0.1)), _arr(manual))
    grey = Image.new("L", (3, 3), 40)
    assert A.adjust_hue(grey, 0.2) is grey
    with pytest.raises(ValueError, match="hue_factor"):
        A.adjust_hue(img, 0.6)


def test_solarize_threshold():
    arr = np.array([[0, 127, 128, 178, 179, 255]], dtype=np.uint8)
    img = Image.fromarray(np.repeat(arr[..., None], 3, axis=2))
    out = _arr(A.solarize(img, 128))[..., 0]
    assert list(out[0]) == [0, 127, 127, 77, 76, 0]
    # Bin 9 of 31 gives threshold 178.5: 178 stays, 179 inverts.
    out = _arr(A.apply_op(img, "Solarize", 178.5))[..., 0]
    assert list(out[0]) == [0, 127, 128, 178, 76, 0]


@pytest.mark.parametrize("bits", [8, 7, 4, 1, 0])
def test_posterize_keeps_top_bits(bits):
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    img = Image.fromarray(np.stack([values] * 3, axis=2))
    mask = (0xFF << (8 - bits)) & 0xFF
    assert np.array_equal(_arr(A.posterize(img, bits))[..., 0], values & mask)
    assert np.array_equal(_arr(A.apply_op(img, "Posterize", float(bits)))[..., 0], values & mask)


def test_posterize_rejects_bad_bits():
    with pytest.raises(ValueError, match="bits"):
        A.posterize(_textured(2, 2), 9)


def test_autocontrast_and_equalize_two_levels():
    arr = np.zeros((16, 32, 3), dtype=np.uint8)
    arr[:8], arr[8:] = 10, 61
    img = Image.fromarray(arr)
    # Stretch 10..61 to 0..255: v -> (v - 10) * 5.
    out = _arr(A.autocontrast(img))
    assert (out[:8] == 0).all() and (out[8:] == 255).all()
    # Equalize with two equally common levels sends them to the two ends of the range.
    out = _arr(A.equalize(img))
    assert (out[:8] == 0).all() and (out[8:] == 255).all()


def test_color_jitter_params_ranges_and_draws():
    g = _gen(0)
    for _ in range(100):
        order, b, c, s, h = A.color_jitter_params(0.4, (0.5, 0.7), 1.5, 0.1, rng=g)
        assert sorted(order) == [0, 1, 2, 3]
        assert 0.6 <= b <= 1.4 and 0.5 <= c <= 0.7 and 0.0 <= s <= 2.5 and -0.1 <= h <= 0.1
    # Disabled ops give None and draw nothing: the same state as randperm + one uniform.
    g1, g2 = _gen(7), _gen(7)
    order, b, c, s, h = A.color_jitter_params(brightness=0.2, rng=g1)
    assert (c, s, h) == (None, None, None)
    assert order == torch.randperm(4, generator=g2).tolist()
    assert b == float(torch.empty(1).uniform_(0.8, 1.2, generator=g2))
    assert torch.equal(g1.get_state(), g2.get_state())
    with pytest.raises(ValueError, match="hue"):
        A.color_jitter_params(hue=0.6, rng=g)
    with pytest.raises(ValueError, match="brightness"):
        A.color_jitter_params(brightness=-1, rng=g)


def test_color_jitter_applies_ops_in_sampled_order():
    img = _textured(10, 12)
    for seed in range(5):
        order, b, c, s, h = A.color_jitter_params(0.4, 0.4, 0.4, 0.1, rng=_gen(seed))
        expected = img
        for op in order:
            fn, factor = [
                (A.adjust_brightness, b),
                (A.adjust_contrast, c),
                (A.adjust_saturation, s),
                (A.adjust_hue, h),
            ][op]
            expected = fn(expected, factor)
        out = A.color_jitter(img, 0.4, 0.4, 0.4, 0.1, rng=_gen(seed))
        assert np.array_equal(_arr(out), _arr(expected))
    assert not np.array_equal(
        _arr(A.color_jitter(img, 0.4, 0.4, 0.4, 0.1, rng=_gen(0))),
        _arr(A.color_jitter(img, 0.4, 0.4, 0.4, 0.1, rng=_gen(1))),
    )


# --------------------------------------------------------------------------- RandAugment


def test_rand_augment_op_set_in_torchvision_order():
    assert A.RAND_AUGMENT_OPS == (
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
    with pytest.raises(ValueError, match="unknown RandAugment op"):
        A.apply_op(_textured(2, 2), "Invert", 0.0)


def test_rand_augment_magnitudes_bin_9_of_31():
    size = (200, 224)  # (H, W)
    expected = {
        "Identity": (0.0, False),
        "ShearX": (0.3 * 9 / 30, True),
        "ShearY": (0.3 * 9 / 30, True),
        "TranslateX": (150 / 331 * 224 * 9 / 30, True),
        "TranslateY": (150 / 331 * 200 * 9 / 30, True),
        "Rotate": (30 * 9 / 30, True),
        "Brightness": (0.9 * 9 / 30, True),
        "Color": (0.9 * 9 / 30, True),
        "Contrast": (0.9 * 9 / 30, True),
        "Sharpness": (0.9 * 9 / 30, True),
        "Posterize": (8 - round(9 / 7.5), False),
        "Solarize": (255 * (1 - 9 / 30), False),
        "AutoContrast": (0.0, False),
        "Equalize": (0.0, False),
    }
    for op, (value, signed) in expected.items():
        got, got_signed = A.rand_augment_magnitude(op, 9, 31, image_size=size)
        assert got_signed is signed, op
        # float32 bins, as torch.linspace builds them in torchvision.
        assert got == pytest.approx(value, rel=1e-6, abs=1e-6), op
    assert A.rand_augment_magnitude("Posterize", 30, 31) == (4.0, False)
    assert A.rand_augment_magnitude("Solarize", 30, 31) == (0.0, False)
    assert A.rand_augment_magnitude("Rotate", 0, 31) == (0.0, True)
    with pytest.raises(ValueError, match="image_size"):
        A.rand_augment_magnitude("TranslateX", 9, 31)
    with pytest.raises(ValueError, match="magnitude"):
        A.rand_augment_magnitude("Rotate", 31, 31)


def test_rand_augment_replays_torchvision_draw_protocol():
    img = _textured(20, 24, seed=1)
    seen = set()
    for seed in range(40):
        g = _gen(seed)
        expected = img
        for _ in range(2):
            op = A.RAND_AUGMENT_OPS[int(torch.randint(14, (1,), generator=g))]
            value, signed = A.rand_augment_magnitude(op, 9, 31, image_size=(20, 24))
            # The sign is drawn for signed ops only.
            if signed and torch.randint(2, (1,), generator=g).item():
                value = -value
            expected = A.apply_op(expected, op, value)
            seen.add(op)
        out = A.rand_augment(img, num_ops=2, magnitude=9, rng=_gen(seed))
        assert np.array_equal(_arr(out), _arr(expected)), seed
    assert len(seen) >= 12


def test_rand_augment_determinism_and_variation():
    img = _textured(24, 24, seed=2)
    a = A.rand_augment(img, num_ops=3, rng=_gen(11))
    b = A.rand_augment(img, num_ops=3, rng=_gen(11))
    assert np.array_equal(_arr(a), _arr(b))
    outs = [_arr(A.rand_augment(img, num_ops=3, rng=_gen(s))) for s in range(12, 16)]
    assert any(not np.array_equal(_arr(a), o) for o in outs)
    assert np.array_equal(_arr(A.rand_augment(img, num_ops=0, rng=_gen(0))), _arr(img))


def test_rand_augment_rejects_bad_arguments():
    img = _textured(4, 4)
    with pytest.raises(TypeError, match="torch.Generator"):
        A.rand_augment(img, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="magnitude"):
        A.rand_augment(img, magnitude=31, rng=_gen(0))
    with pytest.raises(ValueError, match="num_ops"):
        A.rand_augment(img, num_ops=-1, rng=_gen(0))
    with pytest.raises(ValueError, match="mode"):
        A.rand_augment(img.convert("RGBA"), rng=_gen(0))


# --------------------------------------------------------------------------- TrainTransform


def _unnormalize(t: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return t * std + mean


def test_cricavpr_preset():
    t = A.cricavpr_train_transform()
    assert t.image_size == (224, 224) and t.rand_augment_num_ops == 3
    assert t.rand_augment_magnitude == 9 and t.rand_augment_num_bins == 31
    assert t.crop_size is None and t.horizontal_flip_p == 0 and not t.jitter
    img = _textured(60, 80)
    x = t(img, _gen(0))
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    raw = _unnormalize(x)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    assert torch.equal(x, t(img, _gen(0)))
    assert any(not torch.equal(x, t(img, _gen(s))) for s in range(1, 5))
    assert "RandAugment(num_ops=3, magnitude=9" in t.describe()
    assert A.cricavpr_train_transform((112, 96))(img, _gen(0)).shape == (3, 112, 96)


def test_selavpr_preset_is_plain_preprocessing_and_draws_nothing():
    t = A.selavpr_train_transform()
    img = _textured(60, 80)
    g = _gen(3)
    state = g.get_state()
    x = t(img, g)
    assert torch.equal(g.get_state(), state)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    assert torch.equal(x, Preprocess(image_size=(224, 224))(img))
    flip = A.selavpr_train_transform(horizontal_flip_p=0.5, brightness=0.2)
    assert flip.horizontal_flip_p == 0.5 and flip.jitter


def test_train_transform_all_steps_repr_and_pickle():
    t = A.TrainTransform(
        image_size=(40, 48),
        crop_size=(32, 32),
        horizontal_flip_p=0.5,
        brightness=0.3,
        contrast=0.3,
        saturation=0.3,
        hue=0.05,
        rand_augment_num_ops=2,
        rand_augment_fill=(128, 128, 128),
    )
    img = _textured(50, 70)
    x = t(img, _gen(1))
    assert x.shape == (3, 32, 32)
    for name in ("crop_size=(32, 32)", "horizontal_flip_p=0.5", "rand_augment_num_ops=2"):
        assert name in repr(t)
    listing = t.describe()
    order = ["Resize", "RandomResizedCrop", "RandomHorizontalFlip", "ColorJitter", "RandAugment"]
    assert [listing.index(s) for s in order] == sorted(listing.index(s) for s in order)
    clone = pickle.loads(pickle.dumps(t))
    assert clone == t and repr(clone) == repr(t)
    assert torch.equal(clone(img, _gen(1)), x)
    raw = A.TrainTransform(image_size=(8, 8), normalize=False)(img, _gen(0))
    assert raw.min() >= 0 and raw.max() <= 1


def test_train_transform_resumes_from_generator_state():
    t = A.cricavpr_train_transform((32, 32))
    imgs = [_textured(40, 40, seed=s) for s in range(6)]
    g = _gen(9)
    straight = [t(im, g) for im in imgs]
    g = _gen(9)
    first = [t(im, g) for im in imgs[:3]]
    saved = pickle.dumps(g.get_state())
    resumed = torch.Generator()
    resumed.set_state(pickle.loads(saved))
    rest = [t(im, resumed) for im in imgs[3:]]
    assert all(torch.equal(a, b) for a, b in zip(straight, first + rest, strict=True))


def test_train_transform_validates_config_and_inputs():
    with pytest.raises(ValueError, match="horizontal_flip_p"):
        A.TrainTransform(horizontal_flip_p=2.0)
    with pytest.raises(ValueError, match="hue"):
        A.TrainTransform(hue=0.7)
    with pytest.raises(ValueError, match="magnitude"):
        A.TrainTransform(rand_augment_num_ops=2, rand_augment_magnitude=40)
    with pytest.raises(ValueError, match="crop_size"):
        A.TrainTransform(crop_size=(0, 4))
    with pytest.raises(ValueError, match="fill"):
        A.TrainTransform(rand_augment_fill=(1, 2))
    t = A.cricavpr_train_transform()
    with pytest.raises(TypeError, match="torch.Generator"):
        t(_textured(4, 4), 0)
    with pytest.raises(TypeError, match="PIL image"):
        t(np.zeros((4, 4, 3), np.uint8), _gen(0))
