"""Descriptor extraction: images in a fixed order -> (N, D) float32 global descriptors.

Images are read in the given (sorted) order by a non-shuffled loader in batches of
`batch_size`, the last one smaller: the protocol the official evaluations use, which matters
for models whose descriptors depend on the batch (CricaVPR). Images that come out of the
preprocessing in different shapes (one `image_size` for photos of mixed aspect ratios) cannot
share a batch: each batch then holds images of one shape, in input order, and the rows of the
result stay in input order. With a fixed input size the batches are exactly as above.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from vprkit.atomic import atomic_path, save_npy
from vprkit.cpu_precision import warn_if_emulated
from vprkit.data.images import ImageListDataset, Preprocess, input_hw
from vprkit.errors import VprkitError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_context(device: str, precision: str):
    """Autocast for bf16/fp16, a no-op for fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    warn_if_emulated(device, precision)
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def computes_local(model: nn.Module) -> bool:
    """Whether `model.forward` takes `local=` (computing local features is optional)."""
    return "local" in inspect.signature(model.forward).parameters


def same_shape_batches(shapes: Sequence, batch_size: int) -> list[list[int]]:
    """Indices in batches of `batch_size` images of one shape each, in input order: a batch is
    emitted when it is full, and the partial ones at the end, by their first image. With one
    shape these are the plain consecutive batches."""
    batches: list[list[int]] = []
    open_batches: dict = {}
    for i, shape in enumerate(shapes):
        batch = open_batches.setdefault(shape, [])
        batch.append(i)
        if len(batch) == batch_size:
            batches.append(open_batches.pop(shape))
    return batches + sorted(open_batches.values())


@torch.no_grad()
def extract_global_descriptors(
    model: nn.Module,
    paths: Sequence[Path],
    preprocess: Preprocess,
    *,
    batch_size: int = 16,
    num_workers: int = 0,
    device: str = "cpu",
    precision: str = "fp32",
    label: str = "images",
    local_sink: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> np.ndarray:
    """Run `model` over `paths` in order; returns float32 (N, D) global descriptors.

    With `local_sink`, each batch's local features (`local_desc`, else `local_tokens`) are
    passed to it with their image indices, for re-ranking.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if isinstance(preprocess, Preprocess) and preprocess.fixed_hw is None:
        shapes: Sequence = [input_hw(p, preprocess) for p in paths]
    else:  # one shape (or a custom transform, taken to give one): consecutive batches
        shapes = [None] * len(paths)
    loader = torch.utils.data.DataLoader(
        ImageListDataset(paths, preprocess),
        batch_sampler=same_shape_batches(shapes, batch_size),
        num_workers=num_workers,
    )
    model.eval().to(device)
    # Models with local features (SelaVPR, R2Former) skip them when nobody wants them.
    options = {} if local_sink is not None or not computes_local(model) else {"local": False}
    descriptors: np.ndarray | None = None
    with tqdm(total=len(paths), desc=f"extracting {label}", unit="img", leave=False) as bar:
        for images, indices in loader:
            with autocast_context(device, precision):
                out = model(images.to(device), **options)
            batch = out.global_desc.float().cpu().numpy()
            if local_sink is not None:
                local = out.local_desc if out.local_desc is not None else out.local_tokens
                if local is None:
                    raise VprkitError(
                        f"{type(model).__name__} gives no local features to re-rank: choose "
                        "a model that has them, or --rerank_num 0"
                    )
                local_sink(indices, local.float())
            if descriptors is None:
                descriptors = np.empty((len(paths), batch.shape[1]), dtype=np.float32)
            descriptors[indices.numpy()] = batch
            bar.update(len(indices))
    if descriptors is None:
        raise VprkitError(f"no {label} to extract")
    return descriptors


def save_descriptors(
    descriptors: np.ndarray, names: Sequence[str], npy_path: Path, h5_path: Path
) -> None:
    """Save as .npy (rows in `names` order) and as hloc-style HDF5: one group per image
    name holding a `global_descriptor` dataset. Each file is written then renamed."""
    import h5py

    if len(names) != len(descriptors):
        raise ValueError(f"{len(names)} names for {len(descriptors)} descriptors")
    for path in (npy_path, h5_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    save_npy(npy_path, descriptors)
    with atomic_path(h5_path) as tmp, h5py.File(tmp, "w") as f:
        for name, desc in zip(names, descriptors, strict=True):
            f.create_group(name).create_dataset("global_descriptor", data=desc)
