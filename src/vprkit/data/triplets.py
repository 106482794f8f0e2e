"""Triplet training on a VG-format train split: positives, negative mining, triplets dataset.

:func:`load_triplet_data` also reads a Mapillary SLS root: its training lists come from
:func:`vprkit.data.msls.read_msls_train` (positives and non-negatives per city, as the official
MSLS code computes them) and everything below works on them unchanged.

The mining follows gmberton's deep-visual-geo-localization-benchmark (``datasets_ws.py``,
``TripletsDataset``), which SelaVPR uses unchanged and R2Former extends (as in the official
code, Lu-Feng/SelaVPR and bytedance/R2Former):

- per query, the *soft positives* are the database images within
  ``val_positive_dist_threshold`` (25 m) and the *hard-positive candidates* those within
  ``train_positives_dist_threshold`` (10 m); queries without a candidate are dropped;
- every cache refresh draws ``cache_refresh_rate`` queries at random (without replacement,
  independently at every refresh, as ``np.random.choice(queries_num, cache_refresh_rate,
  replace=False)`` in the benchmark) and computes global features with the current model;
- the positive is the candidate nearest to the query in feature space (squared L2 on the raw
  features, as the benchmark's ``faiss.IndexFlatL2``);
- the negatives, never soft positives, depend on the mining method:

  ``partial`` (SelaVPR / R2Former): the ``negs_num_per_query`` nearest in feature space among
  ``neg_samples_num`` database images drawn once per refresh; features are computed for those
  images, the sampled queries and all their candidates.
  ``full``: features of the whole database; per query the hardest among ``neg_samples_num``
  fresh random images plus the query's previous hardest negatives (the benchmark's
  ``neg_cache``, which makes ``full`` depend on the refreshes before).
  ``random``: random negatives; features only of the queries and their candidates (for the
  positive); with no ``feature_fn`` the geographically nearest candidate is taken instead.
  ``precomputed`` (R2Former's ``--mining global``): ``negs_num_per_query`` drawn from the first
  ``neg_hardness`` entries of the query's row of a hard-negative file; positive as ``random``.

Everything random comes from ``(seed, epoch, refresh)``, so the triplets of a refresh can be
mined on one rank and broadcast as one integer array (:meth:`Triplets.to_array`), or mined on
every rank with the same result. Query indices in triplets are positions in the dataset's
``query_paths`` (all queries, dropped ones included); the others are database indices.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vprkit.data.datasets import PlaceDataset, read_vg_dataset
from vprkit.data.formats import open_training_data
from vprkit.data.images import Preprocess, load_image, normalize, to_tensor
from vprkit.data.msls import MSLSTrainIndex
from vprkit.retrieval.ground_truth import positives_within_radius

__all__ = [
    "MINING_METHODS",
    "TripletData",
    "TripletMiner",
    "Triplets",
    "TripletsDataset",
    "collate_triplets",
    "load_hard_negatives",
    "load_triplet_data",
    "local_triplet_indices",
    "model_feature_fn",
]

logger = logging.getLogger(__name__)

MINING_METHODS: tuple[str, ...] = ("full", "partial", "random", "precomputed")

FeatureFn = Callable[[Sequence[Path]], np.ndarray]
Transform = Callable[[Image.Image, torch.Generator], torch.Tensor]

# Separate random streams per purpose, so that e.g. the database sample of a refresh does not
# change when the number of sampled queries does.
_STREAM_QUERIES, _STREAM_DATABASE, _STREAM_NEGATIVES, _STREAM_ITEMS = 1, 2, 3, 4


def _int_at_least(value: object, minimum: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _rng(seed: int, stream: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), stream, *(int(k) for k in keys)])


# ---------------------------------------------------------------------------------------
# Positives
# ---------------------------------------------------------------------------------------


@dataclass(repr=False)
class TripletData:
    """A train split with, per kept query, its hard-positive candidates and soft positives.

    ``query_ids[j]`` is the index in ``dataset.query_paths`` of kept query ``j``;
    ``hard_positives[j]`` / ``soft_positives[j]`` are sorted int64 database indices within
    ``train_positives_dist_threshold`` / ``val_positive_dist_threshold`` metres (inclusive).
    """

    dataset: PlaceDataset
    query_ids: np.ndarray
    hard_positives: list[np.ndarray]
    soft_positives: list[np.ndarray]
    train_positives_dist_threshold: float = 10.0
    val_positive_dist_threshold: float = 25.0
    num_dropped_queries: int = 0

    @classmethod
    def from_dataset(
        cls,
        dataset: PlaceDataset,
        *,
        train_positives_dist_threshold: float = 10.0,
        val_positive_dist_threshold: float = 25.0,
    ) -> TripletData:
        """Compute the positive sets of a labelled ``PlaceDataset`` and drop useless queries."""
        if not isinstance(dataset, PlaceDataset):
            raise TypeError(f"dataset must be a PlaceDataset, got {type(dataset).__name__}")
        if dataset.num_database == 0 or dataset.num_queries == 0:
            raise ValueError(
                f"{dataset.name}: the train split is empty ({dataset.num_database} database "
                f"images, {dataset.num_queries} queries)"
            )
        if dataset.database_utm is None or dataset.query_utm is None:
            raise ValueError(
                f"{dataset.name}: triplet mining needs UTM coordinates for database and queries"
            )
        train_thr = float(train_positives_dist_threshold)
        val_thr = float(val_positive_dist_threshold)
        if not 0 <= train_thr <= val_thr:
            # A hard positive outside the soft positives could also be drawn as a negative.
            raise ValueError(
                "need 0 <= train_positives_dist_threshold <= val_positive_dist_threshold, got "
                f"{train_thr} and {val_thr}"
            )
        hard = positives_within_radius(dataset.database_utm, dataset.query_utm, train_thr)
        soft = positives_within_radius(dataset.database_utm, dataset.query_utm, val_thr)
        keep = np.array([j for j, h in enumerate(hard) if len(h)], dtype=np.int64)
        dropped = dataset.num_queries - len(keep)
        if dropped:
            # As the VG benchmark: such queries are useless for training.
            logger.info(
                "%s: %d of %d queries have no database image within %g m and are dropped",
                dataset.name,
                dropped,
                dataset.num_queries,
                train_thr,
            )
        if len(keep) == 0:
            raise ValueError(
                f"{dataset.name}: none of the {dataset.num_queries} queries has a database "
                f"image within {train_thr} m (train_positives_dist_threshold)"
            )
        # Soft positives are indexed by kept query too (the VG benchmark forgets to drop them,
        # which shifts them by one query per dropped one; R2Former drops them).
        return cls(
            dataset=dataset,
            query_ids=keep,
            hard_positives=[hard[j] for j in keep],
            soft_positives=[soft[j] for j in keep],
            train_positives_dist_threshold=train_thr,
            val_positive_dist_threshold=val_thr,
            num_dropped_queries=dropped,
        )

    @classmethod
    def from_folder(
        cls,
        folder: str | os.PathLike,
        split: str = "train",
        *,
        train_positives_dist_threshold: float = 10.0,
        val_positive_dist_threshold: float = 25.0,
    ) -> TripletData:
        """Read a VG-format split (``read_vg_dataset(folder, split)``) and compute positives."""
        return cls.from_dataset(
            read_vg_dataset(folder, split=split),
            train_positives_dist_threshold=train_positives_dist_threshold,
            val_positive_dist_threshold=val_positive_dist_threshold,
        )

    @classmethod
    def from_msls(cls, index: MSLSTrainIndex) -> TripletData:
        """Wrap the MSLS training lists of :func:`vprkit.data.msls.read_msls_train`.

        ``hard_positives`` are the index's ``positives`` and ``soft_positives`` its
        ``non_negatives``, taken as they are: the index computed them city by city, as the
        official MSLS code does, whereas recomputing them from the UTM coordinates here would
        pair images of different cities (each city is in its own UTM zone). The index already
        dropped the queries without a positive, so every query of ``dataset`` is kept
        (``query_ids`` is ``0..n-1``) and ``num_dropped_queries`` counts the dropped keys.
        ``dataset.positives`` holds the non-negatives (the ground truth within
        ``non_negative_radius``), so nothing downstream falls back to comparing UTM
        coordinates across cities.
        """
        if not isinstance(index, MSLSTrainIndex):
            raise TypeError(f"index must be an MSLSTrainIndex, got {type(index).__name__}")
        if index.num_database == 0 or index.num_queries == 0:
            raise ValueError(
                f"MSLS {index.root} (cities {', '.join(index.cities) or 'none'}): no training "
                f"query with a positive within {index.positive_radius:g} m "
                f"({index.num_queries} queries, {index.num_database} database images)"
            )
        n = index.num_queries
        if len(index.positives) != n or len(index.non_negatives) != n:
            raise ValueError(
                f"MSLS index: {len(index.positives)} positive and {len(index.non_negatives)} "
                f"non-negative lists for {n} queries"
            )
        if not index.positive_radius <= index.non_negative_radius:
            # A positive outside the non-negatives could also be drawn as a negative.
            raise ValueError(
                "MSLS index: need positive_radius <= non_negative_radius, got "
                f"{index.positive_radius} and {index.non_negative_radius}"
            )
        soft = [np.asarray(s, dtype=np.int64) for s in index.non_negatives]
        dataset = PlaceDataset(
            name="msls_train",
            root=index.root,
            database_paths=index.database_paths,
            query_paths=index.query_paths,
            database_utm=index.database_utm,
            query_utm=index.query_utm,
            positives=soft,
            layout="msls",
        )
        return cls(
            dataset=dataset,
            query_ids=np.arange(n, dtype=np.int64),
            hard_positives=[np.asarray(h, dtype=np.int64) for h in index.positives],
            soft_positives=soft,
            train_positives_dist_threshold=float(index.positive_radius),
            val_positive_dist_threshold=float(index.non_negative_radius),
            num_dropped_queries=len(index.dropped_query_keys),
        )

    @property
    def num_queries(self) -> int:
        """Kept queries (those with a hard-positive candidate)."""
        return len(self.query_ids)

    @property
    def num_database(self) -> int:
        return self.dataset.num_database

    def __repr__(self) -> str:
        return (
            f"TripletData({self.dataset.name!r}, #database={self.num_database}, "
            f"#queries={self.num_queries}, dropped={self.num_dropped_queries})"
        )


def load_triplet_data(
    folder: str | os.PathLike,
    split: str = "train",
    *,
    train_positives_dist_threshold: float = 10.0,
    val_positive_dist_threshold: float = 25.0,
    msls_cities: str | Sequence[str] | None = None,
) -> TripletData:
    """The training split of ``folder``: :func:`vprkit.data.formats.open_training_data`.

    A Mapillary SLS root (``<folder>/train_val/``) is read with :func:`read_msls_train`
    (cities ``msls_cities``, default the 22 official train cities; positives within
    ``train_positives_dist_threshold``, non-negatives within ``val_positive_dist_threshold``)
    and wrapped by :meth:`TripletData.from_msls`; ``split`` must then be ``"train"``.
    A VG dataset's ``split`` is read by :meth:`TripletData.from_folder`.
    """
    options: dict[str, object] = {
        "split": split,
        "train_positives_dist_threshold": train_positives_dist_threshold,
        "val_positive_dist_threshold": val_positive_dist_threshold,
    }
    if msls_cities is not None:  # only formats with cities take it
        options["msls_cities"] = msls_cities
    return open_training_data(folder, **options)


# ---------------------------------------------------------------------------------------
# Triplets and the hard-negative file
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Triplets:
    """The triplets of one refresh: ``(query, positive, negatives)`` per row.

    ``query_indices`` index the dataset's ``query_paths``; the other two the database.
    Negatives are ordered hardest first where mined by features.
    """

    query_indices: np.ndarray  # (N,) int64
    positive_indices: np.ndarray  # (N,) int64
    negative_indices: np.ndarray  # (N, negs) int64

    def __len__(self) -> int:
        return len(self.query_indices)

    @property
    def negs_num_per_query(self) -> int:
        return int(self.negative_indices.shape[1])

    def to_array(self) -> np.ndarray:
        """One ``(N, 2 + negs)`` int64 array (query, positive, negatives), e.g. to broadcast."""
        return np.concatenate(
            [self.query_indices[:, None], self.positive_indices[:, None], self.negative_indices],
            axis=1,
        ).astype(np.int64)

    @classmethod
    def from_array(cls, array: np.ndarray | torch.Tensor) -> Triplets:
        """Inverse of :meth:`to_array`."""
        if isinstance(array, torch.Tensor):
            array = array.detach().cpu().numpy()
        arr = np.asarray(array)
        if arr.ndim != 2 or arr.shape[1] < 3 or arr.dtype.kind not in "iu":
            raise ValueError(
                "triplets must be an integer array of shape (N, 2 + negs) with negs >= 1, got "
                f"shape {arr.shape} and dtype {arr.dtype}"
            )
        arr = arr.astype(np.int64)
        return cls(arr[:, 0].copy(), arr[:, 1].copy(), arr[:, 2:].copy())


def load_hard_negatives(
    path: str | os.PathLike, num_rows: Sequence[int] | int, num_database: int
) -> np.ndarray:
    """Read a hard-negative file: an int ``.npy`` of shape (queries, K) of database indices.

    The format of R2Former's ``pre_compute_mining.py`` (K = 200, hardest first, ``-1`` pads
    rows with fewer candidates). ``num_rows``: the accepted row count(s). Read with
    ``allow_pickle=False``; a malformed file raises ValueError naming it.
    """
    path = Path(os.path.abspath(path))
    if not path.is_file():
        raise FileNotFoundError(f"hard-negative file {path} does not exist")
    try:
        table = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npy array of database indices ({e})") from e
    if not isinstance(table, np.ndarray):
        raise ValueError(f"{path}: expected a .npy array, got a {type(table).__name__} archive")
    rows = (num_rows,) if isinstance(num_rows, int) else tuple(num_rows)
    if table.ndim != 2 or table.shape[0] not in rows or table.shape[1] < 1:
        raise ValueError(
            f"{path}: expected shape (num_queries, K) with num_queries in {sorted(set(rows))}, "
            f"got {table.shape}"
        )
    if table.dtype.kind not in "iu":
        raise ValueError(f"{path}: expected integer database indices, got dtype {table.dtype}")
    table = table.astype(np.int64)
    bad = (table < -1) | (table >= num_database)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise ValueError(
            f"{path}: row {r} column {c} holds database index {table[r, c]}, out of range "
            f"(valid 0..{num_database - 1}, or -1 for padding)"
        )
    return table


# ---------------------------------------------------------------------------------------
# Mining
# ---------------------------------------------------------------------------------------


def _features(feature_fn: FeatureFn, paths: list[Path]) -> np.ndarray:
    feats = feature_fn(paths)
    if isinstance(feats, torch.Tensor):
        feats = feats.detach().cpu().numpy()
    feats = np.asarray(feats)
    if feats.ndim != 2 or feats.shape[0] != len(paths) or feats.dtype.kind not in "fiu":
        raise ValueError(
            f"feature_fn must return a numeric ({len(paths)}, D) array for {len(paths)} paths, "
            f"got shape {feats.shape} and dtype {feats.dtype}"
        )
    feats = feats.astype(np.float32, copy=False)
    if not np.isfinite(feats).all():
        raise ValueError("feature_fn returned non-finite features")
    return feats


def _nearest(query: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` rows nearest to ``query`` (squared L2), ties to the lower row."""
    diff = candidates - query[None, :]
    dist = np.einsum("ij,ij->i", diff, diff)
    return np.argsort(dist, kind="stable")[:k]


class TripletMiner:
    """Mines the triplets of refresh ``refresh`` of ``epoch`` (see the module docstring).

    ``hard_negatives_file`` (``precomputed`` only): rows are either the kept queries, in
    order (R2Former's file, computed after dropping queries without positives), or all the
    queries of the split. ``neg_samples_num`` and ``cache_refresh_rate`` larger than the
    database / the kept queries are clipped to them.
    """

    def __init__(
        self,
        data: TripletData,
        mining: str = "partial",
        *,
        negs_num_per_query: int = 2,
        cache_refresh_rate: int = 1000,
        neg_samples_num: int = 1000,
        neg_hardness: int = 100,
        hard_negatives_file: str | os.PathLike | None = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(data, TripletData):
            raise TypeError(f"data must be a TripletData, got {type(data).__name__}")
        if mining not in MINING_METHODS:
            raise ValueError(f"mining must be one of {MINING_METHODS}, got {mining!r}")
        self.data = data
        self.mining = mining
        self.negs_num_per_query = _int_at_least(negs_num_per_query, 1, "negs_num_per_query")
        self.cache_refresh_rate = _int_at_least(cache_refresh_rate, 1, "cache_refresh_rate")
        self.neg_samples_num = _int_at_least(neg_samples_num, 1, "neg_samples_num")
        self.neg_hardness = _int_at_least(neg_hardness, 1, "neg_hardness")
        self.seed = int(seed)
        negs = self.negs_num_per_query

        most_soft = max(len(s) for s in data.soft_positives)
        available = data.num_database - most_soft
        if negs > available:
            worst = int(np.argmax([len(s) for s in data.soft_positives]))
            raise ValueError(
                f"negs_num_per_query={negs} is larger than the negatives available: query "
                f"{data.dataset.query_paths[data.query_ids[worst]]} has {most_soft} of the "
                f"{data.num_database} database images within "
                f"{data.val_positive_dist_threshold} m, leaving {available}"
            )
        if mining in ("partial", "full") and negs > min(self.neg_samples_num, data.num_database):
            raise ValueError(
                f"negs_num_per_query={negs} is larger than neg_samples_num="
                f"{self.neg_samples_num} (the database images the negatives are mined from)"
            )
        self.hard_negatives: np.ndarray | None = None
        self.hard_negatives_file = None
        if mining == "precomputed":
            if hard_negatives_file is None:
                raise ValueError("mining='precomputed' needs hard_negatives_file")
            if negs > self.neg_hardness:
                raise ValueError(
                    f"negs_num_per_query={negs} is larger than neg_hardness={self.neg_hardness}"
                )
            self.hard_negatives_file = Path(os.path.abspath(hard_negatives_file))
            self.hard_negatives = load_hard_negatives(
                self.hard_negatives_file,
                (data.num_queries, data.dataset.num_queries),
                data.num_database,
            )
        elif hard_negatives_file is not None:
            raise ValueError(
                f"hard_negatives_file is only used by mining='precomputed', not {mining!r}"
            )
        # mining="full": each kept query's last hardest negatives, as the benchmark's neg_cache.
        self.neg_cache: dict[int, np.ndarray] = {}

    @property
    def queries_per_refresh(self) -> int:
        return min(self.cache_refresh_rate, self.data.num_queries)

    @property
    def neg_samples_num_clipped(self) -> int:
        return min(self.neg_samples_num, self.data.num_database)

    def sampled_queries(self, epoch: int, refresh: int) -> np.ndarray:
        """Positions (in ``data.query_ids``) of the queries of a refresh, in triplet order."""
        rng = _rng(self.seed, _STREAM_QUERIES, epoch, refresh)
        return rng.choice(self.data.num_queries, self.queries_per_refresh, replace=False)

    def sampled_database(self, epoch: int, refresh: int) -> np.ndarray:
        """``partial``: the sorted database images the negatives of a refresh are mined from."""
        rng = _rng(self.seed, _STREAM_DATABASE, epoch, refresh)
        n = self.neg_samples_num_clipped
        return np.sort(rng.choice(self.data.num_database, n, replace=False))

    def mine(self, feature_fn: FeatureFn | None, epoch: int, refresh: int) -> Triplets:
        """The triplets of refresh ``refresh`` of ``epoch``.

        ``feature_fn(paths) -> (len(paths), D)`` features with the current model (see
        :func:`model_feature_fn`); it is called once, on database paths then query paths.
        Optional for ``random`` and ``precomputed`` (the positive is then the geographically
        nearest candidate).
        """
        epoch = _int_at_least(epoch, 0, "epoch")
        refresh = _int_at_least(refresh, 0, "refresh")
        if feature_fn is None and self.mining in ("full", "partial"):
            raise ValueError(f"mining={self.mining!r} needs a feature_fn")
        queries = self.sampled_queries(epoch, refresh)
        data = self.data
        hard = [data.hard_positives[p] for p in queries]
        sampled_db = None
        if self.mining == "full":
            db_rows = np.arange(data.num_database)
        elif self.mining == "partial":
            sampled_db = self.sampled_database(epoch, refresh)
            db_rows = np.unique(np.concatenate([sampled_db, *hard]))
        else:
            db_rows = np.unique(np.concatenate(hard))

        if feature_fn is not None:
            paths = [data.dataset.database_paths[i] for i in db_rows]
            paths += [data.dataset.query_paths[data.query_ids[p]] for p in queries]
            feats = _features(feature_fn, paths)
            db_feats, q_feats = feats[: len(db_rows)], feats[len(db_rows) :]
        rng = _rng(self.seed, _STREAM_NEGATIVES, epoch, refresh)
        negs = self.negs_num_per_query
        positives = np.empty(len(queries), dtype=np.int64)
        negatives = np.empty((len(queries), negs), dtype=np.int64)
        skipped_soft = 0
        for j, p in enumerate(queries):
            cands = hard[j]
            if feature_fn is not None:
                rows = np.searchsorted(db_rows, cands)
                positives[j] = cands[_nearest(q_feats[j], db_feats[rows], 1)[0]]
            else:
                qid = data.query_ids[p]
                diff = data.dataset.database_utm[cands] - data.dataset.query_utm[qid]
                positives[j] = cands[np.argmin(np.einsum("ij,ij->i", diff, diff))]
            soft = data.soft_positives[p]
            if self.mining in ("partial", "full"):
                chosen = self._hardest_negatives(
                    p, q_feats[j], soft, sampled_db, db_rows, db_feats, rng
                )
            elif self.mining == "random":
                # Enough draws that at least `negs` survive removing the soft positives;
                # kept in draw order (the benchmark's setdiff1d sorts, favouring low indices).
                drawn = rng.choice(data.num_database, negs + len(soft), replace=False)
                chosen = drawn[~np.isin(drawn, soft)][:negs]
            else:
                chosen, dropped = self._precomputed_negatives(p, soft, rng)
                skipped_soft += dropped
            negatives[j] = chosen
        if skipped_soft:
            logger.warning(
                "%s lists %d soft positives (within %g m) among the top-%d candidates of the "
                "sampled queries; they were skipped (is the file for this split?)",
                self.hard_negatives_file,
                skipped_soft,
                data.val_positive_dist_threshold,
                self.neg_hardness,
            )
        return Triplets(data.query_ids[queries].astype(np.int64), positives, negatives)

    def _hardest_negatives(
        self,
        position: int,
        query_feature: np.ndarray,
        soft: np.ndarray,
        sampled_db: np.ndarray | None,
        db_rows: np.ndarray,
        db_feats: np.ndarray,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """``partial`` / ``full`` mining: the nearest non-soft-positives in feature space."""
        data, negs = self.data, self.negs_num_per_query
        if sampled_db is not None:
            pool = np.setdiff1d(sampled_db, soft, assume_unique=True)
        else:
            drawn = rng.choice(data.num_database, self.neg_samples_num_clipped, replace=False)
            pool = np.setdiff1d(drawn, soft, assume_unique=True)
            pool = np.union1d(self.neg_cache.get(int(position), pool[:0]), pool)
        if len(pool) < negs:
            raise ValueError(
                f"query {data.dataset.query_paths[data.query_ids[position]]}: only {len(pool)} "
                f"of the sampled database images are negatives, fewer than "
                f"negs_num_per_query={negs}; raise neg_samples_num"
            )
        rows = np.searchsorted(db_rows, pool)
        chosen = pool[_nearest(query_feature, db_feats[rows], negs)]
        if self.mining == "full":
            self.neg_cache[int(position)] = chosen
        return chosen

    def _precomputed_negatives(
        self, position: int, soft: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, int]:
        assert self.hard_negatives is not None
        table = self.hard_negatives
        row_index = position if table.shape[0] == self.data.num_queries else None
        if row_index is None:  # one row per query of the split, dropped ones included
            row_index = int(self.data.query_ids[position])
        top = table[row_index, : self.neg_hardness]
        top = top[top >= 0]
        # Repeated entries would let one image fill two negative slots.
        _, first = np.unique(top, return_index=True)
        top = top[np.sort(first)]
        is_soft = np.isin(top, soft)
        top = top[~is_soft]
        if len(top) < self.negs_num_per_query:
            raise ValueError(
                f"{self.hard_negatives_file}: row {row_index} has {len(top)} usable negatives "
                f"in its first {self.neg_hardness} entries, fewer than negs_num_per_query="
                f"{self.negs_num_per_query}"
            )
        return rng.choice(top, self.negs_num_per_query, replace=False), int(is_soft.sum())


# ---------------------------------------------------------------------------------------
# Features with the current model
# ---------------------------------------------------------------------------------------


def model_feature_fn(
    model: torch.nn.Module,
    preprocess: Preprocess,
    batch_size: int = 16,
    device: str = "cpu",
    *,
    precision: str = "fp32",
    num_workers: int = 0,
) -> FeatureFn:
    """A ``feature_fn`` computing global descriptors with ``model`` in eval mode.

    Wraps :func:`vprkit.extract.extract_global_descriptors`; the model's train/eval mode is
    restored afterwards, so the training loop can go on without calling ``model.train()``.
    """
    from vprkit.extract import extract_global_descriptors

    def feature_fn(paths: Sequence[Path]) -> np.ndarray:
        was_training = model.training
        try:
            return extract_global_descriptors(
                model,
                list(paths),
                preprocess,
                batch_size=batch_size,
                num_workers=num_workers,
                device=device,
                precision=precision,
                label="mining cache",
            )
        finally:
            model.train(was_training)

    return feature_fn


# ---------------------------------------------------------------------------------------
# Dataset and collate
# ---------------------------------------------------------------------------------------


def _default_transform(img: Image.Image, rng: torch.Generator) -> torch.Tensor:
    # The benchmark's base_transform (ToTensor + ImageNet Normalize), without a resize.
    return normalize(to_tensor(img))


def _item_seed(seed: int, epoch: int, refresh: int, index: int) -> int:
    state = _rng(seed, _STREAM_ITEMS, epoch, refresh, index).integers(0, 2**63 - 1)
    return int(state)


class TripletsDataset(torch.utils.data.Dataset):
    """Item ``i`` is triplet ``i`` of the current refresh: ``(images, indices)``.

    ``images`` is ``(2 + negs, 3, H, W)``: query, positive, negatives, the order of the VG
    benchmark's ``torch.stack((query, positive, *negatives))``; ``indices`` (int64,
    ``2 + negs``) are the query index then the database indices. The query goes
    through ``transform(img, generator)``, database images through ``database_transform``
    (default: ``transform``; the benchmark augments queries only). One ``torch.Generator``
    per item, seeded by ``(seed, epoch, refresh, i)``, serves all its images in that order.

    Per epoch: :meth:`set_epoch`, then per refresh :meth:`refresh` (or, on ranks that receive
    broadcast triplets, :meth:`set_triplets`) and a non-shuffled loader over the triplets
    with ``collate_fn=collate_triplets`` (the benchmark uses ``drop_last=True``). Build that
    loader after each refresh and without ``persistent_workers``: workers hold a copy of
    the triplets of the refresh they were started in.
    """

    def __init__(
        self,
        data: TripletData,
        mining: str = "partial",
        *,
        negs_num_per_query: int = 2,
        cache_refresh_rate: int = 1000,
        neg_samples_num: int = 1000,
        neg_hardness: int = 100,
        hard_negatives_file: str | os.PathLike | None = None,
        transform: Transform | None = None,
        database_transform: Transform | None = None,
        seed: int = 0,
        epoch: int = 0,
    ) -> None:
        for name, fn in (("transform", transform), ("database_transform", database_transform)):
            if fn is not None and not callable(fn):
                raise ValueError(f"{name} must be callable as {name}(img, generator), got {fn!r}")
        self.miner = TripletMiner(
            data,
            mining,
            negs_num_per_query=negs_num_per_query,
            cache_refresh_rate=cache_refresh_rate,
            neg_samples_num=neg_samples_num,
            neg_hardness=neg_hardness,
            hard_negatives_file=hard_negatives_file,
            seed=seed,
        )
        self.transform = _default_transform if transform is None else transform
        self.database_transform = (
            self.transform if database_transform is None else database_transform
        )
        self.triplets: Triplets | None = None
        self.refresh_index: int | None = None
        self.set_epoch(epoch)

    @property
    def data(self) -> TripletData:
        return self.miner.data

    @property
    def seed(self) -> int:
        return self.miner.seed

    @property
    def negs_num_per_query(self) -> int:
        return self.miner.negs_num_per_query

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch``: forget the current triplets; the next refresh is number 0."""
        self.epoch = _int_at_least(epoch, 0, "epoch")
        self.triplets = None
        self._rows = np.empty((0, 2 + self.negs_num_per_query), dtype=np.int64)
        self.refresh_index = None
        self.next_refresh = 0

    def refresh(self, feature_fn: FeatureFn | None, refresh_index: int | None = None) -> Triplets:
        """Mine the triplets of the next refresh (or of ``refresh_index``, to resume)."""
        index = self.next_refresh if refresh_index is None else refresh_index
        triplets = self.miner.mine(feature_fn, self.epoch, index)
        self.set_triplets(triplets, index)
        return triplets

    def set_triplets(
        self, triplets: Triplets | np.ndarray | torch.Tensor, refresh_index: int
    ) -> None:
        """Use triplets mined elsewhere (e.g. broadcast from rank 0) as refresh ``refresh_index``.

        ``triplets``: a :class:`Triplets` or its ``to_array()`` (as a NumPy array or tensor).
        """
        if not isinstance(triplets, Triplets):
            triplets = Triplets.from_array(triplets)
        ds = self.data.dataset
        if triplets.negs_num_per_query != self.negs_num_per_query:
            raise ValueError(
                f"triplets have {triplets.negs_num_per_query} negatives per query, expected "
                f"{self.negs_num_per_query}"
            )
        database = np.concatenate([triplets.positive_indices, triplets.negative_indices.ravel()])
        for what, idx, n in (
            ("query", triplets.query_indices, ds.num_queries),
            ("database", database, ds.num_database),
        ):
            if idx.size and (idx.min() < 0 or idx.max() >= n):
                raise ValueError(f"triplets hold a {what} index out of range 0..{n - 1}")
        self.triplets = triplets
        self._rows = triplets.to_array()
        self.refresh_index = _int_at_least(refresh_index, 0, "refresh_index")
        self.next_refresh = self.refresh_index + 1

    def __len__(self) -> int:
        return 0 if self.triplets is None else len(self.triplets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.triplets is None:
            raise RuntimeError("no triplets yet: call refresh() (or set_triplets()) first")
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"triplet index {index} out of range for {len(self)} triplets")
        assert self.refresh_index is not None
        row = self._rows[index]
        ds = self.data.dataset
        paths = [ds.query_paths[row[0]], *(ds.database_paths[i] for i in row[1:])]
        generator = torch.Generator().manual_seed(
            _item_seed(self.seed, self.epoch, self.refresh_index, index)
        )
        images = []
        for k, path in enumerate(paths):
            fn = self.transform if k == 0 else self.database_transform
            tensor = fn(load_image(path), generator)
            if not isinstance(tensor, torch.Tensor) or tensor.ndim != 3:
                raise ValueError(
                    f"transform must return a (3, H, W) tensor, got "
                    f"{getattr(tensor, 'shape', type(tensor).__name__)} for {path}"
                )
            if images and tensor.shape != images[0].shape:
                raise ValueError(
                    f"images of triplet {index} differ in size after the transform: {paths[0]} "
                    f"gives {tuple(images[0].shape)}, {path} gives {tuple(tensor.shape)}; "
                    "resize in the transform"
                )
            images.append(tensor)
        return torch.stack(images), torch.from_numpy(row.copy())


def collate_triplets(
    batch: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B*(2+negs), 3, H, W)`` images and ``(B, 2+negs)`` indices.

    Triplet-major, as the benchmark's ``collate_fn`` (``torch.cat`` of the items): query,
    positive and negatives of triplet 0, then of triplet 1, ... Image ``b*(2+negs) + k`` has
    index ``indices[b, k]``.
    """
    if len(batch) == 0:
        raise ValueError("collate_triplets got an empty batch")
    images = [item[0] for item in batch]
    if any(img.shape != images[0].shape for img in images):
        shapes = sorted({tuple(img.shape) for img in images})
        raise ValueError(f"triplets in a batch differ in shape: {shapes}")
    return torch.cat(images), torch.stack([item[1] for item in batch])


def local_triplet_indices(batch_size: int, negs_num_per_query: int) -> torch.Tensor:
    """``(B*negs, 3)`` rows ``(query, positive, negative)`` of positions in a collated batch.

    The benchmark's ``triplets_local_indexes``: triplet-major, one row per negative.
    """
    b = _int_at_least(batch_size, 1, "batch_size")
    n = _int_at_least(negs_num_per_query, 1, "negs_num_per_query")
    base = torch.arange(b).repeat_interleave(n) * (2 + n)
    neg = torch.arange(n).repeat(b) + 2
    return torch.stack([base, base + 1, base + neg], dim=1)
