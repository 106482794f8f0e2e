"""Where a training epoch's batches come from, resumable mid-epoch.

- `LoaderSource`: a dataset with a batch sampler (GSV-Cities places x images).
- `TripletSource`: VG-benchmark triplets, re-mined with the current model every
  `cache_refresh_rate` queries (a new loader per refresh, as the VG benchmark does); the
  triplets of the refresh in progress go into checkpoints, so a resumed run uses the same
  ones rather than re-mining them with a changed model.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from vprkit.errors import VprkitError
from vprkit.train.distributed import World, broadcast_object


def _loader(dataset, batch_sampler, collate, num_workers: int, seed: int):
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=collate,
        num_workers=num_workers,
        # Its own generator: creating an iterator (e.g. when resuming mid-epoch) must not
        # draw from the global RNG that dropout uses.
        generator=torch.Generator().manual_seed(seed),
    )


class LoaderSource:
    def __init__(self, dataset, sampler, collate, num_workers: int, seed: int) -> None:
        self.dataset, self.sampler = dataset, sampler
        self.loader = _loader(dataset, sampler, collate, num_workers, seed)

    @property
    def num_batches(self) -> int:
        return self.sampler.num_batches

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch=start_batch)
        self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator:
        return iter(self.loader)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class TripletSource:
    """`queries_per_epoch` queries per epoch in refreshes of `cache_refresh_rate`; batches of
    `batch_size` triplets (global; each rank takes its contiguous slice), `drop_last` as the
    VG benchmark. `feature_fn` computes the mining cache with the current model (rank 0
    mines, every rank gets the triplets)."""

    def __init__(
        self,
        dataset,
        batch_size: int,
        queries_per_epoch: int,
        world: World,
        collate,
        num_workers: int,
        seed: int,
    ) -> None:
        if batch_size % world.size:
            raise VprkitError(f"batch size {batch_size} must divide by {world.size} processes")
        self.dataset, self.batch_size, self.world = dataset, batch_size, world
        self.collate, self.num_workers, self.seed = collate, num_workers, seed
        refresh = min(dataset.miner.cache_refresh_rate, dataset.data.num_queries)
        self.refreshes = max(1, math.ceil(queries_per_epoch / refresh))
        self.batches_per_refresh = refresh // batch_size
        if self.batches_per_refresh == 0:
            raise VprkitError(f"a refresh of {refresh} queries makes no batch of {batch_size}")
        self.feature_fn = None
        self.start_batch = 0
        self._resume: dict | None = None

    @property
    def num_batches(self) -> int:
        return self.refreshes * self.batches_per_refresh

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.dataset.set_epoch(epoch)
        self.start_batch = start_batch

    def _rank_batches(self, skip: int) -> list[list[int]]:
        per_rank = self.batch_size // self.world.size
        batches = []
        for b in range(skip, self.batches_per_refresh):
            first = b * self.batch_size + self.world.rank * per_rank
            batches.append(list(range(first, first + per_rank)))
        return batches

    def __iter__(self) -> Iterator:
        first_refresh, skip = divmod(self.start_batch, self.batches_per_refresh)
        for refresh in range(first_refresh, self.refreshes):
            resume = self._resume
            if resume is not None and resume["refresh_index"] == refresh:
                rows = resume["triplets"]
            else:
                rows = None
                if self.world.is_main:
                    if self.feature_fn is None:
                        raise RuntimeError("TripletSource needs a feature_fn to mine with")
                    rows = self.dataset.miner.mine(
                        self.feature_fn, self.dataset.epoch, refresh
                    ).to_array()
                rows = broadcast_object(self.world, rows)
            self._resume = None
            self.dataset.set_triplets(np.asarray(rows), refresh)
            batches = self._rank_batches(skip if refresh == first_refresh else 0)
            yield from _loader(self.dataset, batches, self.collate, self.num_workers, self.seed)

    def state_dict(self) -> dict:
        if self.dataset.triplets is None:
            return {}
        return {
            "triplets": self.dataset.triplets.to_array(),
            "refresh_index": self.dataset.refresh_index,
        }

    def load_state_dict(self, state: dict) -> None:
        self._resume = state or None
