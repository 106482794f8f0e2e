"""Ranked database candidates per query: what retrieval and re-ranking produce.

A predictions file (``.npz``, format ``vprkit-predictions`` version 1) holds ``indices``
(Q, K) int64 database rows, best first; ``distances`` (Q, K) float32 squared L2 distances of
the global descriptors; ``scores`` (Q, n) float64 re-ranker scores of the first n candidates
after re-ranking (absent after plain retrieval); ``meta``: JSON text with the fingerprint of
the stage that wrote it (which includes short digests of its input files) and the image
names of both sides (so the file can be read without the features).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vprkit.atomic import atomic_path
from vprkit.errors import VprkitError

FORMAT = "vprkit-predictions"
VERSION = 1


@dataclass
class Predictions:
    indices: np.ndarray  # (Q, K) int64
    distances: np.ndarray  # (Q, K) float32
    query_names: list[str]
    database_names: list[str]
    scores: np.ndarray | None = None  # (Q, n) float64, re-ranked candidates only
    fingerprint: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict)

    @property
    def top1_scores(self) -> np.ndarray:
        """A confidence per query, higher = surer (for precision-recall): the re-ranker's
        score of its first candidate, else the negated global distance."""
        return self.scores[:, 0] if self.scores is not None else -self.distances[:, 0]

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "fingerprint": self.fingerprint,
            "record": self.record,
            "query_names": self.query_names,
            "database_names": self.database_names,
        }
        arrays = {"indices": self.indices, "distances": self.distances}
        if self.scores is not None:
            arrays["scores"] = self.scores
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
        return path


def load_predictions(path: str | os.PathLike) -> Predictions:
    path = Path(path)
    if not path.is_file():
        raise VprkitError(f"{path}: no such predictions file; make one with vprkit retrieve")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError):  # numpy's message would advise unpickling: not here
        raise VprkitError(
            f"{path}: not a vprkit predictions file (.npz); give the file vprkit retrieve or "
            "vprkit rerank wrote"
        ) from None
    if not isinstance(data, np.lib.npyio.NpzFile):  # e.g. a features folder's global.npy
        raise VprkitError(
            f"{path}: a plain .npy array, not a predictions file (.npz); give the file "
            "vprkit retrieve or vprkit rerank wrote"
        )
    try:
        with data:
            meta = json.loads(str(data["meta"]))
            arrays = {k: data[k] for k in data.files if k != "meta"}
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as e:
        raise VprkitError(
            f"{path}: not a vprkit predictions file ({e}); give the file vprkit retrieve or "
            "vprkit rerank wrote"
        ) from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise VprkitError(f"{path}: not a {FORMAT} version {VERSION} file")
    return Predictions(
        indices=arrays["indices"],
        distances=arrays["distances"],
        scores=arrays.get("scores"),
        query_names=meta["query_names"],
        database_names=meta["database_names"],
        fingerprint=meta["fingerprint"],
        record=meta["record"],
    )


def reuse_or_none(path: str | os.PathLike | None, wanted: dict, what: str) -> Predictions | None:
    """The predictions at `path` when they were made exactly as `wanted`; None when there is
    no file; a refusal naming the differences otherwise."""
    from vprkit.pipeline.fingerprint import check_same

    if path is None or not Path(path).is_file():
        return None
    existing = load_predictions(path)
    check_same(existing.fingerprint, wanted, Path(path), what)
    return existing
