"""Reading weight files safely and loading them strictly.

Files understood:
- DINOv2 `*_pretrain.pth`: a plain state dict;
- DeiT ImageNet files: the state dict under `model`;
- the methods' released training checkpoints (CricaVPR, SelaVPR, R2Former): the state dict
  under `model_state_dict`, keys prefixed with DataParallel's `module.`, plus NumPy
  `recalls` / `best_r5` entries;
- vprkit's own format (`save_checkpoint`): the state dict under `state_dict`, with the model
  name and its overrides under `vprkit`;
- `.safetensors` files (e.g. MegaLoc's `model.safetensors`): a flat state dict, read with the
  `safetensors` library, which holds only tensors and runs no code.

Nothing is unpickled beyond tensors, containers and the few NumPy types those checkpoints hold
(`torch.load(weights_only=True)` with an explicit allow-list).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vprkit.atomic import atomic_path
from vprkit.errors import VprkitError

VPRKIT_FORMAT_VERSION = 1


class WeightsFileError(VprkitError):
    """A weights file that cannot be used: empty, not a torch file, or refused (it holds
    pickled objects beyond tensors, containers and NumPy arrays)."""


class WeightsFileNotFoundError(VprkitError, FileNotFoundError):
    """A weights file path that names no file."""


class WeightsMismatchError(VprkitError, RuntimeError):
    """A weight file does not fit the model: lists missing, unexpected and misshaped keys."""

    def __init__(
        self,
        source: str,
        missing: list[str],
        unexpected: list[str],
        misshaped: list[tuple[str, tuple, tuple]],
    ) -> None:
        self.missing, self.unexpected, self.misshaped = missing, unexpected, misshaped
        lines = [f"{source} does not match the model:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_abbreviate(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_abbreviate(unexpected)}")
        if misshaped:
            shown = [f"{k}: file {tuple(a)} vs model {tuple(b)}" for k, a, b in misshaped]
            lines.append(f"  wrongly shaped keys ({len(misshaped)}): {_abbreviate(shown)}")
        super().__init__("\n".join(lines))


def _abbreviate(items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


def _numpy_safe_globals() -> list:
    """The NumPy callables a released training checkpoint needs (arrays and scalars), under
    both the NumPy 1 (`numpy.core`) and NumPy 2 (`numpy._core`) names they are pickled as."""
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # NumPy 1
        from numpy.core.multiarray import _reconstruct, scalar
    allowed: list = [np.ndarray, np.dtype]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed.append((_reconstruct, f"{module}._reconstruct"))
        allowed.append((scalar, f"{module}.scalar"))
    # NumPy >= 1.25 may pickle dtypes through their classes (numpy.dtypes.Float64DType, ...).
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return allowed


# torch's refusal names the global as "GLOBAL module.name"; os.system pickles as posix.system.
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_OS_MODULES = ("posix.", "nt.")


def read_checkpoint(path: str | Path) -> Any:
    """`torch.load` without executing arbitrary pickled code; clear errors naming the file
    (and, for a refused file, the global it tried to load)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsFileNotFoundError(f"weights file not found: {path}")
    if path.stat().st_size == 0:
        raise WeightsFileError(f"{path}: the weights file is empty (zero bytes)")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types; all mean "not a usable file"
        raise WeightsFileError(_unreadable(path, err)) from None


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a `.safetensors` file, on the CPU (the format holds nothing else)."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise WeightsFileError(
            f"{path}: reading .safetensors files needs the `safetensors` package "
            "(pip install safetensors)"
        ) from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # safetensors raises its own error types for malformed files
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise WeightsFileError(
            f"{path}: cannot read it as a safetensors file ({type(err).__name__}: {first})"
        ) from None


def _unreadable(path: Path, err: Exception) -> str:
    """Why torch could not load `path`, without torch's advice to retry with
    weights_only=False (which would run whatever the file holds)."""
    message = str(err)
    refused = _REFUSED_GLOBAL.search(message)
    if refused:
        name = refused[1]
        if name.startswith(_OS_MODULES):
            name = "os." + name.split(".", 1)[1]
        return (
            f"refusing to load {name!r} from {path}: weights files may hold only tensors, "
            "containers and NumPy arrays; the file is malformed or malicious"
        )
    if "weights_only" in message:
        # Keep the unpickler's own reason (e.g. "Unsupported operand 62"), not the advice.
        reason = message.partition("WeightsUnpickler error:")[2].strip().splitlines()
        reason = reason[0].strip() if reason else "pickled data it does not allow"
        return (
            f"refusing to load {path} ({reason}): weights files may hold only tensors, "
            "containers and NumPy arrays; the file is malformed or malicious"
        )
    first = message.strip().splitlines()[0] if message.strip() else ""
    return (
        f"{path}: cannot read it as a weights file ({type(err).__name__}: {first}); "
        "is it a torch .pth file?"
    )


def extract_state_dict(checkpoint: Any, source: str = "checkpoint") -> tuple[dict, str]:
    """The state dict inside any supported file layout, and the layout's name."""
    if not isinstance(checkpoint, dict):
        raise WeightsFileError(f"{source}: expected a dict, got {type(checkpoint).__name__}")
    if "vprkit" in checkpoint and "state_dict" in checkpoint:
        state, layout = checkpoint["state_dict"], "vprkit"
    elif "model_state_dict" in checkpoint:
        state, layout = checkpoint["model_state_dict"], "training checkpoint"
    elif "model" in checkpoint and isinstance(checkpoint["model"], dict):
        state, layout = checkpoint["model"], "deit"
    elif checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        state, layout = checkpoint, "state dict"
    else:
        keys = ", ".join(map(str, list(checkpoint)[:10]))
        raise WeightsFileError(
            f"{source}: no state dict found (top-level keys: {keys}); expected a plain state "
            f"dict or one under 'model_state_dict', 'model' or 'state_dict'"
        )
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsFileError(f"{source}: the state dict holds non-tensor values")
    # DataParallel-trained files prefix every key with `module.`.
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state, layout


def load_state_dict_strict(model: nn.Module, state: dict, source: str = "state dict") -> None:
    """`model.load_state_dict(strict=True)`, after one check that reports every problem."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        (k, tuple(state[k].shape), tuple(v.shape))
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or misshaped:
        raise WeightsMismatchError(source, missing, unexpected, misshaped)
    model.load_state_dict(state, strict=True)


def load_weights(model: nn.Module, weights: str | Path | dict) -> str:
    """Load a file (path or official weights name) or an in-memory checkpoint into `model`,
    strictly. Returns the layout that was recognized."""
    if isinstance(weights, dict):
        source, checkpoint = "checkpoint", weights
    else:
        path = Path(weights)
        if not path.exists():
            from vprkit.hub import resolve_weights

            path = resolve_weights(str(weights))
        source, checkpoint = str(path), read_checkpoint(path)
    state, layout = extract_state_dict(checkpoint, source)
    if layout == "vprkit":
        _check_vprkit_origin(model, checkpoint["vprkit"], source)
    adapt = getattr(model, "adapt_state_dict", None)
    if adapt is not None:
        state = adapt(state)
    load_state_dict_strict(model, state, source)
    return layout


def _check_vprkit_origin(model: nn.Module, info: dict, source: str) -> None:
    saved = info.get("model_name")
    current = getattr(model, "vprkit_name", None)
    if saved and current and saved != current:
        raise WeightsFileError(f"{source} holds a {saved!r} model, not {current!r}")


def save_checkpoint(model: nn.Module, path: str | Path, **extra: Any) -> Path:
    """Write vprkit's format atomically (temporary file, then rename): never a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "vprkit": {
            "format_version": VPRKIT_FORMAT_VERSION,
            "model_name": getattr(model, "vprkit_name", type(model).__name__),
            "overrides": getattr(model, "vprkit_overrides", {}),
        },
        "state_dict": model.state_dict(),
        **extra,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path
