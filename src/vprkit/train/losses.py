"""Losses of the methods, each returning the loss and the figures worth logging."""

from __future__ import annotations

import torch
from torch import Tensor

from vprkit.errors import VprkitError
from vprkit.models.outputs import DescriptorOutput


class MultiSimilarity:
    """CricaVPR's loss (Lu-Feng/CricaVPR `train.py`): pytorch-metric-learning's
    MultiSimilarityLoss(alpha 1, beta 50, base 0, dot-product similarity) on pairs mined by
    MultiSimilarityMiner(epsilon 0.1, cosine similarity), labels = place ids. Logs the
    fraction of images the miner kept (GSV-Cities' `b_acc` is one minus it)."""

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


def mnn_similarity(anchor: Tensor, other: Tensor) -> Tensor:
    """SelaVPR's training similarity of two (C, L) local maps: the mean dot product over
    their mutual-nearest-neighbour pairs, or over co-located features when there are none
    (Lu-Feng/SelaVPR `loss.py`). Differentiable through the dot products; the matching is
    not."""
    sim = anchor.T @ other  # (L anchor, L other)
    best_other = sim.argmax(dim=1)
    best_anchor = sim.argmax(dim=0)
    rows = torch.arange(sim.shape[0], device=sim.device)
    mutual = best_anchor[best_other] == rows
    if mutual.any():
        return sim[rows[mutual], best_other[mutual]].mean()
    return sim.diagonal().mean()


class TripletLoss:
    """The VG benchmark's triplet loss as SelaVPR and R2Former use it: TripletMarginLoss
    (margin 0.1, p=2, sum) over every (query, positive, negative), divided by the number of
    triplets; with `local_weight`, plus SelaVPR's local loss sum_b max(0, sim(q, n) -
    sim(q, p)) with the mutual-NN similarity, divided the same way, weighted 1:1 officially."""

    def __init__(self, margin: float = 0.1, local_weight: float = 0.0) -> None:
        self.triplet = torch.nn.TripletMarginLoss(margin=margin, p=2, reduction="sum")
        self.local_weight = local_weight

    def __call__(self, out, negs: int) -> tuple[Tensor, dict[str, float]]:
        group = 2 + negs
        desc = out.global_desc.float()
        batch = len(desc) // group
        desc = desc.view(batch, group, -1)
        global_loss = sum(
            self.triplet(desc[:, 0], desc[:, 1], desc[:, 2 + n]) for n in range(negs)
        ) / (batch * negs)
        figures = {"triplet_loss": float(global_loss.detach())}
        if not self.local_weight:
            return global_loss, figures
        if out.local_desc is None:
            raise VprkitError("local_loss_weight > 0 needs a model with dense local features")
        maps = out.local_desc.float()
        maps = maps.view(batch, group, maps.shape[1], -1)
        local_loss = maps.new_zeros(())
        for b in range(batch):
            positive = mnn_similarity(maps[b, 0], maps[b, 1])
            for n in range(negs):
                negative = mnn_similarity(maps[b, 0], maps[b, 2 + n])
                local_loss = local_loss + torch.clamp(negative - positive, min=0)
        local_loss = local_loss / (batch * negs)
        figures["local_loss"] = float(local_loss.detach())
        return global_loss + self.local_weight * local_loss, figures


class R2FormerLoss:
    """`train_reranker.py`'s loss. Per negative n: the triplet loss (sum over the batch) when
    `triplet`, and when `rerank` the cross-entropy (mean) of the re-ranker's logits over the
    batch's (query, positive) pairs, labelled 1, and (query, negative n) pairs, labelled 0;
    the total is divided by batch x negatives.

    Quirk kept: the cross-entropy is already a mean, so that division scales it by a further
    1 / batch. `global_batch_size` is the batch over all processes: under DDP each process
    sees a slice, and dividing its term by the global batch keeps the gradient the
    single-process one (the triplet term is a per-triplet mean either way)."""

    def __init__(self, margin: float, triplet: bool, rerank: bool, global_batch_size: int) -> None:
        self.triplet = TripletLoss(margin) if triplet else None
        self.rerank = rerank
        self.global_batch_size = global_batch_size

    def __call__(
        self, global_desc: Tensor, logits: Tensor | None, negs: int
    ) -> tuple[Tensor, dict[str, float]]:
        loss, figures = global_desc.new_zeros(()), {}
        if self.triplet is not None:
            loss, figures = self.triplet(DescriptorOutput(global_desc=global_desc), negs)
        if not self.rerank:
            return loss, figures
        if logits is None:
            raise ValueError("the re-ranking loss needs the re-ranker's logits")
        logits = logits.float()  # (batch, 1 + negs, classes): positive pair, then negatives
        batch = logits.shape[0]
        target = torch.cat(
            [torch.ones(batch, dtype=torch.long), torch.zeros(batch, dtype=torch.long)]
        ).to(logits.device)
        ce = [
            torch.nn.functional.cross_entropy(torch.cat([logits[:, 0], logits[:, 1 + n]]), target)
            for n in range(negs)
        ]
        loss = loss + sum(ce) / (self.global_batch_size * negs)
        with torch.no_grad():
            same = logits.argmax(dim=2) == 1
            correct = torch.cat([same[:, :1], ~same[:, 1:]], dim=1)
        figures["rerank_ce"] = float(sum(ce).detach()) / negs
        figures["rerank_accuracy"] = float(correct.float().mean())
        return loss, figures
