"""The registry of dataset layouts: one module per layout, one :func:`open_dataset` for all.

A format is a :class:`DatasetFormat` (subclass it, or give any object the same attributes):
a ``name``, a one-line ``description``, ``detect(path) -> bool`` and
``read(path, **options) -> PlaceDataset``; optionally ``read_training(path, **options)``
(triplet training data) and ``write_results(dataset, run_dir, predictions,
global_predictions)`` (files of its own, such as MSLS's challenge submission). The keyword
arguments of ``read`` / ``read_training`` are the options the format honours.

Registering a new layout is one file and no edit elsewhere::

    from vprkit.data.formats import DatasetFormat, register_format

    @register_format
    class MyLayout(DatasetFormat):
        name = "my_layout"
        description = "<folder>/places.csv listing path,east,north,side"

        def detect(self, path):
            return (path / "places.csv").is_file()

        def read(self, path, *, no_labels=False):
            ...  # return a PlaceDataset

Built-in formats: ``msls``, ``vg``, ``vprbench``, ``gsv_val``, ``folders``. Every format is
asked whether it recognises a folder; exactly one must, pass ``format=`` otherwise.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vprkit.data.datasets import PlaceDataset
from vprkit.errors import MissingInputError, VprkitError

if TYPE_CHECKING:  # triplets imports torch; only training needs it
    from vprkit.data.triplets import TripletData

__all__ = [
    "DatasetFormat",
    "OPTION_DEFAULTS",
    "TRAINING_OPTION_DEFAULTS",
    "detect_format",
    "get_format",
    "list_formats",
    "open_dataset",
    "open_training_data",
    "register_format",
    "write_results",
]

# Options callers such as `vprkit eval` pass whatever the layout: a format that does not take
# one ignores it at its default value and refuses any other value (no silent ignoring).
OPTION_DEFAULTS: dict[str, Any] = {
    "split": "test",
    "no_labels": False,
    "msls_split": "val",
    "msls_cities": None,
    "msls_subtask": "all",
    "msls_val_split": "official",
    "name": None,
    "image_root": None,
    "check_paths": "sample",
    "ground_truth": None,
    "database_folder": "database",
    "queries_folder": "queries",
    "positive_dist_threshold": 25.0,
}
# Options a format takes when it applies them while reading, and that evaluation applies
# itself otherwise: the radius of positives is applied to UTM labels after reading (VG), but
# an MSLS root drops the queries without a positive within it while reading, as the official
# evaluation does.
APPLIED_AFTER_READING: frozenset[str] = frozenset({"positive_dist_threshold"})
TRAINING_OPTION_DEFAULTS: dict[str, Any] = {
    "split": "train",
    "train_positives_dist_threshold": 10.0,
    "val_positive_dist_threshold": 25.0,
    "msls_cities": None,
}


class DatasetFormat:
    """Base class of a dataset layout; see the module docstring."""

    name: str = ""
    description: str = ""
    # Optional: set to a method by formats that have training data / result files.
    read_training: Callable[..., TripletData] | None = None
    write_results: Callable[..., list[Path]] | None = None

    def detect(self, path: Path) -> bool:
        raise NotImplementedError

    def read(self, path: Path, **options: Any) -> PlaceDataset:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<dataset format {self.name!r}: {self.description}>"


_FORMATS: dict[str, Any] = {}
_builtins_loaded = False


_BUILTIN_MODULES = ("msls", "vg", "vprbench", "gsv_val", "folders")  # detection order


def _ensure_builtin_formats() -> None:
    # Importing the modules runs their register_format calls. The flag is set first because
    # those calls come back here.
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    try:
        for module in _BUILTIN_MODULES:
            importlib.import_module(f"vprkit.data.formats.{module}")
    except BaseException:
        _builtins_loaded = False
        raise


def register_format(fmt: Any) -> Any:
    """Register a format (a class, instantiated here, or an instance); usable as a decorator.

    Returns its argument. A name already registered is an error.
    """
    _ensure_builtin_formats()
    instance = fmt() if isinstance(fmt, type) else fmt
    name = getattr(instance, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{fmt!r}: a dataset format needs a non-empty string name")
    for attribute in ("detect", "read"):
        if not callable(getattr(instance, attribute, None)):
            raise ValueError(f"dataset format {name!r} has no {attribute}() method")
    if not isinstance(getattr(instance, "description", None), str):
        raise ValueError(f"dataset format {name!r} needs a one-line description string")
    if name in _FORMATS:
        raise ValueError(f"dataset format {name!r} is already registered: {_FORMATS[name]!r}")
    _FORMATS[name] = instance
    return fmt


def _ordered() -> list[Any]:
    """The formats, built-in ones first in their fixed order, then in registration order."""
    _ensure_builtin_formats()
    rank = {name: i for i, name in enumerate(_BUILTIN_MODULES)}  # built-ins: module = name
    return sorted(_FORMATS.values(), key=lambda f: rank.get(f.name, len(rank)))


def list_formats() -> list[str]:
    """Registered format names: the built-in ones, then those added, in registration order."""
    return [f.name for f in _ordered()]


def get_format(name: str) -> Any:
    """The registered format called ``name``."""
    _ensure_builtin_formats()
    if name not in _FORMATS:
        raise VprkitError(f"unknown dataset format {name!r}; known: {', '.join(list_formats())}")
    return _FORMATS[name]


def _absolute_folder(path: str | os.PathLike) -> Path:
    # abspath, not resolve(): keep the user's symlinked dataset folders in the paths.
    folder = Path(os.path.abspath(path))
    if not folder.is_dir():
        raise MissingInputError(f"Folder {folder} does not exist")
    return folder


def detect_format(path: str | os.PathLike, *, training: bool = False) -> Any:
    """The one format that recognises ``path`` (with ``training``: among those with training
    data). No match and several matches are errors that say what to do."""
    folder = _absolute_folder(path)
    _ensure_builtin_formats()
    candidates = [f for f in _FORMATS.values() if not training or getattr(f, "read_training", None)]
    found = [f for f in candidates if f.detect(folder)]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        names = ", ".join(f.name for f in found)
        raise VprkitError(
            f"{folder}: matches several layouts ({names}); pass format= the one you mean"
        )
    if training:
        raise MissingInputError(
            f"{folder}: no training data found: neither "
            + " nor ".join(f.description for f in candidates)
        )
    known = "\n".join(f"  {f.name}: {f.description}" for f in candidates)
    raise VprkitError(
        f"{folder}: no known dataset layout found. Known layouts:\n{known}\n"
        "For other folders give --database_folder and --queries_folder "
        "(read_folders(database_folder, queries_folder) in Python)."
    )


def _accepted(method: Callable[..., Any]) -> tuple[set[str], bool]:
    """The keyword options a read method takes, and whether it takes any (``**options``)."""
    parameters = list(inspect.signature(method).parameters.values())[1:]  # after path
    names = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind == p.VAR_KEYWORD for p in parameters)


def _options_for(
    fmt: Any, method: Callable[..., Any], options: dict[str, Any], defaults: dict[str, Any]
) -> dict[str, Any]:
    """The options to pass on; a non-default one the format does not take is refused."""
    accepted, takes_any = _accepted(method)
    passed = {}
    for key, value in options.items():
        if takes_any or key in accepted:
            passed[key] = value
        elif key in defaults and value == defaults[key]:
            continue  # e.g. `vprkit eval`'s default split="test" on an MSLS root
        elif key in APPLIED_AFTER_READING:
            continue
        else:
            takes = ", ".join(sorted(accepted)) or "none"
            raise VprkitError(
                f"{key} was given ({key}={value!r}) but the {fmt.name!r} format does not take "
                f"it (its options: {takes})"
            )
    return passed


def open_dataset(
    path: str | os.PathLike, format: str | None = None, **options: Any
) -> PlaceDataset:
    """Read the evaluation set at ``path``, detecting its layout unless ``format`` names one.

    Options (each format takes some; any other given a non-default value is a ValueError):

    - ``split``: VG split, ``"train"``, ``"val"`` or ``"test"`` (default).
    - ``no_labels``: read images without labels (VG, VPR-Bench, plain folders).
    - ``msls_split``: MSLS ``"val"`` (default) or ``"test"`` (unlabelled challenge set).
    - ``msls_cities``: MSLS cities (a list, or None for the split's official ones).
    - ``msls_subtask``: MSLS subtask, ``"all"`` (default), ``"s2w"``, ``"n2d"``, ...
    - ``msls_val_split``: ``"official"`` (default, the 740-query set) or ``"downloader"``
      (VPR-datasets-downloader's larger split).
    - ``name``, ``image_root``: GSV-Cities validation lists: which set of a folder holding
      several, and the folder their paths are relative to (default: ``path``).
    - ``check_paths``: ``"sample"`` (default) or ``"all"``: how many listed images to stat.
    - ``ground_truth``: a VPR-Bench-style ``.npy`` of positives (VPR-Bench, plain folders).
    - ``database_folder``, ``queries_folder``: subfolder names (VG, plain folders), e.g.
      SVOX's ``queries_night``.
    - ``positive_dist_threshold``: MSLS: the radius of positives in metres (25), which also
      decides which queries the official split drops. Other formats leave it to evaluation,
      which applies it to UTM labels.

    The dataset's ``layout`` is the name of the format that read it.
    """
    folder = _absolute_folder(path)
    fmt = get_format(format) if format is not None else detect_format(folder)
    dataset = fmt.read(folder, **_options_for(fmt, fmt.read, options, OPTION_DEFAULTS))
    dataset.layout = fmt.name  # write_results finds the format by it
    return dataset


def open_training_data(
    path: str | os.PathLike, format: str | None = None, **options: Any
) -> TripletData:
    """The triplet training data at ``path`` (:class:`vprkit.data.triplets.TripletData`).

    Options: ``split`` (VG split, default ``"train"``), ``train_positives_dist_threshold``
    (hard-positive radius, 10 m), ``val_positive_dist_threshold`` (soft-positive radius, 25 m)
    and ``msls_cities`` (MSLS train cities, default the 22 official ones).
    """
    folder = _absolute_folder(path)
    fmt = get_format(format) if format is not None else detect_format(folder, training=True)
    if not getattr(fmt, "read_training", None):
        raise VprkitError(f"{folder}: the {fmt.name!r} format has no training data")
    passed = _options_for(fmt, fmt.read_training, options, TRAINING_OPTION_DEFAULTS)
    return fmt.read_training(folder, **passed)


def write_results(
    dataset: PlaceDataset,
    run_dir: str | os.PathLike,
    predictions: Any,
    global_predictions: Any = None,
) -> list[Path]:
    """Let the dataset's format write its own result files (e.g. MSLS's submission CSVs).

    ``predictions`` are the final ranked database indices per query, ``global_predictions``
    those before re-ranking (or None). Returns the files written; none for most formats.
    """
    _ensure_builtin_formats()
    fmt = _FORMATS.get(dataset.layout)
    writer = getattr(fmt, "write_results", None)
    if writer is None:
        return []
    return writer(dataset, Path(run_dir), predictions, global_predictions)
