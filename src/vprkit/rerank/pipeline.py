"""Second-stage re-ranking of the global top-K, for any model with local features.

`make_scorer(kind, ...)` builds the score function of a registered re-ranker
(`vprkit.rerank.list_rerankers()`: `mnn`, `r2former`, `ransac_homography`,
`ransac_fundamental` and any registered later); `rerank_order` sorts each query's first
`rerank_num` candidates by it. Candidates beyond `rerank_num` keep their global order after
the re-ranked ones; equal scores keep their global order too, unless `tie_order="official"`
asks for SelaVPR's official order (`vprkit.rerank.descending_order`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

from vprkit.rerank.base import ScoreFn, check_tie_order, descending_order, get_reranker
from vprkit.rerank.local_features import LocalFeatureCache


def rerank_order(
    predictions: np.ndarray,
    rerank_num: int,
    score_fn: Callable[[int, np.ndarray], np.ndarray],
    label: str = "re-ranking",
    tie_order: str = "stable",
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """For each query, the order of its first `rerank_num` predictions by descending
    `score_fn(query, candidates)`, ties as `tie_order` says (`descending_order`; default: the
    global order), and the scores in that order."""
    if rerank_num < 1:
        raise ValueError(f"rerank_num must be at least 1, got {rerank_num}")
    check_tie_order(tie_order)
    n = min(rerank_num, predictions.shape[1])
    orders = np.zeros((len(predictions), n), dtype=np.int64)
    all_scores = np.zeros((len(predictions), n), dtype=np.float64)
    queries = tqdm(
        range(len(predictions)), desc=label, unit="query", leave=False, disable=not progress
    )
    for q in queries:
        scores = np.asarray(score_fn(q, predictions[q, :n]))
        if scores.shape != (n,):
            raise ValueError(f"the scorer gave {scores.shape} scores for {n} candidates")
        # Ordered in the scorer's own dtype: the official order sorts counts as float32.
        orders[q] = descending_order(scores, tie_order)
        all_scores[q] = scores[orders[q]]
    return orders, all_scores


def apply_order(values: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """`values` (Q, K) with each row's first columns permuted by `orders` (Q, n <= K)."""
    out = values.copy()
    n = orders.shape[1]
    out[:, :n] = np.take_along_axis(values[:, :n], orders, axis=1)
    return out


def make_scorer(
    kind: str,
    model: torch.nn.Module,
    query_local: LocalFeatureCache,
    database_local: LocalFeatureCache,
    query_global: np.ndarray,
    database_global: np.ndarray,
    image_hw: tuple[int, int],
    memory_budget_bytes: int | None = None,
    precision: str = "fp32",
    device: str = "cpu",
) -> ScoreFn:
    """A `score_fn(query_index, candidate_indices)` for `rerank_order`: the scorer of the
    registered re-ranker `kind` (`get_reranker(kind).scorer(...)`)."""
    return get_reranker(kind).scorer(
        model,
        query_local,
        database_local,
        query_global,
        database_global,
        image_hw,
        device=device,
        precision=precision,
        memory_budget_bytes=memory_budget_bytes,
    )
