"""Place-recognition metrics: Recall@N (VG benchmark) and top-1 precision-recall (VPR-Bench)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from sklearn import metrics as skm

__all__ = [
    "auc_pr",
    "first_correct_rank",
    "format_recalls",
    "per_query_correct",
    "precision_recall_curve",
    "recall_at_100_precision",
    "recall_at_n",
]


def first_correct_rank(predictions: np.ndarray, positives: Sequence[np.ndarray]) -> np.ndarray:
    """1-based rank of each query's first correct prediction, 0 when none is correct (int64,
    (num_queries,)). `predictions` is (num_queries, K), or (num_queries,) for one each."""
    preds = np.asarray(predictions)
    if preds.ndim == 1:
        preds = preds[:, None]
    if preds.ndim != 2:
        raise ValueError(f"predictions must be (num_queries, K), got shape {preds.shape}")
    if len(preds) != len(positives):
        raise ValueError(
            f"predictions cover {len(preds)} queries but positives cover {len(positives)}"
        )
    ranks = np.zeros(len(preds), dtype=np.int64)
    for qi, (row, pos) in enumerate(zip(preds, positives, strict=True)):
        hit = np.flatnonzero(np.isin(row, np.asarray(pos)))
        if len(hit):
            ranks[qi] = hit[0] + 1
    return ranks


def _correct_within(ranks: np.ndarray, n: int) -> np.ndarray:
    """Whether each query's first correct prediction is among its first `n`."""
    return (ranks > 0) & (ranks <= n)


def per_query_correct(
    predictions: np.ndarray, positives: Sequence[np.ndarray], n: int = 1
) -> np.ndarray:
    """Boolean (num_queries,): whether any of the first ``n`` predictions is a positive."""
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    return _correct_within(first_correct_rank(predictions, positives), n)


def recall_at_n(
    predictions: np.ndarray,
    positives: Sequence[np.ndarray],
    ns: Iterable[int] = (1, 5, 10, 20, 100),
) -> dict[int, float]:
    """Recall@N in percent for each N in ``ns``, the VG-benchmark convention.

    A query counts for R@N when any of its first N predictions is a positive; queries without
    positives stay in the denominator and always count as failures; an N larger than the
    number of predictions per query uses all of them.
    """
    # Same rule as gmberton/deep-visual-geo-localization-benchmark test.py (test(), "For each
    # query, check if the predictions are correct") and gmberton/VPR-methods-evaluation
    # main.py: np.in1d(pred[:n], positives_per_query[q]) counted cumulatively over the recall
    # values, then divided by the number of queries (all of them) and multiplied by 100.
    ns = [int(n) for n in ns]
    if not ns or any(n < 1 for n in ns):
        raise ValueError(f"ns must be positive integers, got {ns}")
    if len(positives) == 0:
        raise ValueError("recall is undefined for zero queries")
    ranks = first_correct_rank(predictions, positives)
    return {n: float(np.count_nonzero(_correct_within(ranks, n))) / len(ranks) * 100.0 for n in ns}


def format_recalls(recalls: dict[int, float]) -> str:
    """``"R@1: 94.9, R@5: 97.3, ..."`` with one decimal, as the VG benchmark logs them."""
    return ", ".join(f"R@{n}: {value:.1f}" for n, value in recalls.items())


def _top1_matches_and_scores(
    predictions: np.ndarray, positives: Sequence[np.ndarray], scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    preds = np.asarray(predictions)
    sc = np.asarray(scores, dtype=np.float64)
    if preds.ndim == 2:
        preds = preds[:, 0]
    if sc.ndim == 2:
        sc = sc[:, 0]
    if preds.ndim != 1 or sc.shape != preds.shape:
        raise ValueError(
            "predictions and scores must be (num_queries,) or (num_queries, K) with matching "
            f"num_queries, got shapes {np.shape(predictions)} and {np.shape(scores)}"
        )
    if len(preds) == 0:
        raise ValueError("precision-recall is undefined for zero queries")
    if not np.isfinite(sc).all():
        raise ValueError("scores must be finite (higher = more confident)")
    return per_query_correct(preds, positives, n=1), sc


def precision_recall_curve(
    predictions: np.ndarray, positives: Sequence[np.ndarray], scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision-recall of top-1 matches as the acceptance threshold on ``scores`` is swept.

    ``predictions`` are each query's retrievals ((Q,) or (Q, K); only the first column is
    used) and ``scores`` their confidences, higher = more confident (e.g. negative distance).
    Follows VPR-Bench (performance_comparison.py: compute_matches, then
    ``sklearn.metrics.precision_recall_curve(matches, scores)``): a query's top-1 is a match
    when it is one of the query's positives. At threshold t the matches with score >= t are
    accepted (tied scores are accepted together); precision = correct accepted / accepted,
    recall = correct accepted / all correct top-1 matches. Queries without positives are kept:
    their top-1 can never be correct, so they count as false positives whenever accepted, and
    they add nothing to the recall denominator.

    Returns ``(precision, recall, thresholds)`` as sklearn does: by increasing threshold, with a
    final point (precision 1, recall 0) that has no threshold. When no top-1 match is correct
    the recall is all zeros (sklearn would give NaN).
    """
    matches, sc = _top1_matches_and_scores(predictions, positives, scores)
    if not matches.any():
        # Same points sklearn would give, minus the 0/0 recall.
        thresholds = np.unique(sc)
        precision = np.append(np.zeros(len(thresholds)), 1.0)
        return precision, np.zeros(len(thresholds) + 1), thresholds
    return skm.precision_recall_curve(matches.astype(np.int64), sc)


def auc_pr(predictions: np.ndarray, positives: Sequence[np.ndarray], scores: np.ndarray) -> float:
    """Area under the top-1 precision-recall curve in [0, 1] (trapezoidal, as VPR-Bench).

    Computed as VPR-Bench's ``compute_auc_PR``: ``sklearn.metrics.auc(recall, precision)`` of
    ``precision_recall_curve``; see there for how queries without positives count.
    """
    precision, recall, _ = precision_recall_curve(predictions, positives, scores)
    return float(skm.auc(recall, precision))


def recall_at_100_precision(
    predictions: np.ndarray, positives: Sequence[np.ndarray], scores: np.ndarray
) -> float:
    """Largest recall (in [0, 1]) reached by a threshold with no false positive accepted.

    As VPR-Bench's ``compute_extendedprecision`` (its "recall at precision one"): 0 when the
    most confident top-1 match is already wrong. Queries as in ``precision_recall_curve``.
    """
    precision, recall, _ = precision_recall_curve(predictions, positives, scores)
    return float(recall[precision == 1.0].max())
