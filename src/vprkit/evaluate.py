"""`vprkit eval`: a model over a benchmark, Recall@N the way the field reports it.

This module maps the command's flags onto `vprkit.pipeline.EvalConfig` and calls
`vprkit.pipeline.evaluate`, which chains the stages (extract, retrieve, rerank, score) and
writes the run folder `<save_dir>/<run_name>/<timestamp>/`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vprkit.cli_args import (
    add_dataset_arguments,
    add_extraction_arguments,
    add_index_arguments,
    add_local_fp16_argument,
    add_model_arguments,
    add_ray_argument,
    add_recall_values,
    add_reranker_arguments,
    build_model_from_args,
    check_model,
    existing_dir,
    non_negative_int,
    positive_float,
    positive_int,
    read_dataset,
)
from vprkit.models.compiled import check_not_with_ray
from vprkit.pipeline.config import EvalConfig, size_option
from vprkit.pipeline.evaluate import EvalResult, evaluate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_dataset_arguments(parser)
    run = add_extraction_arguments(parser)
    add_ray_argument(run)
    add_recall_values(run)
    run.add_argument(
        "--pca_dim",
        "--pca-dim",
        type=positive_int,
        help="project descriptors to this many dimensions (with --pca_dataset_folder)",
    )
    run.add_argument(
        "--pca_dataset_folder",
        "--pca-dataset-folder",
        type=existing_dir,
        help="images the PCA is fitted on (up to 2**14, shuffled, as the official code)",
    )
    run.add_argument(
        "--memory_budget_mb",
        "--memory-budget-mb",
        type=positive_float,
        help="bound the search's working memory (same ranking, slower)",
    )
    add_index_arguments(parser.add_argument_group("index (default: exact flat, as the papers)"))
    rerank = parser.add_argument_group("re-ranking (models with local features)")
    rerank.add_argument(
        "--rerank_num",
        "--rerank-num",
        type=non_negative_int,
        help="re-rank this many global candidates; default: the method's (100), 0 = off",
    )
    add_reranker_arguments(rerank)
    rerank.add_argument(
        "--local_features_cache",
        "--local-features-cache",
        "--features_dir",
        "--features-dir",
        dest="local_features_cache",
        type=Path,
        help="keep the extracted features here (database/, queries/; local features "
        "memory-mapped) instead of a temporary folder; reused when made the same way",
    )
    add_local_fp16_argument(rerank)
    out = parser.add_argument_group("outputs")
    out.add_argument(
        "--save_dir",
        "--save-dir",
        type=Path,
        default=Path("runs"),
        help="run folders go to SAVE_DIR/RUN_NAME/<timestamp>/",
    )
    out.add_argument("--run_name", "--run-name", help="default: <method>_<dataset>")
    out.add_argument(
        "--num_preds_to_save",
        "--num-preds-to-save",
        type=non_negative_int,
        default=0,
        help="save a picture of each query with its first N predictions",
    )
    out.add_argument(
        "--save_only_wrong_preds",
        "--save-only-wrong-preds",
        action="store_true",
        help="pictures only of queries whose first prediction is wrong",
    )


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    return EvalConfig(
        recall_values=tuple(args.recall_values),
        positive_dist_threshold=args.positive_dist_threshold,
        no_labels=args.no_labels,
        image_size=size_option(args.image_size),
        infer_batch_size=args.infer_batch_size,
        num_workers=args.num_workers,
        device=args.device,
        precision=args.precision,
        pca_dim=args.pca_dim,
        pca_dataset_folder=args.pca_dataset_folder,
        memory_budget_mb=args.memory_budget_mb,
        index=args.index,
        rescore=args.rescore,
        index_params=args.index_params,
        index_seed=args.index_seed,
        rerank_num=args.rerank_num,
        reranker=args.reranker,
        tie_order=args.tie_order,
        features_dir=args.local_features_cache,
        local_features_fp16=args.local_features_fp16,
        rerank_memory_mb=args.rerank_memory_mb,
        rerank_precision=args.rerank_precision,
        save_dir=args.save_dir,
        run_name=args.run_name,
        num_preds_to_save=args.num_preds_to_save,
        save_only_wrong_preds=args.save_only_wrong_preds,
        ray=args.ray,
    )


def evaluate_args(args: argparse.Namespace) -> EvalResult:
    """`vprkit eval` on parsed flags: everything is checked before a model is built or a
    run folder made."""
    config = config_from_args(args)
    check_model(args)  # cheap: a bad flag is reported before the dataset is read
    check_not_with_ray(args.compile, args.ray)
    dataset = read_dataset(args)  # before the run folder: a bad dataset leaves nothing behind
    model, weights = build_model_from_args(args)
    record = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    record["_command"] = getattr(args, "_command", None)
    return evaluate(model, dataset, config, weights=weights, record=record)


def run(args: argparse.Namespace) -> int:
    evaluate_args(args)
    return 0
