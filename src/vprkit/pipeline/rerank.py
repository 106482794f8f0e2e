"""Stage 3, rerank: re-order each query's first `depth` candidates by a re-ranker's score.

Re-rankers (`vprkit.rerank`) score a query against its candidates from the local features
both sides' extraction kept: SelaVPR's mutual nearest neighbours, R2Former's re-ranking
transformer, RANSAC inliers. Candidates beyond `depth` keep their global order; equal
scores keep their global order too.
"""

from __future__ import annotations

import os
import time

import numpy as np
from torch import nn

from vprkit.errors import VprkitError
from vprkit.pipeline.features import Features
from vprkit.pipeline.fingerprint import digest
from vprkit.pipeline.predictions import Predictions, reuse_or_none
from vprkit.rerank import apply_order, make_scorer, rerank_order


def rerank(
    predictions: Predictions,
    reranker: str,
    database: Features,
    queries: Features,
    depth: int,
    out: str | os.PathLike | None = None,
    *,
    model: nn.Module | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    memory_budget_bytes: int | None = None,
    label: str = "re-ranking",
) -> Predictions:
    """`predictions` with each query's first `depth` candidates re-ordered by `reranker`
    (`vprkit.rerank.list_rerankers()`); `model` is needed by re-rankers that are part of a
    model (R2Former's). `out`: a predictions file to write, or to reuse."""
    for side, features in (("database", database), ("queries", queries)):
        if not features.has_local:
            raise VprkitError(
                f"re-ranking needs local features, and the {side} features have none: "
                "extract them with local features (vprkit extract --local)"
            )
    if len(queries) != len(predictions.indices):
        raise VprkitError(
            f"{len(predictions.indices)} queries in the predictions, {len(queries)} in the "
            "query features: they were not made from the same images"
        )
    depth = min(int(depth), predictions.indices.shape[1])
    wanted = {
        "stage": "rerank",
        "predictions": digest(predictions.fingerprint),
        "database": digest(database.fingerprint),
        "queries": digest(queries.fingerprint),
        "reranker": reranker,
        "depth": depth,
        "precision": precision,
    }
    existing = reuse_or_none(out, wanted, "re-ranked predictions")
    if existing is not None:
        return existing
    start = time.perf_counter()
    scorer = make_scorer(
        reranker,
        model,
        queries.local,
        database.local,
        np.array(queries.global_desc),  # memory-mapped read-only files: torch wants copies
        np.array(database.global_desc),
        queries.image_hw,
        device=device,
        precision=precision,
        memory_budget_bytes=memory_budget_bytes,
    )
    orders, scores = rerank_order(predictions.indices, depth, scorer, label=label)
    reranked = Predictions(
        indices=apply_order(predictions.indices, orders),
        distances=apply_order(predictions.distances, orders),
        scores=scores,
        query_names=predictions.query_names,
        database_names=predictions.database_names,
        fingerprint=wanted,
        record={"rerank_s": time.perf_counter() - start, "reranker": reranker, "depth": depth},
    )
    if out is not None:
        reranked.save(out)
    return reranked
