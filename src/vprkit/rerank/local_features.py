"""Local features on disk for re-ranking: one memory-mapped `.npy` per image set.

File layout (what feature extraction writes and a later, separate re-ranking run reads, e.g.
the `local.npy` of a `vprkit extract` features folder): a standard NumPy `.npy` file holding
one array of shape (N, *feature_shape), float32 or float16, row i being
image i of the set (the database or the queries, in dataset order):
- dense local maps (`local_desc`, SelaVPR): (N, C, h, w), e.g. (N, 128, 61, 61);
- selected local tokens (`local_tokens`, R2Former): (N, K, F), e.g. (N, 500, 131) with each
  token `[x, y, attention, feature...]`.
`LocalFeatureCache.open(path)` maps such a file read-only (any `np.save`d array of that form
works too) and reads rows lazily as float32 tensors.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

LOCAL_DESC = "local_desc"
LOCAL_TOKENS = "local_tokens"


def feature_kind(feature_shape: Sequence[int]) -> str:
    """`"local_desc"` for dense (C, h, w) maps, `"local_tokens"` for (K, F) token sets."""
    if len(feature_shape) == 3:
        return LOCAL_DESC
    if len(feature_shape) == 2:
        return LOCAL_TOKENS
    raise ValueError(f"local features are (C, h, w) maps or (K, F) tokens, got {feature_shape}")


class LocalFeatureCache:
    """Per-image local features of one split in a single memory-mapped `.npy` on disk
    (N, D, h, w) maps or (N, K, F) tokens (module doc), so that re-ranking a Pitts30k-size
    set (about 32 GB in fp32) need not fit in RAM; rows are read lazily, only for the
    candidates being re-ranked.

    Writing: `LocalFeatureCache.create(path, num_images, (128, 61, 61))`, then `write(...)`
    batches, then `close()` (or use it as a context manager). Data goes to a temporary file in
    the same folder that is renamed onto `path` only when every row was written, so a reader
    never sees a half-written cache; on an exception the temporary file is removed.
    Reading: `LocalFeatureCache.open(path)[indices]` gives a float32 tensor (K, D, h, w).
    A `.npy` of that form written by anything else (e.g. `np.save`) opens the same way.

    Storage dtype: float16 by default (0.95 MB per 61x61x128 image instead of 1.9 MB). fp16
    rounds each feature by up to 2^-11 relative, which moves similarities by up to ~1e-3 and
    flips near-tied argmaxes, so counts from fp16-stored features can differ from counts on
    the fp32 features the model produced (counting itself stays exact for the stored values).
    Measured on random 61x61x128 data (benchmarks/bench_mnn.py's inputs, K=100, counts
    1800-3721): 44 of 100 counts changed, by 1 to 3; the top-1 was unchanged but candidates
    whose counts were within a few of each other swapped places (positions 48 onwards);
    on 30 unrelated random candidates 24 counts changed, by at most 3. Use
    `dtype="float32"` to reproduce the official fp32 pipeline exactly.
    """

    def __init__(self, path: str | Path, array: np.ndarray, writing: bool, final: Path) -> None:
        self.path = Path(path)
        self._array = array
        self._writing = writing
        self._final = final
        self._written = np.zeros(len(array), dtype=bool) if writing else None

    @classmethod
    def create(
        cls,
        path: str | Path,
        num_images: int,
        feature_shape: Sequence[int],
        dtype: str | np.dtype = "float16",
    ) -> LocalFeatureCache:
        """A new cache of `num_images` maps of `feature_shape` (e.g. (128, 61, 61))."""
        dtype = np.dtype(dtype)
        if dtype not in (np.dtype("float16"), np.dtype("float32")):
            raise ValueError(f"dtype must be float16 or float32, got {dtype}")
        if num_images < 0:
            raise ValueError(f"num_images must be >= 0, got {num_images}")
        final = Path(path)
        if final.suffix != ".npy":
            raise ValueError(f"{final}: a local feature cache is a .npy file")
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=final.name + ".", suffix=".tmp", dir=final.parent)
        os.close(fd)
        shape = (int(num_images), *map(int, feature_shape))
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        return cls(tmp, array, writing=True, final=final)

    @classmethod
    def open(cls, path: str | Path) -> LocalFeatureCache:
        """An existing cache, memory-mapped read-only."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"local feature cache not found: {path}")
        try:
            array = np.load(path, mmap_mode="r")
        except ValueError as err:
            raise ValueError(f"{path}: not a readable .npy local feature cache ({err})") from err
        if array.ndim < 2 or array.dtype not in (np.float16, np.float32):
            raise ValueError(f"{path}: expected a float16/float32 (N, ...) array, got {array}")
        return cls(path, array, writing=False, final=path)

    def __len__(self) -> int:
        return len(self._array)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self._array.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self._array.dtype

    @property
    def writing(self) -> bool:
        """True until `close` publishes the file (or `abort` discards it)."""
        return self._writing

    def write(self, indices: Sequence[int] | np.ndarray | Tensor, features: Tensor) -> None:
        """Store `features` (B, *feature_shape) at rows `indices` (B,)."""
        if not self._writing:
            raise ValueError(f"{self.path} was opened read-only")
        idx = np.asarray(torch.as_tensor(indices).cpu(), dtype=np.int64).reshape(-1)
        feats = torch.as_tensor(features).detach().cpu()
        if tuple(feats.shape) != (len(idx), *self.feature_shape):
            raise ValueError(
                f"features of shape {tuple(feats.shape)} for {len(idx)} indices; expected "
                f"{(len(idx), *self.feature_shape)}"
            )
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"indices out of range for a cache of {len(self)} images")
        self._array[idx] = feats.float().numpy().astype(self.dtype)
        self._written[idx] = True

    def __getitem__(self, indices: int | Sequence[int] | np.ndarray | Tensor) -> Tensor:
        """float32 tensor (K, *feature_shape) for a list of indices, or one map for an int."""
        if isinstance(indices, (int, np.integer)):
            return torch.from_numpy(np.array(self._array[int(indices)], dtype=np.float32))
        idx = np.asarray(torch.as_tensor(indices).cpu(), dtype=np.int64).reshape(-1)
        return torch.from_numpy(np.array(self._array[idx], dtype=np.float32))

    def close(self) -> None:
        """Flush; when writing, check every row was written and publish the file atomically."""
        if not self._writing:
            self._array = None
            return
        missing = np.flatnonzero(~self._written)
        if len(missing):
            self.abort()
            raise ValueError(
                f"{self._final}: {len(missing)} of {len(self._written)} rows were never "
                f"written (first: {missing[:5].tolist()}); nothing was saved"
            )
        self._array.flush()
        self._array = None
        os.replace(self.path, self._final)
        self.path, self._writing = self._final, False
        self._array = np.load(self._final, mmap_mode="r")

    def abort(self) -> None:
        """Discard a cache being written."""
        if self._writing:
            self._array = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self._writing = False

    def __enter__(self) -> LocalFeatureCache:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()
