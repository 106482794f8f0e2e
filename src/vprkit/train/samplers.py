"""Batch and index samplers for training, deterministic and ready for DDP.

- :class:`PlaceBatchSampler`: batches of ``P`` distinct places (each place gives ``K`` images
  in the dataset, so a step sees ``P*K`` images), the GSV-Cities order of the official code.
- :class:`DistributedShardSampler`: a shuffled index list split into disjoint per-rank shards.

Both are pure functions of ``(seed, epoch)``, so a resumed run, or a run on a different
number of processes, sees the same data.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["DistributedShardSampler", "PlaceBatchSampler"]


def _non_negative_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
    return int(value)


def _positive_int(value: object, what: str) -> int:
    value = _non_negative_int(value, what)
    if value == 0:
        raise ValueError(f"{what} must be positive, got 0")
    return value


def _replicas_and_rank(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """Explicit values, or the initialised process group's, or a single process."""
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if num_replicas is None:
        num_replicas = torch.distributed.get_world_size() if initialised else 1
    if rank is None:
        rank = torch.distributed.get_rank() if initialised else 0
    num_replicas = _positive_int(num_replicas, "num_replicas")
    rank = _non_negative_int(rank, "rank")
    if rank >= num_replicas:
        raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
    return num_replicas, rank


class PlaceBatchSampler(Sampler[list[int]]):
    """Batches of ``places_per_batch`` distinct place indices, every place once per epoch.

    Order (the official GSV-Cities / CricaVPR one): with ``city_grouped=True`` each city's
    places are shuffled and the cities concatenated in city-index order, so consecutive
    places, hence most batches, come from one city (the encoder attends across the batch,
    so this matters); with ``city_grouped=False`` all places are shuffled together.
    ``reshuffle=True`` draws a new order every epoch (gsv-cities reloads its dataset every
    epoch); ``reshuffle=False`` keeps epoch 0's order, as CricaVPR, which builds its dataset
    once. The order depends only on ``(seed, epoch)``.

    ``drop_last=False`` (the official ``drop_last=False``) keeps a last, smaller batch of the
    ``N % P`` remaining places; ``drop_last=True`` drops them for this epoch. Batches cross
    city boundaries, as in the official code.

    DDP: each global batch of ``P`` places is cut into ``num_replicas`` contiguous slices of
    ``P / num_replicas`` (``P`` must divide), and rank ``r`` gets slice ``r``; contiguous,
    like DataParallel's split of the official 2-GPU run, so the ranks together see exactly
    the batches of a single-process run. A smaller last batch is split as evenly as possible
    (slices differ by at most one place) and dropped if it has fewer places than ranks.
    ``num_replicas`` / ``rank`` default to the process group's when one is initialised.

    ``start_batch`` skips the first batches of the epoch, to resume mid-epoch; it is set
    again (default 0) by every :meth:`set_epoch`.
    """

    def __init__(
        self,
        place_cities: Sequence[int] | np.ndarray | int,
        places_per_batch: int = 72,
        *,
        city_grouped: bool = True,
        reshuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        epoch: int = 0,
        start_batch: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        if isinstance(place_cities, int | np.integer) and not isinstance(place_cities, bool):
            cities = np.zeros(_positive_int(place_cities, "number of places"), dtype=np.int64)
        else:
            cities = np.asarray(place_cities)
            if cities.ndim != 1 or cities.size == 0 or not np.issubdtype(cities.dtype, np.integer):
                raise ValueError(
                    "place_cities must be a number of places or a non-empty 1-D list of "
                    f"integer city indices (one per place), got {place_cities!r}"
                )
        self.place_cities = cities.astype(np.int64)
        self.places_per_batch = _positive_int(places_per_batch, "places_per_batch")
        self.num_replicas, self.rank = _replicas_and_rank(num_replicas, rank)
        if self.places_per_batch % self.num_replicas:
            raise ValueError(
                f"places_per_batch={self.places_per_batch} must be divisible by "
                f"num_replicas={self.num_replicas} (each rank gets an equal slice)"
            )
        self.city_grouped = bool(city_grouped)
        self.reshuffle = bool(reshuffle)
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        if self.num_batches == 0:
            raise ValueError(
                f"{self.num_places} places make no batch of {self.places_per_batch} "
                f"(drop_last={self.drop_last}, num_replicas={self.num_replicas})"
            )
        self.set_epoch(epoch, start_batch)

    @property
    def num_places(self) -> int:
        return len(self.place_cities)

    @property
    def num_batches(self) -> int:
        """Batches in a whole epoch, before ``start_batch`` is skipped."""
        full, rest = divmod(self.num_places, self.places_per_batch)
        keep_rest = rest > 0 and not self.drop_last and rest >= self.num_replicas
        return full + int(keep_rest)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Choose the epoch's order, and the number of its batches to skip (for resuming)."""
        self.epoch = _non_negative_int(epoch, "epoch")
        start_batch = _non_negative_int(start_batch, "start_batch")
        if start_batch > self.num_batches:
            raise ValueError(
                f"start_batch={start_batch} is past the end of the epoch ({self.num_batches} "
                "batches)"
            )
        self.start_batch = start_batch

    def place_order(self, epoch: int | None = None) -> np.ndarray:
        """All place indices of ``epoch`` (default: the current one) in batch order."""
        epoch = self.epoch if epoch is None else _non_negative_int(epoch, "epoch")
        rng = np.random.default_rng([self.seed, epoch if self.reshuffle else 0])
        if not self.city_grouped:
            return rng.permutation(self.num_places)
        parts = []
        for city in np.unique(self.place_cities):
            members = np.flatnonzero(self.place_cities == city)
            parts.append(members[rng.permutation(len(members))])
        return np.concatenate(parts)

    def global_batches(self, epoch: int | None = None) -> list[list[int]]:
        """Every batch of ``epoch`` across all ranks, with none skipped."""
        order = self.place_order(epoch)
        p = self.places_per_batch
        return [order[i : i + p].tolist() for i in range(0, self.num_batches * p, p)]

    def _rank_slice(self, batch: list[int]) -> list[int]:
        if len(batch) == self.places_per_batch:
            per_rank = self.places_per_batch // self.num_replicas
            return batch[self.rank * per_rank : (self.rank + 1) * per_rank]
        # A smaller last batch: array_split's even cut, larger slices on the first ranks.
        return np.array_split(np.asarray(batch), self.num_replicas)[self.rank].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches()[self.start_batch :]:
            yield self._rank_slice(batch)

    def __len__(self) -> int:
        return self.num_batches - self.start_batch


class DistributedShardSampler(Sampler[int]):
    """Indices of a list, shuffled by ``(seed, epoch)`` and split into disjoint rank shards.

    ``indices``: a number ``n`` (meaning ``0..n-1``) or an explicit list of indices. Rank
    ``r`` gets every ``num_replicas``-th index of the shuffled list from position ``r`` (the
    split of ``torch.utils.data.DistributedSampler``). When the count does not divide,
    ``drop_last=False`` pads with the first indices of the shuffled list, so a few indices
    are seen twice in the epoch, and ``drop_last=True`` drops the last ``n % num_replicas``
    shuffled indices. ``start_index`` skips that many of this rank's indices, to resume
    mid-epoch; every :meth:`set_epoch` sets it again (default 0).
    """

    def __init__(
        self,
        indices: Sequence[int] | np.ndarray | int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
        start_index: int = 0,
    ) -> None:
        if isinstance(indices, int | np.integer) and not isinstance(indices, bool):
            self.indices = np.arange(_positive_int(indices, "number of indices"), dtype=np.int64)
        else:
            arr = np.asarray(indices)
            if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(
                    f"indices must be a count or a non-empty 1-D list of integers, got {indices!r}"
                )
            self.indices = arr.astype(np.int64)
        self.num_replicas, self.rank = _replicas_and_rank(num_replicas, rank)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        if self.num_samples == 0:
            raise ValueError(
                f"{len(self.indices)} indices leave none for each of {self.num_replicas} ranks "
                "with drop_last=True"
            )
        self.set_epoch(epoch, start_index)

    @property
    def num_samples(self) -> int:
        """Indices per rank in a whole epoch, before ``start_index`` is skipped."""
        n, r = len(self.indices), self.num_replicas
        return n // r if self.drop_last else -(-n // r)

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        """Choose the epoch's shuffle, and how many of this rank's indices to skip."""
        self.epoch = _non_negative_int(epoch, "epoch")
        start_index = _non_negative_int(start_index, "start_index")
        if start_index > self.num_samples:
            raise ValueError(
                f"start_index={start_index} is past the end of the epoch "
                f"({self.num_samples} indices per rank)"
            )
        self.start_index = start_index

    def epoch_order(self, epoch: int | None = None) -> np.ndarray:
        """The shuffled, padded or trimmed list of all ranks' indices of ``epoch``."""
        epoch = self.epoch if epoch is None else _non_negative_int(epoch, "epoch")
        order = self.indices
        if self.shuffle:
            order = order[np.random.default_rng([self.seed, epoch]).permutation(len(order))]
        total = self.num_samples * self.num_replicas
        if total <= len(order):
            return order[:total]
        # np.resize repeats the list cyclically, which also covers padding longer than it.
        return np.resize(order, total)

    def __iter__(self) -> Iterator[int]:
        shard = self.epoch_order()[self.rank :: self.num_replicas]
        return iter(shard[self.start_index :].tolist())

    def __len__(self) -> int:
        return self.num_samples - self.start_index
