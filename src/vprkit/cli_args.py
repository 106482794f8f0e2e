"""Flags shared by the verbs: the model to build, the dataset to read, how to extract."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import torch

from vprkit.data.datasets import PlaceDataset, read_folders
from vprkit.data.formats import open_dataset
from vprkit.data.images import Preprocess
from vprkit.extract import PRECISIONS
from vprkit.models.registry import model_info
from vprkit.pipeline.config import size_option


def parse_model_option(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--model_option expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a plain string such as size=vits14


def add_model_arguments(parser: argparse.ArgumentParser, default_method: str | None = None):
    """`--method`, `--weights` and `--model_option` (the verbs that build a model)."""
    model = parser.add_argument_group("model")
    model.add_argument(
        "--method",
        required=default_method is None,
        default=default_method,
        help="a registered model: vprkit models",
    )
    model.add_argument("--weights", help="weights file or official name (vprkit weights list)")
    model.add_argument(
        "--model_option",
        "--model-option",
        type=parse_model_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="constructor override, repeatable, e.g. size=vits14 depth=2",
    )


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """`--dataset_folder` (any known layout) or `--database_folder`/`--queries_folder`."""
    data = parser.add_argument_group("data")
    data.add_argument("--dataset_folder", "--dataset-folder", type=Path)
    data.add_argument("--split", default="test", help="VG layout split")
    data.add_argument("--database_folder", "--database-folder", type=Path)
    data.add_argument("--queries_folder", "--queries-folder", type=Path)
    data.add_argument("--ground_truth", "--ground-truth", type=Path, help="VPR-Bench .npy")
    data.add_argument("--no_labels", "--no-labels", action="store_true")
    data.add_argument(
        "--msls_split",
        "--msls-split",
        choices=["val", "test"],
        default="val",
        help="Mapillary SLS folder (train_val/, test/): which split",
    )
    data.add_argument(
        "--msls_val_split",
        "--msls-val-split",
        choices=["official", "downloader"],
        default="official",
        help="official: the 740-query set the papers use; downloader: VPR-datasets-downloader's",
    )
    data.add_argument("--msls_subtask", "--msls-subtask", default="all")
    data.add_argument("--msls_cities", "--msls-cities", nargs="+", help="default: the split's")
    data.add_argument(
        "--positive_dist_threshold", "--positive-dist-threshold", type=float, default=25.0
    )


def add_extraction_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Input size, batch size, workers, device and precision of the forward passes."""
    run = parser.add_argument_group("run")
    run.add_argument("--image_size", "--image-size", type=int, nargs="+", metavar="N")
    run.add_argument(
        "--infer_batch_size",
        "--infer-batch-size",
        type=int,
        help="default: the method's official value (CricaVPR: 16, 8 for pitts*), else 16",
    )
    run.add_argument("--num_workers", "--num-workers", type=int, default=2)
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    run.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32")
    return run


def make_preprocess(model: torch.nn.Module, image_size: list[int] | None) -> Preprocess:
    """The preprocessing `--image_size` asks for, else the model's evaluation size."""
    size = size_option(image_size)
    return Preprocess(image_size=model_info(model).image_size if size is None else size)


def read_dataset(args: argparse.Namespace) -> PlaceDataset:
    """The dataset the flags name: `--dataset_folder` in any registered layout
    (`vprkit.data.formats`), or `--database_folder` with `--queries_folder`."""
    if args.dataset_folder is not None:
        if args.database_folder or args.queries_folder:
            raise ValueError("give either --dataset_folder or --database_folder/--queries_folder")
        options = dict(
            split=args.split,
            no_labels=args.no_labels,
            msls_split=args.msls_split,
            msls_cities=args.msls_cities,
            msls_subtask=args.msls_subtask,
            msls_val_split=args.msls_val_split,
            positive_dist_threshold=args.positive_dist_threshold,
        )
        if args.ground_truth is not None:
            options["ground_truth"] = args.ground_truth
        return open_dataset(args.dataset_folder, **options)
    if not (args.database_folder and args.queries_folder):
        raise ValueError("give --dataset_folder, or both --database_folder and --queries_folder")
    return read_folders(
        args.database_folder, args.queries_folder, args.ground_truth, no_labels=args.no_labels
    )
