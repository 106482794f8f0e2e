"""Stage 2, retrieve: each query's k nearest database descriptors (exact search).

Descriptors are L2-normalized and searched exactly, as the official evaluations do
(`faiss.IndexFlatL2`); after a PCA projection they are searched as they come out of it, not
re-normalized, as in the official code. With `index` other than flat, a compressed FAISS
index is trained and searched, its top `rescore` candidates ranked again exactly
(`vprkit.retrieval.indexes`).
"""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np

from vprkit.errors import StageMismatchError
from vprkit.pipeline.features import Features
from vprkit.pipeline.fingerprint import digest
from vprkit.pipeline.predictions import Predictions, reuse_or_none
from vprkit.retrieval.search import PCAProjection, search, unnormalized_search


def retrieve(
    database: Features,
    queries: Features,
    k: int,
    out: str | os.PathLike | None = None,
    *,
    pca: PCAProjection | None = None,
    memory_budget_bytes: int | None = None,
    index: str | None = "flat",
    rescore: int = 100,
    index_params: str | None = None,
    index_seed: int = 0,
) -> Predictions:
    """The top `k` database rows per query (k is clipped to the database size).

    `pca`: project both sides first and search without re-normalizing (the official PCA
    evaluation). `memory_budget_bytes` bounds the search's working memory (same ranking).
    `out`: a predictions file to write, or to reuse when it exists with the same inputs.
    `index`, `rescore`, `index_params`, `index_seed`: a compressed index
    (`vprkit.retrieval.indexes`; flat, the default, is the exact search above).
    """
    from vprkit.retrieval.indexes import build_index, parse_index
    from vprkit.retrieval.indexes import search as index_search

    _check_same_model(database, queries)
    k = min(int(k), len(database))
    choice = parse_index(index, len(database), int(database.global_desc.shape[1]), index_params)
    wanted = {
        "stage": "retrieve",
        "database": digest(database.fingerprint),
        "queries": digest(queries.fingerprint),
        "k": k,
        "pca": None if pca is None else pca_digest(pca),
    }
    if not choice.flat:  # absent for flat: the exact search's records stay as they were
        wanted["index"] = {
            "factory": choice.factory,
            "params": choice.params,
            "rescore": int(rescore),
            "seed": int(index_seed),
        }
    existing = reuse_or_none(out, wanted, "predictions")
    if existing is not None:
        return existing
    db_desc, q_desc = np.asarray(database.global_desc), np.asarray(queries.global_desc)
    start = time.perf_counter()
    record = {}
    if not choice.flat:
        if pca is not None or memory_budget_bytes is not None:
            raise ValueError("a compressed index goes without pca and memory_budget_bytes")
        built = build_index(database.global_desc, choice, seed=index_seed)
        record["index"] = {
            **choice.to_json(),
            "summary": built.summary(),
            "rescore": int(rescore),
            "train": built.train,
            "build_s": built.build_s,
            "bytes_per_photo": built.bytes_per_photo,
        }
        start = time.perf_counter()
        distances, indices = index_search(
            built.index, q_desc, k, rescore=rescore, full_descriptors=database.global_desc
        )
    elif pca is not None:
        distances, indices = unnormalized_search(pca.transform(db_desc), pca.transform(q_desc), k)
    else:
        distances, indices = search(db_desc, q_desc, k, memory_budget_bytes=memory_budget_bytes)
    if choice.reason:
        record["index_rule"] = choice.reason
    predictions = Predictions(
        indices=indices,
        distances=distances,
        query_names=queries.names,
        database_names=database.names,
        fingerprint=wanted,
        record={"search_s": time.perf_counter() - start, **record},
    )
    if out is not None:
        predictions.save(out)
    return predictions


def _check_same_model(database: Features, queries: Features) -> None:
    """Both sides from one model: descriptors of two models cannot be compared."""
    db_model, q_model = (f.fingerprint.get("model") for f in (database, queries))
    if db_model and q_model and db_model != q_model:
        raise StageMismatchError(
            f"the database features ({database.folder or 'in memory'}) and the query features "
            f"({queries.folder or 'in memory'}) were made by different models "
            f"({db_model['name']} and {q_model['name']}, or other options or weights): "
            "extract both sides with the same --method, --model_option and --weights"
        )
    if database.global_desc.shape[1] != queries.global_desc.shape[1]:
        raise StageMismatchError(
            f"the database descriptors are {database.global_desc.shape[1]}-D, the queries' "
            f"{queries.global_desc.shape[1]}-D: extract both sides with the same model"
        )


def pca_digest(pca: PCAProjection) -> dict:
    h = hashlib.sha256()
    for array in (pca.mean, pca.components):
        h.update(np.ascontiguousarray(array).tobytes())
    return {"dim": pca.output_dim, "sha256": h.hexdigest()[:16]}
