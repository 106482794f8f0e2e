"""A geometric-verification baseline re-ranker: the inlier count of a RANSAC homography or
fundamental-matrix fit on the mutual-nearest-neighbour matches of local features.

This is the "two-stage with RANSAC" baseline that SelaVPR and R2Former compare against; it
takes any model's local features with image coordinates: SelaVPR's dense maps
(`dense_keypoints`) and R2Former's selected tokens (`r2former_keypoints`) alike.
OpenCV does the estimation (`pip install "vprkit[ransac]"`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vprkit.rerank.base import Reranker, RerankInputs, ScoreFn, register_reranker
from vprkit.rerank.local_features import LOCAL_DESC, feature_kind

MIN_POINTS = {"homography": 4, "fundamental": 8}


@dataclass(frozen=True)
class Keypoints:
    """Local features (N, C) and their image coordinates (N, 2) as (x, y) in pixels."""

    features: np.ndarray
    xy: np.ndarray


def dense_keypoints(local_desc: torch.Tensor | np.ndarray, image_hw: tuple[int, int]) -> Keypoints:
    """A (C, h, w) dense map (SelaVPR's `local_desc`) as keypoints at the cell centres."""
    desc = np.asarray(local_desc, dtype=np.float32)
    c, h, w = desc.shape
    rows, cols = np.mgrid[0:h, 0:w]
    xy = np.stack([(cols + 0.5) * image_hw[1] / w, (rows + 0.5) * image_hw[0] / h], axis=-1)
    return Keypoints(desc.reshape(c, h * w).T.copy(), xy.reshape(-1, 2).astype(np.float32))


def r2former_keypoints(tokens: torch.Tensor | np.ndarray, image_hw: tuple[int, int]) -> Keypoints:
    """R2Former's (K, 131) tokens `[x, y, attention, feature128]`: x and y are normalized by
    max(H, W) (as in the official bytedance/R2Former code), so they scale back to pixels by
    it."""
    tokens = np.asarray(tokens, dtype=np.float32)
    scale = max(image_hw)
    return Keypoints(tokens[:, 3:].copy(), tokens[:, :2] * scale)


def mutual_nn_pairs(query: np.ndarray, candidate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j) where query feature i and candidate feature j are each other's
    nearest neighbour by dot product (features are L2-normalized first)."""
    q = query / np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
    c = candidate / np.maximum(np.linalg.norm(candidate, axis=1, keepdims=True), 1e-12)
    sim = q @ c.T
    best_c = sim.argmax(axis=1)
    best_q = sim.argmax(axis=0)
    qi = np.flatnonzero(best_q[best_c] == np.arange(len(q)))
    return qi, best_c[qi]


def ransac_inliers(
    query_xy: np.ndarray,
    candidate_xy: np.ndarray,
    model: str = "homography",
    threshold: float = 8.0,
    confidence: float = 0.999,
    max_iters: int = 2000,
    seed: int = 0,
) -> int:
    """Inliers of a RANSAC fit between matched points (0 with too few matches to fit)."""
    import cv2

    if model not in MIN_POINTS:
        raise ValueError(f"model must be one of {sorted(MIN_POINTS)}, got {model!r}")
    if len(query_xy) != len(candidate_xy):
        raise ValueError(f"{len(query_xy)} query points for {len(candidate_xy)} candidate points")
    if len(query_xy) < MIN_POINTS[model]:
        return 0
    cv2.setRNGSeed(seed)  # OpenCV's RANSAC sampling: deterministic counts
    src = np.ascontiguousarray(query_xy, dtype=np.float32)
    dst = np.ascontiguousarray(candidate_xy, dtype=np.float32)
    if model == "homography":
        _, mask = cv2.findHomography(
            src, dst, cv2.RANSAC, threshold, maxIters=max_iters, confidence=confidence
        )
    else:
        _, mask = cv2.findFundamentalMat(src, dst, cv2.FM_RANSAC, threshold, confidence, max_iters)
    return 0 if mask is None else int(mask.sum())


def ransac_scores(
    query: Keypoints, candidates: list[Keypoints], model: str = "homography", **ransac
) -> np.ndarray:
    """Inlier count of each candidate against the query: the re-ranking score."""
    scores = np.zeros(len(candidates), dtype=np.int64)
    for k, cand in enumerate(candidates):
        qi, ci = mutual_nn_pairs(query.features, cand.features)
        scores[k] = ransac_inliers(query.xy[qi], cand.xy[ci], model=model, **ransac)
    return scores


def _ransac_scorer(model_name: str):
    """The scorer of the `ransac_<model_name>` re-ranker."""

    def make(inputs: RerankInputs) -> ScoreFn:
        dense = feature_kind(inputs.query_local.feature_shape) == LOCAL_DESC
        to_keypoints = dense_keypoints if dense else r2former_keypoints

        def keypoints(cache, index) -> Keypoints:
            return to_keypoints(cache[int(index)].numpy(), inputs.image_hw)

        def ransac(q: int, candidates: np.ndarray) -> np.ndarray:
            query = keypoints(inputs.query_local, q)
            cands = [keypoints(inputs.database_local, c) for c in candidates]
            return ransac_scores(query, cands, model=model_name)

        return ransac

    return make


_BASELINE = "on mutual-NN matches of local features (geometric verification; needs OpenCV)"
register_reranker(
    Reranker(
        "ransac_homography",
        f"inliers of a RANSAC homography {_BASELINE}",
        _ransac_scorer("homography"),
    )
)
register_reranker(
    Reranker(
        "ransac_fundamental",
        f"inliers of a RANSAC fundamental matrix {_BASELINE}",
        _ransac_scorer("fundamental"),
    )
)
