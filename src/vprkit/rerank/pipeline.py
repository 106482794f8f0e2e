"""Second-stage re-ranking of the global top-K, for any model with local features.

Scorers (higher = more likely the same place):
- `mnn`: SelaVPR's count of mutual nearest-neighbour pairs between dense local maps;
- `r2former`: R2Former's re-ranking transformer, its "same place" probability;
- `ransac_homography` / `ransac_fundamental`: inliers of a RANSAC fit on mutual-NN matches
  (the geometric-verification baseline), on dense maps or R2Former tokens alike.
Candidates beyond `rerank_num` keep their global order after the re-ranked ones; equal
scores keep their global order too.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

from vprkit.rerank.mnn import LocalFeatureCache, mutual_nn_count

RERANKERS = ("mnn", "r2former", "ransac_homography", "ransac_fundamental")


def _stable_descending(scores: np.ndarray) -> np.ndarray:
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


def rerank_order(
    predictions: np.ndarray,
    rerank_num: int,
    score_fn: Callable[[int, np.ndarray], np.ndarray],
    label: str = "re-ranking",
) -> tuple[np.ndarray, np.ndarray]:
    """For each query, the order of its first `rerank_num` predictions by descending
    `score_fn(query, candidates)` (ties keep the global order), and the scores in that order."""
    if rerank_num < 1:
        raise ValueError(f"rerank_num must be at least 1, got {rerank_num}")
    n = min(rerank_num, predictions.shape[1])
    orders = np.zeros((len(predictions), n), dtype=np.int64)
    all_scores = np.zeros((len(predictions), n), dtype=np.float64)
    for q in tqdm(range(len(predictions)), desc=label, unit="query", leave=False):
        scores = np.asarray(score_fn(q, predictions[q, :n]), dtype=np.float64)
        if scores.shape != (n,):
            raise ValueError(f"the scorer gave {scores.shape} scores for {n} candidates")
        orders[q] = _stable_descending(scores)
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
) -> Callable[[int, np.ndarray], np.ndarray]:
    """A `score_fn(query_index, candidate_indices)` for `rerank_predictions`."""
    if kind == "mnn":

        def mnn(q: int, candidates: np.ndarray) -> np.ndarray:
            counts = mutual_nn_count(
                query_local[q].to(device),
                database_local[candidates].to(device),
                memory_budget_bytes=memory_budget_bytes,
                precision=precision,
            )
            return counts.cpu().numpy()

        return mnn
    if kind == "r2former":
        scores_of = getattr(model, "rerank_scores", None)
        if scores_of is None:
            raise ValueError(
                f"reranker r2former needs a model with rerank_scores, not {type(model).__name__}"
            )

        @torch.no_grad()
        def r2former(q: int, candidates: np.ndarray) -> np.ndarray:
            probs = scores_of(
                torch.from_numpy(query_global[q : q + 1]).to(device),
                query_local[[q]].to(device),
                torch.from_numpy(database_global[candidates][None]).to(device),
                database_local[candidates][None].to(device),
            )
            return probs[0].float().cpu().numpy()

        return r2former
    if kind in ("ransac_homography", "ransac_fundamental"):
        from vprkit.rerank.ransac import dense_keypoints, r2former_keypoints, ransac_scores

        to_keypoints = (
            dense_keypoints if len(query_local.feature_shape) == 3 else r2former_keypoints
        )

        def ransac(q: int, candidates: np.ndarray) -> np.ndarray:
            query = to_keypoints(query_local[q].numpy(), image_hw)
            cands = [to_keypoints(database_local[int(c)].numpy(), image_hw) for c in candidates]
            return ransac_scores(query, cands, model=kind.split("_")[1])

        return ransac
    raise ValueError(f"unknown reranker {kind!r}; known: {', '.join(RERANKERS)}")
