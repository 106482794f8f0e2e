"""One registry of model constructors: `create_model(name, weights=None, **overrides)`.

Adding a model is one decorated function that takes keyword overrides and returns an
`nn.Module`, with a `ModelInfo` saying what the model wants around it (evaluation size,
re-ranker, trainable parameters, official weights); architecture and weights stay apart
(weights are loaded by `vprkit.weights`).
"""

from __future__ import annotations

import argparse
import fnmatch
from collections.abc import Callable
from pathlib import Path

from torch import nn

from vprkit.models.info import ModelInfo

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_INFO: dict[str, ModelInfo] = {}


def register_model(
    fn: Callable[..., nn.Module] | None = None,
    *,
    name: str | None = None,
    info: ModelInfo | None = None,
):
    """Register a constructor under `name` (default: the function's name) with its `info`
    (default: `ModelInfo()`)."""

    def decorate(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or f.__name__
        if key in _REGISTRY:
            raise ValueError(f"model {key!r} is already registered")
        _REGISTRY[key] = f
        _INFO[key] = info if info is not None else ModelInfo()
        return f

    return decorate(fn) if fn is not None else decorate


def _ensure_builtin_models() -> None:
    # Importing the modules runs their @register_model decorators.
    from vprkit.models import backbones, baselines, boq, cricavpr, megaloc, r2former, salad, selavpr  # noqa: F401


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, sorted."""
    _ensure_builtin_models()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def _check_known(name: str) -> None:
    _ensure_builtin_models()
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")


def model_info(model_or_name: str | nn.Module) -> ModelInfo:
    """The `ModelInfo` of a registered name, or of a model `create_model` made (it records
    the name); a model the registry did not make gets the default `ModelInfo()`. A model
    carrying its own `vprkit_info` (an exported file run by ONNX Runtime: its input size is
    the export's) gets that."""
    if isinstance(model_or_name, str):
        _check_known(model_or_name)
        return _INFO[model_or_name]
    own = getattr(model_or_name, "vprkit_info", None)
    if isinstance(own, ModelInfo):
        return own
    _ensure_builtin_models()
    return _INFO.get(getattr(model_or_name, "vprkit_name", None), ModelInfo())


def create_model(name: str, weights: str | Path | None = None, **overrides) -> nn.Module:
    """Build a registered model; `weights` is a file path, an official weights name
    (see `vprkit weights list`) or None for random initialization. Loading is strict."""
    _check_known(name)
    model = _REGISTRY[name](**overrides)
    model.vprkit_name = name
    model.vprkit_overrides = dict(overrides)
    if weights is not None:
        from vprkit.weights import load_weights

        load_weights(model, weights)
    return model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pattern", nargs="?", default="*", help="shell-style name filter")


def describe(name: str, name_width: int = 0) -> str:
    """One line for `vprkit models`: name (padded to `name_width`), evaluation size,
    re-ranker and official weights."""
    info = model_info(name)
    height, width = info.image_size
    rerank = f"rerank {info.reranker} top-{info.rerank_num}" if info.reranker else "global only"
    weights = ", ".join(info.weights) or "-"
    return f"{name.ljust(name_width)}  {height}x{width:<4}  {rerank:<23}  weights: {weights}"


def run(args: argparse.Namespace) -> int:
    names = list_models(args.pattern)
    width = max((len(n) for n in names), default=0)
    for model_name in names:
        print(describe(model_name, width))
    return 0
