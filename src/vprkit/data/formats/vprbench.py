"""VPR-Bench: ``<dataset>/{query,ref}/`` with numbered ``N.jpg`` and ``ground_truth_new.npy``.

The reader is :func:`vprkit.data.datasets.read_vprbench` (images in numeric order, as
VPR-Bench indexes them; the ground truth through the restricted unpickler).
"""

from __future__ import annotations

import os
from pathlib import Path

from vprkit.data.datasets import PlaceDataset, read_vprbench
from vprkit.data.formats import DatasetFormat, register_format

__all__ = ["VPRBench", "read_vprbench"]


@register_format
class VPRBench(DatasetFormat):
    name = "vprbench"
    description = (
        "a VPR-Bench set <dataset>/{query,ref}/ with numbered N.jpg and ground_truth_new.npy"
    )

    def detect(self, path: Path) -> bool:
        return (path / "query").is_dir() and (path / "ref").is_dir()

    def read(
        self,
        path: Path,
        *,
        no_labels: bool = False,
        ground_truth: str | os.PathLike | None = None,
        check_paths: str = "sample",
    ) -> PlaceDataset:
        # check_paths is met whatever its value: the images are listed from disk, not a file.
        del check_paths
        return read_vprbench(path, ground_truth, no_labels=no_labels)
