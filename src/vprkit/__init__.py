"""vprkit: visual place recognition."""

from vprkit.allocator import keep_freed_memory
from vprkit.models.info import ModelInfo
from vprkit.models.registry import create_model, list_models, model_info, register_model

__version__ = "0.1.0"
__all__ = [
    "Map",
    "ModelInfo",
    "build_map",
    "create_model",
    "keep_freed_memory",
    "list_models",
    "model_info",
    "register_model",
    "__version__",
]


def __getattr__(name: str):
    # `vprkit.Map.open(folder)` and `vprkit.build_map(...)`, imported when first used.
    if name in ("Map", "build_map"):
        import vprkit.maps

        return getattr(vprkit.maps, name)
    raise AttributeError(f"module 'vprkit' has no attribute {name!r}")
