"""MegaLoc (Berton & Masone, "MegaLoc: One Retrieval to Place Them All", 2025): DINOv2
ViT-B/14, a SALAD-style optimal-transport aggregator and a linear projection to 8448-D.

Matches the official `megaloc_model.py` (gmberton/MegaLoc, the version that `hubconf.py`
loads `model.safetensors` into):

    images -> (H, W not multiples of 14: bilinear antialiased resize to the nearest ones)
    -> DINOv2 ViT-B/14, final norm on every token -> cls token t, patch map x (768, h, w)
    -> f = cluster_features(x) (256 per patch), s = score(x) (64 per patch),
       g = token_features(t) (256)
    -> P = exp(log-Sinkhorn(s with a dust-bin row, 3 iterations)), dust bin dropped
    -> [L2(g), per-cluster L2(sum_n f * P), flattened channel-major] -> L2
    -> Linear(64 * 256 + 256 = 16640 -> 8448) -> L2

What differs from SALAD's aggregator (serizba/salad `models/aggregators/salad.py`): 256
channels per cluster instead of 128, the projection and the second L2 norm after it, and the
Sinkhorn written as OpenGlue's `get_matching_probs`. That is the same arithmetic as SALAD's,
so vprkit runs both with SALAD's aggregator (`vprkit.models.salad.SALADAggregator`); the one
edge where they part: with exactly as many patches as clusters the official MegaLoc fails
(`math.log(0)`) while SALAD's form gives the dust bin no mass, as here. The backbone is the
plain DINOv2 ViT-B/14 (pos-embed interpolated bicubically with the +0.1 offset, no
antialias, as both the hub DINOv2 and MegaLoc's own copy do), without `mask_token`: the
released file has none.

Parameter names are the official ones (`backbone.blocks.N.attn.qkv.weight`,
`aggregator.agg.cluster_features.3.weight`, `aggregator.agg.dust_bin`,
`aggregator.linear.weight`), so the released `model.safetensors` loads strictly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vprkit.errors import VprkitError
from vprkit.models.backbones import Backbone, dinov2_config
from vprkit.models.info import ModelInfo
from vprkit.models.outputs import DescriptorOutput
from vprkit.models.registry import register_model
from vprkit.models.salad import SALADAggregator

PATCH = 14
SINKHORN_ITERS = 3
# The official file's own DINOv2 wrapper (earlier versions of `megaloc_model.py`) runs the
# first 8 of 12 blocks under no_grad, as SALAD does: the last 4, the final norm and the
# aggregator train. MegaLoc's training code itself is not released.
TRAINABLE_BLOCKS = 4

INFO = ModelInfo(
    # The paper's inference resolution (a multiple of 14, so MegaLoc's own resize is a
    # no-op). `--image_size` changes it; the Python API takes any size.
    image_size=(322, 322),
    train_only=(
        *(f"backbone.blocks.{i}.*" for i in range(12 - TRAINABLE_BLOCKS, 12)),
        "backbone.norm.*",
        "aggregator.*",
    ),
    weights=("megaloc",),
)


def nearest_multiple_size(height: int, width: int, multiple: int = PATCH) -> tuple[int, int]:
    """The official `round(h / 14) * 14` for each side (Python rounds halves to even)."""
    return round(height / multiple) * multiple, round(width / multiple) * multiple


def resize_to_patch_multiple(images: Tensor, multiple: int = PATCH) -> Tensor:
    """MegaLoc's forward-time resize: unchanged when both sides are multiples of 14, else
    bilinear with antialiasing to the nearest multiples (what torchvision's
    `functional.resize(images, [h, w], antialias=True)` does to a float tensor)."""
    height, width = images.shape[-2:]
    if height % multiple == 0 and width % multiple == 0:
        return images
    size = nearest_multiple_size(height, width, multiple)
    if min(size) == 0:
        raise VprkitError(
            f"input {height}x{width} is too small for MegaLoc: each side must be at least "
            f"{multiple // 2} pixels (it is rounded to a multiple of {multiple})"
        )
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


class Aggregator(nn.Module):
    """The official `Aggregator`: SALAD (`agg`) then the projection (`linear`)."""

    def __init__(self, agg: SALADAggregator, feat_dim: int) -> None:
        super().__init__()
        self.agg = agg
        self.linear = nn.Linear(agg.output_dim, feat_dim)

    def forward(self, patch_map: Tensor, cls_token: Tensor) -> Tensor:
        desc = self.agg(patch_map, cls_token)
        # The projection runs in its weights' dtype even under autocast: a bf16 product would
        # first cast its 140M fp32 weights, every batch, which on CPU takes longer than the
        # fp32 product itself (that one is bound by a single read of the weights).
        with torch.autocast(desc.device.type, enabled=False):
            return self.linear(desc.to(self.linear.weight.dtype))


class MegaLoc(nn.Module):
    """`forward(images)` -> `DescriptorOutput(global_desc (B, feat_dim))`, L2-normalized.

    Images of any size: sides that are not multiples of 14 are resized to the nearest ones
    first, inside the forward, as the official model does."""

    def __init__(self, backbone: Backbone, aggregator: Aggregator) -> None:
        super().__init__()
        self.backbone = backbone
        self.aggregator = aggregator

    @property
    def global_dim(self) -> int:
        return self.aggregator.linear.out_features

    def forward(self, images: Tensor) -> DescriptorOutput:
        images = resize_to_patch_multiple(images, self.backbone.cfg.patch_size)
        out = self.backbone(images)
        rows, cols = out.grid_size
        B, _, C = out.patch_tokens.shape
        patch_map = out.patch_tokens.reshape(B, rows, cols, C).permute(0, 3, 1, 2)
        desc = self.aggregator(patch_map, out.cls_token)
        return DescriptorOutput(global_desc=F.normalize(desc, p=2, dim=-1))


@register_model(info=INFO)
def megaloc(
    feat_dim: int = 8448,
    num_clusters: int = 64,
    cluster_dim: int = 256,
    token_dim: int = 256,
    mlp_dim: int = 512,
    dropout: float = 0.3,
    **overrides,
) -> MegaLoc:
    """MegaLoc on DINOv2 ViT-B/14 (as released, 8448-D); `overrides` change the ViT config
    (e.g. `depth=1, embed_dim=96, num_heads=2` for a tiny model)."""
    # the released file has no mask_token (MegaLoc's own DINOv2 copy defines none)
    backbone = Backbone(dinov2_config("vitb14", 0, **{"mask_token": False, **overrides}))
    agg = SALADAggregator(
        backbone.embed_dim, num_clusters, cluster_dim, token_dim, dropout=dropout, mlp_dim=mlp_dim
    )
    return MegaLoc(backbone, Aggregator(agg, feat_dim))
