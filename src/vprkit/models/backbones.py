"""The plain backbones: DINOv2 ViT-S/B/L/g 14 (with and without 4 registers) and DeiT-S
distilled. Each name is one registered function; keyword overrides change the config
(e.g. `depth=2` for a tiny test model, `img_size=(480, 640)` for R2Former's DeiT)."""

from __future__ import annotations

from vprkit.models.registry import register_model
from vprkit.models.vit import (
    VisionTransformer,
    ViTConfig,
    adapt_official_vit_state_dict,
    vit_config,
)

DINOV2_SIZES = {
    # name: (embed_dim, depth, num_heads, ffn)
    "vits14": (384, 12, 6, "mlp"),
    "vitb14": (768, 12, 12, "mlp"),
    "vitl14": (1024, 24, 16, "mlp"),
    "vitg14": (1536, 40, 24, "swiglu"),
}


class Backbone(VisionTransformer):
    """A VisionTransformer that knows how to take its official weight files."""

    default_image_size = (224, 224)  # what `vprkit eval` resizes to unless told otherwise

    def adapt_state_dict(self, state: dict) -> dict:
        return adapt_official_vit_state_dict(self, state)


def dinov2_config(size: str, registers: int = 0, **overrides) -> ViTConfig:
    """The official DINOv2 configuration of `size` (vits14 ... vitg14), with overrides."""
    if size not in DINOV2_SIZES:
        raise ValueError(f"DINOv2 size must be one of {sorted(DINOV2_SIZES)}, got {size!r}")
    dim, depth, heads, ffn = DINOV2_SIZES[size]
    base = ViTConfig(
        patch_size=14,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        ffn=ffn,
        img_size=(518, 518),
        layerscale_init=1.0,
        num_register_tokens=registers,
    )
    return vit_config(base, **overrides)


def _register_dinov2(size: str, registers: int) -> None:
    name = f"dinov2_{size}" + ("_reg4" if registers else "")

    def build(**overrides) -> Backbone:
        return Backbone(dinov2_config(size, registers, **overrides))

    build.__doc__ = f"DINOv2 {size} ({registers} register tokens), pos-embed stored at 518x518."
    register_model(build, name=name)


for _size in DINOV2_SIZES:
    _register_dinov2(_size, 0)
    _register_dinov2(_size, 4)


@register_model
def deit_small_distilled_patch16_224(**overrides) -> Backbone:
    """DeiT-S distilled (R2Former's backbone) with its 1000-class ImageNet heads."""
    base = ViTConfig(
        patch_size=16,
        embed_dim=384,
        depth=12,
        num_heads=6,
        img_size=(224, 224),
        layerscale_init=None,
        distilled=True,
        mask_token=False,
        num_classes=1000,
        pos_embed_mode="r2former",
    )
    return Backbone(vit_config(base, **overrides))
