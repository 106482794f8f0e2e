"""`vprkit mine`: R2Former's pre-computed hard negatives (its ``pre_compute_mining.py``).

Done once, before training the re-ranker (bytedance/R2Former): global descriptors of the whole train
database and of the kept training queries (those with a database image within 10 m), then
per query the ``candidates`` (500) nearest database images, minus its non-negatives (the
soft positives, within 25 m), in order; the first ``keep`` (200) are kept, ``-1`` pads rows
with fewer. The result is an int64 ``.npy`` of shape (kept queries, keep), rows in
``TripletData.query_ids`` order: what ``TripletMiner(mining="precomputed")`` reads, e.g. via
``vprkit train r2former_rerank --set hard_negatives_file=<file>``.

The official script ranks by the inner product of L2-normalized descriptors; vprkit's exact
search ranks by the L2 distance of normalized descriptors, the same order, with a
deterministic tie rule (equal distances go to the smaller database index).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from vprkit.atomic import save_npy, write_text
from vprkit.cli_args import (
    ImageSize,
    add_device_arguments,
    add_model_arguments,
    build_model_from_args,
    check_model,
    existing_dir,
    make_preprocess,
    output_file,
    positive_float,
    positive_int,
)
from vprkit.data.images import Preprocess
from vprkit.data.triplets import TripletData, load_triplet_data
from vprkit.errors import MissingInputError, UsageError
from vprkit.extract import extract_global_descriptors
from vprkit.retrieval.search import search

__all__ = ["hard_negatives_from_descriptors", "mine_hard_negatives", "sidecar_path"]

log = logging.getLogger("vprkit.mine")

# R2Former's pre_compute_mining.py: 500 nearest, 200 kept.
DEFAULT_CANDIDATES = 500
DEFAULT_KEEP = 200


def _check_counts(candidates: object, keep: object) -> tuple[int, int]:
    for name, value in (("candidates", candidates), ("keep", keep)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if keep > candidates:
        raise ValueError(
            f"keep={keep} is larger than candidates={candidates}: at most the candidates "
            "can be kept"
        )
    return int(candidates), int(keep)


def hard_negatives_from_descriptors(
    database: np.ndarray,
    queries: np.ndarray,
    soft_positives: Sequence[np.ndarray],
    *,
    candidates: int = DEFAULT_CANDIDATES,
    keep: int = DEFAULT_KEEP,
    memory_budget_bytes: int | None = None,
) -> np.ndarray:
    """The hard-negative table from descriptors: int64 (len(queries), keep), ``-1`` padded.

    Row ``i``: the ``candidates`` database rows nearest to ``queries[i]`` (vprkit's exact
    search of L2-normalized descriptors), without ``soft_positives[i]``, order kept, first
    ``keep``. A database smaller than ``candidates`` is searched whole.
    ``memory_budget_bytes`` bounds the search's memory (same result, slower).
    """
    candidates, keep = _check_counts(candidates, keep)
    if len(soft_positives) != len(queries):
        raise ValueError(
            f"got soft positives for {len(soft_positives)} queries but {len(queries)} query "
            "descriptors"
        )
    # Clipped here rather than by the search, which would warn about it.
    k = min(candidates, len(database))
    _, ranked = search(database, queries, k, memory_budget_bytes=memory_budget_bytes)
    table = np.full((len(queries), keep), -1, dtype=np.int64)
    for i, row in enumerate(ranked):
        negatives = row[~np.isin(row, soft_positives[i])][:keep]
        table[i, : len(negatives)] = negatives
    return table


def mine_hard_negatives(
    model: torch.nn.Module,
    data: TripletData,
    preprocess: Preprocess,
    *,
    candidates: int = DEFAULT_CANDIDATES,
    keep: int = DEFAULT_KEEP,
    batch_size: int = 16,
    num_workers: int = 0,
    device: str = "cpu",
    precision: str = "fp32",
    memory_budget_bytes: int | None = None,
) -> np.ndarray:
    """Hard negatives of the kept queries of ``data`` with ``model``'s global descriptors.

    Returns int64 (data.num_queries, keep): row ``j`` belongs to query
    ``data.dataset.query_paths[data.query_ids[j]]``; see
    :func:`hard_negatives_from_descriptors`.
    """
    _check_counts(candidates, keep)  # before the expensive extraction
    if not isinstance(data, TripletData):
        raise TypeError(f"data must be a TripletData, got {type(data).__name__}")
    dataset = data.dataset
    extract = dict(
        batch_size=batch_size, num_workers=num_workers, device=device, precision=precision
    )
    database = extract_global_descriptors(
        model, dataset.database_paths, preprocess, label="database", **extract
    )
    query_paths = [dataset.query_paths[i] for i in data.query_ids]
    queries = extract_global_descriptors(model, query_paths, preprocess, label="queries", **extract)
    return hard_negatives_from_descriptors(
        database,
        queries,
        data.soft_positives,
        candidates=candidates,
        keep=keep,
        memory_budget_bytes=memory_budget_bytes,
    )


def sidecar_path(out: str | os.PathLike) -> Path:
    """Where the JSON describing ``out`` goes: ``<out>.json``."""
    return Path(f"{os.fspath(out)}.json")


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, default_method="r2former")
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset_folder",
        "--dataset-folder",
        type=existing_dir,
        required=True,
        help="VG-format dataset or Mapillary SLS root",
    )
    data.add_argument("--split", default="train", help="VG layout split (MSLS: train)")
    data.add_argument(
        "--msls_cities",
        "--msls-cities",
        help="MSLS: comma-separated train cities (default: the official 22)",
    )
    data.add_argument(
        "--positive_radius",
        "--positive-radius",
        type=positive_float,
        default=10.0,
        help="queries without a database image this close (m) are dropped, as in training",
    )
    data.add_argument(
        "--non_negative_radius",
        "--non-negative-radius",
        type=positive_float,
        default=25.0,
        help="database images this close (m) to a query are never its negatives",
    )
    mining = parser.add_argument_group("mining")
    mining.add_argument("--out", type=output_file, required=True, help="the .npy file to write")
    mining.add_argument(
        "--candidates",
        type=positive_int,
        default=DEFAULT_CANDIDATES,
        help="nearest database images looked at per query (all, if the database is smaller)",
    )
    mining.add_argument(
        "--keep",
        type=positive_int,
        default=DEFAULT_KEEP,
        help="hard negatives kept per query (columns of the file; -1 pads shorter rows)",
    )
    run_group = parser.add_argument_group("run")
    run_group.add_argument(
        "--image_size",
        "--image-size",
        type=positive_int,
        nargs="+",
        action=ImageSize,
        metavar="N",
        help="H W, or the short side; default: the model's (480 640 for r2former)",
    )
    run_group.add_argument(
        "--batch_size",
        "--batch-size",
        type=positive_int,
        default=16,
        help="images per forward pass (R2Former's pre_compute_mining.py: 16)",
    )
    add_device_arguments(run_group)
    run_group.add_argument(
        "--memory_budget_mb",
        "--memory-budget-mb",
        type=positive_float,
        help="bound the search's working memory (same result, slower)",
    )


def _check_args(args: argparse.Namespace) -> None:
    """What argparse's types cannot check (flags together, the output's folder), before
    any image is read or the model built."""
    if args.keep > args.candidates:
        raise UsageError(
            f"argument --keep: {args.keep} is larger than --candidates {args.candidates}: at "
            "most the candidates can be kept"
        )
    if not args.non_negative_radius >= args.positive_radius:
        # A positive outside the non-negatives could also be mined as a negative.
        raise UsageError(
            f"argument --non_negative_radius: {args.non_negative_radius} must be at least "
            f"--positive_radius ({args.positive_radius})"
        )
    out = Path(os.path.abspath(args.out))
    if not out.parent.is_dir():
        raise MissingInputError(
            f"--out: the folder {out.parent} does not exist (or is not a folder); create it first"
        )
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise PermissionError(f"--out: the folder {out.parent} is not writable")


def _setup_logging() -> None:
    # A fresh handler per run: sys.stdout may have been replaced since the last one.
    log.handlers.clear()
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def _version() -> str | None:
    try:
        from vprkit import __version__

        return __version__
    except ImportError:
        return None


def mine(args: argparse.Namespace) -> np.ndarray:
    """`vprkit mine` without the logging setup: checks, mines, writes; returns the table."""
    _check_args(args)
    check_model(args)  # before the dataset is read
    out = Path(os.path.abspath(args.out))
    data = load_triplet_data(
        args.dataset_folder,
        args.split,
        train_positives_dist_threshold=args.positive_radius,
        val_positive_dist_threshold=args.non_negative_radius,
        msls_cities=args.msls_cities,
    )
    log.info(
        "vprkit mine: %s, %d database images, %d training queries (%d without a database "
        "image within %g m dropped)",
        data.dataset.name,
        data.num_database,
        data.num_queries,
        data.num_dropped_queries,
        args.positive_radius,
    )
    options = dict(args.model_option)
    model, weights = build_model_from_args(args)
    args.weights = weights  # the sidecar records the weights used, the default included
    preprocess = make_preprocess(model, args.image_size)
    log.info(
        "model: %s %s, weights: %s; %r", args.method, options or "", weights or "none", preprocess
    )
    start = time.perf_counter()
    table = mine_hard_negatives(
        model,
        data,
        preprocess,
        candidates=args.candidates,
        keep=args.keep,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=args.device,
        precision=args.precision,
        memory_budget_bytes=None
        if args.memory_budget_mb is None
        else int(args.memory_budget_mb * 2**20),
    )
    elapsed = time.perf_counter() - start

    counts = (table >= 0).sum(axis=1)
    short = int((counts < args.keep).sum())
    info = _sidecar(args, out, table, data, preprocess, short, int(counts.min()))
    # The table first: a sidecar never describes a file that was not written.
    save_npy(out, table)
    write_text(sidecar_path(out), json.dumps(info, indent=2, default=str) + "\n")
    log.info(
        "mined in %.1f s: %d rows of %d; %d row(s) have fewer than %d negatives (fewest: %d)",
        elapsed,
        table.shape[0],
        args.keep,
        short,
        args.keep,
        int(counts.min()),
    )
    log.info("wrote %s and %s", out, sidecar_path(out).name)
    return table


def _sidecar(args, out: Path, table, data, preprocess, short: int, fewest: int) -> dict:
    """What `<out>.json` says about how the table was made."""
    image_size = preprocess.image_size
    return {
        "description": (
            "R2Former-style pre-computed hard negatives: per training query (rows: the "
            "queries with a database image within positive_radius, in sorted order), its "
            "`candidates` nearest database images by global descriptor, minus those within "
            "non_negative_radius, in order, the first `keep`, -1 padded"
        ),
        "file": out.name,
        "shape": list(table.shape),
        "method": args.method,
        "model_options": dict(args.model_option),
        "weights": None if args.weights is None else str(args.weights),
        "random_init": args.weights == "random",
        "seed": args.seed,
        "dataset_folder": str(Path(os.path.abspath(args.dataset_folder))),
        "split": args.split,
        "msls_cities": args.msls_cities,
        "num_queries": data.num_queries,
        "num_dropped_queries": data.num_dropped_queries,
        "num_database": data.num_database,
        "rows_with_fewer_than_keep": short,
        "min_negatives_per_row": fewest,
        "positive_radius": args.positive_radius,
        "non_negative_radius": args.non_negative_radius,
        "candidates": args.candidates,
        "keep": args.keep,
        "image_size": list(image_size) if isinstance(image_size, tuple) else image_size,
        "precision": args.precision,
        "vprkit_version": _version(),
        "created": datetime.now().isoformat(timespec="seconds"),
    }


def run(args: argparse.Namespace) -> int:
    _setup_logging()
    mine(args)
    return 0
