"""Exact search over a sharded database, one Ray actor per shard.

`ShardedIndex(shards)` starts one actor per shard; each holds its rows as a flat FAISS index
(`vprkit.retrieval.search.flat_index`) and answers with its own top-K, ranked by the exact
rule of `vprkit.retrieval.search` (float64 distances of the L2-normalized float32 rows,
rounded to float32, ties by index). The shards' answers are merged by (distance, global
index), so the result is exactly `vprkit.retrieval.search.search` over all the rows
concatenated in shard order: the same ids and the same distances, bit for bit.

Why this is exact: a row of the global top-K is in its own shard's top-K (a shard's rows keep
their relative order under the same (distance, index) rule, its global index being its local
one plus the shard's offset), and each row's distance depends only on the row and the query.

A shard is an (N, D) array (shipped to the actor through Ray's object store), a `.npy` file,
a features folder (or its `Features`), which the actor memory-maps on its own node, so a
shard file on a node's local disk never crosses the network. An actor that dies is
restarted (it loads its shard again) and the search retried on it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vprkit.distributed.cluster import ray_session
from vprkit.errors import VprkitError
from vprkit.pipeline.features import META, Features

Shard = np.ndarray | str | os.PathLike | Features


def _shard_source(shard: Shard | Sequence[Shard]):
    """What an actor loads: a path to a .npy (memory-mapped there) or an array; a list or
    tuple of them is one shard of their rows in order (e.g. several chunks of a map)."""
    if isinstance(shard, list | tuple):
        return [_shard_source(s) for s in shard]
    if isinstance(shard, Features):
        return str(shard.folder / "global.npy") if shard.folder else np.asarray(shard.global_desc)
    if isinstance(shard, str | os.PathLike):
        path = Path(shard)
        return str(path / "global.npy") if (path / META).is_file() else str(path)
    return np.asarray(shard)


def _shape(source) -> tuple[int, int]:
    if isinstance(source, list):
        shapes = [_shape(s) for s in source]
        if not shapes or len({d for _, d in shapes}) != 1:
            raise VprkitError(f"a shard's parts must be one or more of one dimension: {shapes}")
        return sum(n for n, _ in shapes), shapes[0][1]
    if isinstance(source, str):
        if not Path(source).is_file():
            raise VprkitError(f"shard {source} does not exist")
        shape = np.load(source, mmap_mode="r").shape
    else:
        shape = source.shape
    if len(shape) != 2:
        raise VprkitError(f"a shard is an (N, D) array of descriptors, got shape {shape}")
    return int(shape[0]), int(shape[1])


class _ShardWorker:
    """One Ray actor: one shard as a flat index."""

    def __init__(self, source) -> None:
        from vprkit.retrieval.search import flat_index

        parts = source if isinstance(source, list) else [source]
        parts = [np.load(p, mmap_mode="r") if isinstance(p, str) else p for p in parts]
        self.index = flat_index(parts[0] if len(parts) == 1 else np.concatenate(parts))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        from vprkit.retrieval.search import search_flat_index

        return search_flat_index(self.index, queries, min(k, self.index.ntotal))


def merge_top_k(
    results: Sequence[tuple[np.ndarray, np.ndarray]], offsets: Sequence[int], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the `k` best of the shards' (distances, local indices), by (distance,
    global index) ascending; local indices become global ones with the shards' offsets."""
    distances = np.concatenate([d for d, _ in results], axis=1)
    indices = np.concatenate([i + off for (_, i), off in zip(results, offsets, strict=True)], 1)
    order = np.lexsort((indices, distances), axis=1)[:, :k]
    return np.take_along_axis(distances, order, 1), np.take_along_axis(indices, order, 1)


class ShardedIndex:
    """Shards of one database (in order; global index = position in their concatenation),
    each held by a Ray actor. A shard is an array, a `.npy` path, a features folder or
    `Features`, or a list of them: one actor for all their rows, in order (a map's
    consecutive chunks grouped into a few shards). Use as a context manager, or call `close()`.

    `address`: "auto" or a Ray address (default: the running session, else "auto").
    `resources`: Ray resources of each actor (default Ray's: scheduled on a CPU node,
    holding no CPU while idle: one actor per shard however many shards)."""

    def __init__(
        self,
        shards: Sequence[Shard],
        *,
        address: str | None = None,
        resources: dict | None = None,
        max_retries: int = 3,
        ready_timeout_s: float = 300.0,
    ) -> None:
        if not shards:
            raise VprkitError("no shards to search")
        sources = [_shard_source(s) for s in shards]
        shapes = [_shape(s) for s in sources]
        dims = {d for _, d in shapes}
        if len(dims) != 1:
            raise VprkitError(f"the shards have different dimensions: {sorted(dims)}")
        self.dim = dims.pop()
        self.sizes = [n for n, _ in shapes]
        self.offsets = np.cumsum([0] + self.sizes[:-1]).tolist()
        self._session = ray_session(address)
        ray = self._session.__enter__()
        self._ray = ray
        try:
            actor = ray.remote(_ShardWorker).options(
                max_restarts=max_retries,
                max_task_retries=max_retries,
                **(resources or {}),
            )
            self._actors = [
                actor.remote(s if isinstance(s, str | list) else ray.put(s)) for s in sources
            ]
            ready = [a.__ray_ready__.remote() for a in self._actors]
            done, waiting = ray.wait(ready, num_returns=len(ready), timeout=ready_timeout_s)
            ray.get(done)  # a shard that fails to load says why
            if waiting:
                raise VprkitError(
                    f"{len(waiting)} of {len(ready)} search shards found no place on the Ray "
                    f"cluster within {ready_timeout_s:g} s (resources asked per shard: "
                    f"{resources or {}}; the cluster has {ray.cluster_resources()})"
                )
        except BaseException:
            for a in getattr(self, "_actors", []):
                ray.kill(a)
            self._session.__exit__(None, None, None)
            raise

    def __len__(self) -> int:
        return sum(self.sizes)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """`(distances, indices)`, both (Q, k): exactly `vprkit.retrieval.search.search` over
        the concatenated shards (k is clipped to the database size, with a warning)."""
        queries = np.asarray(queries)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise VprkitError(
                f"queries are {queries.shape}, the shards hold {self.dim}-D descriptors"
            )
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if k > len(self):
            warnings.warn(
                f"k={k} is larger than the database ({len(self)} descriptors): "
                f"returning all {len(self)} database items per query",
                stacklevel=2,
            )
        k = min(int(k), len(self))
        ref = self._ray.put(queries)
        try:
            results = self._ray.get([a.search.remote(ref, k) for a in self._actors])
        except self._ray.exceptions.RayError as err:
            raise VprkitError(f"a search shard failed: {str(err).splitlines()[0]}") from None
        return merge_top_k(results, self.offsets, k)

    def close(self) -> None:
        for a in getattr(self, "_actors", []):
            self._ray.kill(a)
        self._actors = []
        self._session.__exit__(None, None, None)

    def __enter__(self) -> ShardedIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def sharded_search(
    shards: Sequence[Shard], queries: np.ndarray, k: int, *, address: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One search over `shards` on Ray actors (`ShardedIndex`), equal to
    `vprkit.retrieval.search.search(np.concatenate(shards), queries, k)`."""
    with ShardedIndex(shards, address=address) as index:
        return index.search(queries, k)
