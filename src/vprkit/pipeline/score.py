"""Stage 4, score: predictions against the ground truth, the way the field reports them.

Recall@N as the VG benchmark computes it (queries without a positive count as misses), and
VPR-Bench's top-1 precision-recall: AUC-PR and recall at 100% precision.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vprkit.data.datasets import PlaceDataset
from vprkit.errors import VprkitError
from vprkit.pipeline.predictions import Predictions
from vprkit.retrieval.ground_truth import positives_within_radius, queries_without_positives
from vprkit.retrieval.metrics import auc_pr, recall_at_100_precision, recall_at_n


def dataset_positives(dataset: PlaceDataset, radius: float) -> list[np.ndarray] | None:
    """Each query's positives: the dataset's own lists, else the database images within
    `radius` metres; None for an unlabelled set."""
    read_at = getattr(dataset, "positive_radius", None)  # MSLS: positives made while reading
    if read_at is not None and read_at != radius:
        raise VprkitError(
            f"{dataset.name}'s positives were computed within {read_at:g} m, not {radius:g} m: "
            f"read it with positive_dist_threshold={radius:g}"
        )
    if dataset.positives is not None:
        return dataset.positives
    if dataset.query_utm is not None and dataset.database_utm is not None:
        return positives_within_radius(dataset.database_utm, dataset.query_utm, radius)
    return None


def score(
    predictions: Predictions,
    positives: Sequence[np.ndarray],
    recall_values: Sequence[int] = (1, 5, 10, 20, 100),
) -> dict:
    """`recalls` ({N: percent}), `auc_pr`, `recall_at_100_precision` (both in [0, 1], on the
    top-1 scores) and `queries_without_positives`."""
    if len(positives) != len(predictions.indices):
        raise VprkitError(
            f"the ground truth has {len(positives)} queries, the predictions "
            f"{len(predictions.indices)}: they are not of the same dataset"
        )
    scores = predictions.top1_scores
    return {
        "recalls": recall_at_n(predictions.indices, positives, recall_values),
        "queries_without_positives": int(len(queries_without_positives(positives))),
        "auc_pr": auc_pr(predictions.indices, positives, scores),
        "recall_at_100_precision": recall_at_100_precision(predictions.indices, positives, scores),
    }
