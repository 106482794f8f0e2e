"""Readers for the standard VPR evaluation layouts, into one :class:`PlaceDataset`.

Layouts:

- ``vg``: gmberton's VG benchmark, ``<dataset>/images/{train,val,test}/{database,queries}/``,
  image names ``@utm_east@utm_north@...@.jpg`` (deep-visual-geo-localization-benchmark,
  VPR-methods-evaluation, VPR-datasets-downloader).
- ``vprbench``: VPR-Bench, ``query/``, ``ref/``, numbered ``N.jpg`` and a pickled
  ``ground_truth_new.npy``.
- ``gsv_val``: GSV-Cities validation lists ``<name>_dbImages.npy``, ``<name>_qImages.npy``,
  ``<name>_gt.npy`` (or MSLS-val's ``_qIdx.npy`` / ``_pIdx.npy``).
- ``folders``: any database folder and queries folder.

Detecting the layout of a folder is :mod:`vprkit.data.formats`' job (one module per layout,
:func:`vprkit.data.formats.open_dataset`); :func:`load_dataset` calls it.

Readers only list files; they never decode images. Pickled ``.npy`` files are read with a
restricted unpickler that can rebuild NumPy arrays and nothing else.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib import format as npy_format
from PIL import features as _pil_features

from vprkit.errors import MissingInputError, VprkitError

__all__ = [
    "IMAGE_EXTENSIONS",
    "PlaceDataset",
    "load_dataset",
    "load_npy_safe",
    "load_vprbench_ground_truth",
    "parse_utm",
    "read_folders",
    "read_gsv_val",
    "read_images_paths",
    "read_vg_dataset",
    "read_vprbench",
]

# Every format Pillow reads here that photos come in; WebP only when Pillow was built with it.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif") + (
    (".webp",) if _pil_features.check("webp") else ()
)
_SHOWN_NAMES = 5
logger = logging.getLogger(__name__)
_CHECK_MODES = ("sample", "all")
_SAMPLE_CHECKS = 32


@dataclass(repr=False)
class PlaceDataset:
    """Database and query image paths of one place-recognition set, with their labels.

    Labels are either UTM coordinates (positives are then the database images within a
    radius, computed by :mod:`vprkit.retrieval.ground_truth`) or explicit ``positives``
    per query; unlabelled sets have neither.
    """

    name: str
    root: Path  # the folder both image lists sit under
    database_paths: list[Path]
    query_paths: list[Path]
    database_utm: np.ndarray | None = None  # (num_database, 2) float64, east then north
    query_utm: np.ndarray | None = None  # (num_queries, 2) float64
    positives: list[np.ndarray] | None = None  # per query: sorted unique int64 indices
    layout: str = "folders"

    def __post_init__(self) -> None:
        # Cheap consistency checks, so a wrongly built dataset fails here, not mid-evaluation.
        if (self.database_utm is None) != (self.query_utm is None):
            raise ValueError(f"{self.name}: give both database_utm and query_utm, or neither")
        for utm, paths, what in (
            (self.database_utm, self.database_paths, "database_utm"),
            (self.query_utm, self.query_paths, "query_utm"),
        ):
            if utm is not None and utm.shape != (len(paths), 2):
                raise ValueError(
                    f"{self.name}: {what} has shape {utm.shape}, expected ({len(paths)}, 2)"
                )
        if self.positives is not None and len(self.positives) != len(self.query_paths):
            raise ValueError(
                f"{self.name}: {len(self.positives)} positive lists for "
                f"{len(self.query_paths)} queries"
            )

    @property
    def num_database(self) -> int:
        return len(self.database_paths)

    @property
    def num_queries(self) -> int:
        return len(self.query_paths)

    def has_labels(self) -> bool:
        """True when the set carries UTM coordinates or explicit positives."""
        return self.positives is not None or (
            self.database_utm is not None and self.query_utm is not None
        )

    def __repr__(self) -> str:
        # The default dataclass repr would print every path of a 75k-image database.
        labels = (
            "positives"
            if self.positives is not None
            else "utm"
            if self.database_utm is not None
            else "none"
        )
        return (
            f"PlaceDataset(name={self.name!r}, layout={self.layout!r}, root='{self.root}', "
            f"#database={self.num_database}, #queries={self.num_queries}, labels={labels})"
        )


# ---------------------------------------------------------------------------------------
# Safe .npy loading
# ---------------------------------------------------------------------------------------


def _numpy_multiarray() -> Any:
    try:  # NumPy >= 2 moved numpy.core to numpy._core (numpy.core is a deprecated alias)
        from numpy._core import multiarray
    except ImportError:  # pragma: no cover - NumPy 1.x
        from numpy.core import multiarray
    return multiarray


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Protocol-2 pickles written by Python 3 store bytes as _codecs.encode(text, "latin1");
    # only that codec is allowed, so a pickle cannot make us look up arbitrary codecs.
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    multiarray = _numpy_multiarray()
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild NumPy arrays, dtypes and scalars, and nothing else."""

    def __init__(self, file: Any, source: Path) -> None:
        # latin1: Python-2 pickles (VPR-Bench's) store array bytes as str; numpy's advice.
        super().__init__(file, encoding="latin1")
        self._source = source
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"{self._source}: refusing to load '{module}.{name}' from a pickle; only NumPy "
                "array reconstruction is allowed (the file is malformed or malicious)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError(f"{self._source}: persistent ids are not allowed")


def load_npy_safe(path: str | os.PathLike) -> np.ndarray:
    """Load a ``.npy`` file; object arrays go through a restricted unpickler.

    Unlike ``np.load(..., allow_pickle=True)``, this never imports or calls anything but
    NumPy's own array, dtype and scalar reconstruction, so a crafted file cannot run code.
    Raises FileNotFoundError if missing and ValueError naming the file if malformed.
    """
    path = Path(os.path.abspath(path))
    if not path.is_file():
        raise MissingInputError(f"File {path} does not exist")
    with open(path, "rb") as f:
        try:
            version = npy_format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = npy_format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = npy_format.read_array_header_2_0(f)
            else:
                raise VprkitError(f"unsupported .npy format version {version}")
        except ValueError as e:
            raise VprkitError(f"{path}: not a readable .npy file ({e})") from e
        if not dtype.hasobject:
            # Plain numeric/string arrays carry no pickle: NumPy's loader is safe here.
            return np.load(path, allow_pickle=False)
        try:
            array = _RestrictedUnpickler(f, path).load()
        except pickle.UnpicklingError as e:
            message = str(e)
            if str(path) not in message:
                message = f"{path}: malformed pickle in .npy file ({message})"
            raise VprkitError(message) from e
        except (EOFError, TypeError, ValueError, AttributeError, IndexError, KeyError) as e:
            raise VprkitError(f"{path}: malformed pickle in .npy file ({e!r})") from e
    if not isinstance(array, np.ndarray) or array.shape != tuple(shape):
        raise VprkitError(
            f"{path}: pickle holds {type(array).__name__} "
            f"{getattr(array, 'shape', '')}, but the header promises an array of shape {shape}"
        )
    return array


# ---------------------------------------------------------------------------------------
# Integer validation for ground-truth files
# ---------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _as_int_array(value: Any, where: str) -> np.ndarray:
    """An int, a list/tuple of ints or a 1-D integer array -> 1-D int64; anything else raises."""
    if _is_int(value):
        return np.array([int(value)], dtype=np.int64)
    if isinstance(value, np.ndarray):
        if value.ndim > 1:
            raise VprkitError(f"{where}: expected a 1-D list of indices, got shape {value.shape}")
        if value.dtype.kind in "iu":
            return value.reshape(-1).astype(np.int64)
        if value.dtype != object:
            raise VprkitError(f"{where}: expected integer indices, got an array of {value.dtype}")
        items: Iterable[Any] = value.reshape(-1).tolist()
    elif isinstance(value, (list, tuple)):
        items = value
    else:
        raise VprkitError(f"{where}: expected an integer or a list of integers, got {value!r:.80}")
    out = []
    for item in items:
        if not _is_int(item):
            raise VprkitError(f"{where}: expected integer indices, got {item!r:.80}")
        out.append(int(item))
    return np.array(out, dtype=np.int64)


def _check_index_range(indices: np.ndarray, num_database: int | None, where: str) -> None:
    if indices.size == 0:
        return
    bad = indices[(indices < 0) | (num_database is not None and indices >= num_database)]
    if bad.size:
        limit = "" if num_database is None else f" (valid 0..{num_database - 1})"
        raise VprkitError(f"{where}: database index {int(bad[0])} is out of range{limit}")


def load_vprbench_ground_truth(
    path: str | os.PathLike,
    num_queries: int | None = None,
    num_database: int | None = None,
) -> list[np.ndarray]:
    """Read VPR-Bench's ``ground_truth_new.npy``: rows ``[query_index, reference indices]``.

    Row ``i`` must be query ``i`` (VPR-Bench indexes the rows by position). ``-1`` is
    VPR-Bench's marker for "no matching reference" (e.g. GardensPoint_TN) and becomes an
    empty list. Returns one sorted unique int64 array per query.
    """
    path = Path(os.path.abspath(path))
    table = load_npy_safe(path)
    if table.ndim == 2 and table.shape[1] == 2:
        rows: Sequence[Any] = [(table[i, 0], table[i, 1]) for i in range(table.shape[0])]
    elif table.ndim == 1 and table.dtype == object:
        rows = table.tolist()
    else:
        raise VprkitError(
            f"{path}: expected rows [query_index, [reference indices]], got an array of "
            f"shape {table.shape} and dtype {table.dtype}"
        )
    if num_queries is not None and len(rows) != num_queries:
        raise VprkitError(
            f"{path}: ground truth has {len(rows)} rows but there are {num_queries} queries"
        )
    positives = []
    for i, row in enumerate(rows):
        if isinstance(row, np.ndarray):
            row = row.tolist() if row.dtype == object else list(row)
        if not isinstance(row, (list, tuple)) or len(row) != 2:
            raise VprkitError(f"{path}: row {i} is not a [query_index, references] pair")
        query, refs = row
        if not _is_int(query):
            raise VprkitError(f"{path}: row {i} has query index {query!r:.80}, not an integer")
        if int(query) != i:
            raise VprkitError(
                f"{path}: row {i} is for query {int(query)}; rows must be in query order"
            )
        indices = _as_int_array(refs, f"{path}: query {i}")
        indices = indices[indices != -1]
        _check_index_range(indices, num_database, f"{path}: query {i}")
        positives.append(np.unique(indices))
    return positives


def _positives_from_array(
    table: np.ndarray, path: Path, num_queries: int, num_database: int
) -> list[np.ndarray]:
    """GSV-Cities ``_gt.npy``: one array of database indices per query."""
    if table.ndim == 2 and table.dtype.kind in "iu":
        rows: list[Any] = list(table)  # every query has the same number of positives
    elif table.ndim == 1 and table.dtype == object:
        rows = table.tolist()
    elif table.ndim == 1 and table.dtype.kind in "iu":
        rows = [[int(v)] for v in table]  # exactly one positive per query
    else:
        raise VprkitError(
            f"{path}: expected one list of database indices per query, got an array of "
            f"shape {table.shape} and dtype {table.dtype}"
        )
    if len(rows) != num_queries:
        raise VprkitError(
            f"{path}: ground truth has {len(rows)} rows but there are {num_queries} queries"
        )
    positives = []
    for i, refs in enumerate(rows):
        indices = _as_int_array(refs, f"{path}: query {i}")
        _check_index_range(indices, num_database, f"{path}: query {i}")
        positives.append(np.unique(indices))
    return positives


# ---------------------------------------------------------------------------------------
# Listing images
# ---------------------------------------------------------------------------------------


def _absolute(path: str | os.PathLike) -> Path:
    # abspath, not resolve(): keep the user's symlinked dataset folders in the paths.
    return Path(os.path.abspath(path))


def _is_image_name(name: str) -> bool:
    # Hidden files (e.g. macOS "._x.jpg") are skipped, as glob("**/*.jpg") skips them.
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _dir_key(path: str) -> tuple[int, int]:
    info = os.stat(path)  # follows links: the folder itself, whatever path reached it
    return info.st_dev, info.st_ino


def _names(paths: list[str], folder: Path) -> str:
    shown = ", ".join(repr(os.path.relpath(p, folder)) for p in paths[:_SHOWN_NAMES])
    return shown + (", ..." if len(paths) > _SHOWN_NAMES else "")


def _walk_images(folder: Path) -> list[str]:
    """Image files under ``folder``, following symlinked folders but never a folder twice
    (a link loop, or two links to one folder) and never one file under two names."""
    found: list[str] = []
    others: list[str] = []
    repeated: list[str] = []
    seen_dirs = {_dir_key(str(folder))}
    # Each file's real path, to know a photo reached under two names; only links cost a call.
    real: dict[str, str] = {}
    stack = [(str(folder), os.path.realpath(folder))]
    while stack:
        dirpath, real_dir = stack.pop()
        with os.scandir(dirpath) as it:
            entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        subdirs = []
        for entry in entries:
            if entry.is_dir():
                if _dir_key(entry.path) in seen_dirs:
                    repeated.append(entry.path)
                else:
                    seen_dirs.add(_dir_key(entry.path))
                    subdirs.append((entry.path, os.path.realpath(entry.path)))
            elif _is_image_name(entry.name):
                found.append(entry.path)
                linked = entry.is_symlink()
                real[entry.path] = (
                    os.path.realpath(entry.path) if linked else os.path.join(real_dir, entry.name)
                )
            else:
                others.append(entry.path)
        stack.extend(reversed(subdirs))  # depth first in sorted order: the first name wins
    if repeated:
        logger.warning(
            "%s: %d folder link(s) lead to a folder already listed (a link loop or a second "
            "link), not walked again: %s",
            folder,
            len(repeated),
            _names(sorted(repeated), folder),
        )
    if others:
        logger.warning(
            "%s: skipped %d file(s) that are not images (read: %s): %s",
            folder,
            len(others),
            " ".join(IMAGE_EXTENSIONS),
            _names(sorted(others), folder),
        )
    return _first_name_per_file(sorted(found), real, folder)


def _first_name_per_file(paths: list[str], real: dict[str, str], folder: Path) -> list[str]:
    # One photo reached under two names (a symlinked file) is counted once: the first name in
    # sorted order is kept. Hard links are separate files to the file system and are kept.
    kept, doubles, seen = [], [], set()
    for path in paths:
        if real[path] in seen:
            doubles.append(path)
        else:
            seen.add(real[path])
            kept.append(path)
    if doubles:
        logger.warning(
            "%s: %d image(s) are links to a file already listed under another name, kept "
            "once (the first name in sorted order): %s",
            folder,
            len(doubles),
            _names(doubles, folder),
        )
    return kept


def _check_listed(paths: list[str], listing: Path, check: str) -> None:
    if check == "all":
        chosen: Iterable[str] = paths
    else:
        # First, last and evenly spaced: catches a wrong root without stat-ing millions.
        step = max(1, len(paths) // _SAMPLE_CHECKS)
        chosen = paths[::step] + paths[-1:]
    missing = [p for p in chosen if not os.path.isfile(p)]
    if missing:
        more = (
            f" ({len(missing)} of {len(paths)} listed files are missing)" if check == "all" else ""
        )
        raise MissingInputError(
            f"Image {missing[0]} listed in {listing} does not exist{more}; paths in that "
            "file must be relative to the folder it describes, so its content is likely wrong"
        )


def _check_duplicates(paths: list[str], folder: Path, source: Path | None = None) -> None:
    seen: set[str] = set()
    for p in paths:
        key = os.path.relpath(p, folder)
        if key in seen:
            where = f" in {source}" if source is not None else ""
            raise VprkitError(f"{folder}: duplicate image name {key!r}{where}")
        seen.add(key)


def read_images_paths(folder: str | os.PathLike, check: str = "sample") -> list[Path]:
    """Absolute, sorted paths of the images (:data:`IMAGE_EXTENSIONS`) anywhere under ``folder``.

    Symlinked folders are followed, but a folder reached twice (a link loop) is walked once
    and a file reached under two names is listed once; files with other extensions are
    skipped with a warning naming them. Hidden files and folders are ignored.

    If ``<folder>_images_paths.txt`` exists beside the folder, the list is read from it
    instead of walking the folder (fast for huge folders); its lines are relative to
    ``folder``, as in gmberton's ``read_images_paths``. ``check`` is ``"sample"`` (stat a
    few listed files) or ``"all"``.
    """
    if check not in _CHECK_MODES:
        raise ValueError(f"check must be one of {_CHECK_MODES}, got {check!r}")
    folder = _absolute(folder)
    if not folder.is_dir():
        raise MissingInputError(f"Folder {folder} does not exist")
    listing = folder.parent / f"{folder.name}_images_paths.txt"
    if listing.is_file():
        lines = [line.strip() for line in listing.read_text().splitlines()]
        # String concatenation like the original (folder + "/" + line), then normalised.
        paths = [os.path.normpath(f"{folder}/{line}") for line in lines if line]
        if not paths:
            raise MissingInputError(f"{listing} lists no images")
        _check_listed(paths, listing, check)
    else:
        paths = _walk_images(folder)
        if not paths:
            raise MissingInputError(
                f"Folder {folder} does not contain any images ({', '.join(IMAGE_EXTENSIONS)})"
            )
    _check_duplicates(paths, folder, listing if listing.is_file() else None)
    return [Path(p) for p in sorted(paths)]


def _image_number(name: str) -> int | None:
    # Plain ASCII digits only: int() would also take "1_0", " 1" or "+1".
    stem = name.rsplit(".", 1)[0]
    return int(stem) if stem.isascii() and stem.isdigit() else None


def _numbered_images(folder: Path) -> list[Path]:
    """VPR-Bench images ``N.jpg`` in numeric order, which ground-truth indices refer to."""
    if not folder.is_dir():
        raise MissingInputError(f"Folder {folder} does not exist")
    numbered: dict[int, Path] = {}
    with os.scandir(folder) as entries:
        names = [e.name for e in entries if _is_image_name(e.name) and e.is_file()]
    for name in sorted(names):
        index = _image_number(name)
        if index is None:
            raise VprkitError(
                f"{folder / name}: VPR-Bench images must be named by number (N.jpg), "
                "since ground-truth indices refer to numeric order"
            )
        if index in numbered:
            raise VprkitError(
                f"{folder}: duplicate image number {index}: {numbered[index].name} and {name}"
            )
        numbered[index] = folder / name
    if not numbered:
        raise MissingInputError(f"Folder {folder} does not contain any images")
    return [numbered[i] for i in sorted(numbered)]


# ---------------------------------------------------------------------------------------
# UTM names
# ---------------------------------------------------------------------------------------


def parse_utm(path: str | os.PathLike) -> tuple[float, float]:
    """``(east, north)`` from a name ``@utm_east@utm_north@...@.jpg`` (fields 1 and 2).

    Only the file name is split, so an ``@`` in a parent folder does no harm.
    """
    name = os.path.basename(os.fspath(path))
    fields = name.split("@")
    try:
        east, north = float(fields[1]), float(fields[2])
    except (IndexError, ValueError):
        raise VprkitError(
            f"{path}: cannot read UTM coordinates from the name; expected "
            "@utm_east@utm_north@...@.jpg"
        ) from None
    if not (np.isfinite(east) and np.isfinite(north)):
        raise VprkitError(f"{path}: UTM coordinates in the name are not finite numbers")
    return east, north


def _utm_array(paths: list[Path]) -> np.ndarray:
    utm = np.empty((len(paths), 2), dtype=np.float64)
    for i, p in enumerate(paths):
        try:
            utm[i] = parse_utm(p)
        except ValueError as e:
            raise VprkitError(
                f"{e} (for images without coordinates pass --no_labels, or no_labels=True in "
                "Python)"
            ) from e
    return utm


# ---------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------


def _find_vg_split(folder: Path, split: str, database: str, queries: str) -> Path | None:
    for candidate in (folder, folder / split, folder / "images" / split):
        if (candidate / database).is_dir() and (candidate / queries).is_dir():
            return candidate
    return None


def _vg_name(folder: Path, split_folder: Path) -> str:
    if split_folder.parent.name == "images":
        return split_folder.parent.parent.name
    return folder.name


def read_vg_dataset(
    dataset_folder: str | os.PathLike,
    split: str = "test",
    *,
    database_folder: str = "database",
    queries_folder: str = "queries",
    no_labels: bool = False,
    check_paths: str = "sample",
) -> PlaceDataset:
    """Read a VG-benchmark set: ``<dataset>/images/<split>/{database,queries}/``.

    ``dataset_folder`` may be the dataset root, its ``images/`` folder or the split folder
    itself. ``database_folder`` / ``queries_folder`` name the subfolders (e.g.
    ``queries_night`` in SVOX). UTM coordinates come from the names unless ``no_labels``.
    """
    folder = _absolute(dataset_folder)
    if not folder.is_dir():
        raise MissingInputError(f"Folder {folder} does not exist")
    split_folder = _find_vg_split(folder, split, database_folder, queries_folder)
    if split_folder is None:
        tried = [folder, folder / split, folder / "images" / split]
        raise MissingInputError(
            f"No {database_folder}/ and {queries_folder}/ folders found in any of "
            + ", ".join(str(t) for t in tried)
        )
    database_paths = read_images_paths(split_folder / database_folder, check_paths)
    query_paths = read_images_paths(split_folder / queries_folder, check_paths)
    return PlaceDataset(
        name=_vg_name(folder, split_folder),
        root=split_folder,
        database_paths=database_paths,
        query_paths=query_paths,
        database_utm=None if no_labels else _utm_array(database_paths),
        query_utm=None if no_labels else _utm_array(query_paths),
        layout="vg",
    )


def read_vprbench(
    folder: str | os.PathLike,
    ground_truth: str | os.PathLike | None = None,
    *,
    no_labels: bool = False,
) -> PlaceDataset:
    """Read a VPR-Bench set: ``query/``, ``ref/`` (numbered images), ``ground_truth_new.npy``.

    Images are ordered by their number, as VPR-Bench does, since ground-truth indices refer
    to that order. ``ground_truth`` defaults to ``<folder>/ground_truth_new.npy``; with
    ``no_labels`` no ground truth is read.
    """
    folder = _absolute(folder)
    if not folder.is_dir():
        raise MissingInputError(f"Folder {folder} does not exist")
    query_paths = _numbered_images(folder / "query")
    database_paths = _numbered_images(folder / "ref")
    positives = None
    if not no_labels:
        gt_path = folder / "ground_truth_new.npy" if ground_truth is None else ground_truth
        gt_path = _absolute(gt_path)
        if not gt_path.is_file():
            raise MissingInputError(
                f"Ground truth {gt_path} does not exist (for a set without it pass "
                "--no_labels, or no_labels=True in Python)"
            )
        positives = load_vprbench_ground_truth(gt_path, len(query_paths), len(database_paths))
    return PlaceDataset(
        name=folder.name,
        root=folder,
        database_paths=database_paths,
        query_paths=query_paths,
        positives=positives,
        layout="vprbench",
    )


def _load_name_list(path: Path) -> list[str]:
    array = load_npy_safe(path)
    if array.ndim != 1:
        raise VprkitError(f"{path}: expected a 1-D array of image paths, got shape {array.shape}")
    if array.dtype.kind == "S":
        return [bytes(v).decode() for v in array]
    if array.dtype.kind == "U" or array.dtype == object:
        names = array.tolist()
        for name in names:
            if not isinstance(name, str):
                raise VprkitError(f"{path}: expected image paths (strings), got {name!r:.80}")
        return names
    raise VprkitError(f"{path}: expected an array of image paths, got dtype {array.dtype}")


def _gsv_paths(names: list[str], image_root: Path, source: Path, check: str) -> list[Path]:
    # gsv-cities opens DATASET_ROOT + name: the names are relative to the image root.
    paths = [os.path.normpath(f"{image_root}/{name}") for name in names]
    if not paths:
        raise VprkitError(f"{source} lists no images")
    _check_duplicates(paths, image_root, source)
    _check_listed(paths, source, check)
    return [Path(p) for p in paths]


def read_gsv_val(
    folder: str | os.PathLike,
    name: str,
    *,
    image_root: str | os.PathLike | None = None,
    check_paths: str = "sample",
) -> PlaceDataset:
    """Read GSV-Cities validation lists ``<folder>/<name>_{dbImages,qImages,gt}.npy``.

    The listed paths are relative to ``image_root`` (gsv-cities' ``DATASET_ROOT``, the folder
    holding e.g. ``ref/`` and ``query/``), which defaults to ``folder``. MSLS-val's lists
    (``_qIdx.npy`` selecting queries, ``_pIdx.npy`` positives) are read too. The order of
    the lists is kept, since the ground truth refers to it.
    """
    folder = _absolute(folder)
    if not folder.is_dir():
        raise MissingInputError(f"Folder {folder} does not exist")
    root = folder if image_root is None else _absolute(image_root)
    if not root.is_dir():
        raise MissingInputError(f"Image root {root} does not exist")
    db_file, q_file = folder / f"{name}_dbImages.npy", folder / f"{name}_qImages.npy"
    for f in (db_file, q_file):
        if not f.is_file():
            raise MissingInputError(f"File {f} does not exist")
    db_names = _load_name_list(db_file)
    q_names = _load_name_list(q_file)
    gt_file = folder / f"{name}_gt.npy"
    qidx_file, pidx_file = folder / f"{name}_qIdx.npy", folder / f"{name}_pIdx.npy"
    if gt_file.is_file():
        table = load_npy_safe(gt_file)
    elif qidx_file.is_file() and pidx_file.is_file():
        q_index = _as_int_array(load_npy_safe(qidx_file), str(qidx_file))
        _check_index_range(q_index, len(q_names), f"{qidx_file}: query list")
        q_names = [q_names[i] for i in q_index]
        gt_file, table = pidx_file, load_npy_safe(pidx_file)
    else:
        raise MissingInputError(
            f"Ground truth {gt_file} does not exist (nor {qidx_file.name} + {pidx_file.name})"
        )
    database_paths = _gsv_paths(db_names, root, db_file, check_paths)
    query_paths = _gsv_paths(q_names, root, q_file, check_paths)
    positives = _positives_from_array(table, gt_file, len(query_paths), len(database_paths))
    return PlaceDataset(
        name=name,
        root=root,
        database_paths=database_paths,
        query_paths=query_paths,
        positives=positives,
        layout="gsv_val",
    )


def _numeric_order(paths: list[Path], folder: Path) -> list[Path]:
    numbered: dict[int, Path] = {}
    for p in paths:
        index = _image_number(p.name)
        if index is None:
            raise VprkitError(
                f"{p}: with a VPR-Bench ground truth, images must be named by number (N.jpg), "
                "since its indices refer to numeric order"
            )
        if index in numbered:
            raise VprkitError(f"{folder}: duplicate image number {index}: {numbered[index]}, {p}")
        numbered[index] = p
    return [numbered[i] for i in sorted(numbered)]


def read_folders(
    database_folder: str | os.PathLike,
    queries_folder: str | os.PathLike,
    ground_truth: str | os.PathLike | None = None,
    no_labels: bool = False,
    *,
    check_paths: str = "sample",
) -> PlaceDataset:
    """Read any database folder and queries folder (images searched recursively).

    Labels: UTM from ``@east@north@`` names by default; explicit positives from a
    VPR-Bench-style ``ground_truth`` .npy (images then ordered by number, as VPR-Bench
    does); none with ``no_labels``.
    """
    if ground_truth is not None and no_labels:
        raise VprkitError(
            "--ground_truth and --no_labels (ground_truth and no_labels=True) exclude each other"
        )
    db_folder, q_folder = _absolute(database_folder), _absolute(queries_folder)
    database_paths = read_images_paths(db_folder, check_paths)
    query_paths = read_images_paths(q_folder, check_paths)
    database_utm = query_utm = positives = None
    if ground_truth is not None:
        database_paths = _numeric_order(database_paths, db_folder)
        query_paths = _numeric_order(query_paths, q_folder)
        positives = load_vprbench_ground_truth(ground_truth, len(query_paths), len(database_paths))
    elif not no_labels:
        database_utm, query_utm = _utm_array(database_paths), _utm_array(query_paths)
    root = Path(os.path.commonpath([db_folder, q_folder]))
    return PlaceDataset(
        name=root.name or str(root),
        root=root,
        database_paths=database_paths,
        query_paths=query_paths,
        database_utm=database_utm,
        query_utm=query_utm,
        positives=positives,
        layout="folders",
    )


def load_dataset(
    path: str | os.PathLike,
    *,
    split: str = "test",
    name: str | None = None,
    image_root: str | os.PathLike | None = None,
    no_labels: bool = False,
    check_paths: str = "sample",
) -> PlaceDataset:
    """Read a dataset, detecting its layout on disk: :func:`vprkit.data.formats.open_dataset`.

    ``split`` is used by the VG layout; ``name`` and ``image_root`` by GSV-Cities lists
    (``name`` is needed when the folder holds several sets); ``no_labels`` by VG, VPR-Bench
    and plain folders. A non-default option the detected layout does not take is an error.
    """
    from vprkit.data.formats import open_dataset  # the registry imports this module

    return open_dataset(
        path,
        split=split,
        name=name,
        image_root=image_root,
        no_labels=no_labels,
        check_paths=check_paths,
    )
