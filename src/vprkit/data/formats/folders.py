"""Plain folders: ``<folder>/database/`` and ``<folder>/queries/`` of any images.

For sets without @UTM@ names (e.g. unlabelled ones, read with ``no_labels=True``, or labelled
by a VPR-Bench-style ``ground_truth`` .npy). Folders anywhere on disk are read with
:func:`read_folders` (``vprkit eval --database_folder ... --queries_folder ...``).
"""

from __future__ import annotations

import os
from pathlib import Path

from vprkit.data.datasets import PlaceDataset, read_folders
from vprkit.data.formats import DatasetFormat, register_format
from vprkit.data.formats.vg import has_utm_names

__all__ = ["Folders", "read_folders"]


@register_format
class Folders(DatasetFormat):
    name = "folders"
    description = (
        "plain folders <folder>/{database,queries}/ of images without @UTM@ names "
        "(read with no_labels=True or a ground_truth .npy)"
    )

    def detect(self, path: Path) -> bool:
        # With @UTM@ names the same folders are a VG split folder (format "vg").
        plain = (path / "database").is_dir() and (path / "queries").is_dir()
        return plain and not has_utm_names(path)

    def read(
        self,
        path: Path,
        *,
        no_labels: bool = False,
        ground_truth: str | os.PathLike | None = None,
        check_paths: str = "sample",
        database_folder: str = "database",
        queries_folder: str = "queries",
    ) -> PlaceDataset:
        # An absolute database_folder / queries_folder replaces path / ... (pathlib's join).
        return read_folders(
            path / database_folder,
            path / queries_folder,
            ground_truth,
            no_labels=no_labels,
            check_paths=check_paths,
        )
