"""GSV-Cities, the training set of CricaVPR (and MixVPR, SALAD, ...): reader and place dataset.

Layout (amaralibey/gsv-cities, ``dataloaders/train/GSVCitiesDataset.py``)::

    <root>/Dataframes/<City>.csv   columns place_id,year,month,northdeg,city_id,lat,lon,panoid
    <root>/Images/<city_id>/<city_id>_<place_id:07d>_<year:04d>_<month:02d>_<northdeg:03d>_
        <lat>_<lon>_<panoid>.jpg

The image folder and the name prefix come from the row's ``city_id``, not from the CSV file
name, and ``lat`` / ``lon`` are written as Python's ``str(float)`` of the parsed value, exactly
as the official ``get_img_name`` does. Place ids restart in every city, so the ``i``-th city of
the list gets ``i * 10**5`` added to them (the official prefix), which makes labels unique.

One item of :class:`GSVCitiesDataset` is one place: ``K`` of its images drawn at random
without replacement, all with the place's label. The order of places in a batch is the
sampler's job (:class:`vprkit.train.samplers.PlaceBatchSampler`).
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vprkit.data.images import load_image, normalize, to_tensor

__all__ = [
    "CITY_ID_OFFSET",
    "GSV_COLUMNS",
    "TRAIN_CITIES",
    "GSVCities",
    "GSVCitiesDataset",
    "collate_places",
    "gsv_image_name",
    "read_gsv_cities",
]

logger = logging.getLogger(__name__)

# The 23 training cities in the official order (CricaVPR dataloaders/GSVCities.py): the
# position of a city sets its place-id offset, so this order is part of the labels.
TRAIN_CITIES: tuple[str, ...] = (
    "Bangkok",
    "BuenosAires",
    "LosAngeles",
    "MexicoCity",
    "OSL",
    "Rome",
    "Barcelona",
    "Chicago",
    "Madrid",
    "Miami",
    "Phoenix",
    "TRT",
    "Boston",
    "Lisbon",
    "Medellin",
    "Minneapolis",
    "PRG",
    "WashingtonDC",
    "Brussels",
    "London",
    "Melbourne",
    "Osaka",
    "PRS",
)
GSV_COLUMNS: tuple[str, ...] = (
    "place_id",
    "year",
    "month",
    "northdeg",
    "city_id",
    "lat",
    "lon",
    "panoid",
)
CITY_ID_OFFSET = 10**5
_CHECK_MODES = ("sample", "all")
_SAMPLE_CHECKS_PER_CITY = 16

PathLike = str | os.PathLike
Transform = Callable[[Image.Image, np.random.Generator], torch.Tensor]


def gsv_image_name(
    city_id: str,
    place_id: int,
    year: int,
    month: int,
    northdeg: int,
    lat: float,
    lon: float,
    panoid: str,
) -> str:
    """File name of one GSV-Cities image, built as the official ``get_img_name`` builds it.

    ``place_id`` is the id in its city's CSV (below ``10**5``), not the offset label.
    """
    return (
        f"{city_id}_{place_id % CITY_ID_OFFSET:07d}_{year:04d}_{month:02d}_{northdeg:03d}_"
        f"{float(lat)!s}_{float(lon)!s}_{panoid}.jpg"
    )


@dataclass(repr=False)
class GSVCities:
    """The places of a GSV-Cities tree, after filtering.

    ``place_images[i]`` lists the image paths of place ``i`` (CSV row order),
    ``place_labels[i]`` its label (CSV ``place_id`` plus ``city index * 10**5``) and
    ``place_cities[i]`` the index of its city in ``cities``. Places are ordered by city, then
    by ``place_id``; shuffling is left to the sampler.
    """

    root: Path
    cities: tuple[str, ...]
    place_images: list[list[str]]
    place_labels: np.ndarray
    place_cities: np.ndarray
    num_dropped_places: int = 0
    num_dropped_images: int = 0

    def __len__(self) -> int:
        return len(self.place_images)

    @property
    def num_images(self) -> int:
        """Images in the kept places."""
        return sum(len(p) for p in self.place_images)

    @property
    def min_images_per_place(self) -> int:
        """Fewest images of any kept place (the largest usable ``images_per_place``)."""
        return min(len(p) for p in self.place_images)

    def __repr__(self) -> str:
        return (
            f"GSVCities(root={str(self.root)!r}, cities={len(self.cities)}, "
            f"places={len(self)}, images={self.num_images}, "
            f"dropped_places={self.num_dropped_places})"
        )


def _parse_int(text: str, column: str, where: str) -> int:
    # Digits only (a leading minus allowed): "4.0" or "" would give other file names in the
    # official code (pandas reads such a column as float), so they are errors here.
    stripped = text.strip()
    body = stripped[1:] if stripped.startswith("-") else stripped
    if not body.isascii() or not body.isdigit():
        raise ValueError(f"{where}: column {column!r} must be an integer, got {text!r}")
    return int(stripped)


def _parse_float(text: str, column: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not np.isfinite(value):
        raise ValueError(f"{where}: column {column!r} must be a finite number, got {text!r}")
    return value


def _city_order(dataframes: Path, cities: Sequence[str] | None) -> list[str]:
    if cities is None:
        found = sorted(p.stem for p in dataframes.glob("*.csv") if not p.name.startswith("."))
        if not found:
            raise FileNotFoundError(f"{dataframes} contains no <City>.csv files")
        # The official list first, in its order, so the full dataset gets the official offsets.
        known = [c for c in TRAIN_CITIES if c in found]
        return known + [c for c in found if c not in TRAIN_CITIES]
    if isinstance(cities, str):
        raise ValueError(f"cities must be a list of city names, got the string {cities!r}")
    cities = list(cities)
    if not cities:
        raise ValueError("cities is empty; pass None to use every CSV in Dataframes/")
    duplicates = sorted({c for c in cities if cities.count(c) > 1})
    if duplicates:
        raise ValueError(f"cities lists {duplicates} more than once")
    return cities


def _read_city(
    csv_path: Path, city_index: int, images_dir: Path
) -> dict[int, list[tuple[str, str]]]:
    """Rows of one city CSV grouped by offset label: ``label -> [(path, where), ...]``."""
    places: dict[int, list[tuple[str, str]]] = {}
    seen_names: dict[str, str] = {}
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{csv_path} is empty (no header row)")
        header = [h.strip() for h in header]
        missing = [c for c in GSV_COLUMNS if c not in header]
        extra = [h for h in header if h not in GSV_COLUMNS]
        if missing or extra:
            raise ValueError(
                f"{csv_path}: columns must be {','.join(GSV_COLUMNS)}; "
                f"missing {missing}, unexpected {extra}"
            )
        if len(set(header)) != len(header):
            raise ValueError(f"{csv_path}: repeated column names in header {header}")
        col = {name: header.index(name) for name in GSV_COLUMNS}
        for row_number, row in enumerate(reader, start=1):
            if not row:
                continue  # A blank line (e.g. a trailing newline) is no row, as in pandas.
            # Line numbers count the header as line 1, as an editor shows them.
            where = f"{csv_path} row {row_number} (line {reader.line_num})"
            if len(row) != len(header):
                raise ValueError(f"{where}: expected {len(header)} fields, got {len(row)}")
            place_id = _parse_int(row[col["place_id"]], "place_id", where)
            if not 0 <= place_id < CITY_ID_OFFSET:
                # The official per-city prefix (i * 10**5) would collide with larger ids.
                raise ValueError(
                    f"{where}: place_id must be in [0, {CITY_ID_OFFSET}), got {place_id}"
                )
            year = _parse_int(row[col["year"]], "year", where)
            month = _parse_int(row[col["month"]], "month", where)
            northdeg = _parse_int(row[col["northdeg"]], "northdeg", where)
            if year < 0 or not 1 <= month <= 12 or northdeg < 0:
                raise ValueError(
                    f"{where}: year/month/northdeg out of range: {year}/{month}/{northdeg}"
                )
            lat = _parse_float(row[col["lat"]], "lat", where)
            lon = _parse_float(row[col["lon"]], "lon", where)
            city_id = row[col["city_id"]].strip()
            panoid = row[col["panoid"]].strip()
            if not city_id or not panoid:
                raise ValueError(f"{where}: city_id and panoid must not be empty")
            name = gsv_image_name(city_id, place_id, year, month, northdeg, lat, lon, panoid)
            if name in seen_names:
                raise ValueError(f"{where}: same image {name} as {seen_names[name]}")
            seen_names[name] = where
            label = place_id + city_index * CITY_ID_OFFSET
            places.setdefault(label, []).append((str(images_dir / city_id / name), where))
    if not places:
        raise ValueError(f"{csv_path} has a header but no rows")
    return places


def _check_images(city_places: list[list[tuple[str, str]]], check: str, seed: int = 0) -> None:
    rows = [item for place in city_places for item in place]
    if check == "all":
        chosen = rows
    else:
        # First, last and a few at random: catches a wrong root or a missing city folder
        # without a stat per image of the 500k-image set.
        rng = np.random.default_rng(seed)
        picks = rng.choice(len(rows), min(len(rows), _SAMPLE_CHECKS_PER_CITY), replace=False)
        chosen = [rows[0], rows[-1]] + [rows[i] for i in sorted(picks)]
    missing = [(path, where) for path, where in chosen if not os.path.isfile(path)]
    if missing:
        path, where = missing[0]
        folder = os.path.dirname(path)
        hint = "" if os.path.isdir(folder) else f" (folder {folder} does not exist)"
        count = f" ({len(missing)} of {len(rows)} images are missing)" if check == "all" else ""
        raise FileNotFoundError(f"{where}: image file {path} does not exist{hint}{count}")


def read_gsv_cities(
    root: PathLike,
    cities: Sequence[str] | None = None,
    min_images_per_place: int = 4,
    check_files: str = "sample",
) -> GSVCities:
    """Read a GSV-Cities tree: every place with at least ``min_images_per_place`` images.

    ``cities``: names of the CSVs in ``<root>/Dataframes`` in order (the order sets the place
    id offsets); None takes every CSV there, the official 23 first in the official order.
    ``check_files``: ``"sample"`` checks a few images per city exist, ``"all"`` checks every
    image of the kept places. Places with too few images are dropped and counted (logged and
    in ``num_dropped_places``); bad CSVs raise errors naming the file and row.
    """
    if check_files not in _CHECK_MODES:
        raise ValueError(f"check_files must be one of {_CHECK_MODES}, got {check_files!r}")
    if isinstance(min_images_per_place, bool) or not isinstance(min_images_per_place, int):
        raise ValueError(f"min_images_per_place must be an int, got {min_images_per_place!r}")
    if min_images_per_place < 1:
        raise ValueError(f"min_images_per_place must be >= 1, got {min_images_per_place}")
    root = Path(os.path.abspath(root))
    if not root.is_dir():
        raise FileNotFoundError(f"GSV-Cities root {root} does not exist")
    dataframes = root / "Dataframes"
    images_dir = root / "Images"
    if not dataframes.is_dir():
        raise FileNotFoundError(f"{dataframes} does not exist (expected <root>/Dataframes/*.csv)")
    if not images_dir.is_dir():
        raise FileNotFoundError(f"{images_dir} does not exist (expected <root>/Images/<city>/)")
    order = _city_order(dataframes, cities)

    place_images: list[list[str]] = []
    labels: list[int] = []
    place_cities: list[int] = []
    dropped_places = dropped_images = 0
    for city_index, city in enumerate(order):
        csv_path = dataframes / f"{city}.csv"
        if not csv_path.is_file():
            raise FileNotFoundError(f"city CSV {csv_path} does not exist (city {city!r})")
        places = _read_city(csv_path, city_index, images_dir)
        kept = []
        for label in sorted(places):
            rows = places[label]
            if len(rows) < min_images_per_place:
                dropped_places += 1
                dropped_images += len(rows)
                continue
            kept.append(rows)
            labels.append(label)
            place_cities.append(city_index)
        if kept:
            _check_images(kept, check_files)
        place_images.extend([path for path, _ in rows] for rows in kept)

    if dropped_places:
        logger.warning(
            "GSV-Cities %s: dropped %d places (%d images) with fewer than %d images",
            root,
            dropped_places,
            dropped_images,
            min_images_per_place,
        )
    if not place_images:
        raise ValueError(
            f"GSV-Cities {root}: no place has at least {min_images_per_place} images "
            f"(all {dropped_places} places dropped)"
        )
    return GSVCities(
        root=root,
        cities=tuple(order),
        place_images=place_images,
        place_labels=np.asarray(labels, dtype=np.int64),
        place_cities=np.asarray(place_cities, dtype=np.int64),
        num_dropped_places=dropped_places,
        num_dropped_images=dropped_images,
    )


def _default_transform(img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
    # The official default_transform: ToTensor then ImageNet Normalize, no resize.
    return normalize(to_tensor(img))


class GSVCitiesDataset(torch.utils.data.Dataset):
    """Item ``i`` is place ``i``: ``(images (K, 3, H, W), labels (K,))``.

    ``K = images_per_place`` images are drawn without replacement from the place's images,
    and ``transform(img, rng)`` turns each into a tensor (default: ImageNet-normalised
    ``to_tensor``). Both draws use one generator seeded by ``(seed, epoch, i)``, so an item
    is the same whichever worker loads it and a resumed run reproduces it; call
    :meth:`set_epoch` before each epoch (with ``persistent_workers=True`` the workers keep
    the epoch they were started with, so leave that off).
    """

    def __init__(
        self,
        data: GSVCities,
        images_per_place: int = 4,
        transform: Transform | None = None,
        *,
        seed: int = 0,
        epoch: int = 0,
    ) -> None:
        if not isinstance(data, GSVCities):
            raise TypeError(f"data must be a GSVCities (from read_gsv_cities), got {data!r}")
        if isinstance(images_per_place, bool) or not isinstance(images_per_place, int):
            raise ValueError(f"images_per_place must be an int, got {images_per_place!r}")
        if not 1 <= images_per_place <= data.min_images_per_place:
            raise ValueError(
                f"images_per_place={images_per_place} must be between 1 and the fewest images "
                f"of a place ({data.min_images_per_place}); raise min_images_per_place "
                "in read_gsv_cities"
            )
        if transform is not None and not callable(transform):
            raise ValueError(
                f"transform must be callable as transform(img, rng), got {transform!r}"
            )
        self.data = data
        self.images_per_place = images_per_place
        self.transform = _default_transform if transform is None else transform
        self.seed = int(seed)
        self.epoch = int(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that seeds the image draws and augmentations."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.data)

    @property
    def place_cities(self) -> np.ndarray:
        """City index of every place, for :class:`~vprkit.train.samplers.PlaceBatchSampler`."""
        return self.data.place_cities

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"place index {index} out of range for {len(self)} places")
        rng = np.random.default_rng([self.seed, self.epoch, index])
        paths = self.data.place_images[index]
        chosen = rng.choice(len(paths), self.images_per_place, replace=False)
        images = []
        for i in chosen:
            tensor = self.transform(load_image(paths[i]), rng)
            if not isinstance(tensor, torch.Tensor) or tensor.ndim != 3:
                raise ValueError(
                    f"transform must return a (3, H, W) tensor, got "
                    f"{getattr(tensor, 'shape', type(tensor).__name__)} for {paths[i]}"
                )
            if images and tensor.shape != images[0].shape:
                raise ValueError(
                    f"images of place {index} differ in size after the transform: "
                    f"{paths[chosen[0]]} gives {tuple(images[0].shape)}, {paths[i]} gives "
                    f"{tuple(tensor.shape)}; resize in the transform"
                )
            images.append(tensor)
        label = int(self.data.place_labels[index])
        return torch.stack(images), torch.full((self.images_per_place,), label, dtype=torch.int64)


def collate_places(
    batch: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten a list of places into ``(B*K, 3, H, W)`` images and ``(B*K,)`` labels.

    Place-major order, the same as the official ``images.view(BS*N, ch, h, w)``.
    """
    if len(batch) == 0:
        raise ValueError("collate_places got an empty batch")
    images = [item[0] for item in batch]
    labels = [item[1] for item in batch]
    if any(img.shape[1:] != images[0].shape[1:] for img in images):
        shapes = sorted({tuple(img.shape) for img in images})
        raise ValueError(f"places in a batch differ in image size: {shapes}")
    return torch.cat(images), torch.cat(labels)
