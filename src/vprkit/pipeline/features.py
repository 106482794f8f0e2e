"""Descriptors of one image list, in memory or in a features folder on disk.

A features folder (format ``vprkit-features``, version 1) holds:

- ``features.json``: the format and version, the image names in order (relative to the
  image root), the network input size, the fingerprint of what made them (model name,
  options and a sha256 of its weights, preprocessing, batch size, precision, the image
  list) and an informative record (weights as named, weights file sha256, device, vprkit
  version);
- ``global.npy``: (N, D) float32 global descriptors, rows in the names' order;
- ``local.npy`` (only when local features were asked for): (N, ...) float32 or float16,
  SelaVPR's dense maps (N, 128, h, w) or R2Former's tokens (N, 500, 131), memory-mapped.

A folder is written as ``<folder>.incomplete/`` and renamed when complete, so a folder
with ``features.json`` is always whole.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vprkit.atomic import save_npy, write_text
from vprkit.errors import VprkitError
from vprkit.rerank.local_features import LocalFeatureCache

FORMAT = "vprkit-features"
VERSION = 1
META = "features.json"


@dataclass
class Features:
    names: list[str]
    global_desc: np.ndarray  # (N, D) float32
    image_hw: tuple[int, int]  # the network's input size (local-feature coordinates)
    fingerprint: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict)
    local: LocalFeatureCache | None = None
    folder: Path | None = None

    def __len__(self) -> int:
        return len(self.global_desc)

    @property
    def has_local(self) -> bool:
        return self.local is not None


def local_path(folder: Path) -> Path:
    return folder / "local.npy"


def staging_folder(folder: Path) -> Path:
    """A fresh `<folder>.incomplete/` to write into (a killed run's leftovers are removed)."""
    staging = folder.with_name(folder.name + ".incomplete")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def publish(features: Features, staging: Path, folder: Path) -> Features:
    """Write the global descriptors and features.json into `staging`, then rename it."""
    save_npy(staging / "global.npy", features.global_desc)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "count": len(features),
        "dim": int(features.global_desc.shape[1]),
        "image_hw": list(features.image_hw),
        "local_shape": list(features.local.feature_shape) if features.local else None,
        "names": features.names,
        "fingerprint": features.fingerprint,
        "record": features.record,
    }
    write_text(staging / META, json.dumps(meta, indent=1))
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()  # an empty folder the user made for us
    os.replace(staging, folder)
    return load_features(folder)


def is_features_folder(folder: Path) -> bool:
    return (Path(folder) / META).is_file()


def load_features(folder: str | os.PathLike) -> Features:
    """Open a features folder (the descriptors and local features memory-mapped)."""
    folder = Path(folder)
    meta_path = folder / META
    if not meta_path.is_file():
        raise VprkitError(
            f"{folder}: not a features folder (no {META}); make one with vprkit extract"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise VprkitError(
            f"{meta_path}: not valid JSON ({e}); delete the folder and re-extract"
        ) from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise VprkitError(
            f"{meta_path}: format {meta.get('format')!r} version {meta.get('version')!r}, "
            f"expected {FORMAT!r} version {VERSION}"
        )
    global_desc = np.load(folder / "global.npy", mmap_mode="r", allow_pickle=False)
    if global_desc.shape != (meta["count"], meta["dim"]):
        raise VprkitError(
            f"{folder}/global.npy has shape {global_desc.shape}, features.json says "
            f"({meta['count']}, {meta['dim']}); the folder is damaged: re-extract"
        )
    local = LocalFeatureCache.open(local_path(folder)) if meta["local_shape"] else None
    return Features(
        names=list(meta["names"]),
        global_desc=global_desc,
        image_hw=tuple(meta["image_hw"]),
        fingerprint=meta["fingerprint"],
        record=meta["record"],
        local=local,
        folder=folder,
    )
