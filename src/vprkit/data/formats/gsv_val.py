"""GSV-Cities validation lists: ``<folder>/<name>_{dbImages,qImages,gt}.npy``.

As gsv-cities' validation datasets read them (paths relative to its ``DATASET_ROOT``); MSLS-val's
``_qIdx.npy`` / ``_pIdx.npy`` lists too. The reader is :func:`vprkit.data.datasets.read_gsv_val`.
"""

from __future__ import annotations

import os
from pathlib import Path

from vprkit.data.datasets import PlaceDataset, read_gsv_val
from vprkit.data.formats import DatasetFormat, register_format
from vprkit.errors import MissingInputError, VprkitError

__all__ = ["GSVVal", "gsv_list_names", "read_gsv_val"]

_SUFFIX = "_dbImages.npy"


def gsv_list_names(folder: Path) -> list[str]:
    """The set names ``<name>`` of the ``<name>_dbImages.npy`` lists in ``folder``, sorted."""
    return sorted(p.name[: -len(_SUFFIX)] for p in folder.glob(f"*{_SUFFIX}") if p.is_file())


@register_format
class GSVVal(DatasetFormat):
    name = "gsv_val"
    description = (
        "GSV-Cities validation lists <folder>/<name>_dbImages.npy, <name>_qImages.npy, "
        "<name>_gt.npy"
    )

    def detect(self, path: Path) -> bool:
        return bool(gsv_list_names(path))

    def read(
        self,
        path: Path,
        *,
        name: str | None = None,
        image_root: str | os.PathLike | None = None,
        check_paths: str = "sample",
    ) -> PlaceDataset:
        names = gsv_list_names(path)
        if name is None:
            if len(names) > 1:
                raise VprkitError(
                    f"{path} holds several GSV-Cities lists ({', '.join(names)}); pass name="
                )
            if not names:
                raise MissingInputError(f"{path}: no <name>{_SUFFIX} list")
            name = names[0]
        elif name not in names:
            raise MissingInputError(
                f"{path}: no {name}{_SUFFIX} (found: {', '.join(names) or 'none'})"
            )
        return read_gsv_val(path, name, image_root=image_root, check_paths=check_paths)
