"""gmberton's VG layout: ``<dataset>/images/<split>/{database,queries}/@east@north@...@.jpg``.

The layout of deep-visual-geo-localization-benchmark, VPR-methods-evaluation and
VPR-datasets-downloader; the reader is :func:`vprkit.data.datasets.read_vg_dataset`, the
name parser :func:`vprkit.data.datasets.parse_utm`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from vprkit.data.datasets import (
    PlaceDataset,
    _find_vg_split,
    _is_image_name,
    parse_utm,
    read_vg_dataset,
)
from vprkit.data.formats import DatasetFormat, register_format
from vprkit.errors import MissingInputError

if TYPE_CHECKING:
    from vprkit.data.triplets import TripletData

__all__ = ["VG", "has_utm_names", "parse_utm", "read_vg_dataset"]

# Training-data messages go where load_triplet_data always logged them.
training_log = logging.getLogger("vprkit.data.triplets")


def _is_split_folder(folder: Path) -> bool:
    return (folder / "database").is_dir() and (folder / "queries").is_dir()


def _first_image_name(folder: Path) -> str | None:
    """The name of the first image under ``folder`` in sorted walk order, or None."""
    for _, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if _is_image_name(name):
                return name
    return None


def has_utm_names(split_folder: Path) -> bool:
    """Whether the database images carry ``@east@north@`` names (judged by one of them)."""
    name = _first_image_name(split_folder / "database")
    if name is None:
        return False
    try:
        parse_utm(name)
    except ValueError:
        return False
    return True


def _splits(folder: Path) -> list[str]:
    """The splits a VG dataset (or its images/ folder) holds, e.g. ["test", "train", "val"]."""
    found = []
    for parent in (folder, folder / "images"):
        if parent.is_dir():
            with os.scandir(parent) as entries:
                found += [e.name for e in entries if e.is_dir() and _is_split_folder(Path(e.path))]
    return sorted(set(found))


@register_format
class VG(DatasetFormat):
    name = "vg"
    description = (
        "a VG dataset <dataset>/images/<split>/{database,queries}/ with "
        "@utm_east@utm_north@...@.jpg names (or the images/ or split folder itself)"
    )

    def detect(self, path: Path) -> bool:
        if _is_split_folder(path):
            # database/ + queries/ without @UTM@ names are plain folders (format "folders").
            return has_utm_names(path)
        return bool(_splits(path))

    def _check_split(self, path: Path, split: str, database: str, queries: str) -> None:
        if _find_vg_split(path, split, database, queries) is None:
            found = ", ".join(_splits(path)) or "none"
            raise MissingInputError(
                f"{path}: no split {split!r}: expected <dataset>/images/{split}/"
                f"{{{database},{queries}}}/ (splits found: {found})"
            )

    def read(
        self,
        path: Path,
        *,
        split: str = "test",
        no_labels: bool = False,
        check_paths: str = "sample",
        database_folder: str = "database",
        queries_folder: str = "queries",
    ) -> PlaceDataset:
        self._check_split(path, split, database_folder, queries_folder)
        return read_vg_dataset(
            path,
            split,
            database_folder=database_folder,
            queries_folder=queries_folder,
            no_labels=no_labels,
            check_paths=check_paths,
        )

    def read_training(
        self,
        path: Path,
        *,
        split: str = "train",
        train_positives_dist_threshold: float = 10.0,
        val_positive_dist_threshold: float = 25.0,
    ) -> TripletData:
        from vprkit.data.triplets import TripletData  # noqa: F811 (imports torch: training only)

        self._check_split(path, split, "database", "queries")
        data = TripletData.from_folder(
            path,
            split,
            train_positives_dist_threshold=train_positives_dist_threshold,
            val_positive_dist_threshold=val_positive_dist_threshold,
        )
        training_log.info(
            "training data: VG layout at %s (split %s): %d queries (%d dropped without a "
            "database image within %g m), %d database images",
            data.dataset.root,
            split,
            data.num_queries,
            data.num_dropped_queries,
            data.train_positives_dist_threshold,
            data.num_database,
        )
        return data
