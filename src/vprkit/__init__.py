"""vprkit: visual place recognition."""

from vprkit.models.info import ModelInfo
from vprkit.models.registry import create_model, list_models, model_info, register_model

__version__ = "0.1.0"
__all__ = [
    "ModelInfo",
    "create_model",
    "list_models",
    "model_info",
    "register_model",
    "__version__",
]
