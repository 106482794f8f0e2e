"""One registry of model constructors: `create_model(name, weights=None, **overrides)`.

Adding a model is one decorated function that takes keyword overrides and returns an
`nn.Module`; architecture and weights stay apart (weights are loaded by `vprkit.weights`).
"""

from __future__ import annotations

import argparse
import fnmatch
from collections.abc import Callable
from pathlib import Path

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module] | None = None, *, name: str | None = None):
    """Register a constructor under `name` (default: the function's name)."""

    def decorate(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or f.__name__
        if key in _REGISTRY:
            raise ValueError(f"model {key!r} is already registered")
        _REGISTRY[key] = f
        return f

    return decorate(fn) if fn is not None else decorate


def _ensure_builtin_models() -> None:
    # Importing the modules runs their @register_model decorators.
    from vprkit.models import backbones, baselines, cricavpr, r2former, selavpr  # noqa: F401


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, sorted."""
    _ensure_builtin_models()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def create_model(name: str, weights: str | Path | None = None, **overrides) -> nn.Module:
    """Build a registered model; `weights` is a file path, an official weights name
    (see `vprkit weights list`) or None for random initialization. Loading is strict."""
    _ensure_builtin_models()
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    model = _REGISTRY[name](**overrides)
    model.vprkit_name = name
    model.vprkit_overrides = dict(overrides)
    if weights is not None:
        from vprkit.weights import load_weights

        load_weights(model, weights)
    return model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pattern", nargs="?", default="*", help="shell-style name filter")


def run(args: argparse.Namespace) -> int:
    for model_name in list_models(args.pattern):
        print(model_name)
    return 0
