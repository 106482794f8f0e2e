"""Stage 1, extract: a model over an image list -> global (and local) descriptors.

`extract(model, image_paths, out=...)` writes a features folder (see
`vprkit.pipeline.features`); run again with the same model, weights, preprocessing and
settings it reads the folder instead of recomputing, and with other ones it refuses, naming
what differs. Without `out` the descriptors stay in memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

import vprkit
from vprkit.data.images import Preprocess, input_hw, load_image
from vprkit.errors import VprkitError
from vprkit.extract import extract_global_descriptors
from vprkit.pipeline import fingerprint as fp
from vprkit.pipeline.features import (
    Features,
    is_features_folder,
    load_features,
    local_path,
    publish,
    staging_folder,
)
from vprkit.rerank.local_features import LocalFeatureCache


def network_input_hw(preprocess: Preprocess, first_image: Path) -> tuple[int, int]:
    """The network's input size: fixed by `image_size=(H, W)`, else that of the first image
    after resizing (local-feature coordinates are in this frame)."""
    if isinstance(preprocess.image_size, tuple):
        return preprocess.image_size
    shape = preprocess(load_image(first_image)).shape
    return int(shape[1]), int(shape[2])


def relative_names(paths: Sequence[Path], root: Path | None) -> list[str]:
    """Image names relative to `root` (POSIX), or the absolute path without its leading /."""
    names = []
    for p in paths:
        try:
            names.append(Path(p).relative_to(root).as_posix())
        except (ValueError, TypeError):
            names.append(Path(p).as_posix().lstrip("/"))
    return names


def extract_fingerprint(
    model: nn.Module,
    names: Sequence[str],
    paths: Sequence[Path],
    preprocess: Preprocess,
    batch_size: int,
    precision: str,
    local: bool,
    local_dtype: str,
) -> dict:
    """What the descriptors depend on (not: device, worker count, where the images live)."""
    return {
        "model": fp.model_fingerprint(model),
        "preprocess": json.loads(json.dumps(vars_of(preprocess))),
        "batch_size": int(batch_size),
        "precision": precision,
        "local": {"dtype": local_dtype} if local else None,
        "images": {"count": len(paths), "sha256": fp.images_sha256(names, paths)},
    }


def extract_record(model: nn.Module, weights, device: str, root: str | os.PathLike | None) -> dict:
    """What is recorded beside the fingerprint, for information and to rebuild the model."""
    return {
        **fp.weights_record(weights),
        # A random initialization is rebuilt from its seed (vprkit rerank needs the model).
        **({"seed": model.vprkit_seed} if hasattr(model, "vprkit_seed") else {}),
        "device": device,
        "vprkit_version": vprkit.__version__,
        "root": None if root is None else str(root),
    }


def vars_of(preprocess: Preprocess) -> dict:
    return {
        "image_size": preprocess.image_size,
        "crop": preprocess.crop,
        "normalize": preprocess.normalize,
        "mean": preprocess.mean,
        "std": preprocess.std,
    }


def extract(
    model: nn.Module,
    image_paths: Sequence[str | os.PathLike],
    out: str | os.PathLike | None = None,
    *,
    preprocess: Preprocess,
    root: str | os.PathLike | None = None,
    local: bool = False,
    local_dtype: str = "float32",
    batch_size: int = 16,
    num_workers: int = 0,
    device: str = "cpu",
    precision: str = "fp32",
    weights: str | os.PathLike | None = None,
    label: str = "images",
    on_compute: Callable[[], None] | None = None,
) -> Features:
    """Descriptors of `image_paths`, in their order, in batches of `batch_size` (the last
    one smaller; CricaVPR's descriptors depend on the batch). `local=True` also keeps the
    model's local features (SelaVPR's dense maps, R2Former's tokens) for re-ranking.

    `out`: a features folder to write, or to reuse when it exists with the same fingerprint.
    `root`: names are recorded relative to it. `weights` is only recorded (the fingerprint
    hashes the weights in memory). `on_compute` is called when the images are actually read.
    """
    paths = [Path(p) for p in image_paths]
    if not paths:
        raise VprkitError(f"no {label} to extract")
    names = relative_names(paths, None if root is None else Path(root))
    folder = None if out is None else Path(out)
    # Hashing the weights costs a second for a ViT-L: only for features kept on disk.
    wanted, record = {}, {}
    if folder is not None:
        wanted = extract_fingerprint(
            model, names, paths, preprocess, batch_size, precision, local, local_dtype
        )
        record = extract_record(model, weights, device, root)
    if folder is not None and is_features_folder(folder):
        existing = load_features(folder)
        if not local and existing.has_local:
            wanted["local"] = existing.fingerprint["local"]  # more than asked for: it serves
        fp.check_same(existing.fingerprint, wanted, folder, "features")
        return existing
    if local:
        _check_one_shape(paths, preprocess, names)
    if on_compute is not None:
        on_compute()
    staging = None if folder is None else staging_folder(folder)
    global_desc, local_cache = _compute(
        model,
        paths,
        preprocess,
        local_file=None if not local else local_path(staging) if staging else _temporary_local(),
        local_dtype=local_dtype,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        precision=precision,
        label=label,
    )
    features = Features(
        names=names,
        global_desc=global_desc,
        image_hw=network_input_hw(preprocess, paths[0]),
        fingerprint=json.loads(json.dumps(wanted)),
        record=record,
        local=local_cache,
    )
    if staging is None:
        return features
    return publish(features, staging, folder)


def _check_one_shape(paths: list[Path], preprocess: Preprocess, names: list[str]) -> None:
    """Local features are kept in one array of one shape: refuse images that the
    preprocessing makes into different shapes, before any forward pass."""
    if preprocess.fixed_hw is not None:
        return
    # An unreadable file is left out here: loading it reports why.
    shapes = [(input_hw(p, preprocess), n) for p, n in zip(paths, names, strict=True)]
    readable = [(hw, name) for hw, name in shapes if isinstance(hw[0], int)]
    for hw, name in readable:
        if hw != readable[0][0]:
            (h0, w0), first = readable[0]
            raise VprkitError(
                f"local features need one input size, but {first} becomes {h0}x{w0} and "
                f"{name} {hw[0]}x{hw[1]} (H x W) with image_size={preprocess.image_size}; "
                "pass --image_size H W (Preprocess(image_size=(H, W)))"
            )


def _compute(
    model: nn.Module,
    paths: list[Path],
    preprocess: Preprocess,
    *,
    local_file: Path | None,
    local_dtype: str,
    **options,
) -> tuple[np.ndarray, LocalFeatureCache | None]:
    """The forward passes: global descriptors, and local features into `local_file`."""
    cache: dict[str, LocalFeatureCache] = {}

    def sink(indices: torch.Tensor, features: torch.Tensor) -> None:
        if "local" not in cache:  # the first batch fixes the features' shape
            cache["local"] = LocalFeatureCache.create(
                local_file, len(paths), features.shape[1:], local_dtype
            )
        cache["local"].write(indices, features)

    try:
        global_desc = extract_global_descriptors(
            model, paths, preprocess, local_sink=sink if local_file else None, **options
        )
        if "local" in cache:
            cache["local"].close()  # publishes the finished cache, reopened read-only
    except BaseException:
        if "local" in cache:
            cache["local"].abort()
        raise
    return global_desc, cache.get("local")


def _temporary_local() -> Path:
    """In-memory extraction with local features still needs a file for them (they can be
    tens of GB): a temporary folder, removed when the process ends."""
    import atexit
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="vprkit_local_"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder / "local.npy"


def as_array(features: Features | np.ndarray) -> np.ndarray:
    return np.asarray(features.global_desc if isinstance(features, Features) else features)
