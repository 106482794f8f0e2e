"""Re-ranking the global retrieval's candidates with local features."""

from vprkit.rerank.mnn import LocalFeatureCache, mutual_nn_count, rerank_by_mnn

__all__ = ["LocalFeatureCache", "mutual_nn_count", "rerank_by_mnn"]
