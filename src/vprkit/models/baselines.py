"""Zero-shot DINOv2 baselines: the class token, or GeM over the patch tokens.

Their state dicts are exactly the backbone's, so the official `dinov2_*_pretrain.pth` files
load into them strictly.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from vprkit.models.backbones import Backbone, dinov2_config
from vprkit.models.info import ModelInfo
from vprkit.models.outputs import DescriptorOutput
from vprkit.models.pooling import gem
from vprkit.models.registry import register_model
from vprkit.models.vit import ViTConfig


class Dinov2Baseline(Backbone):
    def __init__(self, cfg: ViTConfig, pooling: str) -> None:
        if pooling not in ("cls", "gem"):
            raise ValueError(f"pooling must be 'cls' or 'gem', got {pooling!r}")
        super().__init__(cfg)
        self.pooling = pooling

    def forward(self, x: Tensor) -> DescriptorOutput:  # type: ignore[override]
        out = super().forward(x)
        if self.pooling == "cls":
            desc = out.cls_token
        else:
            # As the methods pool: L2-normalize each patch token, then GeM (p=3).
            rows, cols = out.grid_size
            tokens = F.normalize(out.patch_tokens, dim=-1)
            desc = gem(tokens.transpose(1, 2).reshape(tokens.shape[0], -1, rows, cols))[:, :, 0, 0]
        return DescriptorOutput(global_desc=F.normalize(desc, dim=-1))


def _baseline(pooling: str, size: str = "vitb14", registers: int = 0, **overrides):
    return Dinov2Baseline(dinov2_config(size, registers, **overrides), pooling)


# The default (vitb14) configuration takes the official ViT-B file; `size=` others.
BASELINE_INFO = ModelInfo(weights=("dinov2_vitb14",))


@register_model(info=BASELINE_INFO)
def dinov2_cls(**overrides) -> Dinov2Baseline:
    """Zero-shot DINOv2 (`size=`, default vitb14): the normalized class token."""
    return _baseline("cls", **overrides)


@register_model(info=BASELINE_INFO)
def dinov2_gem(**overrides) -> Dinov2Baseline:
    """Zero-shot DINOv2 (`size=`, default vitb14): GeM over L2-normalized patch tokens."""
    return _baseline("gem", **overrides)
