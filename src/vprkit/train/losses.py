"""Losses of the methods, each returning the loss and the figures worth logging."""

from __future__ import annotations

import torch
from torch import Tensor


class MultiSimilarity:
    """CricaVPR's loss (SPEC §1.4): pytorch-metric-learning's MultiSimilarityLoss(alpha 1,
    beta 50, base 0, dot-product similarity) on pairs mined by MultiSimilarityMiner(epsilon
    0.1, cosine similarity), labels = place ids. Logs the fraction of images the miner kept
    (GSV-Cities' `b_acc` is one minus it)."""

    def __init__(
        self, alpha: float = 1.0, beta: float = 50.0, base: float = 0.0, epsilon: float = 0.1
    ) -> None:
        from pytorch_metric_learning import distances, losses, miners

        self.loss = losses.MultiSimilarityLoss(
            alpha=alpha, beta=beta, base=base, distance=distances.DotProductSimilarity()
        )
        self.miner = miners.MultiSimilarityMiner(
            epsilon=epsilon, distance=distances.CosineSimilarity()
        )

    def __call__(self, descriptors: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, float]]:
        mined = self.miner(descriptors, labels)
        loss = self.loss(descriptors, labels, mined)
        mined_images = torch.unique(mined[0]).numel()
        return loss, {"mined_fraction": mined_images / max(1, len(labels))}
