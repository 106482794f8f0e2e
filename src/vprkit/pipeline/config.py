"""The settings of an evaluation, typed; `vprkit eval` maps its flags onto these fields."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from vprkit.errors import VprkitError
from vprkit.extract import PRECISIONS


@dataclass
class EvalConfig:
    """How `vprkit.pipeline.evaluate` runs; None means "the model's own" where noted."""

    recall_values: tuple[int, ...] = (1, 5, 10, 20, 100)
    positive_dist_threshold: float = 25.0  # metres: positives of UTM-labelled sets
    no_labels: bool = False  # retrieval only, no recall
    image_size: int | tuple[int, int] | None = None  # short side, or (H, W); None: the model's
    infer_batch_size: int | None = None  # None: the model's official value for the dataset
    num_workers: int = 2
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")
    precision: str = "fp32"  # fp32, bf16 or fp16 autocast for the forward
    pca_dim: int | None = None  # with pca_dataset_folder: PCA fitted on that folder's images
    pca_dataset_folder: Path | None = None
    memory_budget_mb: float | None = None  # bound the search's working memory
    index: str = "flat"  # flat (exact), ivfpq, hnsw, auto or a FAISS factory string
    rescore: int = 100  # compressed index: candidates re-scored exactly (0: its own order)
    index_params: str | None = None  # FAISS search parameters (nprobe=16, efSearch=64)
    index_seed: int = 0  # the compressed index's training sample
    rerank_num: int | None = None  # candidates to re-rank; None: the model's; 0: off
    reranker: str | None = None  # None: the model's own
    tie_order: str | None = None  # equal re-rank scores: official/stable; None: the model's
    features_dir: Path | None = None  # keep features here; reused when made the same way
    local_features_fp16: bool = False
    rerank_memory_mb: float | None = None
    rerank_precision: str = "fp32"
    save_dir: Path = Path("runs")
    run_name: str | None = None  # default: <method>_<dataset>
    num_preds_to_save: int = 0  # pictures of the first N predictions per query
    save_only_wrong_preds: bool = False
    ray: str | None = None  # "auto" or a Ray address: extraction as a Ray job (vprkit[ray])

    def __post_init__(self) -> None:
        self.recall_values = tuple(int(n) for n in self.recall_values)
        if not self.recall_values or min(self.recall_values) < 1:
            raise VprkitError(f"recall values must be positive, got {list(self.recall_values)}")
        if self.infer_batch_size is not None and self.infer_batch_size < 1:
            raise VprkitError(f"--infer_batch_size must be at least 1, got {self.infer_batch_size}")
        if (self.pca_dim is None) != (self.pca_dataset_folder is None):
            raise VprkitError("--pca_dim and --pca_dataset_folder go together")
        if self.pca_dim is not None and self.memory_budget_mb is not None:
            raise VprkitError(
                "--memory_budget_mb cannot be used with --pca_dim (as in the official code)"
            )
        if str(self.index).strip().lower() not in ("flat", ""):
            if self.pca_dim is not None:
                raise VprkitError(
                    f"--index {self.index} cannot be used with --pca_dim: give the PCA inside "
                    "the factory string instead (e.g. --index PCA256,IVF1024,PQ32)"
                )
            if self.memory_budget_mb is not None:
                raise VprkitError(
                    f"--index {self.index} cannot be used with --memory_budget_mb (the bounded "
                    "search is exact and flat): drop one of them"
                )
        if self.rescore < 0:
            raise VprkitError(f"--rescore must be 0 (off) or more, got {self.rescore}")
        for name in ("precision", "rerank_precision"):
            if getattr(self, name) not in PRECISIONS:
                raise VprkitError(
                    f"--{name} must be one of {', '.join(sorted(PRECISIONS))}, "
                    f"got {getattr(self, name)!r}"
                )
        if self.tie_order not in (None, "official", "stable"):
            raise VprkitError(f"--tie_order must be official or stable, got {self.tie_order!r}")
        if self.rerank_num is not None and self.rerank_num < 0:
            raise VprkitError(f"--rerank_num must be 0 (off) or more, got {self.rerank_num}")

    def to_json(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def size_option(values: list[int] | None) -> int | tuple[int, int] | None:
    """`--image_size`: one value (short side) or two (H W)."""
    if values is None:
        return None
    if len(values) == 1:
        return values[0]
    if len(values) == 2:
        return tuple(values)
    raise VprkitError(f"--image_size takes one value (short side) or two (H W), got {values}")
