"""Ground truth for place recognition: database images within a radius of each query.

The convention is the one of gmberton's deep-visual-geo-localization-benchmark and
VPR-methods-evaluation (``test_dataset.py``): ``sklearn.neighbors.NearestNeighbors`` fitted on
the database UTM coordinates, then ``radius_neighbors(queries, radius=25)``. sklearn keeps a
database image whose distance equals the radius exactly (``d <= radius``), and so do we.
"""

from __future__ import annotations

import numpy as np
from sklearn.neighbors import NearestNeighbors

__all__ = ["positives_within_radius", "queries_without_positives"]

# Queries per radius_neighbors call: bounds sklearn's per-call object arrays and lists, which
# matters when a dense layout gives each query thousands of positives (Tokyo 24/7).
_QUERY_BLOCK = 4096


def _as_coordinates(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2 or arr.shape[1] < 1:
        raise ValueError(
            f"{name} must be an (N, 2) array of UTM coordinates, got shape {arr.shape}"
        )
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr).all(axis=1))[0])
        raise ValueError(f"{name} has a non-finite coordinate in row {bad}: {arr[bad].tolist()}")
    return arr


def positives_within_radius(
    database_utm: np.ndarray, query_utm: np.ndarray, radius: float = 25.0
) -> list[np.ndarray]:
    """Database indices within ``radius`` metres (inclusive) of each query.

    Returns one sorted int64 array per query (empty where the query has no positive).
    """
    db = _as_coordinates(database_utm, "database_utm")
    q = _as_coordinates(query_utm, "query_utm")
    if db.shape[1] != q.shape[1]:
        raise ValueError(
            f"database_utm has {db.shape[1]} coordinates per row but query_utm has {q.shape[1]}"
        )
    radius = float(radius)
    if not np.isfinite(radius) or radius < 0:
        raise ValueError(f"radius must be a finite non-negative number of metres, got {radius}")
    if len(db) == 0:
        return [np.empty(0, dtype=np.int64) for _ in range(len(q))]

    # kd_tree, not "auto": for databases under 10 images "auto" switches to brute force,
    # whose |a|^2 + |b|^2 - 2ab distances are inexact for UTM-sized numbers and can move a
    # point across the radius. For real sizes "auto" picks kd_tree too, so results match the
    # VG benchmark's. The tree compares squared distances with radius**2, exactly as written.
    knn = NearestNeighbors(algorithm="kd_tree").fit(db)
    positives: list[np.ndarray] = []
    for start in range(0, len(q), _QUERY_BLOCK):
        block = knn.radius_neighbors(
            q[start : start + _QUERY_BLOCK], radius=radius, return_distance=False
        )
        # sklearn returns each query's neighbours in tree order; sort for reproducible output.
        positives.extend(np.sort(np.asarray(p, dtype=np.int64)) for p in block)
    return positives


def queries_without_positives(positives: list[np.ndarray]) -> np.ndarray:
    """Indices (int64, ascending) of the queries whose positive list is empty."""
    return np.array([i for i, p in enumerate(positives) if len(p) == 0], dtype=np.int64)
