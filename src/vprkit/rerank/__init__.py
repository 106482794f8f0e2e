"""Re-ranking the global retrieval's candidates with local features.

Each re-ranker is one module that registers a `Reranker` (`vprkit.rerank.base`); importing
this package registers the built-ins: `mnn` (SelaVPR), `r2former` (R2Former) and
`ransac_homography` / `ransac_fundamental` (the geometric-verification baseline).
"""

from vprkit.rerank import mnn, r2former, ransac  # noqa: F401  (registers the built-ins)
from vprkit.rerank.base import (
    Reranker,
    RerankInputs,
    ScoreFn,
    descending_order,
    get_reranker,
    list_rerankers,
    register_reranker,
    rerank_by_scores,
)
from vprkit.rerank.local_features import LocalFeatureCache
from vprkit.rerank.mnn import mutual_nn_count, rerank_by_mnn
from vprkit.rerank.pipeline import apply_order, make_scorer, rerank_order

__all__ = [
    "LocalFeatureCache",
    "RerankInputs",
    "Reranker",
    "ScoreFn",
    "apply_order",
    "descending_order",
    "get_reranker",
    "list_rerankers",
    "make_scorer",
    "mutual_nn_count",
    "register_reranker",
    "rerank_by_mnn",
    "rerank_by_scores",
    "rerank_order",
]
