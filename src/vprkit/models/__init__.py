"""Models: the shared ViT backbone and the methods built on it."""

from vprkit.models.info import ModelInfo
from vprkit.models.registry import create_model, list_models, model_info, register_model
from vprkit.models.vit import TokenLayout, VisionTransformer, ViTConfig, ViTOutput

__all__ = [
    "create_model",
    "list_models",
    "model_info",
    "register_model",
    "ModelInfo",
    "TokenLayout",
    "VisionTransformer",
    "ViTConfig",
    "ViTOutput",
]
