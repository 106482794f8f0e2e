"""A position and a confidence from a query's top-K matches.

The estimate is not simply the top-1's position. Each match gets a weight from its evidence:

- after re-ranking, its re-rank score relative to the best one, ``w = max(score, 0) / best``
  (inlier counts and same-place probabilities alike);
- without, its descriptor similarity relative to the best match's, ``w = exp((s - s_1) / T)``
  with the cosine similarity ``s = 1 - d^2 / 2`` of the L2-normalized descriptors (``d^2`` the
  squared distance the search returns) and a temperature ``T`` (0.02 by default: a match 0.05
  less similar than the best weighs 8% of it).

Matches within ``radius_m`` metres (25 by default) of one another agree. For each match, its
group is every match within the radius of it; the group with the largest total weight wins
(ties: the one around the better-ranked match). The estimate is the weighted mean position of
that group, so a lone top-1 outvoted by several agreeing matches elsewhere is overruled, and
agreeing neighbours refine the top-1's position.

The confidence is the share of the top-K's total weight that lies in the winning group, in
(0, 1]: 1 when all the evidence agrees, near 1/K when the matches scatter over the map. A robot
can threshold it; `vprkit localize` reports the precision each threshold gives when the queries
carry positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_RADIUS_M = 25.0
DEFAULT_TEMPERATURE = 0.02


@dataclass(frozen=True)
class Estimate:
    east: float
    north: float
    confidence: float  # share of the evidence in the winning group, (0, 1]
    spread_m: float  # weighted RMS distance of the group from the estimate (a circle's radius)
    in_group: np.ndarray  # (K,) bool: the matches that agree with the estimate


def match_weights(
    distances: np.ndarray,
    scores: np.ndarray | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
) -> np.ndarray:
    """Each match's weight (module doc), the matches in rank order; the first is 1."""
    if scores is not None:
        scores = np.maximum(np.asarray(scores, dtype=np.float64), 0.0)
        best = scores.max(initial=0.0)
        return scores / best if best > 0 else np.ones_like(scores)
    similarity = 1.0 - np.asarray(distances, dtype=np.float64) / 2.0
    return np.exp((similarity - similarity.max()) / temperature)


def estimate_position(
    east: np.ndarray,
    north: np.ndarray,
    weights: np.ndarray,
    radius_m: float = DEFAULT_RADIUS_M,
) -> Estimate:
    """The weighted mean position of the heaviest group of agreeing matches (module doc)."""
    xy = np.stack([np.asarray(east, np.float64), np.asarray(north, np.float64)], axis=1)
    weights = np.asarray(weights, dtype=np.float64)
    if len(xy) == 0:
        raise ValueError("no matches to estimate a position from")
    near = np.linalg.norm(xy[:, None, :] - xy[None, :, :], axis=2) <= radius_m
    support = near @ weights
    # argmax takes the first maximum: the group around the best-ranked match wins ties.
    best = int(np.argmax(support))
    group = near[best]
    w = weights * group
    total = w.sum()
    if total <= 0:  # every weight zero (no re-rank evidence at all): the top-1's position
        group = np.zeros(len(xy), dtype=bool)
        group[0] = True
        w, total = group.astype(np.float64), 1.0
    centre = (w[:, None] * xy).sum(axis=0) / total
    spread = float(np.sqrt((w * ((xy - centre) ** 2).sum(axis=1)).sum() / total))
    confidence = float(total / weights.sum()) if weights.sum() > 0 else 1.0 / len(xy)
    return Estimate(float(centre[0]), float(centre[1]), confidence, spread, group)
