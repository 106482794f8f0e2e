"""Synthetic places: a procedural street world rendered by true pinhole ray casting.

No pretrained weights or benchmark datasets reach some machines, so vprkit proves that its
methods learn on a world it renders itself. Streets are straight segments in metric UTM-style
coordinates, lined on both sides by building facades assembled from a small shared vocabulary
of modules (window grids, doors, shop fronts, colours, wall textures), so places alias
perceptually and differ only in a few details. Trees, hedges, street lamps, sky and ground
complete the scene; cars and pedestrians occlude it per image.

Each image is rendered by casting one ray per pixel against the vertical facade rectangles
(vectorized in numpy), so geometry is exact; conditions (day/dusk/night, season, fog, colour
cast, contrast, blur, noise) are applied on the G-buffer. Every image draws its randomness
from ``numpy.random.default_rng([seed, kind, index])`` so the output does not depend on
generation order or worker count.

Outputs (``generate`` / ``vprkit synth``):

- ``gsv/Dataframes/<City>.csv`` and ``gsv/Images/<City>/*.jpg`` in the GSV-Cities layout;
- ``vg/<name>/images/{val,test}/{database,queries}/@east@north@...@.jpg`` in the layout of
  gmberton's VPR-datasets-downloader, from streets unseen in training, each photo with EXIF
  GPS (latitude, longitude, camera height as altitude, heading) as a phone writes it: the world
  has a geographic origin (``LAT0, LON0`` at ``BASE_EAST, BASE_NORTH``);
- optionally (``vg_train_queries > 0``) ``vg/<name>/images/train/{database,queries}/``, built
  like val/test from streets of its own, for triplet training on VG-format data;
- ``meta.json`` (parameters, seed, counts) and ``poses.jsonl`` (one line per image: pose,
  condition and the facade ids in view).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import shutil
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from vprkit.atomic import atomic_path, write_text
from vprkit.data.datasets import parse_utm
from vprkit.data.gsv_cities import GSV_COLUMNS, gsv_image_name
from vprkit.errors import VprkitError
from vprkit.maps.positions import exif_gps

FORMAT_VERSION = 1

# Metric frame: the world lives around this UTM-style offset; lat/lon come from a local
# equirectangular projection anchored at (LAT0, LON0) <-> (BASE_EAST, BASE_NORTH).
BASE_EAST = 500_000.0
BASE_NORTH = 4_000_000.0
UTM_ZONE = 33
UTM_LETTER = "S"
LAT0 = 36.13
LON0 = 15.0
METRES_PER_DEGREE = 6_371_000.0 * math.pi / 180.0

# Splits live in separate regions (20 km apart) so val/test streets are never seen in training.
# "train" holds the GSV-Cities places; "vg_train" the streets of the optional VG train split
# (its images go to images/train/), apart from both so that adding it changes no other image.
SPLITS = ("train", "val", "test", "vg_train")
SPLIT_REGION_EAST = {"train": 0.0, "val": 20_000.0, "test": 40_000.0, "vg_train": 60_000.0}
VG_FOLDERS = {"val": "val", "test": "test", "vg_train": "train"}  # split -> images/<folder>
STREET_CELL = 600.0  # streets sit in their own 600 m cells: no two streets come within 200 m

PPM = 8.0  # texels per metre on facades
MIP_LEVELS = 3

# Texel materials (channel 3 of a texture); 0 is transparent (cut-out quads only).
M_NONE, M_WALL, M_GLASS, M_TRIM, M_DOOR, M_SIGN, M_VEG, M_BARK, M_LAMP = range(9)

# Quad kinds: which ones count as "facades in view" in the metadata.
K_FACADE, K_SIDE, K_END, K_BACKDROP, K_TREE, K_POLE, K_OCCLUDER = range(7)
FACADE_KINDS = (K_FACADE, K_SIDE, K_END, K_BACKDROP)

TIMES = ("day", "dusk", "night")
SEASONS = ("spring", "summer", "autumn", "winter")
SEASON_MONTHS = {
    "spring": (3, 4, 5),
    "summer": (6, 7, 8),
    "autumn": (9, 10, 11),
    "winter": (12, 1, 2),
}


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Difficulty:
    """How hard the world is: viewpoint, condition and occlusion ranges, and aliasing."""

    lateral_m: float  # max lateral offset of a query/training view from the reference track
    forward_m: float  # max forward offset between images of one training place
    yaw_deg: float  # max yaw change
    pitch_deg: float  # max pitch
    height_range: tuple[float, float]  # camera height above ground (m)
    p_dusk: float
    p_night: float
    p_season: float  # probability that the season differs from the database's summer
    p_fog: float
    fog_max: float  # max fog density (1/m); visibility is about 3 / density
    color_cast: float  # max per-channel gain deviation
    exposure: float  # max exposure deviation
    contrast_range: tuple[float, float]
    blur_max: float  # max Gaussian blur sigma, in pixels at 224 px width
    noise_max: float  # max sensor noise sigma (0..1 intensity)
    max_occluders: int
    unique_details: int  # unique details per facade: fewer means more perceptual aliasing


DIFFICULTIES: dict[str, Difficulty] = {
    # Day-only, near-identical viewpoints: raw pixels already do fairly well.
    "easy": Difficulty(
        lateral_m=1.0, forward_m=2.0, yaw_deg=5.0, pitch_deg=2.0, height_range=(2.3, 2.7),
        p_dusk=0.0, p_night=0.0, p_season=0.0, p_fog=0.0, fog_max=0.02, color_cast=0.05,
        exposure=0.1, contrast_range=(0.9, 1.1), blur_max=0.5, noise_max=0.01,
        max_occluders=1, unique_details=4,
    ),
    # The default: raw pixels are near chance, a learned descriptor has room to show its worth.
    "medium": Difficulty(
        lateral_m=3.0, forward_m=4.0, yaw_deg=20.0, pitch_deg=5.0, height_range=(1.6, 2.8),
        p_dusk=0.25, p_night=0.3, p_season=0.6, p_fog=0.3, fog_max=0.04, color_cast=0.15,
        exposure=0.3, contrast_range=(0.7, 1.15), blur_max=1.5, noise_max=0.03,
        max_occluders=3, unique_details=2,
    ),
    # `vprkit demo`'s world: mild viewpoint change (the hard part to learn from scratch in
    # minutes), varied light (dusk, a little night), seasons, haze and occlusion; facades
    # alias (2 unique details each). Raw pixels and an untrained network score low; a tiny
    # network trained from scratch for a few CPU minutes clearly learns it.
    "demo": Difficulty(
        lateral_m=1.5, forward_m=2.0, yaw_deg=12.0, pitch_deg=2.0, height_range=(2.2, 2.7),
        p_dusk=0.2, p_night=0.05, p_season=0.3, p_fog=0.1, fog_max=0.02, color_cast=0.15,
        exposure=0.3, contrast_range=(0.75, 1.1), blur_max=1.0, noise_max=0.02,
        max_occluders=2, unique_details=2,
    ),
    "hard": Difficulty(
        lateral_m=4.0, forward_m=6.0, yaw_deg=35.0, pitch_deg=8.0, height_range=(1.4, 3.0),
        p_dusk=0.3, p_night=0.45, p_season=1.0, p_fog=0.5, fog_max=0.06, color_cast=0.25,
        exposure=0.4, contrast_range=(0.5, 1.2), blur_max=2.5, noise_max=0.05,
        max_occluders=5, unique_details=1,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class SynthConfig:
    """Everything that determines a generated dataset (together with nothing else)."""

    seed: int = 0
    image_size: tuple[int, int] = (224, 224)  # (H, W)
    hfov_deg: float = 75.0
    train_places: int = 1000
    images_per_place: int = 4
    val_queries: int = 200
    test_queries: int = 500
    eval_streets: int = 4  # streets per val/test split
    vg_train_queries: int = 0  # queries of the VG train split; 0: no VG train split
    vg_train_streets: int = 4  # streets of the VG train split
    db_spacing: float = 5.0  # metres between database positions along a street
    db_headings: int = 2  # 1: facing forward only; 2: forward and backward
    place_spacing: float = 20.0  # metres between training places along a street
    n_styles: int = 8  # size of the facade style vocabulary shared by the whole world
    city: str = "Synthville"
    vg_name: str = "synthetic"
    jpeg_quality: int = 90
    difficulty: str = "medium"
    params: Difficulty = field(default_factory=lambda: DIFFICULTIES["medium"])

    def __post_init__(self) -> None:
        h, w = self.image_size
        if h < 8 or w < 8:
            raise VprkitError(f"image_size must be at least 8x8, got {self.image_size}")
        if self.images_per_place < 4:
            raise VprkitError(
                f"images_per_place must be >= 4 (GSV-Cities keeps places with 4+ images), "
                f"got {self.images_per_place}"
            )
        if self.train_places < 0 or self.val_queries < 0 or self.test_queries < 0:
            raise VprkitError("train_places, val_queries and test_queries must be >= 0")
        if self.train_places >= 10**5:
            raise VprkitError("train_places must be < 100000 (GSV-Cities place id convention)")
        if self.eval_streets < 1:
            raise VprkitError(f"eval_streets must be >= 1, got {self.eval_streets}")
        if self.vg_train_queries < 0:
            raise VprkitError(f"vg_train_queries must be >= 0, got {self.vg_train_queries}")
        if self.vg_train_streets < 1:
            raise VprkitError(f"vg_train_streets must be >= 1, got {self.vg_train_streets}")
        if not 0.5 <= self.db_spacing <= 20.0:
            raise VprkitError(
                f"db_spacing must be in [0.5, 20] m (positives within 25 m), got {self.db_spacing}"
            )
        if self.db_headings not in (1, 2):
            raise VprkitError(f"db_headings must be 1 or 2, got {self.db_headings}")
        if self.place_spacing <= 0:
            raise VprkitError(f"place_spacing must be > 0, got {self.place_spacing}")
        if not 20.0 <= self.hfov_deg <= 120.0:
            raise VprkitError(f"hfov_deg must be in [20, 120], got {self.hfov_deg}")
        if self.difficulty not in DIFFICULTIES:
            raise VprkitError(f"difficulty must be one of {sorted(DIFFICULTIES)}")
        if not 1 <= self.jpeg_quality <= 100:
            raise VprkitError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        if not self.city.isalnum() or not self.vg_name.replace("_", "").isalnum():
            raise VprkitError(
                f"--city must be letters and digits only, got {self.city!r}; --vg_name letters, "
                f"digits or '_', got {self.vg_name!r}"
            )

    @classmethod
    def create(cls, difficulty: str = "medium", **overrides: Any) -> SynthConfig:
        """Config for a difficulty preset, with Difficulty fields (e.g. ``yaw_deg``) overridable."""
        if difficulty not in DIFFICULTIES:
            raise VprkitError(f"difficulty must be one of {sorted(DIFFICULTIES)}: {difficulty!r}")
        names = {f.name for f in dataclasses.fields(Difficulty)}
        diff_over = {k: overrides.pop(k) for k in list(overrides) if k in names}
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise VprkitError(f"unknown synthetic config fields: {sorted(unknown)}")
        params = dataclasses.replace(DIFFICULTIES[difficulty], **diff_over)
        return cls(difficulty=difficulty, params=params, **overrides)


@dataclass(frozen=True)
class WorldParams:
    """The part of the config that shapes the world (streets, facades), hashable for caching."""

    seed: int
    n_styles: int
    unique_details: int


def _rng(seed: int, *keys: str | int) -> np.random.Generator:
    """A generator that depends only on (seed, keys): never on order or worker count."""
    ints = [int(seed)] + [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in keys]
    return np.random.default_rng(ints)


# ----------------------------------------------------------------------------- camera


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics: square pixels, principal point at the image centre."""

    width: int
    height: int
    hfov_deg: float

    @property
    def focal(self) -> float:
        return 0.5 * self.width / math.tan(math.radians(self.hfov_deg) / 2)


@dataclass(frozen=True)
class Pose:
    """Camera pose: position (UTM-style metres), height above ground, compass yaw, pitch up."""

    east: float
    north: float
    height: float
    yaw_deg: float  # 0 = north, 90 = east
    pitch_deg: float  # positive looks up


def camera_axes(pose: Pose) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World (east, north, up) directions of the camera's right, down and forward axes."""
    yaw, pitch = math.radians(pose.yaw_deg), math.radians(pose.pitch_deg)
    fwd = np.array(
        [math.sin(yaw) * math.cos(pitch), math.cos(yaw) * math.cos(pitch), math.sin(pitch)]
    )
    right = np.array([math.cos(yaw), -math.sin(yaw), 0.0])
    down = np.cross(fwd, right)
    return right, down, fwd


def project_points(
    intr: Intrinsics, pose: Pose, points: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Project world points (N, 3) to continuous pixel coordinates (N, 2) as (x, y), and depth.

    Pixel (row r, column c) covers [c, c+1) x [r, r+1), so its centre is (c + 0.5, r + 0.5).
    """
    right, down, fwd = camera_axes(pose)
    rel = np.asarray(points, dtype=np.float64) - np.array([pose.east, pose.north, pose.height])
    x, y, z = rel @ right, rel @ down, rel @ fwd
    f = intr.focal
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = np.stack([intr.width / 2 + f * x / z, intr.height / 2 + f * y / z], axis=-1)
    return uv, z


@functools.lru_cache(maxsize=8)
def _camera_grid(intr: Intrinsics) -> np.ndarray:
    f = intr.focal
    xs = (np.arange(intr.width) + 0.5 - intr.width / 2) / f
    ys = (np.arange(intr.height) + 0.5 - intr.height / 2) / f
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel(), np.ones(gx.size)], axis=1)


def pixel_rays(intr: Intrinsics, pose: Pose) -> np.ndarray:
    """Unit ray directions in world coordinates, one per pixel in row-major order: (H*W, 3)."""
    right, down, fwd = camera_axes(pose)
    rays = _camera_grid(intr) @ np.stack([right, down, fwd])
    rays /= np.linalg.norm(rays, axis=1, keepdims=True)
    return rays.astype(np.float32)


# ----------------------------------------------------------------------------- textures


def _hash01(*arrays: np.ndarray, seed: int = 0) -> np.ndarray:
    """Deterministic per-integer-tuple noise in [0, 1), vectorized (a small integer hash)."""
    h = np.full(np.broadcast(*arrays).shape, np.uint32((seed * 2654435761) & 0xFFFFFFFF))
    for a in arrays:
        h ^= np.asarray(a).astype(np.int64).astype(np.uint32) * np.uint32(0x9E3779B1)
        h ^= h >> np.uint32(16)
        h *= np.uint32(0x85EBCA6B)
        h ^= h >> np.uint32(13)
        h *= np.uint32(0xC2B2AE35)
        h ^= h >> np.uint32(16)
    return (h >> np.uint32(8)).astype(np.float32) / np.float32(1 << 24)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: int) -> np.ndarray:
    """Low-frequency noise in [0, 1] of the given shape (bilinear upsampling of a coarse grid)."""
    gh, gw = shape[0] // cell + 2, shape[1] // cell + 2
    coarse = rng.random((gh, gw), dtype=np.float32)
    img = Image.fromarray(coarse).resize((gw * cell, gh * cell), Image.BILINEAR)
    return np.asarray(img)[: shape[0], : shape[1]]


class _Canvas:
    """A facade texture being drawn: (h, w, 5) uint8 = RGB, material, per-texel random byte.

    Drawing takes facade-local metres (x right, y up from the bottom-left corner).
    """

    def __init__(self, width_m: float, height_m: float, ppm: float = PPM) -> None:
        self.ppm = ppm
        self.w = max(1, round(width_m * ppm))
        self.h = max(1, round(height_m * ppm))
        self.a = np.zeros((self.h, self.w, 5), np.uint8)

    def _slices(self, x0: float, y0: float, x1: float, y1: float) -> tuple[slice, slice]:
        c0, c1 = round(x0 * self.ppm), round(x1 * self.ppm)
        r0, r1 = self.h - round(y1 * self.ppm), self.h - round(y0 * self.ppm)
        return slice(max(r0, 0), max(r1, 0)), slice(max(c0, 0), max(c1, 0))

    def rect(
        self,
        x0: float,
        y0: float,
        x1: float,
        y1: float,
        rgb: Sequence[int],
        mat: int,
        wr: int | None = None,
    ) -> None:
        rs, cs = self._slices(x0, y0, x1, y1)
        self.a[rs, cs, :3] = rgb
        self.a[rs, cs, 3] = mat
        if wr is not None:
            self.a[rs, cs, 4] = wr

    def shade(self, x0: float, y0: float, x1: float, y1: float, factor: np.ndarray | float) -> None:
        rs, cs = self._slices(x0, y0, x1, y1)
        region = self.a[rs, cs, :3].astype(np.float32)
        f = factor if np.isscalar(factor) else np.asarray(factor)[..., None]
        self.a[rs, cs, :3] = np.clip(region * f, 0, 255).astype(np.uint8)


WALL_COLOURS = [
    (200, 170, 120),
    (225, 215, 190),
    (160, 80, 60),
    (150, 150, 145),
    (235, 235, 228),
    (170, 190, 200),
    (220, 150, 120),
    (120, 95, 75),
    (190, 200, 160),
    (210, 190, 90),
]
TRIM_COLOURS = [(240, 240, 235), (60, 55, 50), (110, 70, 40), (180, 180, 175), (40, 60, 50)]
ACCENT_COLOURS = [
    (180, 30, 30),
    (30, 80, 160),
    (30, 120, 60),
    (200, 160, 30),
    (120, 40, 120),
    (20, 20, 20),
    (230, 110, 20),
    (0, 140, 150),
]
GLASS = (55, 70, 85)


@dataclass(frozen=True)
class Style:
    """One architectural module set; many buildings share a style, hence perceptual aliasing."""

    wall: tuple[int, int, int]
    wall_kind: str  # plaster | brick | stone | siding
    trim: tuple[int, int, int]
    accent: tuple[int, int, int]  # shutters, awnings, shop sign
    bay_m: float
    win_w: float
    win_h: float
    floor_h: float
    ground_h: float
    floors: tuple[int, int]
    ground: str  # shop | door | garage
    shutters: bool
    balcony: bool
    mullion: bool
    band: bool  # horizontal trim band between floors


def make_styles(seed: int, n: int) -> list[Style]:
    """The facade vocabulary of a world: ``n`` styles shared by every street and split."""
    rng = _rng(seed, "styles")
    styles = []
    for _ in range(n):
        styles.append(
            Style(
                wall=WALL_COLOURS[rng.integers(len(WALL_COLOURS))],
                wall_kind=str(rng.choice(["plaster", "brick", "stone", "siding"])),
                trim=TRIM_COLOURS[rng.integers(len(TRIM_COLOURS))],
                accent=ACCENT_COLOURS[rng.integers(len(ACCENT_COLOURS))],
                bay_m=float(rng.uniform(2.6, 3.6)),
                win_w=float(rng.uniform(0.9, 1.5)),
                win_h=float(rng.uniform(1.3, 1.9)),
                floor_h=float(rng.uniform(3.0, 3.6)),
                ground_h=float(rng.uniform(3.6, 4.6)),
                floors=(int(rng.integers(2, 4)), int(rng.integers(4, 7))),
                ground=str(rng.choice(["shop", "door", "garage"], p=[0.5, 0.35, 0.15])),
                shutters=bool(rng.random() < 0.35),
                balcony=bool(rng.random() < 0.35),
                mullion=bool(rng.random() < 0.5),
                band=bool(rng.random() < 0.5),
            )
        )
    return styles


def _wall_pattern(style: Style, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Multiplicative wall texture (h, w) around 1.0 for the style's wall material."""
    yy, xx = np.mgrid[0:h, 0:w]
    pattern = 0.94 + 0.12 * _smooth_noise(rng, (h, w), 12)
    if style.wall_kind == "brick":
        course = yy // 2
        brick = (xx + (course % 2) * 2) // 4
        pattern *= 0.9 + 0.2 * _hash01(course, brick, seed=7)
        pattern[(yy % 2) == 0] *= 1.12
    elif style.wall_kind == "stone":
        course = yy // 4
        block = (xx + (course % 2) * 4) // 8
        pattern *= 0.92 + 0.16 * _hash01(course, block, seed=11)
        pattern[((yy % 4) == 0) | (((xx + (course % 2) * 4) % 8) == 0)] *= 0.8
    elif style.wall_kind == "siding":
        pattern[(yy % 2) == 0] *= 0.85
    return pattern


def _draw_window(cv: _Canvas, x: float, y: float, style: Style, wr: int, trim=None) -> None:
    trim = style.trim if trim is None else trim
    w, h = style.win_w, style.win_h
    if style.shutters:
        cv.rect(x - w / 2, y, x, y + h, style.accent, M_TRIM)
        cv.rect(x + w, y, x + 1.5 * w, y + h, style.accent, M_TRIM)
        cv.shade(x - w / 2, y, x, y + h, 0.85)
    cv.rect(x - 0.1, y - 0.15, x + w + 0.1, y + h + 0.1, trim, M_TRIM)
    cv.rect(x, y, x + w, y + h, GLASS, M_GLASS, wr)
    cv.shade(x, y + h * 0.55, x + w, y + h, 1.25)  # sky reflection gradient on upper panes
    if style.mullion:
        cv.rect(x + w / 2 - 0.05, y, x + w / 2 + 0.05, y + h, trim, M_TRIM)
        cv.rect(x, y + h * 0.6 - 0.05, x + w, y + h * 0.6 + 0.05, trim, M_TRIM)


def _draw_ground_floor(
    cv: _Canvas,
    style: Style,
    bays: list[float],
    rng: np.random.Generator,
    door_rgb: tuple[int, int, int],
) -> None:
    gh = style.ground_h
    door_bay = int(rng.integers(len(bays)))
    for i, x in enumerate(bays):
        bw = style.bay_m
        if i == door_bay:
            dx = x + bw / 2 - 0.6
            cv.rect(dx - 0.15, 0, dx + 1.35, 2.45, style.trim, M_TRIM)
            cv.rect(dx, 0, dx + 1.2, 2.3, door_rgb, M_DOOR)
            cv.shade(dx + 0.1, 0.2, dx + 1.1, 2.1, 0.8)
        elif style.ground == "shop":
            cv.rect(x + 0.15, 0.4, x + bw - 0.15, gh - 1.0, style.trim, M_TRIM)
            cv.rect(x + 0.25, 0.5, x + bw - 0.25, gh - 1.1, GLASS, M_GLASS, int(rng.integers(256)))
        elif style.ground == "garage":
            cv.rect(x + 0.2, 0, x + bw - 0.2, 2.6, (120, 120, 120), M_DOOR)
            for k in range(8):
                cv.rect(x + 0.2, k * 0.32, x + bw - 0.2, k * 0.32 + 0.05, (90, 90, 90), M_DOOR)
        else:
            wx = x + (bw - style.win_w) / 2
            cv.rect(
                wx - 0.1, 1.0, wx + style.win_w + 0.1, 1.0 + style.win_h * 0.9, style.trim, M_TRIM
            )
            cv.rect(
                wx,
                1.1,
                wx + style.win_w,
                1.0 + style.win_h * 0.9 - 0.1,
                GLASS,
                M_GLASS,
                int(rng.integers(256)),
            )
    if style.ground == "shop":
        # The style's shop sign: identical on every building of the style (aliasing).
        cv.rect(bays[0], gh - 0.95, bays[-1] + style.bay_m, gh - 0.2, style.accent, M_SIGN)


def _glyphs(cv: _Canvas, x0: float, y0: float, x1: float, y1: float, rgb, rng) -> None:
    """Text-like blocks: what makes one shop sign unlike another."""
    n = int(rng.integers(3, 9))
    xs = np.sort(rng.uniform(x0 + 0.1, x1 - 0.1, n))
    for x in xs:
        w = float(rng.uniform(0.1, 0.35))
        hh = float(rng.uniform(0.4, 0.9)) * (y1 - y0)
        cv.rect(
            x, y0 + (y1 - y0 - hh) / 2, min(x + w, x1 - 0.05), y0 + (y1 + hh - y0) / 2, rgb, M_SIGN
        )


def _add_detail(
    cv: _Canvas, style: Style, width: float, height: float, rng: np.random.Generator
) -> None:
    """One unique detail: a sign, mural, awning, poster, graffiti or odd-coloured window."""
    kind = rng.choice(["sign", "mural", "awning", "poster", "graffiti", "window", "plants"])
    colour = tuple(int(c) for c in rng.integers(20, 240, 3))
    ink = tuple(int(c) for c in 255 - np.array(colour))
    x = float(rng.uniform(0.3, max(0.4, width - 3.0)))
    if kind == "sign":
        y = float(rng.uniform(2.6, style.ground_h - 0.2))
        w = float(rng.uniform(1.5, 3.0))
        cv.rect(x, y - 0.7, x + w, y, colour, M_SIGN)
        _glyphs(cv, x, y - 0.7, x + w, y, ink, rng)
    elif kind == "mural":
        y = float(rng.uniform(style.ground_h, max(style.ground_h + 0.1, height - 4.0)))
        w, h = float(rng.uniform(1.5, 3.0)), float(rng.uniform(1.5, 3.0))
        for k in range(4):
            c = tuple(int(v) for v in rng.integers(20, 240, 3))
            cv.rect(x, y + k * h / 4, x + w, y + (k + 1) * h / 4, c, M_WALL)
    elif kind == "awning":
        w = float(rng.uniform(2.0, 3.5))
        y = style.ground_h - 0.9
        for k in range(int(w / 0.4)):
            c = colour if k % 2 == 0 else (235, 235, 230)
            cv.rect(x + k * 0.4, y - 0.6, x + (k + 1) * 0.4, y, c, M_TRIM)
    elif kind == "poster":
        cv.rect(x, 0.8, x + 0.9, 2.2, colour, M_WALL)
        cv.rect(x + 0.1, 1.5, x + 0.8, 2.1, ink, M_WALL)
    elif kind == "graffiti":
        for _ in range(6):
            gx, gy = x + float(rng.uniform(0, 2.0)), float(rng.uniform(0.2, 1.6))
            cv.rect(gx, gy, gx + float(rng.uniform(0.2, 0.8)), gy + 0.2, colour, M_WALL)
    elif kind == "window":
        floors = max(1, int((height - style.ground_h) / style.floor_h))
        y = style.ground_h + int(rng.integers(floors)) * style.floor_h + 0.9
        if y + style.win_h < height:
            cv.rect(x - 0.2, y - 0.25, x + style.win_w + 0.2, y + style.win_h + 0.2, colour, M_TRIM)
            cv.rect(x, y, x + style.win_w, y + style.win_h, GLASS, M_GLASS, int(rng.integers(256)))
    else:
        y = style.ground_h + 0.8
        for _ in range(5):
            px = x + float(rng.uniform(0, 1.5))
            cv.rect(px, y, px + 0.35, y + 0.35, (60, 130, 50), M_VEG, 0)


def facade_texture(
    style: Style, width: float, floors: int, rng: np.random.Generator, unique_details: int
) -> tuple[np.ndarray, float]:
    """Texture (h, w, 5) of one building front, and the building height in metres."""
    height = style.ground_h + (floors - 1) * style.floor_h + 0.8
    cv = _Canvas(width, height)
    cv.rect(0, 0, width, height, style.wall, M_WALL)
    cv.shade(0, 0, width, height, _wall_pattern(style, cv.h, cv.w, rng))
    n_bays = max(1, int((width - 0.6) / style.bay_m))
    margin = (width - n_bays * style.bay_m) / 2
    bays = [margin + i * style.bay_m for i in range(n_bays)]
    cv.rect(0, height - 0.6, width, height, style.trim, M_TRIM)  # cornice
    cv.shade(0, height - 0.6, width, height - 0.45, 0.6)
    for f in range(1, floors):
        y = style.ground_h + (f - 1) * style.floor_h
        if style.band:
            cv.rect(0, y - 0.1, width, y + 0.08, style.trim, M_TRIM)
        for x in bays:
            wx = x + (style.bay_m - style.win_w) / 2
            _draw_window(cv, wx, y + 0.9, style, int(rng.integers(256)))
            if style.balcony and f % 2 == 1:
                cv.rect(wx - 0.3, y + 0.05, wx + style.win_w + 0.3, y + 0.95, (50, 50, 55), M_TRIM)
                for k in range(int((style.win_w + 0.6) / 0.25)):
                    bx = wx - 0.3 + k * 0.25 + 0.12
                    cv.rect(bx, y + 0.1, bx + 0.12, y + 0.9, style.wall, M_WALL)
    door_rgb = ACCENT_COLOURS[int(rng.integers(len(ACCENT_COLOURS)))]
    _draw_ground_floor(cv, style, bays, rng, door_rgb)
    for _ in range(unique_details):
        _add_detail(cv, style, width, height, rng)
    # Ground-level grime: ambient occlusion near the pavement.
    cv.shade(0, 0, width, 0.4, 0.8)
    return cv.a, height


def plain_wall_texture(
    style: Style, width: float, height: float, rng: np.random.Generator
) -> np.ndarray:
    """Side walls and back buildings: the style's wall material without openings."""
    cv = _Canvas(width, height)
    cv.rect(0, 0, width, height, style.wall, M_WALL)
    cv.shade(0, 0, width, height, _wall_pattern(style, cv.h, cv.w, rng) * 0.85)
    return cv.a


def backdrop_texture(width: float, height: float, rng: np.random.Generator) -> np.ndarray:
    """A dull distant building block with a regular grid of small windows."""
    grey = int(rng.integers(110, 170))
    cv = _Canvas(width, height, ppm=4.0)
    cv.rect(0, 0, width, height, (grey, grey - 5, grey - 12), M_WALL)
    for y in np.arange(1.5, height - 1.5, 3.0):
        for x in np.arange(0.8, width - 1.0, 2.5):
            cv.rect(x, y, x + 1.0, y + 1.3, GLASS, M_GLASS, int(rng.integers(256)))
    return cv.a


def tree_texture(width: float, height: float, rng: np.random.Generator) -> np.ndarray:
    """Crown and trunk with a cut-out outline. The per-texel byte of foliage is a leaf density
    threshold, so a season can thin the crown (winter trees are see-through)."""
    cv = _Canvas(width, height)
    h, w = cv.h, cv.w
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    crown_h = 0.7 * h
    cy, cx = crown_h / 2, w / 2
    ang = np.arctan2(yy - cy, xx - cx)
    phase = rng.uniform(0, 6, 2)
    wobble = 1 + 0.15 * np.sin(3 * ang + phase[0]) + 0.1 * np.sin(7 * ang + phase[1])
    inside = ((yy - cy) / (crown_h / 2)) ** 2 + ((xx - cx) / (w / 2)) ** 2 < (0.95 * wobble) ** 2
    lum = (90 + 110 * _smooth_noise(rng, (h, w), 3)).astype(np.uint8)
    a = cv.a
    a[inside, 0] = a[inside, 1] = a[inside, 2] = lum[inside]
    a[inside, 3] = M_VEG
    a[inside, 4] = rng.integers(1, 256, size=int(inside.sum()), dtype=np.uint8)
    trunk = (np.abs(xx - cx) < max(1.0, 0.04 * w)) & (yy > crown_h * 0.45)
    a[trunk, :3] = (85, 65, 45)
    a[trunk, 3] = M_BARK
    # A few branches stay opaque in winter (density byte 0).
    for _ in range(6):
        t = np.linspace(0, 1, 40)
        bx = cx + t * rng.uniform(-0.45, 0.45) * w
        by = crown_h * 0.75 - t * rng.uniform(0.2, 0.6) * crown_h
        bi, bj = np.clip(by.astype(int), 0, h - 1), np.clip(bx.astype(int), 0, w - 1)
        a[bi, bj, :3] = (80, 60, 45)
        a[bi, bj, 3] = M_VEG
        a[bi, bj, 4] = 0
    return a


def hedge_texture(width: float, height: float, rng: np.random.Generator) -> np.ndarray:
    cv = _Canvas(width, height)
    h, w = cv.h, cv.w
    top = h * (0.15 + 0.15 * _smooth_noise(rng, (1, w), 4)[0])
    yy = np.arange(h)[:, None]
    inside = yy >= top[None, :]
    lum = (80 + 100 * _smooth_noise(rng, (h, w), 2)).astype(np.uint8)
    a = cv.a
    a[inside, 0] = a[inside, 1] = a[inside, 2] = lum[inside]
    a[inside, 3] = M_VEG
    a[inside, 4] = rng.integers(0, 120, size=int(inside.sum()), dtype=np.uint8)
    return a


def pole_texture(height: float) -> np.ndarray:
    cv = _Canvas(0.25, height)
    cv.rect(0, 0, 0.25, height, (70, 72, 75), M_TRIM)
    cv.rect(0, height - 0.4, 0.25, height, (230, 230, 200), M_LAMP)
    return cv.a


# ----------------------------------------------------------------------------- quads and atlas


@dataclass
class QuadSet:
    """Vertical textured rectangles, struct-of-arrays.

    Quad i spans p0[i] + s * d[i] for s in [0, width[i]] horizontally (world east/north) and
    z0[i] .. z0[i] + height[i] vertically; texture column 0 is at p0, so ``d`` points to the
    right of a viewer facing the textured side.
    """

    p0: np.ndarray  # (Q, 2) float64
    d: np.ndarray  # (Q, 2) unit
    width: np.ndarray
    z0: np.ndarray
    height: np.ndarray
    kind: np.ndarray  # int8
    ids: np.ndarray  # int64 facade ids (global), -1 for non-facades
    cutout: np.ndarray  # bool: alpha-tested
    atlas: Atlas

    def __len__(self) -> int:
        return len(self.width)


@dataclass
class Atlas:
    """All quad textures flattened into one array per mip level, for vectorized lookup."""

    aux: np.ndarray  # (N0, 2) uint8 material, random byte (level 0 only)
    rgb: list[np.ndarray]  # per level: (Nk, 3) uint8
    offset: np.ndarray  # (levels, Q) int64
    tw: np.ndarray  # (levels, Q) int64
    th: np.ndarray  # (levels, Q) int64


def _downsample(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    h2, w2 = max(1, h // 2), max(1, w // 2)
    if h < 2 or w < 2:
        return rgb[:h2, :w2].copy()
    x = rgb[: h2 * 2, : w2 * 2].astype(np.uint16)
    total = x[0::2, 0::2] + x[1::2, 0::2] + x[0::2, 1::2] + x[1::2, 1::2]
    return ((total + 2) // 4).astype(np.uint8)


def build_atlas(textures: Sequence[np.ndarray]) -> Atlas:
    """Pack (h, w, 5) textures; colour gets mip levels so distant facades do not shimmer."""
    q = len(textures)
    offset = np.zeros((MIP_LEVELS, q), np.int64)
    tw = np.zeros((MIP_LEVELS, q), np.int64)
    th = np.zeros((MIP_LEVELS, q), np.int64)
    rgb_levels: list[list[np.ndarray]] = [[] for _ in range(MIP_LEVELS)]
    aux = []
    pos = [0] * MIP_LEVELS
    for i, tex in enumerate(textures):
        aux.append(tex[..., 3:5].reshape(-1, 2))
        level = np.ascontiguousarray(tex[..., :3])
        for k in range(MIP_LEVELS):
            if k:
                level = _downsample(level)
            th[k, i], tw[k, i] = level.shape[:2]
            offset[k, i] = pos[k]
            pos[k] += level.shape[0] * level.shape[1]
            rgb_levels[k].append(level.reshape(-1, 3))

    def cat(parts: list[np.ndarray], cols: int) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros((0, cols), np.uint8)

    return Atlas(aux=cat(aux, 2), rgb=[cat(p, 3) for p in rgb_levels], offset=offset, tw=tw, th=th)


def make_quads(rows: list[dict[str, Any]]) -> QuadSet:
    """QuadSet from a list of dicts with p0, d, width, z0, height, kind, id, cutout, tex."""
    n = len(rows)

    def col(key: str, dtype: Any) -> np.ndarray:
        return np.array([r[key] for r in rows], dtype=dtype) if n else np.zeros(0, dtype)

    return QuadSet(
        p0=np.array([r["p0"] for r in rows], np.float64).reshape(n, 2),
        d=np.array([r["d"] for r in rows], np.float64).reshape(n, 2),
        width=col("width", np.float64),
        z0=col("z0", np.float64),
        height=col("height", np.float64),
        kind=col("kind", np.int8),
        ids=col("id", np.int64),
        cutout=col("cutout", bool),
        atlas=build_atlas([r["tex"] for r in rows]),
    )


# ----------------------------------------------------------------------------- world


@dataclass(frozen=True)
class StreetLayout:
    """A straight street: centre line from ``origin`` along compass ``heading_deg``."""

    split: str
    street_id: int
    origin: tuple[float, float]  # (east, north) of the start of the centre line
    heading_deg: float
    length: float
    width: float  # facade line to facade line
    sidewalk: float

    @property
    def direction(self) -> np.ndarray:
        h = math.radians(self.heading_deg)
        return np.array([math.sin(h), math.cos(h)])

    @property
    def left(self) -> np.ndarray:
        d = self.direction
        return np.array([-d[1], d[0]])

    def point(self, along: float, lateral: float) -> np.ndarray:
        """World (east, north) of a street-local point (lateral > 0 is left of the heading)."""
        return np.asarray(self.origin) + along * self.direction + lateral * self.left


def street_layout(seed: int, split: str, street_id: int) -> StreetLayout:
    """The geometry of street ``street_id`` of a split (cheap: no textures)."""
    rng = _rng(seed, "layout", split, street_id)
    cols = 8
    cx = BASE_EAST + SPLIT_REGION_EAST[split] + (street_id % cols) * STREET_CELL
    cy = BASE_NORTH + (street_id // cols) * STREET_CELL
    heading = float(rng.uniform(0, 360))
    length = float(rng.uniform(220, 380))
    width = float(rng.uniform(14, 22))
    d = np.array([math.sin(math.radians(heading)), math.cos(math.radians(heading))])
    origin = np.array([cx, cy]) - d * length / 2
    return StreetLayout(
        split,
        street_id,
        (float(origin[0]), float(origin[1])),
        heading,
        length,
        width,
        float(rng.uniform(2.0, 3.0)),
    )


@dataclass
class Street:
    """A renderable street: its layout, quads (facades, trees, poles) and lamp positions."""

    layout: StreetLayout
    quads: QuadSet
    lamps: np.ndarray  # (L, 3) world positions of lamp heads


def _facade_id(split: str, street_id: int, k: int) -> int:
    return (SPLITS.index(split) + 1) * 10**8 + street_id * 10**4 + k


def build_street(world: WorldParams, split: str, street_id: int) -> Street:
    """Generate the buildings, vegetation and lamps of one street, deterministically."""
    # One function on purpose: every draw comes from one rng in this order, which fixes the city.
    lay = street_layout(world.seed, split, street_id)
    styles = make_styles(world.seed, world.n_styles)
    rng = _rng(world.seed, "street", split, street_id)
    dirv, left = lay.direction, lay.left
    half = lay.width / 2
    rows: list[dict[str, Any]] = []

    def add(p0, d, width, height, tex, kind, cutout=False, z0=0.0) -> None:
        fid = _facade_id(split, street_id, len(rows)) if kind in FACADE_KINDS else -1
        rows.append(
            dict(
                p0=p0,
                d=d,
                width=width,
                z0=z0,
                height=height,
                tex=tex,
                kind=kind,
                id=fid,
                cutout=cutout,
            )
        )

    tree_lined = [bool(rng.random() < 0.5), bool(rng.random() < 0.5)]
    for side in (+1, -1):  # +1: left of the heading, -1: right
        # The textured side faces the street; texture columns run to the viewer's right.
        d_tex = dirv if side > 0 else -dirv
        a = -10.0
        while a < lay.length + 10.0:
            style = styles[int(rng.integers(len(styles)))]
            n_bays = int(rng.integers(2, 6))
            width = n_bays * style.bay_m + float(rng.uniform(0.4, 1.2))
            floors = int(rng.integers(style.floors[0], style.floors[1] + 1))
            setback = float(rng.choice([0.0, 0.0, 0.0, 0.6, 1.2]))
            tex, height = facade_texture(style, width, floors, rng, world.unique_details)
            s = side * (half + setback)
            start = lay.point(a if side > 0 else a + width, s)
            add(start, d_tex, width, height, tex, K_FACADE)
            # Side walls close the building into a block so gaps and setbacks look solid.
            depth = 12.0
            for end in (a, a + width):
                p = lay.point(end, s)
                add(
                    p,
                    side * left,
                    depth,
                    height,
                    plain_wall_texture(style, depth, height, rng),
                    K_SIDE,
                )
            a += width
            if rng.random() < 0.3:  # a gap: hedge or trees in front, a taller block behind
                gap = float(rng.uniform(3.0, 8.0))
                back = lay.point(a if side > 0 else a + gap, side * (half + depth))
                bh = float(rng.uniform(10, 24))
                add(back, d_tex, gap, bh, backdrop_texture(gap, bh, rng), K_BACKDROP)
                if rng.random() < 0.5:
                    p = lay.point(a if side > 0 else a + gap, side * (half + 0.5))
                    hh = float(rng.uniform(1.0, 1.8))
                    add(p, d_tex, gap, hh, hedge_texture(gap, hh, rng), K_TREE, cutout=True)
                else:
                    _add_tree(add, lay, a + gap / 2, side * (half + 2.0), rng)
                a += gap
        if tree_lined[side > 0]:
            spacing = float(rng.uniform(8, 14))
            for ta in np.arange(float(rng.uniform(0, spacing)), lay.length, spacing):
                _add_tree(add, lay, float(ta), side * (half - lay.sidewalk + 0.8), rng)
    # End walls close the street so views along it never see to infinity.
    for end, sign in ((-10.0, 1), (lay.length + 10.0, -1)):
        x = -half - 30.0
        while x < half + 30.0:
            style = styles[int(rng.integers(len(styles)))]
            width = float(rng.uniform(8, 16))
            floors = int(rng.integers(style.floors[0], style.floors[1] + 1))
            tex, height = facade_texture(style, width, floors, rng, world.unique_details)
            # Facing back along the street: texture runs to the viewer's right.
            add(lay.point(end, sign * x), sign * left, width, height, tex, K_END)
            x += width
    lamps = []
    lamp_spacing = float(rng.uniform(22, 30))
    pole_h = 5.5
    for side in (+1, -1):
        for la in np.arange(float(rng.uniform(0, lamp_spacing)), lay.length, lamp_spacing):
            s = side * (half - lay.sidewalk + 0.3)
            base = lay.point(float(la), s)
            lamps.append([base[0], base[1], pole_h])
            for d in (dirv, left):
                add(base - d * 0.125, d, 0.25, pole_h, pole_texture(pole_h), K_POLE)
    return Street(lay, make_quads(rows), np.array(lamps, np.float64).reshape(-1, 3))


def _add_tree(add, lay: StreetLayout, along: float, lateral: float, rng) -> None:
    """A tree as two crossed cut-out billboards, so it has width from any view direction."""
    w = float(rng.uniform(3.5, 6.0))
    h = float(rng.uniform(5.0, 9.0))
    tex = tree_texture(w, h, rng)
    centre = lay.point(along, lateral)
    for d in (lay.direction, lay.left):
        add(centre - d * w / 2, d, w, h, tex, K_TREE, cutout=True)


@functools.lru_cache(maxsize=6)
def _cached_street(world: WorldParams, split: str, street_id: int) -> Street:
    return build_street(world, split, street_id)


# ----------------------------------------------------------------------------- conditions


@dataclass(frozen=True)
class Condition:
    """Illumination, weather and camera effects of one image."""

    time: str = "day"  # day | dusk | night
    season: str = "summer"
    sun_azimuth: float = 150.0
    sun_elevation: float = 45.0
    fog_density: float = 0.002  # 1/m; 0.002 is clear-air haze
    exposure: float = 1.0
    color_gains: tuple[float, float, float] = (1.0, 1.0, 1.0)
    contrast: float = 1.0
    blur_sigma: float = 0.0  # pixels at 224 px width
    noise_sigma: float = 0.005
    lit_fraction: float = 0.0  # fraction of windows lit
    lit_offset: int = 0  # which windows are lit changes from image to image
    cloudiness: float = 0.3

    @property
    def veg_density(self) -> float:
        return {"spring": 0.8, "summer": 1.0, "autumn": 0.7, "winter": 0.12}[self.season]


def reference_condition() -> Condition:
    """The database condition: a clear summer day with a fixed sun."""
    return Condition()


def sample_condition(rng: np.random.Generator, p: Difficulty) -> Condition:
    """A random query/training condition under the difficulty's ranges."""
    r = rng.random()
    time = "night" if r < p.p_night else "dusk" if r < p.p_night + p.p_dusk else "day"
    season = str(rng.choice(SEASONS)) if rng.random() < p.p_season else "summer"
    fog = float(rng.uniform(0.01, p.fog_max)) if rng.random() < p.p_fog else 0.002
    elevation = {"day": rng.uniform(20, 65), "dusk": rng.uniform(0, 8), "night": -20.0}[time]
    lit = {"day": 0.0, "dusk": rng.uniform(0.1, 0.35), "night": rng.uniform(0.25, 0.6)}[time]
    lo, hi = p.contrast_range
    return Condition(
        time=time,
        season=season,
        sun_azimuth=float(rng.uniform(0, 360)),
        sun_elevation=float(elevation),
        fog_density=fog,
        exposure=float(1 + rng.uniform(-p.exposure, p.exposure)),
        color_gains=tuple(float(g) for g in 1 + rng.uniform(-p.color_cast, p.color_cast, 3)),
        contrast=float(rng.uniform(lo, hi)),
        blur_sigma=float(rng.uniform(0, p.blur_max)) if rng.random() < 0.6 else 0.0,
        noise_sigma=float(rng.uniform(0.003, max(p.noise_max, 0.003))),
        lit_fraction=float(lit),
        lit_offset=int(rng.integers(256)),
        cloudiness=float(rng.uniform(0, 0.8)),
    )


SEASON_FOLIAGE = {
    "spring": ((0.45, 0.70, 0.30), (0.95, 0.75, 0.85)),  # fresh green, blossom
    "summer": ((0.22, 0.45, 0.15), (0.30, 0.50, 0.18)),
    "autumn": ((0.75, 0.42, 0.10), (0.60, 0.20, 0.08)),
    "winter": ((0.35, 0.30, 0.26), (0.45, 0.40, 0.35)),  # bare branches
}


# ----------------------------------------------------------------------------- occluders


def _car_textures(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    body = ACCENT_COLOURS[int(rng.integers(len(ACCENT_COLOURS)))]
    body = tuple(int(c) for c in np.clip(np.array(body) + rng.integers(-30, 30, 3), 10, 245))
    length, height, width = 4.3, 1.5, 1.8
    side = _Canvas(length, height)
    side.rect(0, 0.3, length, 0.9, body, M_WALL)
    side.rect(0.9, 0.9, 3.3, 1.45, body, M_WALL)
    side.rect(1.05, 0.95, 3.15, 1.4, GLASS, M_GLASS, 255)
    for wx in (0.9, 3.4):
        side.rect(wx - 0.35, 0, wx + 0.35, 0.65, (25, 25, 25), M_TRIM)
    side.rect(0, 0.6, 0.12, 0.8, (255, 60, 40), M_LAMP)
    side.rect(length - 0.12, 0.6, length, 0.8, (255, 250, 220), M_LAMP)
    end = _Canvas(width, height)
    end.rect(0, 0.15, width, 0.9, body, M_WALL)
    end.rect(0.2, 0.9, width - 0.2, 1.45, GLASS, M_GLASS, 255)
    end.rect(0.1, 0.6, 0.45, 0.8, (255, 245, 210), M_LAMP)
    end.rect(width - 0.45, 0.6, width - 0.1, 0.8, (255, 245, 210), M_LAMP)
    return side.a, end.a


def _person_texture(rng: np.random.Generator) -> np.ndarray:
    cv = _Canvas(0.6, 1.75)
    shirt = tuple(int(c) for c in rng.integers(20, 230, 3))
    trousers = tuple(int(c) for c in rng.integers(20, 120, 3))
    cv.rect(0.2, 0.0, 0.29, 0.85, trousers, M_WALL)
    cv.rect(0.31, 0.0, 0.4, 0.85, trousers, M_WALL)
    cv.rect(0.12, 0.85, 0.48, 1.45, shirt, M_WALL)
    cv.rect(0.22, 1.48, 0.38, 1.72, (200, 160, 130), M_WALL)
    return cv.a


def make_occluders(
    rng: np.random.Generator, lay: StreetLayout, along: float, forward: int, count: int
) -> QuadSet:
    """Cars on the road and pedestrians on the pavement in front of a camera at ``along``."""
    rows: list[dict[str, Any]] = []
    dirv, left = lay.direction, lay.left
    half = lay.width / 2
    for _ in range(count):
        a = along + forward * float(rng.uniform(3.0, 25.0))
        if rng.random() < 0.6:
            side_tex, end_tex = _car_textures(rng)
            s = float(rng.uniform(-(half - lay.sidewalk - 1.2), half - lay.sidewalk - 1.2))
            if abs(s) < 1.3:  # not straddling the camera track
                s = math.copysign(1.3, s if s else 1.0)
            centre = lay.point(a, s)
            corners = [
                centre + sx * dirv * 2.15 + sy * left * 0.9
                for sx, sy in ((-1, -1), (1, -1), (1, 1), (-1, 1))
            ]
            for k in range(4):
                p, q = corners[k], corners[(k + 1) % 4]
                seg = q - p
                w = float(np.linalg.norm(seg))
                rows.append(
                    dict(
                        p0=p,
                        d=seg / w,
                        width=w,
                        z0=0.0,
                        height=1.5,
                        tex=side_tex if k % 2 == 0 else end_tex,
                        kind=K_OCCLUDER,
                        id=-1,
                        cutout=True,
                    )
                )
        else:
            s = math.copysign(
                float(rng.uniform(half - lay.sidewalk + 0.3, half - 0.3)), rng.random() - 0.5
            )
            centre = lay.point(a, s)
            tex = _person_texture(rng)
            for d in (dirv, left):
                rows.append(
                    dict(
                        p0=centre - d * 0.3,
                        d=d,
                        width=0.6,
                        z0=0.0,
                        height=1.75,
                        tex=tex,
                        kind=K_OCCLUDER,
                        id=-1,
                        cutout=True,
                    )
                )
    return make_quads(rows)


# ----------------------------------------------------------------------------- rendering


@dataclass
class GBuffer:
    """Per-pixel ray-cast results (flattened, H*W)."""

    t: np.ndarray  # distance along the unit ray; inf for sky
    quad: np.ndarray  # index into the layer's QuadSet, -1 for ground/sky
    layer: np.ndarray  # 0 static world, 1 occluders
    u: np.ndarray  # facade-local metres
    v: np.ndarray


def _texel_index(
    qs: QuadSet, level: int, q: np.ndarray | int, u: np.ndarray, v: np.ndarray
) -> np.ndarray:
    at = qs.atlas
    tw, th = at.tw[level, q], at.th[level, q]
    col = np.clip((u * (tw / qs.width[q])).astype(np.int64), 0, tw - 1)
    row = np.clip(((qs.height[q] - v) * (th / qs.height[q])).astype(np.int64), 0, th - 1)
    return at.offset[level, q] + row * tw + col


def _visible_quads(qs: QuadSet, cam: np.ndarray, rays: np.ndarray, pose: Pose) -> np.ndarray:
    """Indices of quads whose footprint overlaps the horizontal view wedge (cheap culling)."""
    if len(qs) == 0:
        return np.zeros(0, np.int64)
    yaw = math.radians(pose.yaw_deg)
    fwd = np.array([math.sin(yaw), math.cos(yaw)])
    right = np.array([math.cos(yaw), -math.sin(yaw)])
    rz, rx = rays[:, :2] @ fwd, rays[:, :2] @ right
    slope = rx / np.maximum(rz, 1e-6)
    lo, hi = float(slope.min()) - 0.02, float(slope.max()) + 0.02
    a = qs.p0 - cam[:2]
    b = a + qs.d * qs.width[:, None]
    za, xa, zb, xb = a @ fwd, a @ right, b @ fwd, b @ right
    near = 0.05
    keep = (za > near) | (zb > near)
    with np.errstate(divide="ignore", invalid="ignore"):
        # Clip the segment to the half-space in front of the camera.
        ta = np.where(za < near, (near - za) / (zb - za), 0.0)
        tb = np.where(zb < near, (near - zb) / (za - zb), 0.0)
        za2, xa2 = za + ta * (zb - za), xa + ta * (xb - xa)
        zb2, xb2 = zb + tb * (za - zb), xb + tb * (xa - xb)
        sa, sb = xa2 / np.maximum(za2, near), xb2 / np.maximum(zb2, near)
        keep &= (np.maximum(sa, sb) >= lo) & (np.minimum(sa, sb) <= hi)
    return np.flatnonzero(keep)


def _clip_near(poly: np.ndarray, near: float) -> np.ndarray:
    """Clip a polygon (N, 3) in camera coordinates to z >= near (Sutherland-Hodgman)."""
    out = []
    for i in range(len(poly)):
        p, q = poly[i], poly[(i + 1) % len(poly)]
        if p[2] >= near:
            out.append(p)
        if (p[2] >= near) != (q[2] >= near):
            out.append(p + (q - p) * (near - p[2]) / (q[2] - p[2]))
    return np.array(out).reshape(-1, 3)


def _pixel_boxes(qs: QuadSet, cand: np.ndarray, pose: Pose, intr: Intrinsics) -> np.ndarray:
    """Pixel bounding box (r0, r1, c0, c1) of each candidate quad's projection, 1 px margin."""
    right, down, fwd = camera_axes(pose)
    cam = np.array([pose.east, pose.north, pose.height])
    p0, d, w = qs.p0[cand], qs.d[cand], qs.width[cand]
    z0, z1 = qs.z0[cand], qs.z0[cand] + qs.height[cand]
    p1 = p0 + d * w[:, None]
    corners = (
        np.stack(
            [
                np.column_stack([p0, z0]),
                np.column_stack([p1, z0]),
                np.column_stack([p1, z1]),
                np.column_stack([p0, z1]),
            ],
            axis=1,
        )
        - cam
    )
    cc = corners @ np.stack([right, down, fwd], axis=1)  # (Q, 4, 3) camera coordinates
    near, f = 0.05, intr.focal
    boxes = np.zeros((len(cand), 4), np.int64)
    for i in range(len(cand)):
        poly = cc[i] if (cc[i, :, 2] >= near).all() else _clip_near(cc[i], near)
        if len(poly) == 0:
            continue
        x = intr.width / 2 + f * poly[:, 0] / poly[:, 2]
        y = intr.height / 2 + f * poly[:, 1] / poly[:, 2]
        r0, r1 = int(np.floor(y.min())) - 1, int(np.ceil(y.max())) + 1
        c0, c1 = int(np.floor(x.min())) - 1, int(np.ceil(x.max())) + 1
        boxes[i] = (max(r0, 0), min(r1, intr.height), max(c0, 0), min(c1, intr.width))
    return boxes


def _cast(
    qs: QuadSet,
    cam: np.ndarray,
    rays: tuple[np.ndarray, ...],
    gb: GBuffer,
    layer: int,
    candidates: np.ndarray,
    boxes: np.ndarray,
    veg_density: float,
) -> None:
    """Intersect pixel rays with the candidate quads, keeping the nearest opaque hit.

    Works on 2D (H, W) arrays and only inside each quad's projected bounding box.
    """
    rx, ry, rz = rays
    veg_cut = int(round(veg_density * 255))
    for q, (r0, r1, c0, c1) in zip(candidates, boxes, strict=True):
        if r1 <= r0 or c1 <= c0:
            continue
        sl = (slice(r0, r1), slice(c0, c1))
        bx, by = rx[sl], ry[sl]
        px, py = qs.p0[q, 0] - cam[0], qs.p0[q, 1] - cam[1]
        dx, dy = qs.d[q]
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (px * -dy + py * dx) / (bx * -dy + by * dx)
        u = t * (bx * dx + by * dy) - (px * dx + py * dy)
        v = t * rz[sl] + (cam[2] - qs.z0[q])
        t_best = gb.t[sl]
        ok = (t > 0.05) & (t < t_best) & (u >= 0) & (u < qs.width[q]) & (v >= 0)
        ok &= v < qs.height[q]
        if qs.cutout[q]:
            sel = np.nonzero(ok)
            aux = qs.atlas.aux[_texel_index(qs, 0, q, u[sel], v[sel])]
            mat, dens = aux[:, 0], aux[:, 1]
            ok[sel] = (mat != M_NONE) & ((mat != M_VEG) | (dens <= veg_cut))
        t_best[ok] = t[ok]
        gb.quad[sl][ok] = q
        gb.layer[sl][ok] = layer
        gb.u[sl][ok] = u[ok]
        gb.v[sl][ok] = v[ok]


def render_gbuffer(
    street: Street,
    pose: Pose,
    intr: Intrinsics,
    veg_density: float = 1.0,
    occluders: QuadSet | None = None,
) -> tuple[GBuffer, np.ndarray]:
    """Ray-cast the street (and optional occluders) from a pose; returns G-buffer and rays."""
    rays = pixel_rays(intr, pose)
    shape = (intr.height, intr.width)
    gb = GBuffer(
        t=np.full(shape, np.inf, np.float32),
        quad=np.full(shape, -1, np.int64),
        layer=np.zeros(shape, np.int8),
        u=np.zeros(shape, np.float32),
        v=np.zeros(shape, np.float32),
    )
    cam = np.array([pose.east, pose.north, pose.height])
    rays2 = tuple(np.ascontiguousarray(rays[:, k]).reshape(shape) for k in range(3))
    for layer, qs in enumerate([street.quads, occluders]):
        if qs is None or not len(qs):
            continue
        cand = _visible_quads(qs, cam, rays, pose)
        _cast(qs, cam, rays2, gb, layer, cand, _pixel_boxes(qs, cand, pose, intr), veg_density)
    flat = GBuffer(*(a.reshape(-1) for a in (gb.t, gb.quad, gb.layer, gb.u, gb.v)))
    return flat, rays


@dataclass
class RenderResult:
    image: np.ndarray  # (H, W, 3) uint8
    depth: np.ndarray  # (H, W) float32 metres along the ray, inf for sky
    facade_id: np.ndarray  # (H, W) int64 facade id per pixel, -1 elsewhere
    visible_facades: list[int]  # facade ids covering at least 0.5% of the image


def _sky(rays: np.ndarray, cond: Condition, rng: np.random.Generator) -> np.ndarray:
    elev = np.clip(rays[:, 2], 0, 1)[:, None]
    horizon, zenith = {
        "day": ((0.78, 0.84, 0.90), (0.35, 0.55, 0.85)),
        "dusk": ((0.95, 0.60, 0.35), (0.25, 0.25, 0.45)),
        "night": ((0.07, 0.06, 0.06), (0.01, 0.015, 0.04)),
    }[cond.time]
    col = np.array(horizon) + (np.array(zenith) - np.array(horizon)) * np.sqrt(elev)
    if cond.cloudiness > 0:
        # Clouds: a random field over (azimuth, elevation), different in every image.
        grid = rng.random((6, 25), dtype=np.float32)
        az = (np.arctan2(rays[:, 0], rays[:, 1]) / (2 * np.pi) + 0.5) * 24
        el = elev[:, 0] * 5
        i0, j0 = np.floor(el).astype(int), np.floor(az).astype(int) % 24
        fi, fj = el - i0, az - np.floor(az)
        i1 = np.minimum(i0 + 1, 5)
        val = (grid[i0, j0] * (1 - fj) + grid[i0, j0 + 1] * fj) * (1 - fi) + (
            grid[i1, j0] * (1 - fj) + grid[i1, j0 + 1] * fj
        ) * fi
        cover = np.clip((val - (1 - cond.cloudiness)) * 3, 0, 1)[:, None]
        cloud = {"day": 0.92, "dusk": 0.7, "night": 0.05}[cond.time]
        col = col * (1 - cover) + cloud * cover
    return col.astype(np.float32)


def _ground(
    points: np.ndarray, footprint: np.ndarray, lay: StreetLayout, cond: Condition
) -> np.ndarray:
    """Asphalt with lane markings, kerbs and paved sidewalks (street-local coordinates)."""
    rel = points[:, :2] - np.asarray(lay.origin)
    a = rel @ lay.direction
    s = np.abs(rel @ lay.left)
    road_half = lay.width / 2 - lay.sidewalk
    noise = _hash01(np.floor(a * 2), np.floor(s * 2), seed=3) - 0.5
    detail = np.clip(1 - footprint / 0.5, 0, 1)  # fade sub-pixel patterns with distance
    grey = 0.30 + 0.06 * noise * detail
    dash = (s < 0.08 + footprint * 0.5) & ((a % 9.0) < 3.0)
    edge = np.abs(s - (road_half - 0.4)) < 0.06 + footprint * 0.5
    grey = np.where(
        dash | edge, 0.30 + 0.5 * np.clip(0.12 / np.maximum(footprint, 0.12), 0, 1), grey
    )
    walk = s > road_half
    tiles = ((a % 1.0) < 0.05) | (((s - road_half) % 1.0) < 0.05)
    walk_grey = 0.55 + 0.05 * noise * detail - 0.12 * tiles * detail
    grey = np.where(walk, walk_grey, grey)
    grey = np.where(np.abs(s - road_half) < 0.15, 0.65, grey)  # kerb
    col = np.repeat(grey[:, None], 3, axis=1)
    if cond.season == "winter":
        snow = np.clip((_hash01(np.floor(a), np.floor(s), seed=5) - 0.4) * 2, 0, 1)
        snow = np.where(walk | (s > road_half - 1.5), snow, snow * 0.2)[:, None]
        col = col * (1 - snow) + 0.9 * snow
    return col.astype(np.float32)


def _surface_albedo(
    qs: QuadSet, q: np.ndarray, u: np.ndarray, v: np.ndarray, footprint: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mip-mapped colour plus level-0 material and random byte for hits on quads."""
    tex_per_m = qs.atlas.tw[0, q] / qs.width[q]
    level = np.clip(np.floor(np.log2(np.maximum(footprint * tex_per_m, 1.0))), 0, MIP_LEVELS - 1)
    rgb = np.empty((q.size, 3), np.uint8)
    for k in range(MIP_LEVELS):
        sel = np.flatnonzero(level == k)
        if sel.size:
            rgb[sel] = qs.atlas.rgb[k][_texel_index(qs, k, q[sel], u[sel], v[sel])]
    aux = qs.atlas.aux[_texel_index(qs, 0, q, u, v)]
    return rgb.astype(np.float32) / 255, aux[:, 0], aux[:, 1]


def _shade(
    gb: GBuffer,
    rays: np.ndarray,
    layers: list[QuadSet],
    street: Street,
    pose: Pose,
    intr: Intrinsics,
    cond: Condition,
    rng: np.random.Generator,
) -> np.ndarray:
    """Linear RGB (H*W, 3) from the G-buffer under the condition's illumination."""
    # Long but linear (surfaces, light, glass, fog); split, each step would take a dozen arrays.
    n = rays.shape[0]
    img = np.empty((n, 3), np.float32)
    sky = ~np.isfinite(gb.t)
    cam = np.array([pose.east, pose.north, pose.height])
    ground_t = np.where(rays[:, 2] < -1e-6, -pose.height / np.minimum(rays[:, 2], -1e-6), np.inf)
    on_ground = ground_t < gb.t
    t = np.where(on_ground, ground_t, gb.t).astype(np.float32)
    sky &= ~on_ground
    img[sky] = _sky(rays[sky], cond, rng)

    hit = ~sky
    normals = np.zeros((n, 3), np.float32)
    normals[:, 2] = 1.0  # ground
    albedo = np.zeros((n, 3), np.float32)
    material = np.zeros(n, np.uint8)
    wbyte = np.zeros(n, np.uint8)
    footprint = t / intr.focal
    gidx = np.flatnonzero(on_ground)
    pts_ground = cam + t[gidx, None] * rays[gidx]
    albedo[gidx] = _ground(
        pts_ground, footprint[gidx] / np.maximum(-rays[gidx, 2], 0.05), street.layout, cond
    )
    material[gidx] = M_WALL
    for layer, qs in enumerate(layers):
        idx = np.flatnonzero(hit & ~on_ground & (gb.layer == layer))
        if idx.size == 0:
            continue
        q = gb.quad[idx]
        nrm = np.stack([-qs.d[q, 1], qs.d[q, 0], np.zeros(idx.size)], axis=1)
        facing = np.sum(nrm * rays[idx], axis=1)
        nrm[facing > 0] *= -1  # two-sided: the normal faces the camera
        normals[idx] = nrm
        cos_inc = np.maximum(np.abs(facing), 0.15)
        rgb, mat, wb = _surface_albedo(qs, q, gb.u[idx], gb.v[idx], footprint[idx] / cos_inc)
        albedo[idx], material[idx], wbyte[idx] = rgb, mat, wb

    # Foliage takes the season's colours; the texel's grey level modulates them.
    veg = np.flatnonzero(hit & (material == M_VEG))
    if veg.size:
        base, alt = (np.array(c, np.float32) for c in SEASON_FOLIAGE[cond.season])
        mix = (_hash01(wbyte[veg], seed=17) < 0.25)[:, None]
        albedo[veg] = albedo[veg, :1] * 1.6 * np.where(mix, alt, base)

    # Direct + ambient light.
    hidx = np.flatnonzero(hit)
    az, el = math.radians(cond.sun_azimuth), math.radians(max(cond.sun_elevation, 0.0))
    sun = np.array([math.sin(az) * math.cos(el), math.cos(az) * math.cos(el), math.sin(el)])
    ambient, sun_i, tint = {
        "day": (0.55, 0.65, (1.0, 1.0, 1.0)),
        "dusk": (0.28, 0.35, (1.0, 0.72, 0.5)),
        "night": (0.06, 0.0, (0.6, 0.7, 1.0)),
    }[cond.time]
    light = ambient + sun_i * np.maximum(normals[hidx] @ sun.astype(np.float32), 0)[:, None]
    light = light * np.array(tint, np.float32)
    if cond.time != "day" and len(street.lamps):
        # Relative to the camera, so float32 keeps centimetres.
        pts = [t[hidx] * rays[hidx, k] for k in range(3)]
        nrm = [normals[hidx, k] for k in range(3)]
        near = street.lamps[np.linalg.norm(street.lamps[:, :2] - cam[:2], axis=1) < 70] - cam
        lamp_col = np.array([1.0, 0.78, 0.5], np.float32) * (1.0 if cond.time == "night" else 0.4)
        acc = np.zeros(hidx.size, np.float32)
        for lamp in near.astype(np.float32):
            vx, vy, vz = lamp[0] - pts[0], lamp[1] - pts[1], lamp[2] - pts[2]
            d2 = vx * vx + vy * vy + vz * vz
            cos = np.maximum(vx * nrm[0] + vy * nrm[1] + vz * nrm[2], 0) / np.sqrt(d2 + 1e-6)
            acc += 18.0 * cos / (d2 + 6.0)
        light = light + acc[:, None] * lamp_col
    col = albedo[hidx] * light
    m = material[hidx]
    glass = m == M_GLASS
    if cond.time == "day":  # glass reflects the sky a little
        col[glass] = col[glass] * 0.7 + np.array([0.25, 0.3, 0.35], np.float32) * 0.4
    lit = glass & (
        ((wbyte[hidx].astype(np.int64) + cond.lit_offset) % 256) < cond.lit_fraction * 256
    )
    col[lit] = np.array([1.0, 0.82, 0.5], np.float32) * (0.55 + 0.4 * albedo[hidx][lit, 2:3] * 2)
    if cond.time != "day":
        emissive = (m == M_SIGN) | (m == M_LAMP)
        col[emissive] = np.maximum(col[emissive], albedo[hidx][emissive] * 0.9)
    img[hidx] = col

    # Aerial perspective / fog with depth.
    fog_col = {"day": (0.78, 0.80, 0.83), "dusk": (0.6, 0.5, 0.5), "night": (0.05, 0.05, 0.06)}
    trans = np.exp(-cond.fog_density * np.where(np.isfinite(t), t, 1e4))[:, None]
    if cond.fog_density <= 0.003:
        trans = np.where(sky[:, None], 1.0, trans)  # clear air: the sky keeps its colour
    img = img * trans + np.array(fog_col[cond.time], np.float32) * (1 - trans)
    if cond.time != "day":
        img = _lamp_glow(img, street, pose, intr, t, cond)
    return img


def _lamp_glow(
    img: np.ndarray, street: Street, pose: Pose, intr: Intrinsics, t: np.ndarray, cond: Condition
) -> np.ndarray:
    """Halos around visible lamp heads (image space), so lamps read as lights at night."""
    if not len(street.lamps):
        return img
    uv, z = project_points(intr, pose, street.lamps)
    h, w = intr.height, intr.width
    ys, xs = np.divmod(np.arange(h * w), w)
    strength = 1.0 if cond.time == "night" else 0.5
    for (x, y), depth in zip(uv, z, strict=True):
        if not (0.5 < depth < 80 and -10 < x < w + 10 and -10 < y < h + 10):
            continue
        ix, iy = int(np.clip(x, 0, w - 1)), int(np.clip(y, 0, h - 1))
        if t[iy * w + ix] < depth - 1.0:
            continue  # hidden behind something
        sigma = max(1.0, 0.5 * intr.focal / depth)
        r2 = (xs + 0.5 - x) ** 2 + (ys + 0.5 - y) ** 2
        img += (strength * np.exp(-r2 / (2 * sigma**2)))[:, None].astype(np.float32) * np.array(
            [1.0, 0.85, 0.6], np.float32
        )
    return img


def _camera_effects(
    img: np.ndarray, intr: Intrinsics, cond: Condition, rng: np.random.Generator
) -> np.ndarray:
    """Exposure, colour cast, contrast, optical blur and sensor noise; returns uint8 (H, W, 3)."""
    img = img.reshape(intr.height, intr.width, 3) * cond.exposure
    img = img * np.array(cond.color_gains, np.float32)
    mean = img.mean()
    img = (img - mean) * cond.contrast + mean
    u8 = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    sigma = cond.blur_sigma * intr.width / 224
    if sigma > 0.2:
        u8 = np.asarray(Image.fromarray(u8).filter(ImageFilter.GaussianBlur(sigma)))
    noise_sigma = cond.noise_sigma * (2.0 if cond.time == "night" else 1.0)
    noise = rng.normal(0, noise_sigma * 255, u8.shape).astype(np.float32)
    return np.clip(u8 + noise + 0.5, 0, 255).astype(np.uint8)


def render(
    street: Street,
    pose: Pose,
    intr: Intrinsics,
    cond: Condition | None = None,
    rng: np.random.Generator | None = None,
    occluders: QuadSet | None = None,
) -> RenderResult:
    """Render one image of a street: ray cast, shade under ``cond``, apply camera effects."""
    cond = reference_condition() if cond is None else cond
    rng = np.random.default_rng(0) if rng is None else rng
    gb, rays = render_gbuffer(street, pose, intr, cond.veg_density, occluders)
    layers = [street.quads] + ([occluders] if occluders is not None else [])
    lin = _shade(gb, rays, layers, street, pose, intr, cond, rng)
    image = _camera_effects(lin, intr, cond, rng)
    ground_t = np.where(rays[:, 2] < -1e-6, -pose.height / np.minimum(rays[:, 2], -1e-6), np.inf)
    depth = np.minimum(gb.t, ground_t).reshape(intr.height, intr.width)
    fid = np.full(gb.t.shape, -1, np.int64)
    static = np.flatnonzero((gb.layer == 0) & (gb.quad >= 0) & (gb.t <= ground_t))
    fid[static] = street.quads.ids[gb.quad[static]]
    ids, counts = np.unique(fid[fid >= 0], return_counts=True)
    visible = [int(i) for i, c in zip(ids, counts, strict=True) if c >= 0.005 * fid.size]
    return RenderResult(image, depth, fid.reshape(intr.height, intr.width), visible)


# ----------------------------------------------------------------------------- dataset plan


def to_latlon(east: float, north: float) -> tuple[float, float]:
    """Local equirectangular projection of the metric frame (good to centimetres over km)."""
    lat = LAT0 + (north - BASE_NORTH) / METRES_PER_DEGREE
    lon = LON0 + (east - BASE_EAST) / (METRES_PER_DEGREE * math.cos(math.radians(LAT0)))
    return round(lat, 6), round(lon, 6)


@dataclass(frozen=True)
class Task:
    """One image to render: everything not drawn from its own generator."""

    kind: str  # gsv | {val,test,vg_train}_{database,queries}
    index: int
    split: str  # the world region of the street (SPLITS)
    street_id: int
    along: float = 0.0  # reference position along the street (m)
    lateral: float = 0.0
    backward: bool = False
    place_id: int = -1


def _street_weights(seed: int, split: str, n: int) -> tuple[list[StreetLayout], np.ndarray]:
    lays = [street_layout(seed, split, i) for i in range(n)]
    usable = np.array([lay.length - 30.0 for lay in lays])
    return lays, usable / usable.sum()


def plan_tasks(cfg: SynthConfig) -> list[Task]:
    """The list of images to render, in output order (independent of workers)."""
    tasks: list[Task] = []
    # Training places: spaced along training streets, one canonical pose each.
    sid, along = 0, None
    lay = street_layout(cfg.seed, "train", 0)
    for place in range(cfg.train_places):
        prng = _rng(cfg.seed, "gsv_place", place)
        along = 20.0 if along is None else along + cfg.place_spacing
        while along > lay.length - 20.0:
            sid += 1
            lay = street_layout(cfg.seed, "train", sid)
            along = 20.0
        lateral = float(prng.uniform(-cfg.params.lateral_m, cfg.params.lateral_m)) / 2
        backward = bool(prng.random() < 0.5)
        for k in range(cfg.images_per_place):
            tasks.append(
                Task(
                    "gsv",
                    place * cfg.images_per_place + k,
                    "train",
                    sid,
                    along,
                    lateral,
                    backward,
                    place,
                )
            )
    vg_splits = [
        ("val", cfg.val_queries, cfg.eval_streets),
        ("test", cfg.test_queries, cfg.eval_streets),
    ]
    if cfg.vg_train_queries:  # last, so the other tasks keep their order
        vg_splits.append(("vg_train", cfg.vg_train_queries, cfg.vg_train_streets))
    for split, n_queries, n_streets in vg_splits:
        lays, weights = _street_weights(cfg.seed, split, n_streets)
        i = 0
        for lay in lays:
            for a in np.arange(15.0, lay.length - 15.0 + 1e-6, cfg.db_spacing):
                for backward in (False, True)[: cfg.db_headings]:
                    tasks.append(
                        Task(f"{split}_database", i, split, lay.street_id, float(a), 0.0, backward)
                    )
                    i += 1
        for i in range(n_queries):
            qrng = _rng(cfg.seed, f"{split}_queries_pos", i)
            lay = lays[int(qrng.choice(len(lays), p=weights))]
            a = float(qrng.uniform(15.0, lay.length - 15.0))
            backward = bool(qrng.random() < 0.5) if cfg.db_headings == 2 else False
            tasks.append(Task(f"{split}_queries", i, split, lay.street_id, a, 0.0, backward))
    return tasks


def _pose_for(
    task: Task, lay: StreetLayout, cfg: SynthConfig, rng: np.random.Generator
) -> tuple[Pose, float]:
    """Camera pose of a task (database: exact reference; others: perturbed); returns along."""
    p = cfg.params
    along, lateral, yaw_off, pitch, height = task.along, task.lateral, 0.0, 0.0, 2.5
    if task.kind == "gsv":
        along += float(rng.uniform(-p.forward_m, p.forward_m))
        lateral += float(rng.uniform(-p.lateral_m, p.lateral_m)) / 2
    if task.kind == "gsv" or task.kind.endswith("queries"):
        if task.kind.endswith("queries"):
            lateral = float(rng.uniform(-p.lateral_m, p.lateral_m))
        yaw_off = float(rng.uniform(-p.yaw_deg, p.yaw_deg))
        pitch = float(rng.uniform(-p.pitch_deg, p.pitch_deg))
        height = float(rng.uniform(*p.height_range))
    road = lay.width / 2 - lay.sidewalk - 0.5
    lateral = float(np.clip(lateral, -road, road))
    east, north = lay.point(along, lateral)
    if task.kind != "gsv":
        # VG names carry 2 decimals: render from exactly the named position.
        east, north = round(float(east), 2), round(float(north), 2)
    yaw = (lay.heading_deg + (180.0 if task.backward else 0.0) + yaw_off) % 360.0
    return Pose(float(east), float(north), round(height, 3), round(yaw, 3), round(pitch, 3)), along


def vg_image_name(
    east: float, north: float, heading: float, pitch: float, panoid: str, note: str = ""
) -> str:
    """``@east@north@zone@letter@lat@lon@panoid@tile@heading@pitch@roll@height@time@note@.jpg``."""
    lat, lon = to_latlon(east, north)
    return (
        f"@{east:010.2f}@{north:010.2f}@{UTM_ZONE:02d}@{UTM_LETTER}@{lat:09.5f}@{lon:010.5f}"
        f"@{panoid}@@{int(heading) % 360:03d}@{int(pitch):03d}@@@@{note}@.jpg"
    )


# The VG name parser is the one the readers use (the name kept for older callers).
parse_vg_utm = parse_utm


def _write_jpeg(path: Path, image: np.ndarray, quality: int, exif: bytes = b"") -> None:
    """Atomic write; fixed encoder settings and no timestamps, so bytes are reproducible."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(
            tmp, format="JPEG", quality=quality, subsampling=0, optimize=False, exif=exif
        )


def _render_task(task: Task, cfg: SynthConfig, root: Path) -> dict[str, Any]:
    """Render and write one image; returns its pose metadata (path relative to ``root``)."""
    world = WorldParams(cfg.seed, cfg.n_styles, cfg.params.unique_details)
    street = _cached_street(world, task.split, task.street_id)
    lay = street.layout
    rng = _rng(cfg.seed, task.kind, task.index)
    pose, along = _pose_for(task, lay, cfg, rng)
    is_db = task.kind.endswith("database")
    cond = reference_condition() if is_db else sample_condition(rng, cfg.params)
    n_occ = int(rng.integers(0, cfg.params.max_occluders + 1))
    if is_db:
        n_occ = int(rng.integers(0, cfg.params.max_occluders // 2 + 1))
    occ = make_occluders(rng, lay, along, -1 if task.backward else 1, n_occ) if n_occ else None
    intr = Intrinsics(cfg.image_size[1], cfg.image_size[0], cfg.hfov_deg)
    res = render(street, pose, intr, cond, rng, occ)
    lat, lon = to_latlon(pose.east, pose.north)
    panoid = f"s{cfg.seed}k{zlib.crc32(task.kind.encode()) % 1000:03d}i{task.index:06d}"
    if task.kind == "gsv":
        month = int(rng.choice(SEASON_MONTHS[cond.season]))
        year = int(rng.integers(2008, 2024))
        northdeg = int(pose.yaw_deg) % 360
        rel = Path(
            "gsv",
            "Images",
            cfg.city,
            gsv_image_name(cfg.city, task.place_id, year, month, northdeg, lat, lon, panoid),
        )
        extra = dict(
            place_id=task.place_id,
            year=year,
            month=month,
            northdeg=northdeg,
            lat=lat,
            lon=lon,
            panoid=panoid,
        )
    else:
        role = "database" if is_db else "queries"
        name = vg_image_name(pose.east, pose.north, pose.yaw_deg, pose.pitch_deg, panoid, cond.time)
        rel = Path("vg", cfg.vg_name, "images", VG_FOLDERS[task.split], role, name)
        extra = {}
    # VG photos carry EXIF GPS as a camera writes it: a map can be built from them as they are.
    exif = b"" if task.kind == "gsv" else exif_gps(lat, lon, pose.height, pose.yaw_deg)
    _write_jpeg(root / rel, res.image, cfg.jpeg_quality, exif)
    return dict(
        path=rel.as_posix(),
        kind=task.kind,
        split=task.split,
        street_id=task.street_id,
        east=pose.east,
        north=pose.north,
        height=pose.height,
        yaw=pose.yaw_deg,
        pitch=pose.pitch_deg,
        condition=dataclasses.asdict(cond),
        occluders=n_occ,
        facades=res.visible_facades,
        **extra,
    )


def _render_chunk(chunk: list[Task], cfg: SynthConfig, root: Path) -> list[dict[str, Any]]:
    return [_render_task(t, cfg, root) for t in chunk]


# ----------------------------------------------------------------------------- writers


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, text)


def _write_gsv_csv(root: Path, cfg: SynthConfig, records: list[dict[str, Any]]) -> None:
    lines = [",".join(GSV_COLUMNS)]
    for r in records:
        if r["kind"] == "gsv":
            lines.append(
                f"{r['place_id']},{r['year']},{r['month']},{r['northdeg']},{cfg.city},"
                f"{r['lat']},{r['lon']},{r['panoid']}"
            )
    _write_text(root / "gsv" / "Dataframes" / f"{cfg.city}.csv", "\n".join(lines) + "\n")


def _config_dict(cfg: SynthConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["image_size"] = list(cfg.image_size)
    if not cfg.vg_train_queries:
        # No VG train split: meta.json stays as it was before the split existed.
        del d["vg_train_queries"], d["vg_train_streets"]
    return d


def _write_meta(root: Path, cfg: SynthConfig, records: list[dict[str, Any]]) -> None:
    counts: dict[str, int] = {}
    for r in records:
        counts[r["kind"]] = counts.get(r["kind"], 0) + 1
    meta = dict(
        generator="vprkit.data.synthetic",
        format_version=FORMAT_VERSION,
        seed=cfg.seed,
        config=_config_dict(cfg),
        counts=counts,
        train_places=cfg.train_places,
        gsv_root="gsv",
        vg_root=f"vg/{cfg.vg_name}",
        poses="poses.jsonl",
        frame=dict(
            utm_zone=UTM_ZONE,
            utm_letter=UTM_LETTER,
            base_east=BASE_EAST,
            base_north=BASE_NORTH,
            lat0=LAT0,
            lon0=LON0,
            projection="local equirectangular about (lat0, lon0)",
        ),
        conventions=dict(
            yaw="compass degrees, 0 = north, 90 = east",
            pitch="degrees, + = up",
            height="camera metres above ground",
        ),
    )
    _write_text(root / "meta.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")
    lines = [json.dumps(r, sort_keys=True) for r in records]
    _write_text(root / "poses.jsonl", "\n".join(lines) + ("\n" if lines else ""))


def _prepare_out(out_dir: Path) -> Path:
    """A fresh staging folder beside ``out_dir``; renamed into place only when complete."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not an empty folder; choose a new one")
    staging = out_dir.with_name(out_dir.name + ".partial")
    if staging.exists():
        if not (staging / ".vprkit-synth-partial").exists():
            raise FileExistsError(f"{staging} exists and was not made by vprkit synth")
        shutil.rmtree(staging)  # left over by an interrupted run of ours
    staging.mkdir(parents=True)
    (staging / ".vprkit-synth-partial").write_text("incomplete\n")
    return staging


def generate(
    out_dir: str | os.PathLike[str],
    config: SynthConfig | None = None,
    *,
    num_workers: int = 1,
    progress: bool = False,
    **overrides: Any,
) -> Path:
    """Render a GSV-Cities training city and VG val/test (and train) sets into ``out_dir``.

    ``overrides`` are :class:`SynthConfig` or :class:`Difficulty` field names; with no
    ``config`` they apply on top of ``SynthConfig.create(difficulty)``. Output bytes depend
    only on the config, never on ``num_workers``. Returns ``out_dir``.
    """
    if config is None:
        config = SynthConfig.create(overrides.pop("difficulty", "medium"), **overrides)
    elif overrides:
        raise ValueError("pass either a config or overrides, not both")
    out = Path(out_dir)
    staging = _prepare_out(out)
    tasks = plan_tasks(config)
    # Chunks follow the task order, so one worker mostly stays on one street (street cache).
    chunks = [tasks[i : i + 32] for i in range(0, len(tasks), 32)]
    records: list[dict[str, Any]] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), desc="synth", unit="img")
    try:
        if num_workers <= 1:
            for chunk in chunks:
                records.extend(_render_chunk(chunk, config, staging))
                if bar is not None:
                    bar.update(len(chunk))
        else:
            with ProcessPoolExecutor(max_workers=num_workers) as pool:
                fn = functools.partial(_render_chunk, cfg=config, root=staging)
                for recs in pool.map(fn, chunks):
                    records.extend(recs)
                    if bar is not None:
                        bar.update(len(recs))
    finally:
        if bar is not None:
            bar.close()
    _write_gsv_csv(staging, config, records)
    _write_meta(staging, config, records)
    (staging / ".vprkit-synth-partial").unlink()
    if out.exists():
        out.rmdir()  # empty, checked above
    os.replace(staging, out)
    return out


def load_poses(out_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The per-image metadata written by :func:`generate`."""
    path = Path(out_dir) / "poses.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a vprkit synth output folder")
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def raw_pixel_recall(
    vg_split_dir: str | os.PathLike[str], size: int = 16, radius: float = 25.0
) -> float:
    """R@1 of nearest-neighbour retrieval on ``size`` x ``size`` grey raw pixels (L2).

    A sanity baseline: if it is high, the synthetic task is too easy to prove anything.
    """
    root = Path(vg_split_dir)

    def load(folder: str) -> tuple[np.ndarray, np.ndarray]:
        files = sorted((root / folder).glob("*.jpg"))
        if not files:
            raise FileNotFoundError(f"no .jpg images in {root / folder}")
        feats = np.stack(
            [
                np.asarray(
                    Image.open(f).convert("L").resize((size, size), Image.BILINEAR), np.float32
                ).ravel()
                / 255
                for f in files
            ]
        )
        utm = np.array([parse_utm(f.name) for f in files])
        return feats, utm

    db, db_utm = load("database")
    q, q_utm = load("queries")
    d2 = (q**2).sum(1)[:, None] - 2 * q @ db.T + (db**2).sum(1)[None, :]
    nn = d2.argmin(1)
    return float(np.mean(np.linalg.norm(q_utm - db_utm[nn], axis=1) <= radius))


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``vprkit synth``, each checked when parsed (the ranges of SynthConfig)."""
    from vprkit.cli_args import float_range, int_range, positive_int

    d = SynthConfig()
    add = parser.add_argument
    add("out_dir", metavar="OUT_DIR", help="new (or empty) output folder")
    add("--seed", type=int, default=d.seed, help="same seed and arguments: same bytes")
    add(
        "--image_size",
        type=int_range(8),
        nargs=2,
        default=list(d.image_size),
        metavar=("H", "W"),
        help="image height and width (at least 8)",
    )
    add(
        "--train_places",
        type=int_range(0, 10**5 - 1),
        default=d.train_places,
        help="GSV-Cities training places",
    )
    add(
        "--images_per_place",
        type=int_range(4),
        default=d.images_per_place,
        help="images per place (GSV-Cities keeps places with 4+)",
    )
    add("--val_queries", type=int_range(0), default=d.val_queries, help="VG val queries")
    add("--test_queries", type=int_range(0), default=d.test_queries, help="VG test queries")
    add(
        "--difficulty",
        choices=sorted(DIFFICULTIES),
        default=d.difficulty,
        help="preset for viewpoint, condition, occlusion and aliasing ranges",
    )
    add(
        "--eval_streets",
        type=positive_int,
        default=d.eval_streets,
        help="streets in each of val and test",
    )
    add(
        "--vg_train_queries",
        type=int_range(0),
        default=d.vg_train_queries,
        help="queries of a VG train split from streets of its own (0: no VG train split)",
    )
    add(
        "--vg_train_streets",
        type=positive_int,
        default=d.vg_train_streets,
        help="streets of the VG train split",
    )
    add(
        "--db_spacing",
        type=float_range(0.5, 20.0),
        default=d.db_spacing,
        help="metres between database images, in [0.5, 20] (positives are within 25 m)",
    )
    add(
        "--db_headings",
        type=int,
        choices=(1, 2),
        default=d.db_headings,
        help="database views per position: forward only, or forward and backward",
    )
    add(
        "--place_spacing",
        type=float_range(1e-3),
        default=d.place_spacing,
        help="metres between training places",
    )
    add(
        "--hfov",
        type=float_range(20.0, 120.0),
        default=d.hfov_deg,
        help="horizontal field of view, degrees, in [20, 120]",
    )
    add("--n_styles", type=positive_int, default=d.n_styles, help="facade style vocabulary size")
    add("--city", default=d.city, help="GSV-Cities city name (letters and digits)")
    add("--vg_name", default=d.vg_name, help="VG dataset folder name (letters, digits, _)")
    add(
        "--jpeg_quality",
        type=int_range(1, 100),
        default=d.jpeg_quality,
        help="JPEG quality, in [1, 100]",
    )
    add(
        "--num_workers",
        type=positive_int,
        default=min(8, os.cpu_count() or 1),
        help="processes (the output does not depend on it)",
    )
    g = parser.add_argument_group("difficulty overrides (default: the --difficulty preset's value)")
    knobs = {
        "lateral_m": "max lateral offset (m) of a query/training view from the reference track",
        "forward_m": "max forward offset (m) between images of one training place",
        "yaw_deg": "max yaw change, degrees",
        "pitch_deg": "max pitch, degrees",
        "height_range": "camera height above ground (m), low and high",
        "p_dusk": "probability of dusk, in [0, 1]",
        "p_night": "probability of night, in [0, 1]",
        "p_season": "probability that the season differs from the database's summer",
        "p_fog": "probability of fog, in [0, 1]",
        "fog_max": "max fog density (1/m); visibility is about 3 / density",
        "color_cast": "max per-channel gain deviation",
        "exposure": "max exposure deviation",
        "contrast_range": "contrast factor, low and high",
        "blur_max": "max Gaussian blur sigma, in pixels at 224 px width",
        "noise_max": "max sensor noise sigma (0..1 intensity)",
        "max_occluders": "max occluders (cars, people) per image",
        "unique_details": "unique details per facade: fewer means more perceptual aliasing",
    }
    for f in dataclasses.fields(Difficulty):
        # Probabilities in [0, 1]; every other knob a non-negative amount.
        number = float_range(0.0, 1.0) if f.name.startswith("p_") else float_range(0.0)
        if f.name.endswith("_range"):
            g.add_argument(
                f"--{f.name}",
                type=float_range(0.0),
                nargs=2,
                default=None,
                metavar=("LO", "HI"),
                help=knobs.get(f.name, f.name),
            )
        else:
            g.add_argument(
                f"--{f.name}",
                type=int_range(0) if f.type == "int" else number,
                default=None,
                help=knobs.get(f.name, f.name),
            )


def run(args: argparse.Namespace) -> int:
    """Entry point of ``vprkit synth``."""
    diff = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(Difficulty)
        if getattr(args, f.name, None) is not None
    }
    diff = {k: tuple(v) if isinstance(v, list) else v for k, v in diff.items()}
    cfg = SynthConfig.create(
        args.difficulty,
        seed=args.seed,
        image_size=tuple(args.image_size),
        train_places=args.train_places,
        images_per_place=args.images_per_place,
        val_queries=args.val_queries,
        test_queries=args.test_queries,
        eval_streets=args.eval_streets,
        vg_train_queries=args.vg_train_queries,
        vg_train_streets=args.vg_train_streets,
        db_spacing=args.db_spacing,
        db_headings=args.db_headings,
        place_spacing=args.place_spacing,
        hfov_deg=args.hfov,
        n_styles=args.n_styles,
        city=args.city,
        vg_name=args.vg_name,
        jpeg_quality=args.jpeg_quality,
        **diff,
    )
    out = generate(args.out_dir, cfg, num_workers=args.num_workers, progress=True)
    meta = json.loads((out / "meta.json").read_text())
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(meta["counts"].items()))
    print(f"wrote {out} ({counts})")
    return 0
