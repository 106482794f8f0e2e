"""The pooling layers the methods share, with the official parameter names and shapes
(`aggregation = Sequential(L2Norm(), GeM(), Flatten())` gives the key `aggregation.1.p`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def gem(x: Tensor, p: float | Tensor = 3.0, eps: float = 1e-6) -> Tensor:
    """Generalized mean over the spatial axes of a (B, C, H, W) map -> (B, C, 1, 1), as the
    VG benchmark's `gem` (average pooling of clamped powers). The kernel is plain ints, so that
    a traced graph (ONNX export, at a fixed input size) holds it as a constant."""
    kernel = (int(x.shape[-2]), int(x.shape[-1]))
    return F.avg_pool2d(x.clamp(min=eps).pow(p), kernel).pow(1.0 / p)


class GeM(nn.Module):
    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return gem(x, p=self.p, eps=self.eps)


class L2Norm(nn.Module):
    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, p=2.0, dim=self.dim)


class Flatten(nn.Module):
    """(B, C, 1, 1) -> (B, C)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[2:] != (1, 1):
            raise ValueError(f"Flatten expects (B, C, 1, 1), got {tuple(x.shape)}")
        return x[:, :, 0, 0]
