"""`vprkit extract | retrieve | rerank | score`: each pipeline stage alone, on the files the
stage before it wrote, so a user can stop, inspect and go on anywhere:

    vprkit extract --method selavpr --weights selavpr_msls --dataset_folder D --out feats
    vprkit retrieve --features feats --out feats/retrieved.npz
    vprkit rerank --features feats --predictions feats/retrieved.npz --out feats/reranked.npz
    vprkit score --predictions feats/reranked.npz --dataset_folder D

A stage whose output exists, made the same way, skips its work; one made otherwise is refused.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vprkit.atomic import write_text
from vprkit.cli_args import (
    add_dataset_arguments,
    add_extraction_arguments,
    add_keep_local_argument,
    add_local_fp16_argument,
    add_model_arguments,
    add_recall_values,
    add_reranker_arguments,
    build_model,
    build_model_from_args,
    check_model,
    device,
    existing_dir,
    existing_file,
    make_preprocess,
    output_file,
    positive_float,
    positive_int,
    read_dataset,
    weights_option,
)
from vprkit.data.datasets import read_images_paths
from vprkit.errors import UsageError, VprkitError
from vprkit.models.registry import model_info
from vprkit.pipeline import (
    dataset_positives,
    extract,
    load_features,
    load_predictions,
    rerank,
    retrieve,
    score,
)
from vprkit.pipeline.extract import relative_names
from vprkit.pipeline.fingerprint import state_sha256
from vprkit.pipeline.outputs import write_pairs
from vprkit.rerank import get_reranker, list_rerankers
from vprkit.retrieval.metrics import format_recalls
from vprkit.retrieval.search import load_pca

SIDES = ("database", "queries")

# --------------------------------------------------------------------------- extract


def add_extract_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    source = parser.add_argument_group("images: one folder, or a dataset's two sides")
    source.add_argument(
        "--images", type=existing_dir, help="a folder of images (searched recursively)"
    )
    add_dataset_arguments(parser)
    run = add_extraction_arguments(parser)
    add_keep_local_argument(run)
    add_local_fp16_argument(run)
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="features folder (with a dataset: OUT/database/ and OUT/queries/)",
    )


def run_extract(args: argparse.Namespace) -> int:
    if args.images is not None and (args.dataset_folder or args.database_folder):
        raise UsageError(
            "argument --images: give either --images or a dataset (--dataset_folder, ...), not both"
        )
    check_model(args)  # cheap: a bad flag is reported before the images are listed
    if args.images is not None:
        jobs = [("images", read_images_paths(args.images), args.images, args.out)]
    else:
        dataset = read_dataset(args)
        jobs = [
            (side, paths, dataset.root, args.out / side)
            for side, paths in zip(
                SIDES, (dataset.database_paths, dataset.query_paths), strict=True
            )
        ]
    model, weights = build_model_from_args(args)
    info = model_info(model)
    preprocess = make_preprocess(model, args.image_size)
    batch_size = args.infer_batch_size or info.eval_batch_size(
        dataset.name if args.images is None else args.images.name
    )
    local = bool(info.rerank_num) if args.local is None else args.local
    for side, paths, root, out in jobs:
        computed = []
        start = time.perf_counter()
        features = extract(
            model,
            paths,
            out,
            preprocess=preprocess,
            root=root,
            local=local,
            local_dtype="float16" if args.local_features_fp16 else "float32",
            batch_size=batch_size,
            num_workers=args.num_workers,
            device=args.device,
            precision=args.precision,
            weights=weights,
            label=side,
            on_compute=lambda done=computed: done.append(True),
        )
        how = f"extracted in {time.perf_counter() - start:.1f} s" if computed else "reused"
        local_text = f", local {features.local.feature_shape}" if features.has_local else ""
        print(
            f"{side}: {len(features)} x {features.global_desc.shape[1]}-D{local_text} -> "
            f"{out} ({how})"
        )
    return 0


# --------------------------------------------------------------------------- retrieve


def add_features_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--features",
        type=existing_dir,
        help="a dataset's features folder (database/ and queries/), from vprkit extract",
    )
    parser.add_argument("--database", type=existing_dir, help="the database's features folder")
    parser.add_argument("--queries", type=existing_dir, help="the queries' features folder")


def read_sides(args: argparse.Namespace):
    if args.features is not None:
        if args.database or args.queries:
            raise UsageError(
                "argument --features: give either --features or --database and --queries, not both"
            )
        folders = (args.features / "database", args.features / "queries")
    elif args.database and args.queries:
        folders = (args.database, args.queries)
    else:
        raise UsageError(
            "argument --features: give --features FOLDER, or both --database and --queries"
        )
    return load_features(folders[0]), load_features(folders[1])


def add_retrieve_arguments(parser: argparse.ArgumentParser) -> None:
    add_features_arguments(parser)
    parser.add_argument(
        "-k",
        "--num_candidates",
        "--num-candidates",
        type=positive_int,
        default=100,
        help="database candidates kept per query (R2Former re-ranks the top 100)",
    )
    parser.add_argument(
        "--pca", type=existing_file, help="a PCA .npz (vprkit eval --pca_dim writes one)"
    )
    parser.add_argument(
        "--memory_budget_mb",
        "--memory-budget-mb",
        type=positive_float,
        help="bound the search's working memory (same ranking, slower)",
    )
    parser.add_argument("--out", type=output_file, required=True, help="predictions file (.npz)")
    parser.add_argument("--pairs", type=output_file, help="also write hloc-style pairs text here")


def run_retrieve(args: argparse.Namespace) -> int:
    database, queries = read_sides(args)
    pca = load_pca(args.pca) if args.pca else None
    budget = None if args.memory_budget_mb is None else int(args.memory_budget_mb * 2**20)
    predictions = retrieve(
        database, queries, args.num_candidates, args.out, pca=pca, memory_budget_bytes=budget
    )
    if args.pairs:
        write_pairs(args.pairs, predictions)
    shape = predictions.indices.shape
    print(f"top {shape[1]} of {len(database)} for {shape[0]} queries -> {args.out}")
    return 0


# --------------------------------------------------------------------------- rerank


def add_rerank_arguments(parser: argparse.ArgumentParser) -> None:
    add_features_arguments(parser)
    parser.add_argument(
        "--predictions", type=existing_file, required=True, help="from vprkit retrieve"
    )
    parser.add_argument(
        "--rerank_num",
        "--rerank-num",
        type=positive_int,
        help="re-rank this many candidates; default: the method's (R2Former and SelaVPR: 100)",
    )
    parser.add_argument(
        "--weights",
        type=weights_option,
        help="the model's weights, for re-rankers inside the model (R2Former); default: "
        "those the features were extracted with",
    )
    parser.add_argument("--device", type=device, default="cpu", help="cpu, cuda or cuda:N")
    add_reranker_arguments(parser)
    parser.add_argument("--out", type=output_file, required=True, help="predictions file (.npz)")
    parser.add_argument("--pairs", type=output_file, help="also write hloc-style pairs text here")


def model_of_features(features, weights: str | None):
    """The model the features were extracted with, rebuilt and checked against their record
    (re-rankers that are part of a model need the same weights)."""
    made = features.fingerprint["model"]
    weights = weights or features.record.get("weights")
    model, _ = build_model(
        made["name"],
        weights,
        list(made["options"].items()),
        seed=features.record.get("seed", 0),  # rebuilds a random init from its seed
    )
    if state_sha256(model) != made["state_sha256"]:
        raise VprkitError(
            f"{features.folder}: extracted with other weights than {weights or 'a random init'}"
            "; give the same --weights as vprkit extract"
        )
    return model


def run_rerank(args: argparse.Namespace) -> int:
    database, queries = read_sides(args)
    predictions = load_predictions(args.predictions)
    info = model_info(queries.fingerprint["model"]["name"])
    reranker = args.reranker or info.reranker
    depth = info.rerank_num if args.rerank_num is None else args.rerank_num
    if reranker is None:
        raise UsageError(
            f"argument --reranker: {queries.fingerprint['model']['name']} has no re-ranker of "
            f"its own: choose --reranker ({', '.join(list_rerankers())})"
        )
    needs_model = get_reranker(reranker).model_method is not None
    model = model_of_features(queries, args.weights) if needs_model else None
    budget = None if args.rerank_memory_mb is None else int(args.rerank_memory_mb * 2**20)
    reranked = rerank(
        predictions,
        reranker,
        database,
        queries,
        depth,
        args.out,
        model=model,
        device=args.device,
        precision=args.rerank_precision,
        memory_budget_bytes=budget,
        tie_order=args.tie_order,
    )
    if args.pairs:
        write_pairs(args.pairs, reranked)
    print(f"re-ranked the top {reranked.scores.shape[1]} with {reranker} -> {args.out}")
    return 0


# --------------------------------------------------------------------------- score


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--predictions",
        type=existing_file,
        required=True,
        help="predictions file (.npz) from vprkit retrieve or rerank",
    )
    add_dataset_arguments(parser)
    add_recall_values(parser)
    parser.add_argument("--out", type=output_file, help="write the metrics here as JSON")


def run_score(args: argparse.Namespace) -> int:
    predictions = load_predictions(args.predictions)
    dataset = read_dataset(args)
    for side, paths, names in (
        ("database", dataset.database_paths, predictions.database_names),
        ("queries", dataset.query_paths, predictions.query_names),
    ):
        if relative_names(paths, dataset.root) != names:
            raise VprkitError(
                f"{args.predictions}: its {side} images are not those of {dataset.name} "
                f"({len(names)} there, {len(paths)} in the dataset, or in another order)"
            )
    positives = dataset_positives(dataset, args.positive_dist_threshold)
    if positives is None:
        raise VprkitError(f"{dataset.name} has no labels: nothing to score against")
    metrics = score(predictions, positives, args.recall_values)
    print(format_recalls(metrics["recalls"]))
    print(
        f"AUC-PR: {metrics['auc_pr']:.3f}, recall at 100% precision: "
        f"{metrics['recall_at_100_precision']:.3f}"
    )
    if args.out:
        saved = {**metrics, "recalls": {f"R@{n}": v for n, v in metrics["recalls"].items()}}
        write_text(args.out, json.dumps(saved, indent=2))
    return 0


COMMANDS = {
    "extract": (add_extract_arguments, run_extract),
    "retrieve": (add_retrieve_arguments, run_retrieve),
    "rerank": (add_rerank_arguments, run_rerank),
    "score": (add_score_arguments, run_score),
}
