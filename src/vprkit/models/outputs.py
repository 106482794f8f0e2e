"""What every place-recognition model returns, whatever its method."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class DescriptorOutput:
    global_desc: Tensor  # (B, D), L2-normalized: what retrieval searches with
    local_desc: Tensor | None = None  # (B, C, h, w) dense local features, for re-ranking
    local_tokens: Tensor | None = None  # (B, K, F) selected local tokens (R2Former)
