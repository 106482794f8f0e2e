"""What an evaluation leaves in its run folder besides the metrics: per-query results as CSV,
hloc-style retrieval pairs, and pictures of queries beside their predictions.

``predictions.csv`` is UTF-8 CSV (Python's ``csv`` module, so any name, with commas, quotes
or newlines, reads back with ``csv.DictReader(open(path, newline="", encoding="utf-8"))``).
One row per query, columns:

- ``query``: the query image name, relative to the image root;
- ``predictions``: a JSON array of database image names, best first
  (``json.loads(row["predictions"])``);
- ``distances``: a JSON array of their distances (4 decimals), best first;
- ``positives``: a JSON array of database indices (rows of ``database_descriptors.npy``), ``[]``
  for a query with no positive; empty when the set has no labels;
- ``correct_at_1``: ``True``/``False``; empty without labels;
- ``first_correct_rank``: the 1-based rank of the first positive among the predictions; empty
  without labels or when none is there.

``pairs.txt`` is hloc's ``query database`` per line, which hloc splits on whitespace; it is
written only when no name contains whitespace, since such a name could not be read back.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np

from vprkit.data.datasets import PlaceDataset
from vprkit.pipeline.predictions import Predictions
from vprkit.retrieval.metrics import first_correct_rank
from vprkit.visualize import save_prediction_picture

log = logging.getLogger("vprkit.eval")


def _json_distances(values) -> str:
    # 4 decimals as before; NaN and infinities as Python's json module writes and reads them.
    items = [f"{d:.4f}" if np.isfinite(d) else json.dumps(float(d)) for d in values]
    return "[" + ", ".join(items) + "]"


def write_per_query(path: Path, predictions: Predictions, positives) -> None:
    """One row per query: its predictions, distances, positives and first correct rank
    (columns and encoding in the module docstring)."""
    indices, db_names = predictions.indices, predictions.database_names
    ranks = first_correct_rank(indices, positives) if positives is not None else None
    # surrogateescape: a file name that is not valid UTF-8 is written back as its own bytes.
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["query", "predictions", "distances", "positives", "correct_at_1", "first_correct_rank"]
        )
        for i, name in enumerate(predictions.query_names):
            pos = positives[i] if positives is not None else None
            writer.writerow(
                [
                    name,
                    json.dumps([db_names[j] for j in indices[i]], ensure_ascii=False),
                    _json_distances(predictions.distances[i]),
                    "" if pos is None else json.dumps([int(j) for j in pos]),
                    "" if ranks is None else bool(ranks[i] == 1),
                    "" if ranks is None or ranks[i] == 0 else int(ranks[i]),
                ]
            )


def _first_unpairable(predictions: Predictions) -> str | None:
    # str.split() (what hloc reads pairs with) splits on exactly the characters isspace() finds.
    for name in (*predictions.query_names, *predictions.database_names):
        if any(ch.isspace() for ch in name):
            return name
    return None


def write_pairs(path: Path, predictions: Predictions) -> bool:
    """hloc-style retrieval pairs: `query database` per line, best first. Written only if no
    image name contains whitespace (hloc could not read it back); returns whether it was."""
    bad = _first_unpairable(predictions)
    if bad is not None:
        log.warning(
            "%s not written: hloc's pairs format splits on whitespace and the image name %r "
            "contains some; predictions.csv and the predictions file hold every pair",
            path.name,
            bad,
        )
        return False
    db_names = predictions.database_names
    with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
        for name, row in zip(predictions.query_names, predictions.indices, strict=True):
            f.writelines(f"{name} {db_names[j]}\n" for j in row)
    return True


def save_pictures(
    folder: Path,
    dataset: PlaceDataset,
    predictions: Predictions,
    positives,
    per_query: int,
    only_wrong: bool = False,
) -> int:
    """`<folder>/<query index>_<query name>.jpg`: each query beside its first `per_query`
    predictions, framed green (correct) or red (wrong) when there are labels."""
    n = min(per_query, predictions.indices.shape[1])
    saved = 0
    for i, query in enumerate(dataset.query_paths):
        preds = predictions.indices[i, :n]
        if positives is None:
            correct = [None] * n
        else:
            correct = [bool(np.isin(j, positives[i])) for j in preds]
            if only_wrong and correct[0]:
                continue
        save_prediction_picture(
            folder / f"{i:05d}_{query.stem}.jpg",
            query,
            [dataset.database_paths[j] for j in preds],
            correct,
        )
        saved += 1
    log.info("saved %d prediction pictures in %s/", saved, folder.name)
    return saved
