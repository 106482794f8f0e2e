"""The re-ranker interface, its registry and the one rule for ordering by score.

A re-ranker turns the local features (and, for some, the global descriptors or the model) of a
query and its global-retrieval candidates into one score per candidate, higher = more likely
the same place. Adding one is one module that builds a `Reranker` and passes it to
`register_reranker`; the built-ins (`mnn`, `r2former`, `ransac_homography`,
`ransac_fundamental`) register when `vprkit.rerank` is imported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from vprkit.cpu_precision import warn_if_emulated
from vprkit.errors import VprkitError
from vprkit.rerank.local_features import LOCAL_DESC, LOCAL_TOKENS, LocalFeatureCache, feature_kind

ScoreFn = Callable[[int, np.ndarray], np.ndarray]
"""`score_fn(query_index, candidate_indices) -> scores (K,)`, higher = same place."""


@dataclass(frozen=True)
class RerankInputs:
    """What a re-ranker's score function is built from: the model, both sides' local-feature
    caches and global descriptors, the network input size `image_hw` (for local-feature
    coordinates), and where and how to compute."""

    model: torch.nn.Module | None
    query_local: LocalFeatureCache | None
    database_local: LocalFeatureCache | None
    query_global: np.ndarray | None
    database_global: np.ndarray | None
    image_hw: tuple[int, int]
    device: str = "cpu"
    precision: str = "fp32"
    memory_budget_bytes: int | None = None


@dataclass(frozen=True)
class Reranker:
    """A named re-ranker.

    `make(inputs: RerankInputs) -> score_fn` builds the score function. `local_features` are
    the model outputs it can score: `"local_desc"` (dense (C, h, w) maps), `"local_tokens"`
    (selected (K, F) tokens), both, or none (`()`). `model_method` names the model method
    the scorer calls (e.g. R2Former's `rerank_scores`), None when the model is not used."""

    name: str
    description: str
    make: Callable[[RerankInputs], ScoreFn]
    local_features: tuple[str, ...] = (LOCAL_DESC, LOCAL_TOKENS)
    model_method: str | None = None

    def scorer(
        self,
        model: torch.nn.Module | None,
        query_local: LocalFeatureCache | None,
        database_local: LocalFeatureCache | None,
        query_global: np.ndarray | None,
        database_global: np.ndarray | None,
        image_hw: tuple[int, int],
        *,
        device: str = "cpu",
        precision: str = "fp32",
        memory_budget_bytes: int | None = None,
    ) -> ScoreFn:
        """`score_fn(query_index, candidate_indices)` over the given caches and descriptors,
        after checking that the features and the model are what this re-ranker needs."""
        if self.model_method is not None and getattr(model, self.model_method, None) is None:
            raise ValueError(
                f"reranker {self.name} needs a model with {self.model_method}, "
                f"not {type(model).__name__}"
            )
        if self.local_features:
            kind = feature_kind(query_local.feature_shape)
            if kind not in self.local_features:
                raise ValueError(
                    f"reranker {self.name} scores {' or '.join(self.local_features)}, not "
                    f"{kind} of shape {query_local.feature_shape}"
                )
        warn_if_emulated(device, precision)
        inputs = RerankInputs(
            model,
            query_local,
            database_local,
            query_global,
            database_global,
            image_hw,
            device,
            precision,
            memory_budget_bytes,
        )
        return self.make(inputs)


_REGISTRY: dict[str, Reranker] = {}


def register_reranker(reranker: Reranker, *, replace: bool = False) -> Reranker:
    """Make `reranker` available by its name (to `get_reranker`, `make_scorer` and the CLI's
    `--reranker`); a name already taken is an error unless `replace`."""
    if reranker.name in _REGISTRY and not replace:
        raise ValueError(f"a reranker named {reranker.name!r} is already registered")
    _REGISTRY[reranker.name] = reranker
    return reranker


def get_reranker(name: str) -> Reranker:
    """The registered re-ranker called `name`."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown reranker {name!r}; known: {', '.join(list_rerankers())}")
    return _REGISTRY[name]


def list_rerankers() -> tuple[str, ...]:
    """Names of the registered re-rankers, in registration order."""
    return tuple(_REGISTRY)


TIE_ORDERS = ("official", "stable")


def check_tie_order(tie_order: str) -> str:
    if tie_order not in TIE_ORDERS:
        raise VprkitError(f"tie_order must be one of {', '.join(TIE_ORDERS)}, got {tie_order!r}")
    return tie_order


def descending_order(scores: np.ndarray | Sequence[float], tie_order: str = "stable") -> np.ndarray:
    """Indices that sort `scores` by descending value. Both orders agree except on ties.

    - `"stable"`: equal scores keep their input (global retrieval) order.
    - `"official"`: SelaVPR's official `test.rerank` (Lu-Feng/SelaVPR), `np.argsort(scores)
      [::-1]` on its float32 tensor of counts: NumPy's default (unstable) sort, reversed.
      Integer scores are cast to float32 as there; which of equal scores comes first then
      depends on NumPy's sort kernel (its version and the CPU's SIMD), exactly as in the
      official code.
    """
    check_tie_order(tie_order)
    values = np.asarray(scores)
    if tie_order == "stable":
        return np.argsort(-values.astype(np.float64), kind="stable")
    if values.dtype.kind in "biu":
        values = values.astype(np.float32)
    return np.ascontiguousarray(np.argsort(values)[::-1])


def rerank_by_scores(
    candidate_ids, scores: np.ndarray | Sequence[float], tie_order: str = "stable"
):
    """`candidate_ids` (list, ndarray or tensor; the type is kept) sorted by descending
    `scores`, ties as `tie_order` says (`descending_order`; default: their input order)."""
    if len(candidate_ids) != len(scores):
        raise ValueError(f"{len(candidate_ids)} candidate ids for {len(scores)} scores")
    order = descending_order(scores, tie_order)
    if isinstance(candidate_ids, Tensor):
        return candidate_ids[torch.as_tensor(order, device=candidate_ids.device)]
    if isinstance(candidate_ids, np.ndarray):
        return candidate_ids[order]
    return [candidate_ids[i] for i in order]
