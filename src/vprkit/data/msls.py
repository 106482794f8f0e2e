"""Mapillary Street-Level Sequences (MSLS), read the way the official Mapillary tools read it.

Layout (mapillary/mapillary_sls README)::

    <root>/{train_val,test}/<city>/{query,database}/
        images/<key>.jpg
        seq_info.csv         key, sequence_key, frame_number
        subtask_index.csv    boolean columns all, s2w, w2s, o2n, n2o, d2n, n2d
        raw.csv              key, lon, lat, ca, captured_at, pano        (train_val only)
        postprocessed.csv    key, easting, northing, night, view_direction, ...  (train_val only)

The rules below are those of ``mapillary_sls/datasets/msls.py`` (class ``MSLS``, task ``im2im``,
so sequences of length 1), as vendored by R2Former and called there with ``posDistThr=25`` for
validation (``datasets_ws.py``, ``mapillary_sls_main/evaluate.py``, ``eval_api``):

- A city lives in ``test/`` if it is one of the six test cities, else in ``train_val/``.
- The candidate frames of one side (query or database) are the row labels of
  ``postprocessed.csv`` (its unnamed first column). A label is a *row position* in
  ``seq_info.csv`` (the image key comes from there), ``subtask_index.csv`` and ``raw.csv``.
- Validation keeps the frames whose ``subtask_index.csv`` row is True in the chosen subtask
  column, on *both* sides; training applies no subtask filter.
- Panoramas (``raw.csv`` ``pano`` True) are excluded on both sides.
- A city left with no query or no database frame is skipped (R2Former's copy ``continue``s).
- Positives: database images within the radius (25 m validation, 10 m training) of the query,
  in the same city. A query without a positive is dropped and its key recorded
  (``query_keys_with_no_match``); database images are never dropped.
- Training also gives the non-negatives within 25 m and, in R2Former's copy only
  (``nonNegIdx_hard``), within 50 m; and the indices (among the kept queries) of night queries
  (``postprocessed.csv`` ``night``) and sideways ones (``view_direction == "Sideways"``), which
  weight query sampling (``__calcSamplingWeights__``, the ``msls_weighted`` mining).
- Test cities have no coordinates: the frames are the rows of ``subtask_index.csv`` in the
  subtask, keys from ``seq_info.csv``; no panorama filter and no positives.

On the official data, validation on cph + sf with subtask ``all`` gives 747 queries of which 7
have no positive within 25 m, i.e. the 740-query set the papers report. The
VPR-datasets-downloader (``format_mapillary.py``) instead keeps every non-panorama image
(no subtask filter), takes coordinates from ``raw.csv`` lat/lon converted to UTM and truncated
to centimetres in the file names, and the VG-benchmark evaluation keeps queries without a
positive (they count as misses): ``val_split="downloader"`` reproduces that larger split.

The parsed index is cached in ``<root>/.vprkit_msls_cache/`` (``.npz``, no pickles), keyed by
the sizes and modification times of the CSVs and image folders it was built from.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vprkit.atomic import atomic_path
from vprkit.data.datasets import PlaceDataset
from vprkit.errors import MissingInputError, VprkitError
from vprkit.retrieval.ground_truth import positives_within_radius

__all__ = [
    "MSLS_CITIES",
    "MSLS_SUBTASKS",
    "MSLSDataset",
    "MSLSTrainIndex",
    "is_msls_root",
    "latlon_to_utm",
    "read_msls",
    "read_msls_train",
    "write_submission",
]

logger = logging.getLogger(__name__)

# The official default_cities (mapillary_sls/datasets/msls.py), in the official order: the order
# of cities is the order of the concatenated image lists.
MSLS_CITIES: dict[str, tuple[str, ...]] = {
    "train": (
        "trondheim",
        "london",
        "boston",
        "melbourne",
        "amsterdam",
        "helsinki",
        "tokyo",
        "toronto",
        "saopaulo",
        "moscow",
        "zurich",
        "paris",
        "bangkok",
        "budapest",
        "austin",
        "berlin",
        "ottawa",
        "phoenix",
        "goa",
        "amman",
        "nairobi",
        "manila",
    ),
    "val": ("cph", "sf"),
    "test": ("miami", "athens", "buenosaires", "stockholm", "bengaluru", "kampala"),
}
MSLS_SUBTASKS: tuple[str, ...] = ("all", "s2w", "w2s", "o2n", "n2o", "d2n", "n2d")
VAL_SPLITS: tuple[str, ...] = ("official", "downloader")
SIDES: tuple[str, ...] = ("query", "database")

_CACHE_DIRNAME = ".vprkit_msls_cache"
_CACHE_VERSION = 1
_SAMPLE_CHECKS = 32
_TRUE = frozenset({"true", "1", "1.0"})
_FALSE = frozenset({"false", "0", "0.0"})


# ---------------------------------------------------------------------------------------
# Public result types
# ---------------------------------------------------------------------------------------


@dataclass(repr=False)
class MSLSDataset(PlaceDataset):
    """An MSLS evaluation set: a :class:`PlaceDataset` that also says how it was formed.

    ``query_keys`` / ``database_keys`` are the image keys (file stems) in list order, as the
    challenge submission needs them. ``no_positive_query_keys`` lists the queries without a
    positive within ``positive_radius``: dropped from the set for the official split, kept
    (counted as misses) for the downloader split (``dropped_no_positive`` says which).
    """

    split: str = "val"
    val_split: str | None = None  # "official" / "downloader" for labelled splits
    subtask: str = "all"
    positive_radius: float | None = None
    cities: tuple[str, ...] = ()
    skipped_cities: tuple[str, ...] = ()
    query_keys: list[str] = field(default_factory=list)
    database_keys: list[str] = field(default_factory=list)
    no_positive_query_keys: list[str] = field(default_factory=list)
    dropped_no_positive: bool = True
    from_cache: bool = False

    @property
    def description(self) -> str:
        """One line stating the split, its rule and its size."""
        if self.split == "test":
            rule = f"subtask {self.subtask!r}, no labels"
        elif self.val_split == "downloader":
            rule = (
                "VPR-datasets-downloader split: every non-panorama image, raw.csv coordinates, "
                f"{len(self.no_positive_query_keys)} queries without a positive within "
                f"{self.positive_radius:g} m kept"
            )
        else:
            rule = (
                f"official split: subtask {self.subtask!r}, panoramas excluded, "
                f"{len(self.no_positive_query_keys)} queries without a positive within "
                f"{self.positive_radius:g} m dropped"
            )
        skipped = f"; skipped {', '.join(self.skipped_cities)}" if self.skipped_cities else ""
        return (
            f"MSLS {self.split} ({rule}): {self.num_queries} queries, "
            f"{self.num_database} database images, cities {', '.join(self.cities)}{skipped}"
        )

    def __repr__(self) -> str:
        return (
            f"MSLSDataset(name={self.name!r}, split={self.split!r}, val_split={self.val_split!r}, "
            f"subtask={self.subtask!r}, #database={self.num_database}, "
            f"#queries={self.num_queries}, cities={self.cities})"
        )


@dataclass(repr=False)
class MSLSTrainIndex:
    """The MSLS training lists of the official ``MSLS(mode="train")``.

    Per kept query (one with a positive): ``positives`` (database indices within
    ``positive_radius``, 10 m), ``non_negatives`` (within 25 m: never use as negatives) and
    ``hard_non_negatives`` (within 50 m, R2Former's ``nonNegIdx_hard``). ``night_queries`` and
    ``sideways_queries`` are query indices for the ``msls_weighted`` sampling.
    """

    root: Path
    cities: tuple[str, ...]
    query_paths: list[Path]
    database_paths: list[Path]
    query_keys: list[str]
    database_keys: list[str]
    query_utm: np.ndarray  # (num_queries, 2) float64, easting then northing
    database_utm: np.ndarray
    positives: list[np.ndarray]
    non_negatives: list[np.ndarray]
    hard_non_negatives: list[np.ndarray]
    night_queries: np.ndarray  # int64 indices into the query list
    sideways_queries: np.ndarray
    dropped_query_keys: list[str]
    skipped_cities: tuple[str, ...] = ()
    positive_radius: float = 10.0
    non_negative_radius: float = 25.0
    hard_non_negative_radius: float = 50.0
    from_cache: bool = False

    @property
    def num_queries(self) -> int:
        return len(self.query_paths)

    @property
    def num_database(self) -> int:
        return len(self.database_paths)

    def sampling_weights(self) -> np.ndarray:
        """Official ``__calcSamplingWeights__``: 1, plus N/#night if night, plus N/#sideways.

        Unnormalized (``random.choices`` and ``torch.multinomial`` take them as they are); an
        empty night or sideways set adds nothing, as in the official code.
        """
        n = self.num_queries
        weights = np.ones(n, dtype=np.float64)
        if len(self.night_queries):
            weights[self.night_queries] += n / len(self.night_queries)
        if len(self.sideways_queries):
            weights[self.sideways_queries] += n / len(self.sideways_queries)
        return weights

    def __repr__(self) -> str:
        return (
            f"MSLSTrainIndex(root='{self.root}', #database={self.num_database}, "
            f"#queries={self.num_queries}, #night={len(self.night_queries)}, "
            f"#sideways={len(self.sideways_queries)}, cities={self.cities})"
        )


# ---------------------------------------------------------------------------------------
# UTM, as the downloader computes it
# ---------------------------------------------------------------------------------------

# Snyder's series ("Map Projections: A Working Manual", USGS 1987, eqs. 8-9, 8-10, 3-21) with
# e^2 = 0.00669438, which is what the `utm` package used by the downloader evaluates.
_E2 = 0.00669438
_EP2 = _E2 / (1 - _E2)
_R = 6378137.0
_K0 = 0.9996
_M1 = 1 - _E2 / 4 - 3 * _E2**2 / 64 - 5 * _E2**3 / 256
_M2 = 3 * _E2 / 8 + 3 * _E2**2 / 32 + 45 * _E2**3 / 1024
_M3 = 15 * _E2**2 / 256 + 45 * _E2**3 / 1024
_M4 = 35 * _E2**3 / 3072


def _utm_zone(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    zone = (np.floor((lon + 180.0) / 6.0) % 60 + 1).astype(np.int64)
    zone[(lat >= 56) & (lat < 64) & (lon >= 3) & (lon < 12)] = 32  # south-west Norway
    svalbard = (lat >= 72) & (lat <= 84) & (lon >= 0) & (lon < 42)
    lower = 0.0
    for upper, z in ((9, 31), (21, 33), (33, 35), (42, 37)):
        zone[svalbard & (lon >= lower) & (lon < upper)] = z
        lower = upper
    return zone


def latlon_to_utm(lat: np.ndarray, lon: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """WGS84 latitude/longitude (degrees) -> ``(easting, northing, zone)``, each point in its zone.

    Same series and constants as the ``utm`` package's ``from_latlon`` (which
    VPR-datasets-downloader uses to name MSLS images), so the values agree with it to
    floating-point rounding.
    """
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    if lat.shape != lon.shape:
        raise ValueError(f"lat has shape {lat.shape} but lon has shape {lon.shape}")
    bad = ~(np.isfinite(lat) & np.isfinite(lon) & (lat >= -80) & (lat <= 84))
    bad |= np.abs(lon) > 180
    if bad.any():
        i = int(np.flatnonzero(bad.reshape(-1))[0])
        raise ValueError(
            f"latitude/longitude {lat.reshape(-1)[i]}, {lon.reshape(-1)[i]} is outside UTM "
            "(latitude -80..84, longitude -180..180)"
        )
    zone = _utm_zone(lat, lon)
    phi = np.radians(lat)
    central = np.radians((zone - 1) * 6 - 180 + 3)
    dlon = np.radians(lon) - central
    dlon = (dlon + np.pi) % (2 * np.pi) - np.pi  # wrap across the antimeridian
    sin, cos, tan = np.sin(phi), np.cos(phi), np.tan(phi)
    t2 = tan * tan
    n = _R / np.sqrt(1 - _E2 * sin * sin)
    c = _EP2 * cos * cos
    a = cos * dlon
    m = _R * (_M1 * phi - _M2 * np.sin(2 * phi) + _M3 * np.sin(4 * phi) - _M4 * np.sin(6 * phi))
    easting = (
        _K0
        * n
        * (a + a**3 / 6 * (1 - t2 + c) + a**5 / 120 * (5 - 18 * t2 + t2 * t2 + 72 * c - 58 * _EP2))
        + 500000.0
    )
    northing = _K0 * (
        m
        + n
        * tan
        * (
            a**2 / 2
            + a**4 / 24 * (5 - t2 + 9 * c + 4 * c * c)
            + a**6 / 720 * (61 - 58 * t2 + t2 * t2 + 600 * c - 330 * _EP2)
        )
    )
    northing = np.where(lat < 0, northing + 10000000.0, northing)
    return easting, northing, zone


def _truncate_cm(value: float) -> float:
    # The downloader writes str(abs(x)) cut to 2 decimals into the name (format_coord), and
    # the VG reader parses the name back: truncation towards zero, not rounding.
    text = repr(abs(float(value)))
    if "e" in text or "E" in text or "." not in text:
        truncated = math.trunc(abs(value) * 100) / 100
    else:
        integer, decimal = text.split(".")
        truncated = float(f"{integer}.{decimal[:2]:<02}")
    return -truncated if value < 0 else truncated


# ---------------------------------------------------------------------------------------
# CSV reading
# ---------------------------------------------------------------------------------------


@dataclass
class _Table:
    path: Path
    labels: np.ndarray  # int64: the unnamed first column (pandas index_col=0), else positions
    lines: list[int]  # file line of each row, for error messages
    columns: dict[str, list[str]]

    def __len__(self) -> int:
        return len(self.lines)

    def bools(self, name: str) -> np.ndarray:
        out = np.empty(len(self), dtype=bool)
        for i, value in enumerate(self.columns[name]):
            v = value.strip().lower()
            if v in _TRUE:
                out[i] = True
            elif v in _FALSE:
                out[i] = False
            else:
                raise VprkitError(
                    f"{self.path}: line {self.lines[i]}: column {name!r} is {value!r}, "
                    "expected True or False"
                )
        return out

    def floats(self, name: str) -> np.ndarray:
        values = self.columns[name]
        try:
            out = np.array(values, dtype=np.float64)
        except ValueError:
            out = None
        if out is None or not np.isfinite(out).all():
            for i, value in enumerate(values):
                try:
                    ok = math.isfinite(float(value))
                except ValueError:
                    ok = False
                if not ok:
                    raise VprkitError(
                        f"{self.path}: line {self.lines[i]}: column {name!r} is {value!r}, "
                        "expected a finite number"
                    ) from None
        return out


def _read_csv(path: Path, required: Sequence[str]) -> _Table:
    """Read an MSLS metadata CSV with the columns ``required``; clear errors naming the file."""
    if not path.is_file():
        raise MissingInputError(f"MSLS metadata file {path} does not exist")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise VprkitError(f"{path} is empty; expected a header with {', '.join(required)}")
        names = [h.strip() for h in header]
        missing = [c for c in required if c not in names]
        if missing:
            raise VprkitError(
                f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(names)})"
            )
        wanted = {names.index(c): c for c in required}
        columns: dict[str, list[str]] = {c: [] for c in required}
        lines: list[int] = []
        first: list[str] = []
        for row in reader:
            if not row:
                continue  # blank line, skipped as pandas does
            if len(row) != len(names):
                raise VprkitError(
                    f"{path}: line {reader.line_num} has {len(row)} fields but the header "
                    f"has {len(names)}"
                )
            lines.append(reader.line_num)
            first.append(row[0])
            for j, c in wanted.items():
                columns[c].append(row[j])
    if names[0] == "":
        # The unnamed first column is the pandas index the official code reads (index_col=0).
        try:
            labels = np.array([int(v) for v in first], dtype=np.int64)
        except ValueError:
            bad = next(i for i, v in enumerate(first) if not v.strip().lstrip("-").isdigit())
            raise VprkitError(
                f"{path}: line {lines[bad]}: row label {first[bad]!r} is not an integer"
            ) from None
    else:
        labels = np.arange(len(lines), dtype=np.int64)
    return _Table(path, labels, lines, columns)


# ---------------------------------------------------------------------------------------
# One side (query or database) of one city
# ---------------------------------------------------------------------------------------


@dataclass
class _Side:
    keys: list[str]
    utm: np.ndarray | None = None
    night: np.ndarray | None = None
    sideways: np.ndarray | None = None


def _check_in_range(labels: np.ndarray, table: _Table, source: _Table) -> None:
    bad = (labels < 0) | (labels >= len(table))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise VprkitError(
            f"{source.path}: row label {int(labels[i])} has no row in {table.path} "
            f"({len(table)} rows); the MSLS metadata files of this folder do not match"
        )


def _check_keys(keys: list[str], table: _Table, rows: np.ndarray, source: Path) -> None:
    # The official code pairs files by row position only; a key column that disagrees means
    # the files do not belong together, which would silently mislabel every image.
    if "key" not in table.columns:
        return
    other = table.columns["key"]
    for key, r in zip(keys, rows.tolist(), strict=True):
        if other[r] != key:
            raise VprkitError(
                f"{table.path}: line {table.lines[r]} has key {other[r]!r} where {source} "
                f"has {key!r}; the MSLS metadata files of this folder do not match"
            )


def _optional_key(path: Path, required: tuple[str, ...]) -> tuple[str, ...]:
    # Read the key column for the consistency check when the file has one.
    try:
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
    except OSError:
        return required
    return required + ("key",) if "key" in [h.strip() for h in header] else required


def _read_labelled_side(
    folder: Path, subtask: str | None, with_meta: bool
) -> tuple[_Side, dict[str, int]]:
    """Official train/val frames of one side; ``subtask`` None means no subtask filter."""
    pp_path = folder / "postprocessed.csv"
    pp_cols = ("easting", "northing") + (("night", "view_direction") if with_meta else ())
    pp = _read_csv(pp_path, _optional_key(pp_path, pp_cols))
    raw = _read_csv(folder / "raw.csv", _optional_key(folder / "raw.csv", ("pano",)))
    seq = _read_csv(folder / "seq_info.csv", ("key",))
    frames = pp.labels
    if len(np.unique(frames)) != len(frames):
        raise VprkitError(f"{pp.path}: duplicate row labels in the first column")
    for table in (seq, raw):
        _check_in_range(frames, table, pp)
    keep = ~raw.bools("pano")[frames]
    counts = {"rows": len(frames), "panoramas": int((~keep).sum())}
    if subtask is not None:
        sub = _read_csv(folder / "subtask_index.csv", (subtask,))
        _check_in_range(frames, sub, pp)
        in_subtask = sub.bools(subtask)[frames]
        counts["not_in_subtask"] = int((keep & ~in_subtask).sum())
        keep &= in_subtask
    rows = np.flatnonzero(keep)
    frame_rows = frames[rows]
    seq_keys = seq.columns["key"]
    keys = [seq_keys[r].strip() for r in frame_rows.tolist()]
    if "key" in pp.columns:
        pp_keys = pp.columns["key"]
        for key, r in zip(keys, rows.tolist(), strict=True):
            if pp_keys[r].strip() != key:
                raise VprkitError(
                    f"{pp.path}: line {pp.lines[r]} has key {pp_keys[r]!r} where "
                    f"{seq.path} (row {int(frames[r])}) has {key!r}; the MSLS metadata files "
                    "of this folder do not match"
                )
    _check_keys(keys, raw, frame_rows, seq.path)
    utm = np.stack([pp.floats("easting")[rows], pp.floats("northing")[rows]], axis=1)
    side = _Side(keys, utm)
    if with_meta:
        side.night = pp.bools("night")[rows]
        view = pp.columns["view_direction"]
        side.sideways = np.array([view[r] == "Sideways" for r in rows.tolist()], dtype=bool)
    return side, counts


def _read_test_side(folder: Path, subtask: str) -> tuple[_Side, dict[str, int]]:
    sub = _read_csv(folder / "subtask_index.csv", (subtask,))
    seq = _read_csv(folder / "seq_info.csv", ("key",))
    # Official test mode: frames are subtask_index's row labels, the filter its positions.
    in_subtask = sub.bools(subtask)
    frames = sub.labels[in_subtask]
    _check_in_range(frames, seq, sub)
    seq_keys = seq.columns["key"]
    keys = [seq_keys[r].strip() for r in frames.tolist()]
    return _Side(keys), {"rows": len(sub), "not_in_subtask": int((~in_subtask).sum())}


def _read_downloader_side(folder: Path) -> tuple[_Side, dict[str, int]]:
    raw = _read_csv(folder / "raw.csv", ("key", "lat", "lon", "pano"))
    keep = ~raw.bools("pano")
    rows = np.flatnonzero(keep)
    keys = [raw.columns["key"][r].strip() for r in rows.tolist()]
    lat, lon = raw.floats("lat")[rows], raw.floats("lon")[rows]
    try:
        easting, northing, _ = latlon_to_utm(lat, lon)
    except ValueError as e:
        raise VprkitError(f"{raw.path}: {e}") from None
    utm = np.array(
        [[_truncate_cm(e), _truncate_cm(n)] for e, n in zip(easting, northing, strict=True)],
        dtype=np.float64,
    ).reshape(-1, 2)
    return _Side(keys, utm), {"rows": len(raw), "panoramas": int((~keep).sum())}


# ---------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------


def _city_folder(root: Path, city: str) -> Path:
    return root / ("test" if city in MSLS_CITIES["test"] else "train_val") / city


def _check_images_listed(root: Path, city: str, side: str, keys: list[str], source: str) -> None:
    """Every key has its image: one directory listing, not one stat per image."""
    folder = _city_folder(root, city) / side / "images"
    if not folder.is_dir():
        raise MissingInputError(f"Image folder {folder} does not exist (keys listed in {source})")
    with os.scandir(folder) as entries:
        names = {e.name for e in entries}
    missing = [k for k in keys if f"{k}.jpg" not in names]
    if missing:
        raise MissingInputError(
            f"Image {folder / (missing[0] + '.jpg')} does not exist ({len(missing)} of "
            f"{len(keys)} images listed in {source} are missing)"
        )


def _check_images_sample(paths: list[Path]) -> None:
    step = max(1, len(paths) // _SAMPLE_CHECKS)
    for p in paths[::step] + paths[-1:]:
        if not p.is_file():
            raise MissingInputError(
                f"Image {p} does not exist; the dataset changed since the index was cached "
                "(delete the .vprkit_msls_cache folder, or use_cache=False, to re-check all)"
            )


# ---------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------


def _fingerprint(root: Path, cities: Sequence[str], files: Sequence[str]) -> list[list[Any]]:
    """(relative path, size, mtime_ns) of every file the index is built from.

    The image folders are included: their mtime changes when images are added or removed.
    """
    out: list[list[Any]] = []
    for city in cities:
        for side in SIDES:
            folder = _city_folder(root, city) / side
            for name in (*files, "images"):
                path = folder / name
                try:
                    st = path.stat()
                    entry: list[Any] = [st.st_size if name != "images" else 0, st.st_mtime_ns]
                except OSError:
                    entry = [None, None]
                out.append([os.path.relpath(path, root), *entry])
    return out


def _cache_file(cache_dir: Path, tag: str, subtask: str, params: dict[str, Any]) -> Path:
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    return cache_dir / f"{tag}_{subtask}_{digest}.npz"


def _load_cache(path: Path, params: dict[str, Any], fingerprint: list) -> dict | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays.pop("meta")))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        logger.warning("MSLS cache %s is unreadable (%s); rebuilding it", path, e)
        return None
    if meta.get("params") != params:
        logger.warning("MSLS cache %s was built with other settings; rebuilding it", path)
        return None
    if meta.get("fingerprint") != fingerprint:
        logger.info("MSLS metadata changed since %s was written; rebuilding the index", path)
        return None
    arrays["meta"] = meta
    return arrays


def _save_cache(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    with contextlib.ExitStack() as stack:
        # A folder we cannot write to only costs the cache; an error while writing is raised.
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = stack.enter_context(atomic_path(path))
        except OSError as e:
            logger.warning(
                "cannot write the MSLS cache in %s (%s); continuing without", path.parent, e
            )
            return
        with open(tmp, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
    logger.info("MSLS index cached in %s", path)


def _to_csr(lists: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    indptr = np.zeros(len(lists) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(x) for x in lists])
    indices = np.concatenate(lists).astype(np.int64) if lists else np.zeros(0, np.int64)
    return indptr, indices


def _from_csr(indptr: np.ndarray, indices: np.ndarray) -> list[np.ndarray]:
    return [indices[indptr[i] : indptr[i + 1]] for i in range(len(indptr) - 1)]


def _str_array(values: Sequence[str]) -> np.ndarray:
    return np.array(list(values), dtype=str) if len(values) else np.zeros(0, dtype="U1")


# ---------------------------------------------------------------------------------------
# Building the index
# ---------------------------------------------------------------------------------------


def _resolve_cities(cities: str | Sequence[str] | None, default: str) -> tuple[str, ...]:
    if cities is None:
        return MSLS_CITIES[default]
    if isinstance(cities, str):
        # The official `cities` argument: a split name or a comma-separated list.
        names = MSLS_CITIES.get(cities) or tuple(c.strip() for c in cities.split(","))
    else:
        names = tuple(cities)
    names = tuple(c for c in names if c)
    if not names:
        raise VprkitError("cities is empty")
    if len(set(names)) != len(names):
        raise VprkitError(f"cities lists a city twice: {', '.join(names)}")
    return names


def _check_root(root: Path, cities: Sequence[str]) -> None:
    if not root.is_dir():
        raise MissingInputError(f"MSLS root {root} does not exist")
    for city in cities:
        folder = _city_folder(root, city)
        if not folder.is_dir():
            raise MissingInputError(
                f"MSLS city folder {folder} does not exist (expected "
                "<root>/{train_val,test}/<city>/{query,database}/)"
            )


def _read_city(root: Path, city: str, mode: str, subtask: str) -> dict[str, _Side] | None:
    """The query and database side of one city, or None (logged) when one is left empty."""
    sides: dict[str, _Side] = {}
    for side in SIDES:
        folder = _city_folder(root, city) / side
        if mode == "test":
            sides[side], counts = _read_test_side(folder, subtask)
        elif mode == "downloader":
            sides[side], counts = _read_downloader_side(folder)
        else:
            subtask_filter = subtask if mode == "val" else None
            with_meta = mode == "train" and side == "query"
            sides[side], counts = _read_labelled_side(folder, subtask_filter, with_meta)
        logger.debug("MSLS %s/%s: %s -> %d kept", city, side, counts, len(sides[side].keys))
    q, db = sides["query"], sides["database"]
    if not q.keys or not db.keys:
        empty = "query" if not q.keys else "database"
        logger.warning(
            "MSLS: skipping city %s: no %s image left after the filters (subtask %r, "
            "panoramas excluded) in %s",
            city,
            empty,
            subtask,
            _city_folder(root, city) / empty,
        )
        return None
    for side, s in sides.items():
        source = "raw.csv" if mode == "downloader" else "seq_info.csv"
        _check_images_listed(
            root, city, side, s.keys, str(_city_folder(root, city) / side / source)
        )
    return sides


def _build(
    root: Path,
    cities: tuple[str, ...],
    mode: str,
    subtask: str,
    radii: tuple[float, ...],
) -> dict[str, Any]:
    """Read every city and assemble the lists; ``mode`` is val, downloader, test or train."""
    q_keys: list[str] = []
    db_keys: list[str] = []
    q_city: list[int] = []
    db_city: list[int] = []
    q_utm: list[np.ndarray] = []
    db_utm: list[np.ndarray] = []
    relations: list[list[np.ndarray]] = [[] for _ in radii]
    no_positive: list[str] = []
    night: list[int] = []
    sideways: list[int] = []
    skipped: list[str] = []
    for ci, city in enumerate(cities):
        sides = _read_city(root, city, mode, subtask)
        if sides is None:
            skipped.append(city)
            continue
        q, db = sides["query"], sides["database"]
        offset = len(db_keys)
        db_keys.extend(db.keys)
        db_city.extend([ci] * len(db.keys))
        if mode == "test":
            q_keys.extend(q.keys)
            q_city.extend([ci] * len(q.keys))
            continue
        db_utm.append(db.utm)
        per_radius = [positives_within_radius(db.utm, q.utm, r) for r in radii]
        matched = np.array([len(p) > 0 for p in per_radius[0]], dtype=bool)
        no_positive.extend(k for k, m in zip(q.keys, matched, strict=True) if not m)
        # The downloader's VG layout keeps such queries (they count as misses); MSLS drops them.
        keep = np.arange(len(q.keys)) if mode == "downloader" else np.flatnonzero(matched)
        if mode == "train":
            base = len(q_keys)
            night.extend(base + j for j, i in enumerate(keep.tolist()) if q.night[i])
            sideways.extend(base + j for j, i in enumerate(keep.tolist()) if q.sideways[i])
        q_keys.extend(q.keys[i] for i in keep.tolist())
        q_city.extend([ci] * len(keep))
        q_utm.append(q.utm[keep])
        for rel, lists in zip(relations, per_radius, strict=True):
            rel.extend(lists[i] + offset for i in keep.tolist())
    if len(skipped) == len(cities):
        raise VprkitError(
            f"MSLS: no city of {', '.join(cities)} under {root} has both query and database "
            f"images for subtask {subtask!r}; choose another subtask or more cities"
        )
    arrays: dict[str, Any] = {
        "query_keys": _str_array(q_keys),
        "database_keys": _str_array(db_keys),
        "query_city": np.array(q_city, dtype=np.int32),
        "database_city": np.array(db_city, dtype=np.int32),
        "no_positive_keys": _str_array(no_positive),
        "skipped_cities": _str_array(skipped),
    }
    if mode != "test":
        arrays["query_utm"] = np.concatenate(q_utm).reshape(-1, 2)
        arrays["database_utm"] = np.concatenate(db_utm).reshape(-1, 2)
        for j, rel in enumerate(relations):
            arrays[f"rel{j}_indptr"], arrays[f"rel{j}_indices"] = _to_csr(rel)
    if mode == "train":
        arrays["night"] = np.array(night, dtype=np.int64)
        arrays["sideways"] = np.array(sideways, dtype=np.int64)
    return arrays


def _index(
    root: Path,
    cities: tuple[str, ...],
    mode: str,
    subtask: str,
    radii: tuple[float, ...],
    tag: str,
    use_cache: bool,
    cache_dir: str | os.PathLike | None,
) -> tuple[dict[str, Any], bool]:
    """The parsed index, from the cache when it is up to date, and whether it came from there."""
    files = {
        "val": ("postprocessed.csv", "raw.csv", "seq_info.csv", "subtask_index.csv"),
        "train": ("postprocessed.csv", "raw.csv", "seq_info.csv"),
        "downloader": ("raw.csv",),
        "test": ("subtask_index.csv", "seq_info.csv"),
    }[mode]
    params = {
        "version": _CACHE_VERSION,
        "mode": mode,
        "subtask": subtask,
        "cities": list(cities),
        "radii": list(radii),
    }
    path = None
    if use_cache:
        folder = (
            Path(os.path.abspath(cache_dir)) if cache_dir is not None else root / _CACHE_DIRNAME
        )
        path = _cache_file(folder, tag, subtask, params)
        fingerprint = _fingerprint(root, cities, files)
        cached = _load_cache(path, params, fingerprint)
        if cached is not None:
            return cached, True
    arrays = _build(root, cities, mode, subtask, radii)
    if path is not None:
        # Fingerprint again after reading, so a CSV edited during the build forces a rebuild.
        _save_cache(
            path, arrays, {"params": params, "fingerprint": _fingerprint(root, cities, files)}
        )
    return arrays, False


def _paths(root: Path, cities: tuple[str, ...], side: str, keys, city_index) -> list[Path]:
    # Joining a bare name onto one parent Path per city is about twice as fast as parsing full
    # path strings, which dominates loading a cached index of 1.6M images.
    folders = [_city_folder(root, c) / side / "images" for c in cities]
    return [
        folders[c] / f"{k}.jpg" for k, c in zip(keys.tolist(), city_index.tolist(), strict=True)
    ]


# ---------------------------------------------------------------------------------------
# Public readers
# ---------------------------------------------------------------------------------------


def is_msls_root(folder: str | os.PathLike) -> bool:
    """Whether `folder` is a Mapillary SLS root: it holds `train_val/<city>/...`."""
    return (Path(folder) / "train_val").is_dir()


def _check_read_arguments(split: str, subtask: str, val_split: str, positive_radius: float) -> None:
    if split not in MSLS_CITIES:
        raise VprkitError(f"split must be one of {', '.join(MSLS_CITIES)}, got {split!r}")
    if subtask not in MSLS_SUBTASKS:
        raise VprkitError(f"subtask must be one of {', '.join(MSLS_SUBTASKS)}, got {subtask!r}")
    if val_split not in VAL_SPLITS:
        raise VprkitError(f"val_split must be one of {', '.join(VAL_SPLITS)}, got {val_split!r}")
    if val_split == "downloader" and split != "val":
        raise VprkitError("val_split='downloader' only applies to split='val'")
    if val_split == "downloader" and subtask != "all":
        raise VprkitError("the downloader split has no subtasks; use subtask='all'")
    if not (math.isfinite(positive_radius) and positive_radius >= 0):
        raise VprkitError(f"positive_radius must be a non-negative number, got {positive_radius}")


def read_msls(
    root: str | os.PathLike,
    split: str = "val",
    cities: str | Sequence[str] | None = None,
    subtask: str = "all",
    val_split: str = "official",
    use_cache: bool = True,
    *,
    positive_radius: float = 25.0,
    cache_dir: str | os.PathLike | None = None,
) -> MSLSDataset:
    """Read an MSLS evaluation set the way the official ``MSLS(mode="val"/"test")`` does.

    ``split`` picks the default cities (``MSLS_CITIES[split]``) and, for ``"test"``, the
    unlabelled test rules; ``"train"`` and ``"val"`` both follow the official validation rules
    (subtask filter, panoramas excluded, positives within ``positive_radius``, queries without
    one dropped). ``val_split="downloader"`` gives VPR-datasets-downloader's larger val split
    instead (see the module docstring). ``cache_dir`` overrides ``<root>/.vprkit_msls_cache``
    (e.g. for a read-only dataset).
    """
    _check_read_arguments(split, subtask, val_split, positive_radius)
    root = Path(os.path.abspath(root))
    names = _resolve_cities(cities, split)
    _check_root(root, names)
    mode = "test" if split == "test" else "downloader" if val_split == "downloader" else "val"
    tag = {"test": "test", "downloader": "val-downloader", "val": split}[mode]
    radii = () if mode == "test" else (float(positive_radius),)
    arrays, from_cache = _index(root, names, mode, subtask, radii, tag, use_cache, cache_dir)

    query_paths = _paths(root, names, "query", arrays["query_keys"], arrays["query_city"])
    database_paths = _paths(
        root, names, "database", arrays["database_keys"], arrays["database_city"]
    )
    if from_cache:
        _check_images_sample(query_paths)
        _check_images_sample(database_paths)
    labelled = mode != "test"
    dataset = MSLSDataset(
        name=f"msls_{split}"
        + ("_downloader" if mode == "downloader" else "")
        + ("" if subtask == "all" else f"_{subtask}"),
        root=root,
        database_paths=database_paths,
        query_paths=query_paths,
        database_utm=arrays["database_utm"] if labelled else None,
        query_utm=arrays["query_utm"] if labelled else None,
        positives=_from_csr(arrays["rel0_indptr"], arrays["rel0_indices"]) if labelled else None,
        layout="msls",
        split=split,
        val_split=val_split if labelled else None,
        subtask=subtask,
        positive_radius=float(positive_radius) if labelled else None,
        cities=tuple(c for c in names if c not in set(arrays["skipped_cities"].tolist())),
        skipped_cities=tuple(arrays["skipped_cities"].tolist()),
        query_keys=arrays["query_keys"].tolist(),
        database_keys=arrays["database_keys"].tolist(),
        no_positive_query_keys=arrays["no_positive_keys"].tolist(),
        dropped_no_positive=mode == "val",
        from_cache=from_cache,
    )
    if dataset.no_positive_query_keys:
        logger.info(
            "MSLS %s: %d queries have no positive within %g m (%s): %s",
            split,
            len(dataset.no_positive_query_keys),
            positive_radius,
            "dropped" if mode == "val" else "kept, they count as misses",
            ", ".join(dataset.no_positive_query_keys[:10])
            + (" ..." if len(dataset.no_positive_query_keys) > 10 else ""),
        )
    logger.info("%s%s", dataset.description, " (from cache)" if from_cache else "")
    return dataset


def read_msls_train(
    root: str | os.PathLike,
    cities: str | Sequence[str] | None = None,
    use_cache: bool = True,
    *,
    positive_radius: float = 10.0,
    non_negative_radius: float = 25.0,
    hard_non_negative_radius: float = 50.0,
    cache_dir: str | os.PathLike | None = None,
) -> MSLSTrainIndex:
    """The training lists of the official ``MSLS(mode="train")`` (default: the 22 train cities).

    No subtask filter, panoramas excluded, queries without a positive within
    ``positive_radius`` dropped; see :class:`MSLSTrainIndex`.
    """
    radii = (float(positive_radius), float(non_negative_radius), float(hard_non_negative_radius))
    if not all(math.isfinite(r) and r >= 0 for r in radii):
        raise ValueError(f"radii must be non-negative numbers, got {radii}")
    if not radii[0] <= radii[1] <= radii[2]:
        raise ValueError(
            "expected positive_radius <= non_negative_radius <= hard_non_negative_radius, "
            f"got {radii}"
        )
    root = Path(os.path.abspath(root))
    names = _resolve_cities(cities, "train")
    _check_root(root, names)
    arrays, from_cache = _index(
        root, names, "train", "all", radii, "train-index", use_cache, cache_dir
    )
    query_paths = _paths(root, names, "query", arrays["query_keys"], arrays["query_city"])
    database_paths = _paths(
        root, names, "database", arrays["database_keys"], arrays["database_city"]
    )
    if from_cache:
        _check_images_sample(query_paths)
        _check_images_sample(database_paths)
    skipped = tuple(arrays["skipped_cities"].tolist())
    index = MSLSTrainIndex(
        root=root,
        cities=tuple(c for c in names if c not in skipped),
        query_paths=query_paths,
        database_paths=database_paths,
        query_keys=arrays["query_keys"].tolist(),
        database_keys=arrays["database_keys"].tolist(),
        query_utm=arrays["query_utm"],
        database_utm=arrays["database_utm"],
        positives=_from_csr(arrays["rel0_indptr"], arrays["rel0_indices"]),
        non_negatives=_from_csr(arrays["rel1_indptr"], arrays["rel1_indices"]),
        hard_non_negatives=_from_csr(arrays["rel2_indptr"], arrays["rel2_indices"]),
        night_queries=arrays["night"],
        sideways_queries=arrays["sideways"],
        dropped_query_keys=arrays["no_positive_keys"].tolist(),
        skipped_cities=skipped,
        positive_radius=radii[0],
        non_negative_radius=radii[1],
        hard_non_negative_radius=radii[2],
        from_cache=from_cache,
    )
    logger.info(
        "%r: %d queries dropped without a positive within %g m%s",
        index,
        len(index.dropped_query_keys),
        radii[0],
        " (from cache)" if from_cache else "",
    )
    return index


# ---------------------------------------------------------------------------------------
# Challenge submission
# ---------------------------------------------------------------------------------------


def _check_key(key: Any, what: str) -> str:
    if not isinstance(key, str) or not key or key.startswith("#") or key != "".join(key.split()):
        raise ValueError(
            f"{what} {key!r} is not a valid MSLS key (a non-empty string without spaces that "
            "does not start with '#')"
        )
    return key


def write_submission(
    path: str | os.PathLike,
    query_keys: Sequence[str],
    database_keys: Sequence[str],
    predictions: np.ndarray | Sequence[Sequence[int]],
) -> Path:
    """Write the MSLS challenge prediction file: per query, its key then the ranked database keys.

    The format read by the official ``evaluate.py`` (``np.loadtxt(..., ndmin=2, dtype=str)``):
    one line per query, space-separated, every line with the same number of predictions, no
    duplicate within a line. ``predictions[i]`` holds database indices, best first. The file is
    written to a temporary name and renamed, so it is never half-written.
    """
    try:
        preds = np.asarray(predictions)
    except ValueError:  # ragged rows
        preds = np.asarray(predictions, dtype=object)
    if preds.ndim != 2 or preds.dtype == object:
        raise ValueError(
            f"predictions must be a (num_queries, k) array of database indices, got shape "
            f"{preds.shape} (every query needs the same number of predictions)"
        )
    if preds.size and preds.dtype.kind not in "iu":
        raise ValueError(f"predictions must be integer database indices, got {preds.dtype}")
    if len(query_keys) != preds.shape[0]:
        raise ValueError(f"{len(query_keys)} query keys but predictions has {preds.shape[0]} rows")
    if preds.shape[0] == 0 or preds.shape[1] == 0:
        raise ValueError(f"predictions is empty (shape {preds.shape})")
    qkeys = [_check_key(k, "query key") for k in query_keys]
    dbkeys = [_check_key(k, "database key") for k in database_keys]
    if len(set(qkeys)) != len(qkeys):
        dup = next(k for i, k in enumerate(qkeys) if k in qkeys[:i])
        raise ValueError(f"query key {dup!r} appears twice; the evaluator rejects duplicates")
    if preds.min() < 0 or preds.max() >= len(dbkeys):
        bad = int(preds.min() if preds.min() < 0 else preds.max())
        raise ValueError(f"prediction {bad} is out of range for {len(dbkeys)} database keys")
    for i, row in enumerate(preds):
        if len(np.unique(row)) != len(row):
            raise ValueError(
                f"query {qkeys[i]!r} (row {i}) predicts the same database image twice; "
                "the evaluator rejects duplicates"
            )
    if preds.shape[1] < 20:
        logger.info(
            "MSLS submission has %d predictions per query; the challenge reports R@1..R@20",
            preds.shape[1],
        )
    path = Path(os.path.abspath(path))
    if not path.parent.is_dir():
        raise FileNotFoundError(f"Folder {path.parent} does not exist")
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for key, row in zip(qkeys, preds.tolist(), strict=True):
            f.write(" ".join([key, *(dbkeys[j] for j in row)]) + "\n")
    return path
