"""What made a stage's output: a fingerprint recorded in the file, compared on the next run.

A stage whose output exists with the same fingerprint skips its work (hloc's habit); one
made otherwise is refused, naming every setting that differs. Only what can change the
result goes into the fingerprint (not the device's worker count, say); what is merely
informative is recorded beside it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from vprkit.errors import StageMismatchError


def state_sha256(model: nn.Module) -> str:
    """sha256 of every tensor of `model.state_dict()` (names, dtypes, shapes and bytes): the
    weights as they are in memory, whether they came from a file, a download or a seed."""
    state = sorted(model.state_dict().items())
    # Hashing a ViT-L takes a second; a map build asks once per chunk. The same storage at
    # the same version counter (bumped by every in-place change, a weight load or an
    # optimizer step) holds the same bytes.
    key = tuple((n, t.data_ptr(), t._version, t.dtype, tuple(t.shape)) for n, t in state)
    cached = getattr(model, "_vprkit_state_sha256", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    digest = hashlib.sha256()
    for name, tensor in state:
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    model.__dict__["_vprkit_state_sha256"] = (key, digest.hexdigest())
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_fingerprint(model: nn.Module) -> dict:
    return {
        "name": getattr(model, "vprkit_name", type(model).__name__),
        "options": json.loads(json.dumps(getattr(model, "vprkit_overrides", {}), default=repr)),
        "state_sha256": state_sha256(model),
    }


def weights_record(weights: str | os.PathLike | None) -> dict:
    """How the weights were named, and the file's sha256 when they were a file."""
    if weights is None:
        return {"weights": None}
    if str(weights) == "random":  # `--weights random`: an explicit random initialization
        return {"weights": "random", "random_init": True}
    record: dict = {"weights": str(weights)}
    if Path(weights).is_file():
        record["weights_file_sha256"] = file_sha256(weights)
    return record


def images_sha256(names: Sequence[str], paths: Sequence[Path]) -> str:
    """The image list: names in order and each file's size (a changed photo usually changes
    size; hashing every photo would cost as much as reading it)."""
    digest = hashlib.sha256()
    for name, path in zip(names, paths, strict=True):
        digest.update(f"{name}\0{os.path.getsize(path)}\n".encode())
    return digest.hexdigest()


def digest(fingerprint: dict) -> str:
    """A short stable hash of a fingerprint, for a later stage to record what it read."""
    text = json.dumps(fingerprint, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def differences(recorded: dict, wanted: dict, prefix: str = "") -> list[str]:
    """`key (recorded there, wanted now)` for every leaf that differs."""
    out = []
    for key in sorted(set(recorded) | set(wanted)):
        a, b = recorded.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} ({_short(a)} there, {_short(b)} now)")
    return out


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def check_same(recorded: dict, wanted: dict, where: Path, what: str) -> None:
    """Refuse an existing output whose fingerprint differs from the one wanted now."""
    diff = differences(recorded, wanted)
    if diff:
        raise StageMismatchError(
            f"{where}: these {what} were made with other inputs or settings: "
            + "; ".join(diff)
            + ". Give another output path, or delete it to recompute"
        )
