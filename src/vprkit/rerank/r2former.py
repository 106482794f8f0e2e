"""R2Former's re-ranker: its re-ranking transformer's "same place" probability for each
query-candidate pair of selected local tokens (bytedance/R2Former). The transformer is part
of the model (`vprkit.models.r2former`, `R2Former.rerank_scores`); this module only feeds it
the cached tokens and global descriptors."""

from __future__ import annotations

import numpy as np
import torch

from vprkit.rerank.base import Reranker, RerankInputs, ScoreFn, register_reranker
from vprkit.rerank.local_features import LOCAL_TOKENS


def r2former_scorer(inputs: RerankInputs) -> ScoreFn:
    """The `r2former` re-ranker: `model.rerank_scores` of the query against its candidates."""
    q_global, db_global = inputs.query_global, inputs.database_global
    q_local, db_local, device = inputs.query_local, inputs.database_local, inputs.device

    @torch.no_grad()
    def r2former(q: int, candidates: np.ndarray) -> np.ndarray:
        probs = inputs.model.rerank_scores(
            torch.from_numpy(q_global[q : q + 1]).to(device),
            q_local[[q]].to(device),
            torch.from_numpy(db_global[candidates][None]).to(device),
            db_local[candidates][None].to(device),
        )
        return probs[0].float().cpu().numpy()

    return r2former


register_reranker(
    Reranker(
        "r2former",
        "R2Former: the model's re-ranking transformer, its same-place probability",
        r2former_scorer,
        local_features=(LOCAL_TOKENS,),
        model_method="rerank_scores",
    )
)
