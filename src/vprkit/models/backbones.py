"""The plain backbones: DINOv2 ViT-S/B/L/g 14 (with and without 4 registers) and DeiT-S
distilled. Each name is one registered function; keyword overrides change the config
(e.g. `depth=2` for a tiny test model, `img_size=(480, 640)` for R2Former's DeiT)."""

from __future__ import annotations

from torch import nn

from vprkit.models.info import ModelInfo
from vprkit.models.registry import register_model
from vprkit.models.vit import (
    VisionTransformer,
    ViTConfig,
    adapt_official_vit_state_dict,
    vit_config,
)
from vprkit.weights import WeightsMismatchError

# The keys that tell a plain ViT file (`dinov2_*_pretrain.pth`, DeiT's ImageNet weights)
# from a method's own layout, whose keys all start with a module name such as `backbone.`.
VIT_FILE_KEYS = ("cls_token", "patch_embed.proj.weight")

DINOV2_SIZES = {
    # name: (embed_dim, depth, num_heads, ffn)
    "vits14": (384, 12, 6, "mlp"),
    "vitb14": (768, 12, 12, "mlp"),
    "vitl14": (1024, 24, 16, "mlp"),
    "vitg14": (1536, 40, 24, "swiglu"),
}


class Backbone(VisionTransformer):
    """A VisionTransformer that knows how to take its official weight files."""

    def adapt_state_dict(self, state: dict) -> dict:
        return adapt_official_vit_state_dict(self, state)


def is_backbone_only(state: dict, own_prefixes: tuple[str, ...]) -> bool:
    """True when `state` is a plain ViT file rather than a method's own layout (any key
    under one of `own_prefixes`, e.g. `backbone.`) or something else entirely."""
    if any(k.startswith(own_prefixes) for k in state):
        return False
    return any(k in state for k in VIT_FILE_KEYS)


def with_backbone_weights(model: nn.Module, state: dict, source: str) -> tuple[dict, int]:
    """`model`'s full state dict with its backbone's tensors replaced by a backbone-only
    `state` (adapted first by the backbone's `adapt_state_dict`), and how many tensors came
    from `state`. The methods' `--foundation_model_path` behaviour: adapters and heads keep
    their current values. Unlike the official merge, every non-adapter backbone key must be
    in `state` and none may be unknown (`WeightsMismatchError` names them, after `source`)."""
    backbone = model.backbone
    state = backbone.adapt_state_dict(state)
    expected = [k for k in backbone.state_dict() if "adapter" not in k]
    known = set(expected)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in known]
    if missing or unexpected:
        raise WeightsMismatchError(source, missing, unexpected, misshaped=[])
    full = dict(model.state_dict())
    full.update({f"backbone.{k}": v for k, v in state.items()})
    return full, len(state)


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
    register_model(build, name=name, info=ModelInfo(weights=(name,)))


for _size in DINOV2_SIZES:
    _register_dinov2(_size, 0)
    _register_dinov2(_size, 4)


@register_model(info=ModelInfo(weights=("deit_small_distilled_patch16_224",)))
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
