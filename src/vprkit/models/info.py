"""What a model wants around it, declared once where it is registered (in the spirit of
timm's pretrained configs): evaluation input size, batch protocol, re-ranker, trainable
parameters and official weights. Read it with `vprkit.models.model_info`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from vprkit.data.images import IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class ModelInfo:
    """Metadata of a registered model; every field has a default, so `ModelInfo()` is what a
    model without declared metadata gets.

    - `image_size`: (H, W) that evaluation resizes to unless told otherwise.
    - `mean`, `std`: the normalization the model was trained with (what
      `vprkit.data.images.Preprocess` applies by default).
    - `infer_batch_size`, `batch_size_by_prefix`: the evaluation batch; the first
      `(prefix, size)` whose prefix starts the dataset name (ignoring case) wins. See
      `eval_batch_size`.
    - `protocol`: `(model, batch_size) -> str | None`, one line for a run log about how the
      batch shapes the descriptors (see `describe_protocol`).
    - `reranker`, `rerank_num`: the model's own re-ranker (a `vprkit.rerank` name) and how
      many global candidates it re-sorts by default; None and 0 for global-only models.
    - `tie_order`: how its own re-ranker orders equal scores: `"stable"` (their global order)
      or `"official"` (SelaVPR's `np.argsort(scores)[::-1]`, see
      `vprkit.rerank.descending_order`). Other re-rankers use `"stable"`. See
      `default_tie_order`.
    - `train_only`: fnmatch patterns of the parameters the official training updates; None
      when every parameter trains.
    - `weights`: official weight names (`vprkit weights list`) made for this model.
    """

    image_size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    infer_batch_size: int = 16
    batch_size_by_prefix: tuple[tuple[str, int], ...] = ()
    protocol: Callable[[nn.Module, int], str | None] | None = None
    reranker: str | None = None
    rerank_num: int = 0
    tie_order: str = "stable"
    train_only: tuple[str, ...] | None = None
    weights: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ValueError(f"image_size must be (H, W) of positive ints, got {self.image_size}")
        if (self.reranker is None) != (self.rerank_num == 0):
            raise ValueError(
                f"reranker and rerank_num go together: got {self.reranker!r} and {self.rerank_num}"
            )
        if self.tie_order not in ("official", "stable"):
            raise ValueError(f"tie_order must be 'official' or 'stable', got {self.tie_order!r}")
        # Tuples keep the info hashable and immutable; a list would be a shared mutable.
        for name in ("train_only", "weights"):
            value = getattr(self, name)
            if isinstance(value, str | list):
                raise TypeError(f"{name} must be a tuple of strings, got {value!r}")

    def eval_batch_size(self, dataset_name: str) -> int:
        """The batch size evaluation uses on `dataset_name` by default."""
        for prefix, size in self.batch_size_by_prefix:
            if dataset_name.lower().startswith(prefix.lower()):
                return size
        return self.infer_batch_size

    def default_tie_order(self, reranker: str | None) -> str:
        """The tie order of `reranker` for this model: the declared one for its own
        re-ranker, the stable order for any other."""
        return self.tie_order if reranker == self.reranker else "stable"

    def describe_protocol(self, model: nn.Module, batch_size: int) -> str | None:
        """A line on how `batch_size` shapes `model`'s descriptors, or None when it does not."""
        return None if self.protocol is None else self.protocol(model, batch_size)
