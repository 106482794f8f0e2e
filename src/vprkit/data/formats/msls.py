"""Mapillary SLS root: ``<root>/train_val/<city>/{query,database}/`` (+ ``test/<city>/``).

Evaluation sets come from :func:`vprkit.data.msls.read_msls` (the official val split or the
unlabelled test cities), training data from :func:`vprkit.data.msls.read_msls_train`, and the
challenge's submission files (``msls_submission.csv``, read by mapillary_sls's official
``evaluate.py``) from :func:`vprkit.data.msls.write_submission`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vprkit.data.datasets import PlaceDataset
from vprkit.data.formats import DatasetFormat, register_format
from vprkit.data.msls import (
    MSLSDataset,
    is_msls_root,
    read_msls,
    read_msls_train,
    write_submission,
)
from vprkit.errors import VprkitError

if TYPE_CHECKING:
    from vprkit.data.triplets import TripletData

__all__ = ["MSLS", "is_msls_root", "read_msls", "read_msls_train", "write_submission"]

# Training-data messages go where load_triplet_data always logged them.
training_log = logging.getLogger("vprkit.data.triplets")


def _has_test_cities(root: Path) -> bool:
    """Whether ``root/test/`` holds a city folder ``<city>/{query,database}/``."""
    test = root / "test"
    if not test.is_dir():
        return False
    return any((c / "query").is_dir() and (c / "database").is_dir() for c in test.iterdir())


@register_format
class MSLS(DatasetFormat):
    name = "msls"
    description = (
        "a Mapillary SLS root <root>/train_val/<city>/{query,database}/ "
        "(test cities in <root>/test/<city>/)"
    )

    def detect(self, path: Path) -> bool:
        return is_msls_root(path) or _has_test_cities(path)

    def read(
        self,
        path: Path,
        *,
        msls_split: str = "val",
        msls_cities: str | Sequence[str] | None = None,
        msls_subtask: str = "all",
        msls_val_split: str = "official",
        positive_dist_threshold: float = 25.0,
    ) -> PlaceDataset:
        return read_msls(
            path,
            split=msls_split,
            cities=msls_cities,
            subtask=msls_subtask,
            val_split=msls_val_split,
            positive_radius=float(positive_dist_threshold),
        )

    def read_training(
        self,
        path: Path,
        *,
        split: str = "train",
        msls_cities: str | Sequence[str] | None = None,
        train_positives_dist_threshold: float = 10.0,
        val_positive_dist_threshold: float = 25.0,
    ) -> TripletData:
        from vprkit.data.triplets import TripletData  # noqa: F811 (imports torch: training only)

        if split != "train":
            raise VprkitError(
                f"{path} is a Mapillary SLS root: triplet training reads its train cities, "
                f"so split must be 'train', got {split!r} (validate with read_msls(root, 'val') "
                "or `vprkit eval`)"
            )
        train_thr = float(train_positives_dist_threshold)
        val_thr = float(val_positive_dist_threshold)
        index = read_msls_train(
            path,
            cities=msls_cities,
            positive_radius=train_thr,
            non_negative_radius=val_thr,
            # Unused here, but read_msls_train needs it >= the non-negative radius.
            hard_non_negative_radius=max(50.0, val_thr),
        )
        data = TripletData.from_msls(index)
        training_log.info(
            "training data: Mapillary SLS layout at %s, cities %s: %d queries (%d dropped "
            "without a positive within %g m), %d database images",
            path,
            ", ".join(index.cities),
            data.num_queries,
            data.num_dropped_queries,
            train_thr,
            data.num_database,
        )
        return data

    def write_results(
        self,
        dataset: PlaceDataset,
        run_dir: Path,
        predictions: Any,
        global_predictions: Any = None,
    ) -> list[Path]:
        """``msls_submission.csv`` and, given the predictions before re-ranking,
        ``msls_submission_global.csv``; nothing for MSLS training lists (no keys)."""
        if not isinstance(dataset, MSLSDataset):
            return []
        keys = (dataset.query_keys, dataset.database_keys)
        written = [write_submission(run_dir / "msls_submission.csv", *keys, predictions)]
        if global_predictions is not None:
            path = run_dir / "msls_submission_global.csv"
            written.append(write_submission(path, *keys, global_predictions))
        return written
