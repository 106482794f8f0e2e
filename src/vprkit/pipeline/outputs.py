"""What an evaluation leaves in its run folder besides the metrics: per-query results as CSV,
hloc-style retrieval pairs, and pictures of queries beside their predictions."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from vprkit.data.datasets import PlaceDataset
from vprkit.pipeline.predictions import Predictions
from vprkit.retrieval.metrics import first_correct_rank
from vprkit.visualize import save_prediction_picture

log = logging.getLogger("vprkit.eval")


def write_per_query(path: Path, predictions: Predictions, positives) -> None:
    """One row per query: its predictions, distances, positives and first correct rank."""
    indices, db_names = predictions.indices, predictions.database_names
    ranks = first_correct_rank(indices, positives) if positives is not None else None
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["query", "predictions", "distances", "positives", "correct_at_1", "first_correct_rank"]
        )
        for i, name in enumerate(predictions.query_names):
            pos = positives[i] if positives is not None else None
            writer.writerow(
                [
                    name,
                    ";".join(db_names[j] for j in indices[i]),
                    ";".join(f"{d:.4f}" for d in predictions.distances[i]),
                    "" if pos is None else ";".join(map(str, pos)),
                    "" if ranks is None else bool(ranks[i] == 1),
                    "" if ranks is None or ranks[i] == 0 else int(ranks[i]),
                ]
            )


def write_pairs(path: Path, predictions: Predictions) -> None:
    """hloc-style retrieval pairs: `query database` per line, best first."""
    db_names = predictions.database_names
    with open(path, "w") as f:
        for name, row in zip(predictions.query_names, predictions.indices, strict=True):
            f.writelines(f"{name} {db_names[j]}\n" for j in row)


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
