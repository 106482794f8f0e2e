"""`vprkit eval`: a model over a benchmark, Recall@N the way the field reports it.

Stages: dataset reader -> preprocessing -> model -> global descriptors -> (PCA) -> exact
search -> metrics, per-query results and pictures, all written to a run folder
`<save_dir>/<run_name>/<timestamp>/`. The folder is built as `<timestamp>.incomplete/` and
renamed only when everything is written, so a failed run never looks complete.
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import logging
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from vprkit.data.datasets import PlaceDataset, load_dataset, read_folders, read_images_paths
from vprkit.data.images import Preprocess, load_image
from vprkit.extract import PRECISIONS, extract_global_descriptors, save_descriptors
from vprkit.models.registry import create_model, list_models
from vprkit.rerank.mnn import LocalFeatureCache
from vprkit.rerank.pipeline import RERANKERS, apply_order, make_scorer, rerank_order
from vprkit.retrieval.ground_truth import positives_within_radius, queries_without_positives
from vprkit.retrieval.metrics import (
    auc_pr,
    format_recalls,
    recall_at_100_precision,
    recall_at_n,
)
from vprkit.retrieval.search import fit_pca, search, unnormalized_search
from vprkit.visualize import save_prediction_picture

log = logging.getLogger("vprkit.eval")


# --------------------------------------------------------------------------- arguments


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
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
    run.add_argument(
        "--recall_values", "--recall-values", type=int, nargs="+", default=[1, 5, 10, 20, 100]
    )
    run.add_argument("--pca_dim", "--pca-dim", type=int)
    run.add_argument("--pca_dataset_folder", "--pca-dataset-folder", type=Path)
    run.add_argument(
        "--memory_budget_mb",
        "--memory-budget-mb",
        type=float,
        help="bound the search's working memory (same ranking, slower)",
    )
    rerank = parser.add_argument_group("re-ranking (models with local features)")
    rerank.add_argument(
        "--rerank_num",
        "--rerank-num",
        type=int,
        help="re-rank this many global candidates; default: the method's (100), 0 = off",
    )
    rerank.add_argument("--reranker", choices=RERANKERS, help="default: the method's own")
    rerank.add_argument(
        "--local_features_cache",
        "--local-features-cache",
        type=Path,
        help="keep local features on disk here (memory-mapped) instead of a temporary folder",
    )
    rerank.add_argument(
        "--local_features_fp16",
        "--local-features-fp16",
        action="store_true",
        help="store local features in fp16 (half the disk; counts may differ slightly)",
    )
    rerank.add_argument("--rerank_memory_mb", "--rerank-memory-mb", type=float)
    rerank.add_argument(
        "--rerank_precision", "--rerank-precision", choices=sorted(PRECISIONS), default="fp32"
    )
    out = parser.add_argument_group("outputs")
    out.add_argument("--save_dir", "--save-dir", type=Path, default=Path("runs"))
    out.add_argument("--run_name", "--run-name", help="default: <method>_<dataset>")
    out.add_argument("--num_preds_to_save", "--num-preds-to-save", type=int, default=0)
    out.add_argument("--save_only_wrong_preds", "--save-only-wrong-preds", action="store_true")


@dataclass
class EvalResult:
    run_dir: Path
    recalls: dict[int, float] = field(default_factory=dict)
    predictions: np.ndarray | None = None
    distances: np.ndarray | None = None
    summary: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- pipeline


class LocalStores:
    """Where both sides' local features go for re-ranking: memory-mapped .npy caches in
    `--local_features_cache` (kept) or in a temporary folder (removed at the end)."""

    def __init__(self, folder: Path | None = None, fp16: bool = False) -> None:
        self._tmp = None
        if folder is not None:
            self.folder = Path(folder)
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="vprkit_local_")
            self.folder = Path(self._tmp.name)
        self.dtype = "float16" if fp16 else "float32"
        self.caches: dict[str, LocalFeatureCache] = {}

    def sink(self, name: str, count: int):
        def write(indices: torch.Tensor, local: torch.Tensor) -> None:
            if name not in self.caches:
                path = self.folder / f"{name}_local_features.npy"
                self.caches[name] = LocalFeatureCache.create(
                    path, count, local.shape[1:], self.dtype
                )
            self.caches[name].write(indices, local)

        return write

    def read(self, name: str) -> LocalFeatureCache:
        cache = self.caches[name]
        cache.close()  # publishes a finished cache and reopens it read-only
        return cache

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def _image_hw(preprocess: Preprocess, dataset: PlaceDataset) -> tuple[int, int]:
    """The network's input size (for local-feature coordinates)."""
    if isinstance(preprocess.image_size, tuple):
        return preprocess.image_size
    shape = preprocess(load_image(dataset.query_paths[0])).shape
    return int(shape[1]), int(shape[2])


def read_dataset(args: argparse.Namespace) -> PlaceDataset:
    if args.dataset_folder is not None:
        if args.database_folder or args.queries_folder:
            raise ValueError("give either --dataset_folder or --database_folder/--queries_folder")
        from vprkit.data.msls import is_msls_root, read_msls

        if (
            is_msls_root(args.dataset_folder)
            or args.msls_split == "test"
            and (Path(args.dataset_folder) / "test").is_dir()
        ):
            return read_msls(
                args.dataset_folder,
                split=args.msls_split,
                cities=args.msls_cities,
                subtask=args.msls_subtask,
                val_split=args.msls_val_split,
            )
        return load_dataset(args.dataset_folder, split=args.split, no_labels=args.no_labels)
    if not (args.database_folder and args.queries_folder):
        raise ValueError("give --dataset_folder, or both --database_folder and --queries_folder")
    return read_folders(
        args.database_folder, args.queries_folder, args.ground_truth, no_labels=args.no_labels
    )


def dataset_positives(dataset: PlaceDataset, radius: float) -> list[np.ndarray] | None:
    if dataset.positives is not None:
        return dataset.positives
    if dataset.query_utm is not None and dataset.database_utm is not None:
        return positives_within_radius(dataset.database_utm, dataset.query_utm, radius)
    return None


def make_preprocess(model: torch.nn.Module, image_size: list[int] | None) -> Preprocess:
    if image_size is None:
        size = getattr(model, "default_image_size", (224, 224))
    elif len(image_size) == 1:
        size = image_size[0]
    elif len(image_size) == 2:
        size = tuple(image_size)
    else:
        raise ValueError(
            f"--image_size takes one value (short side) or two (H W), got {image_size}"
        )
    return Preprocess(image_size=size)


def _relative_names(paths: list[Path], root: Path) -> list[str]:
    names = []
    for p in paths:
        try:
            names.append(p.relative_to(root).as_posix())
        except ValueError:
            names.append(p.as_posix().lstrip("/"))
    return names


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is at the time (it may be redirected between runs)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.addHandler(handler)
    if not any(isinstance(h, _StdoutHandler) for h in log.handlers):
        log.addHandler(_StdoutHandler())
    log.setLevel(logging.INFO)
    log.propagate = False
    return handler


def _peak_memory_mib() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def evaluate(args: argparse.Namespace) -> EvalResult:
    if args.infer_batch_size is not None and args.infer_batch_size < 1:
        raise ValueError(f"--infer_batch_size must be at least 1, got {args.infer_batch_size}")
    if args.no_labels and args.ground_truth:
        raise ValueError("--no_labels and --ground_truth contradict each other")
    if (args.pca_dim is None) != (args.pca_dataset_folder is None):
        raise ValueError("--pca_dim and --pca_dataset_folder go together")
    if args.pca_dim is not None and args.memory_budget_mb is not None:
        raise ValueError(
            "--memory_budget_mb cannot be used with --pca_dim (as in the official code)"
        )
    if args.method not in list_models():
        raise ValueError(f"unknown --method {args.method!r}; known: {', '.join(list_models())}")
    dataset = read_dataset(args)  # before the run folder: a bad dataset leaves nothing behind
    positives = None if args.no_labels else dataset_positives(dataset, args.positive_dist_threshold)

    run_name = args.run_name or f"{args.method}_{dataset.name}"
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    final_dir = args.save_dir / run_name / stamp
    run_dir = final_dir.with_name(stamp + ".incomplete")
    run_dir.mkdir(parents=True, exist_ok=False)
    handler = _setup_logging(run_dir)
    try:
        result = _evaluate_in(run_dir, args, dataset, positives)
        handler.close()
        log.removeHandler(handler)
        os.replace(run_dir, final_dir)
        result.run_dir = final_dir
        print(f"Results saved in {final_dir}")
        return result
    except BaseException:
        log.exception("evaluation failed; partial outputs left in %s", run_dir)
        handler.close()
        log.removeHandler(handler)
        raise


def extract_both_sides(
    model: torch.nn.Module,
    dataset: PlaceDataset,
    preprocess: Preprocess,
    stores: LocalStores | None,
    label: str = "",
    **extract_options,
) -> tuple[np.ndarray, np.ndarray]:
    """Database then queries, each in its own batches (never mixed: CricaVPR's protocol);
    local features go to `stores` when re-ranking follows."""
    sides = []
    for side, paths in (("database", dataset.database_paths), ("queries", dataset.query_paths)):
        sink = stores.sink(side, len(paths)) if stores else None
        sides.append(
            extract_global_descriptors(
                model, paths, preprocess, label=label + side, local_sink=sink, **extract_options
            )
        )
    return sides[0], sides[1]


def validation_recalls(
    model: torch.nn.Module,
    dataset: PlaceDataset,
    positives: list[np.ndarray],
    preprocess: Preprocess,
    recall_values: list[int],
    rerank_num: int = 0,
    reranker: str | None = None,
    **extract_options,
) -> dict[int, float]:
    """Recall@N of `model` on `dataset`, for validation during training (no files written);
    after re-ranking the top `rerank_num` with `reranker` when it is set (SelaVPR selects
    its checkpoints by re-ranked R@5)."""
    stores = LocalStores() if rerank_num else None
    try:
        db_desc, q_desc = extract_both_sides(
            model, dataset, preprocess, stores, label="val ", **extract_options
        )
        k = min(max(*recall_values, rerank_num), len(db_desc))
        _, predictions = search(db_desc, q_desc, k)
        if stores:
            scorer = make_scorer(
                reranker,
                model,
                stores.read("queries"),
                stores.read("database"),
                q_desc,
                db_desc,
                _image_hw(preprocess, dataset),
                device=extract_options.get("device", "cpu"),
            )
            orders, _ = rerank_order(predictions, rerank_num, scorer, label="val re-ranking")
            predictions = apply_order(predictions, orders)
        return recall_at_n(predictions, positives, recall_values)
    finally:
        if stores:
            stores.close()


def _evaluate_in(
    run_dir: Path, args: argparse.Namespace, dataset: PlaceDataset, positives
) -> EvalResult:
    log.info("vprkit eval: %s", " ".join(sys.argv[1:]) or "(API call)")
    log.info("dataset: %r", dataset)
    options = dict(args.model_option)
    model = create_model(args.method, weights=args.weights, **options)
    preprocess = make_preprocess(model, args.image_size)
    if args.infer_batch_size is None:
        official = getattr(model, "official_infer_batch_size", None)
        args.infer_batch_size = official(dataset.name) if official else 16
    config = {
        k: str(v) if isinstance(v, Path) else v
        for k, v in vars(args).items()
        if not k.startswith("_")
    }
    config["image_size"] = preprocess.image_size
    (run_dir / "config.json").write_text(json.dumps(config, indent=2, default=str))
    protocol = getattr(model, "describe_eval_protocol", None)
    log.info("model: %s %s, weights: %s", args.method, options or "", args.weights or "random init")
    log.info("preprocessing: %r", preprocess)
    log.info(
        "protocol: database and queries encoded separately, in sorted order, batches of %d "
        "(last one smaller)%s",
        args.infer_batch_size,
        f"; {protocol(args.infer_batch_size)}" if protocol else "",
    )

    extract = dict(
        batch_size=args.infer_batch_size,
        num_workers=args.num_workers,
        device=args.device,
        precision=args.precision,
    )
    rerank_num = args.rerank_num
    if rerank_num is None:
        rerank_num = getattr(model, "default_rerank_num", 0)
    reranker = args.reranker or getattr(model, "default_reranker", None)
    if rerank_num and reranker is None:
        raise ValueError(f"{args.method} has no re-ranker of its own: choose --reranker")
    locals_ = (
        LocalStores(args.local_features_cache, args.local_features_fp16) if rerank_num else None
    )
    start = time.perf_counter()
    db_desc, q_desc = extract_both_sides(model, dataset, preprocess, locals_, **extract)
    num_images = len(db_desc) + len(q_desc)
    extraction_s = time.perf_counter() - start
    log.info(
        "extracted %d x %d-D descriptors in %.1f s (%.1f ms per image)",
        num_images,
        db_desc.shape[1],
        extraction_s,
        1000 * extraction_s / num_images,
    )

    db_names = _relative_names(dataset.database_paths, dataset.root)
    q_names = _relative_names(dataset.query_paths, dataset.root)
    save_descriptors(
        db_desc, db_names, run_dir / "database_descriptors.npy", run_dir / "database_descriptors.h5"
    )
    save_descriptors(
        q_desc, q_names, run_dir / "queries_descriptors.npy", run_dir / "queries_descriptors.h5"
    )

    if args.pca_dim is not None:
        pca_paths = read_images_paths(args.pca_dataset_folder)
        rng = np.random.default_rng(0)  # the official code fits PCA on shuffled batches
        pca_paths = [pca_paths[i] for i in rng.permutation(len(pca_paths))[: 2**14]]
        pca_desc = extract_global_descriptors(
            model, pca_paths, preprocess, label="PCA set", **extract
        )
        pca = fit_pca(pca_desc, args.pca_dim)
        pca.save(run_dir / "pca.npz")
        db_desc, q_desc = pca.transform(db_desc), pca.transform(q_desc)
        log.info(
            "PCA to %d dimensions, fitted on %d images of %s",
            args.pca_dim,
            len(pca_paths),
            args.pca_dataset_folder,
        )

    k = min(max(*args.recall_values, rerank_num), len(db_desc))
    budget = None if args.memory_budget_mb is None else int(args.memory_budget_mb * 2**20)
    start = time.perf_counter()
    if args.pca_dim is not None:
        # As the official code: PCA outputs are searched as they are, not re-normalized.
        distances, predictions = unnormalized_search(db_desc, q_desc, k)
    else:
        distances, predictions = search(db_desc, q_desc, k, memory_budget_bytes=budget)
    search_s = time.perf_counter() - start
    log.info(
        "searched the top %d in %.3f s (%.3f ms per query)",
        k,
        search_s,
        1000 * search_s / len(q_desc),
    )

    global_predictions = predictions
    scores = -distances[:, 0]
    rerank_s = 0.0
    if rerank_num:
        start = time.perf_counter()
        scorer = make_scorer(
            reranker,
            model,
            locals_.read("queries"),
            locals_.read("database"),
            q_desc,
            db_desc,
            _image_hw(preprocess, dataset),
            device=args.device,
            precision=args.rerank_precision,
            memory_budget_bytes=None
            if args.rerank_memory_mb is None
            else int(args.rerank_memory_mb * 2**20),
        )
        orders, rerank_scores = rerank_order(predictions, rerank_num, scorer)
        predictions, distances = apply_order(predictions, orders), apply_order(distances, orders)
        scores = rerank_scores[:, 0]
        rerank_s = time.perf_counter() - start
        log.info(
            "re-ranked the top %d with %s in %.1f s (%.1f ms per query)",
            orders.shape[1],
            reranker,
            rerank_s,
            1000 * rerank_s / len(q_desc),
        )
        locals_.close()

    summary: dict = {
        "method": args.method,
        "weights": args.weights,
        "dataset": dataset.name,
        "num_database": len(db_desc),
        "num_queries": len(q_desc),
        "descriptor_dim": int(db_desc.shape[1]),
        "image_size": list(preprocess.image_size)
        if isinstance(preprocess.image_size, tuple)
        else preprocess.image_size,
        "infer_batch_size": args.infer_batch_size,
        "timing": {
            "extraction_ms_per_image": 1000 * extraction_s / num_images,
            "search_ms_per_query": 1000 * search_s / len(q_desc),
            "rerank_ms_per_query": 1000 * rerank_s / len(q_desc),
            "peak_memory_mib": _peak_memory_mib(),
        },
    }
    recalls: dict[int, float] = {}
    if positives is not None:
        without = queries_without_positives(positives)
        if len(without):
            log.info(
                "%d of %d queries have no positive within %g m; they count as misses, "
                "as the convention does",
                len(without),
                len(q_desc),
                args.positive_dist_threshold,
            )
        recalls = recall_at_n(predictions, positives, args.recall_values)
        if rerank_num:
            global_recalls = recall_at_n(global_predictions, positives, args.recall_values)
            summary["recalls_global"] = {f"R@{n}": v for n, v in global_recalls.items()}
            summary["reranker"] = {"method": reranker, "rerank_num": int(orders.shape[1])}
            log.info("global retrieval: %s", format_recalls(global_recalls))
            log.info("re-ranked (%s, top %d):", reranker, orders.shape[1])
        summary.update(
            recalls={f"R@{n}": v for n, v in recalls.items()},
            queries_without_positives=int(len(without)),
            auc_pr=auc_pr(predictions, positives, scores),
            recall_at_100_precision=recall_at_100_precision(predictions, positives, scores),
        )
        log.info("%s", format_recalls(recalls))
        log.info(
            "AUC-PR: %.3f, recall at 100%% precision: %.3f",
            summary["auc_pr"],
            summary["recall_at_100_precision"],
        )
    else:
        log.info("no labels: retrieval only, no recall computed")

    if hasattr(dataset, "query_keys"):  # Mapillary SLS: the challenge's submission files
        from vprkit.data.msls import write_submission

        write_submission(
            run_dir / "msls_submission.csv", dataset.query_keys, dataset.database_keys, predictions
        )
        if rerank_num:
            write_submission(
                run_dir / "msls_submission_global.csv",
                dataset.query_keys,
                dataset.database_keys,
                global_predictions,
            )
        log.info("%s", getattr(dataset, "description", "MSLS"))
    _write_per_query(run_dir, q_names, db_names, predictions, distances, positives)
    _write_pairs(run_dir / "pairs.txt", q_names, db_names, predictions)
    if args.num_preds_to_save:
        _save_pictures(run_dir, args, dataset, predictions, positives)
    (run_dir / "recalls.json").write_text(json.dumps(summary, indent=2))
    return EvalResult(run_dir, recalls, predictions, distances, summary)


def first_correct_rank(predictions: np.ndarray, positives) -> np.ndarray:
    """1-based rank of each query's first correct prediction, 0 when none is correct."""
    ranks = np.zeros(len(predictions), dtype=np.int64)
    for i, (row, pos) in enumerate(zip(predictions, positives, strict=True)):
        hits = np.flatnonzero(np.isin(row, pos))
        if len(hits):
            ranks[i] = hits[0] + 1
    return ranks


def _write_per_query(run_dir, q_names, db_names, predictions, distances, positives) -> None:
    ranks = first_correct_rank(predictions, positives) if positives is not None else None
    with open(run_dir / "predictions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["query", "predictions", "distances", "positives", "correct_at_1", "first_correct_rank"]
        )
        for i, name in enumerate(q_names):
            pos = positives[i] if positives is not None else None
            writer.writerow(
                [
                    name,
                    ";".join(db_names[j] for j in predictions[i]),
                    ";".join(f"{d:.4f}" for d in distances[i]),
                    "" if pos is None else ";".join(map(str, pos)),
                    "" if ranks is None else bool(ranks[i] == 1),
                    "" if ranks is None or ranks[i] == 0 else int(ranks[i]),
                ]
            )


def _write_pairs(path: Path, q_names, db_names, predictions) -> None:
    """hloc-style retrieval pairs: `query database` per line, best first."""
    with open(path, "w") as f:
        for i, name in enumerate(q_names):
            f.writelines(f"{name} {db_names[j]}\n" for j in predictions[i])


def _save_pictures(run_dir, args, dataset, predictions, positives) -> None:
    n = min(args.num_preds_to_save, predictions.shape[1])
    saved = 0
    for i, query in enumerate(dataset.query_paths):
        preds = predictions[i, :n]
        if positives is None:
            correct = [None] * n
        else:
            correct = [bool(np.isin(j, positives[i])) for j in preds]
            if args.save_only_wrong_preds and correct[0]:
                continue
        save_prediction_picture(
            run_dir / "preds" / f"{i:05d}_{query.stem}.jpg",
            query,
            [dataset.database_paths[j] for j in preds],
            correct,
        )
        saved += 1
    log.info("saved %d prediction pictures in preds/", saved)


def run(args: argparse.Namespace) -> int:
    evaluate(args)
    return 0
