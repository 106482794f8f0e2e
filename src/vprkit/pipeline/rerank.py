"""Stage 3, rerank: re-order each query's first `depth` candidates by a re-ranker's score.

Re-rankers (`vprkit.rerank`) score a query against its candidates from the local features
both sides' extraction kept: SelaVPR's mutual nearest neighbours, R2Former's re-ranking
transformer, RANSAC inliers. Candidates beyond `depth` keep their global order; equal
scores keep their global order too, except in SelaVPR's protocol, which orders them as its
official code does (`tie_order`, `vprkit.rerank.descending_order`).
"""

from __future__ import annotations

import os
import time

import numpy as np
from torch import nn

from vprkit.errors import VprkitError
from vprkit.models.info import ModelInfo
from vprkit.models.registry import model_info
from vprkit.pipeline.features import Features
from vprkit.pipeline.fingerprint import digest
from vprkit.pipeline.predictions import Predictions, reuse_or_none
from vprkit.rerank import apply_order, make_scorer, rerank_order
from vprkit.rerank.base import check_tie_order


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
    tie_order: str | None = None,
) -> Predictions:
    """`predictions` with each query's first `depth` candidates re-ordered by `reranker`
    (`vprkit.rerank.list_rerankers()`); `model` is needed by re-rankers that are part of a
    model (R2Former's). `out`: a predictions file to write, or to reuse. `tie_order`:
    `"official"` or `"stable"` (`vprkit.rerank.descending_order`); None: the model's for its
    own re-ranker (SelaVPR: official), else stable. The model is `model`, or the one the
    features were extracted with."""
    if tie_order is None:
        tie_order = _model_info(model, queries).default_tie_order(reranker)
    check_tie_order(tie_order)
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
        "tie_order": tie_order,
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
    orders, scores = rerank_order(
        predictions.indices, depth, scorer, label=label, tie_order=tie_order
    )
    reranked = Predictions(
        indices=apply_order(predictions.indices, orders),
        distances=apply_order(predictions.distances, orders),
        scores=scores,
        query_names=predictions.query_names,
        database_names=predictions.database_names,
        fingerprint=wanted,
        record={
            "rerank_s": time.perf_counter() - start,
            "reranker": reranker,
            "depth": depth,
            "tie_order": tie_order,
        },
    )
    if out is not None:
        reranked.save(out)
    return reranked


def _model_info(model: nn.Module | None, queries: Features) -> ModelInfo:
    if model is not None:
        return model_info(model)
    name = queries.fingerprint.get("model", {}).get("name")
    try:
        return model_info(name) if name else ModelInfo()
    except ValueError:  # features of a model not registered in this process
        return ModelInfo()
