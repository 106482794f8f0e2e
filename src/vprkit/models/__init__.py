"""Models: the shared ViT backbone and the methods built on it."""

from vprkit.models.registry import create_model, list_models, register_model
from vprkit.models.vit import TokenLayout, VisionTransformer, ViTConfig, ViTOutput

__all__ = [
    "create_model",
    "list_models",
    "register_model",
    "TokenLayout",
    "VisionTransformer",
    "ViTConfig",
    "ViTOutput",
]
