"""`evaluate(model, dataset, config)`: the stages chained over a benchmark, into a run folder.

extract (database, then queries, never mixed in a batch: CricaVPR's protocol) -> (PCA) ->
retrieve -> (rerank) -> score, then per-query results, retrieval pairs, pictures and the
metrics, all written to `<save_dir>/<run_name>/<timestamp>/`. The folder is built as
`<timestamp>.incomplete/` and renamed only when everything is written, so a failed run never
looks complete.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import numpy as np
from torch import nn

from vprkit.data.datasets import PlaceDataset, read_images_paths
from vprkit.data.images import Preprocess
from vprkit.errors import VprkitError, disk_full, is_disk_full
from vprkit.extract import save_descriptors
from vprkit.models.registry import model_info
from vprkit.pipeline.config import EvalConfig
from vprkit.pipeline.extract import extract
from vprkit.pipeline.features import Features
from vprkit.pipeline.outputs import save_pictures, write_pairs, write_per_query
from vprkit.pipeline.predictions import Predictions
from vprkit.pipeline.rerank import rerank
from vprkit.pipeline.retrieve import retrieve
from vprkit.pipeline.score import dataset_positives, score
from vprkit.retrieval.metrics import format_recalls
from vprkit.retrieval.search import fit_pca

log = logging.getLogger("vprkit.eval")

RANDOM = "random"  # weights="random": an explicit random initialization (`--weights random`)


@dataclass
class EvalResult:
    run_dir: Path
    recalls: dict[int, float] = field(default_factory=dict)
    predictions: np.ndarray | None = None
    distances: np.ndarray | None = None
    summary: dict = field(default_factory=dict)


def resolve(model: nn.Module, dataset: PlaceDataset, config: EvalConfig) -> EvalConfig:
    """`config` with the model's defaults filled in (image size, batch size, re-ranker)."""
    info = model_info(model)
    resolved = replace(
        config,
        image_size=info.image_size if config.image_size is None else config.image_size,
        infer_batch_size=config.infer_batch_size or info.eval_batch_size(dataset.name),
        rerank_num=info.rerank_num if config.rerank_num is None else config.rerank_num,
        reranker=config.reranker or info.reranker,
    )
    if resolved.rerank_num and resolved.reranker is None:
        name = getattr(model, "vprkit_name", type(model).__name__)
        raise VprkitError(f"{name} has no re-ranker of its own: choose --reranker")
    if resolved.rerank_num and resolved.tie_order is None:
        resolved.tie_order = info.default_tie_order(resolved.reranker)
    return resolved


def extract_sides(
    model: nn.Module,
    dataset: PlaceDataset,
    preprocess: Preprocess,
    folder: Path | None,
    *,
    local: bool = False,
    local_dtype: str = "float32",
    weights=None,
    label: str = "",
    extractor=extract,
    **options,
) -> tuple[Features, Features]:
    """Database then queries, each in its own batches; into `folder`/{database,queries}/
    when given (reused when made the same way). `extractor`: `extract` or one with its
    signature (`vprkit.distributed.ray_extract.ray_extract`)."""
    sides = []
    for side, paths in (("database", dataset.database_paths), ("queries", dataset.query_paths)):
        sides.append(
            extractor(
                model,
                paths,
                None if folder is None else folder / side,
                preprocess=preprocess,
                root=dataset.root,
                local=local,
                local_dtype=local_dtype,
                weights=weights,
                label=label + side,
                **options,
            )
        )
    return sides[0], sides[1]


def validation_recalls(
    model: nn.Module,
    dataset: PlaceDataset,
    positives: list[np.ndarray],
    preprocess: Preprocess,
    recall_values: list[int],
    rerank_num: int = 0,
    reranker: str | None = None,
    **extract_options,
) -> dict[int, float]:
    """Recall@N of `model` on `dataset`, for validation during training (no files kept);
    after re-ranking the top `rerank_num` with `reranker` when it is set (SelaVPR selects
    its checkpoints by re-ranked R@5)."""
    with ExitStack() as stack:
        folder = None
        if rerank_num:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vprkit_val_")))
        database, queries = extract_sides(
            model,
            dataset,
            preprocess,
            folder,
            local=bool(rerank_num),
            label="val ",
            **extract_options,
        )
        k = min(max(*recall_values, rerank_num), len(database))
        predictions = retrieve(database, queries, k)
        if rerank_num:
            predictions = rerank(
                predictions,
                reranker,
                database,
                queries,
                rerank_num,
                model=model,
                device=extract_options.get("device", "cpu"),
                label="val re-ranking",
            )
        return score(predictions, positives, recall_values)["recalls"]


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


def evaluate(
    model: nn.Module,
    dataset: PlaceDataset,
    config: EvalConfig | None = None,
    *,
    weights: str | os.PathLike | None = None,
    record: dict | None = None,
) -> EvalResult:
    """Evaluate `model` on `dataset` into a new run folder; `weights` (how the model's
    weights were named) and `record` (e.g. the command's flags) are saved with the results.
    Everything is checked before the run folder is made."""
    config = resolve(model, dataset, config or EvalConfig())
    positives = (
        None if config.no_labels else dataset_positives(dataset, config.positive_dist_threshold)
    )
    method = getattr(model, "vprkit_name", type(model).__name__)
    run_name = config.run_name or f"{method}_{dataset.name}"
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    final_dir = config.save_dir / run_name / stamp
    run_dir = final_dir.with_name(stamp + ".incomplete")
    run_dir.mkdir(parents=True, exist_ok=False)
    handler = _setup_logging(run_dir)
    try:
        context = _RunContext(model, dataset, config, positives, run_dir, weights, record)
        result = context.run()
        handler.close()
        log.removeHandler(handler)
        os.replace(run_dir, final_dir)
        result.run_dir = final_dir
        print(f"Results saved in {final_dir}")
        return result
    except BaseException as err:
        expected = isinstance(err, KeyboardInterrupt | VprkitError) or is_disk_full(err)
        if expected:  # the command line says what happened in one line: no traceback here
            log.info("evaluation stopped (%s); partial outputs left in %s", _reason(err), run_dir)
        else:
            log.exception("evaluation failed; partial outputs left in %s", run_dir)
        handler.close()
        log.removeHandler(handler)
        if is_disk_full(err) and not isinstance(err, VprkitError):
            raise disk_full(err.filename or run_dir) from err
        raise


def _reason(err: BaseException) -> str:
    return "interrupted" if isinstance(err, KeyboardInterrupt) else str(err).splitlines()[0]


def _peak_memory_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class _RunContext:
    """One evaluation's steps, sharing the model, dataset, settings and run folder."""

    def __init__(self, model, dataset, config: EvalConfig, positives, run_dir, weights, record):
        self.model, self.dataset, self.config = model, dataset, config
        self.positives, self.run_dir, self.weights = positives, run_dir, weights
        self.record = record or {}
        self.preprocess = Preprocess(image_size=config.image_size)
        self.method = getattr(model, "vprkit_name", type(model).__name__)
        self.timing: dict[str, float] = {}

    def run(self) -> EvalResult:
        self._log_setup()
        with ExitStack() as stack:
            database, queries = self._extract(stack)
            predictions = self._retrieve(database, queries)
            global_predictions = predictions
            if self.config.rerank_num:
                predictions = self._rerank(predictions, database, queries)
        return self._report(database, predictions, global_predictions)

    def _log_setup(self) -> None:
        config, options = self.config, getattr(self.model, "vprkit_overrides", {})
        log.info("vprkit eval: %s", self.record.get("_command") or "(API call)")
        log.info("dataset: %r", self.dataset)
        flags = {k: v for k, v in self.record.items() if not k.startswith("_")}
        saved = {**flags, **config.to_json(), "method": self.method}
        saved["image_size"] = self.preprocess.image_size
        (self.run_dir / "config.json").write_text(json.dumps(saved, indent=2, default=str))
        protocol = model_info(self.model).describe_protocol(self.model, config.infer_batch_size)
        log.info(
            "model: %s %s, weights: %s", self.method, options or "", self.weights or "random init"
        )
        if self.weights == RANDOM:
            log.warning(
                "warning: random weights (--weights random, --seed %s): the figures are those "
                "of an untrained network",
                self.record.get("seed", "not set"),
            )
        log.info("preprocessing: %r", self.preprocess)
        log.info(
            "protocol: database and queries encoded separately, in sorted order, batches of %d "
            "(last one smaller)%s",
            config.infer_batch_size,
            f"; {protocol}" if protocol else "",
        )

    def _extract_options(self) -> dict:
        c = self.config
        return dict(
            batch_size=c.infer_batch_size,
            num_workers=c.num_workers,
            device=c.device,
            precision=c.precision,
        )

    def _extract(self, stack: ExitStack) -> tuple[Features, Features]:
        config = self.config
        folder = config.features_dir
        if folder is None and config.rerank_num:
            # Local features can be tens of GB: on disk, memory-mapped, removed at the end.
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vprkit_local_")))
        extractor = extract
        if config.ray is not None:  # a Ray job over the cluster (vprkit.distributed)
            from functools import partial

            from vprkit.distributed.cluster import ray_session
            from vprkit.distributed.ray_extract import ray_extract

            stack.enter_context(ray_session(config.ray))  # one session for both sides
            extractor = partial(ray_extract, address=config.ray)
        with _Timer() as timer:
            database, queries = extract_sides(
                self.model,
                self.dataset,
                self.preprocess,
                folder,
                local=bool(config.rerank_num),
                local_dtype="float16" if config.local_features_fp16 else "float32",
                weights=self.weights,
                extractor=extractor,
                **self._extract_options(),
            )
        self.timing["extraction_s"] = timer.seconds
        num_images = len(database) + len(queries)
        log.info(
            "extracted %d x %d-D descriptors in %.1f s (%.1f ms per image)",
            num_images,
            database.global_desc.shape[1],
            timer.seconds,
            1000 * timer.seconds / num_images,
        )
        for side, features in (("database", database), ("queries", queries)):
            save_descriptors(
                np.asarray(features.global_desc),
                features.names,
                self.run_dir / f"{side}_descriptors.npy",
                self.run_dir / f"{side}_descriptors.h5",
            )
        return database, queries

    def _fit_pca(self):
        config = self.config
        pca_paths = read_images_paths(config.pca_dataset_folder)
        rng = np.random.default_rng(0)  # the official code fits PCA on shuffled batches
        pca_paths = [pca_paths[i] for i in rng.permutation(len(pca_paths))[: 2**14]]
        pca_features = extract(
            self.model,
            pca_paths,
            preprocess=self.preprocess,
            label="PCA set",
            **self._extract_options(),
        )
        pca = fit_pca(pca_features.global_desc, config.pca_dim)
        pca.save(self.run_dir / "pca.npz")
        log.info(
            "PCA to %d dimensions, fitted on %d images of %s",
            config.pca_dim,
            len(pca_paths),
            config.pca_dataset_folder,
        )
        return pca

    def _retrieve(self, database: Features, queries: Features) -> Predictions:
        config = self.config
        pca = self._fit_pca() if config.pca_dim is not None else None
        self.searched_dim = pca.output_dim if pca else int(database.global_desc.shape[1])
        k = min(max(*config.recall_values, config.rerank_num), len(database))
        budget = None if config.memory_budget_mb is None else int(config.memory_budget_mb * 2**20)
        with _Timer() as timer:
            predictions = retrieve(
                database,
                queries,
                k,
                pca=pca,
                memory_budget_bytes=budget,
                index=config.index,
                rescore=config.rescore,
                index_params=config.index_params,
                index_seed=config.index_seed,
            )
        self.timing["search_s"] = timer.seconds
        self.index_record = {
            key: predictions.record[key]
            for key in ("index", "index_rule")
            if key in (predictions.record or {})
        }
        if "index_rule" in self.index_record:
            log.info("%s", self.index_record["index_rule"])
        if "index" in self.index_record:
            entry = self.index_record["index"]
            self.timing["search_s"] = predictions.record["search_s"]  # the build apart
            log.info(
                "%s; top %d re-scored exactly from the full descriptors",
                entry["summary"],
                entry["rescore"],
            )
        log.info(
            "searched the top %d in %.3f s (%.3f ms per query)",
            k,
            self.timing["search_s"],
            1000 * self.timing["search_s"] / len(queries),
        )
        return predictions

    def _rerank(self, predictions: Predictions, database: Features, queries: Features):
        config = self.config
        budget = None if config.rerank_memory_mb is None else int(config.rerank_memory_mb * 2**20)
        with _Timer() as timer:
            reranked = rerank(
                predictions,
                config.reranker,
                database,
                queries,
                config.rerank_num,
                model=self.model,
                device=config.device,
                precision=config.rerank_precision,
                memory_budget_bytes=budget,
                tie_order=config.tie_order,
            )
        self.timing["rerank_s"] = timer.seconds
        log.info(
            "re-ranked the top %d with %s (equal scores: %s order) in %.1f s (%.1f ms per query)",
            reranked.scores.shape[1],
            config.reranker,
            config.tie_order,
            timer.seconds,
            1000 * timer.seconds / len(queries),
        )
        return reranked

    def _report(
        self, database: Features, predictions: Predictions, global_predictions
    ) -> EvalResult:
        summary = self._summary(database, predictions)
        recalls = self._score(summary, predictions, global_predictions)
        self._write_outputs(predictions, global_predictions)
        (self.run_dir / "recalls.json").write_text(json.dumps(summary, indent=2))
        return EvalResult(
            self.run_dir, recalls, predictions.indices, predictions.distances, summary
        )

    def _summary(self, database: Features, predictions: Predictions) -> dict:
        config, num_queries = self.config, len(predictions.indices)
        num_images = len(database) + num_queries
        size = self.preprocess.image_size
        return {
            "method": self.method,
            "weights": None if self.weights is None else str(self.weights),
            "random_init": self.weights == RANDOM,
            "dataset": self.dataset.name,
            "num_database": len(database),
            "num_queries": num_queries,
            "descriptor_dim": self.searched_dim,
            "image_size": list(size) if isinstance(size, tuple) else size,
            "infer_batch_size": config.infer_batch_size,
            "reranker": config.reranker if config.rerank_num else None,
            "rerank_num": config.rerank_num,
            "tie_order": config.tie_order if config.rerank_num else None,
            **({"index": self.index_record} if getattr(self, "index_record", None) else {}),
            "timing": {
                "extraction_ms_per_image": 1000 * self.timing["extraction_s"] / num_images,
                "search_ms_per_query": 1000 * self.timing["search_s"] / num_queries,
                "rerank_ms_per_query": 1000 * self.timing.get("rerank_s", 0.0) / num_queries,
                "peak_memory_mib": _peak_memory_mib(),
            },
        }

    def _score(self, summary: dict, predictions: Predictions, global_predictions) -> dict:
        if self.positives is None:
            log.info("no labels: retrieval only, no recall computed")
            return {}
        config = self.config
        metrics = score(predictions, self.positives, config.recall_values)
        without = metrics["queries_without_positives"]
        if without:
            log.info(
                "%d of %d queries have no positive within %g m; they count as misses, "
                "as the convention does",
                without,
                len(predictions.indices),
                config.positive_dist_threshold,
            )
        if config.rerank_num:
            global_recalls = score(global_predictions, self.positives, config.recall_values)
            global_recalls = global_recalls["recalls"]
            depth = predictions.scores.shape[1]
            summary["recalls_global"] = {f"R@{n}": v for n, v in global_recalls.items()}
            summary["reranker"] = {"method": config.reranker, "rerank_num": int(depth)}
            log.info("global retrieval: %s", format_recalls(global_recalls))
            log.info("re-ranked (%s, top %d):", config.reranker, depth)
        summary.update(
            recalls={f"R@{n}": v for n, v in metrics["recalls"].items()},
            queries_without_positives=without,
            auc_pr=metrics["auc_pr"],
            recall_at_100_precision=metrics["recall_at_100_precision"],
        )
        log.info("%s", format_recalls(metrics["recalls"]))
        log.info(
            "AUC-PR: %.3f, recall at 100%% precision: %.3f",
            summary["auc_pr"],
            summary["recall_at_100_precision"],
        )
        return metrics["recalls"]

    def _write_outputs(self, predictions: Predictions, global_predictions: Predictions) -> None:
        from vprkit.data.formats import write_results

        reranked = global_predictions is not predictions
        written = write_results(
            self.dataset,
            self.run_dir,
            predictions.indices,
            global_predictions.indices if reranked else None,
        )
        if written:
            log.info("%s", getattr(self.dataset, "description", self.dataset.layout))
        write_per_query(self.run_dir / "predictions.csv", predictions, self.positives)
        write_pairs(self.run_dir / "pairs.txt", predictions)
        if self.config.num_preds_to_save:
            save_pictures(
                self.run_dir / "preds",
                self.dataset,
                predictions,
                self.positives,
                self.config.num_preds_to_save,
                self.config.save_only_wrong_preds,
            )


class _Timer:
    def __enter__(self):
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._start
