"""Triplet mining (full / partial / random / precomputed) and the triplets dataset, on a
tiny VG train split: a line of database images every 5 m and a few queries beside it."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from vprkit.data.datasets import PlaceDataset, parse_utm, read_vg_dataset
from vprkit.data.images import Preprocess, to_tensor
from vprkit.data.triplets import (
    TripletData,
    TripletMiner,
    Triplets,
    TripletsDataset,
    collate_triplets,
    load_hard_negatives,
    local_triplet_indices,
    model_feature_fn,
)

EAST0, NORTH0 = 500000.0, 4000000.0
NUM_DB = 30  # database image i at (5 i, 0) m
# Query offsets in metres. The second has no database image within 10 m (dropped), and sits
# second in sorted order, so kept positions and query ids differ.
QUERIES = [(12.0, 1.0), (20.0, 500.0), (52.0, -2.0), (101.0, 0.0), (133.0, 3.0)]
KEPT_IDS = [0, 2, 3, 4]
QUERY_SHIFT = 6.0  # fake query features sit 6 m east of the query: feature-nearest != nearest


def _colour(kind: str, i: int) -> tuple[int, int, int]:
    return (8 * i, 40, 200) if kind == "db" else (200, 20 + 40 * i, 40)


def _write(path: Path, colour: tuple[int, int, int]) -> None:
    Image.new("RGB", (8, 8), colour).save(path, quality=95)


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vg") / "line"
    db = root / "images" / "train" / "database"
    q = root / "images" / "train" / "queries"
    db.mkdir(parents=True)
    q.mkdir(parents=True)
    for i in range(NUM_DB):
        _write(db / f"@{EAST0 + 5 * i:.2f}@{NORTH0:.2f}@db{i:02d}@.jpg", _colour("db", i))
    for j, (e, n) in enumerate(QUERIES):
        _write(q / f"@{EAST0 + e:.2f}@{NORTH0 + n:.2f}@q{j}@.jpg", _colour("q", j))
    return root


@pytest.fixture(scope="module")
def data(split) -> TripletData:
    return TripletData.from_folder(split)


def fake_feature_fn(calls: list[list[Path]] | None = None):
    """Features = position in metres (queries shifted east), known without a model."""

    def fn(paths):
        paths = list(paths)
        if calls is not None:
            calls.append(paths)
        out = []
        for p in paths:
            e, n = parse_utm(p)
            shift = QUERY_SHIFT if "queries" in Path(p).parts else 0.0
            out.append([e - EAST0 + shift, n - NORTH0])
        return np.asarray(out, dtype=np.float32)

    return fn


def _db_xy() -> np.ndarray:
    return np.array([[5.0 * i, 0.0] for i in range(NUM_DB)])


def _within(qid: int, radius: float) -> set[int]:
    qe, qn = QUERIES[qid]
    return {i for i in range(NUM_DB) if math.hypot(5.0 * i - qe, qn) <= radius}


def _feat_dist(qid: int, i: int) -> float:
    qe, qn = QUERIES[qid]
    return (5.0 * i - qe - QUERY_SHIFT) ** 2 + qn**2


def _hardest(qid: int, pool, k: int) -> list[int]:
    return sorted(pool, key=lambda i: (_feat_dist(qid, i), i))[:k]


def _expected_positive(qid: int) -> int:
    return _hardest(qid, _within(qid, 10.0), 1)[0]


# --------------------------------------------------------------------------- positives


def test_positive_sets_match_brute_force(split, caplog):
    with caplog.at_level(logging.INFO, logger="vprkit.data.triplets"):
        data = TripletData.from_folder(split)
    assert "1 of 5 queries" in caplog.text
    assert data.num_dropped_queries == 1 and data.num_queries == 4 and data.num_database == 30
    assert data.query_ids.tolist() == KEPT_IDS
    for pos, qid in enumerate(KEPT_IDS):
        assert set(data.hard_positives[pos].tolist()) == _within(qid, 10.0)
        assert set(data.soft_positives[pos].tolist()) == _within(qid, 25.0)
        assert data.hard_positives[pos].dtype == np.int64
    # Hand-checked: query (52, -2) has 45, 50, 55, 60 m within 10 m and 30..75 m within 25 m.
    assert data.hard_positives[1].tolist() == [9, 10, 11, 12]
    assert data.soft_positives[1].tolist() == list(range(6, 16))


# --------------------------------------------------------------------------- partial


def test_partial_all_sampled_matches_hand_and_brute_force(data):
    miner = TripletMiner(data, "partial", negs_num_per_query=2, cache_refresh_rate=1000)
    triplets = miner.mine(fake_feature_fn(), epoch=0, refresh=0)
    assert sorted(triplets.query_indices.tolist()) == KEPT_IDS  # clipped to the 4 kept
    rows = {int(r[0]): r for r in triplets.to_array()}
    # Query (52, -2), feature at (58, -2): positive 60 m (not the nearest, 50 m), negatives
    # the two nearest features outside 25 m: 80 m and 85 m.
    assert rows[2].tolist() == [2, 12, 16, 17]
    for qid, row in rows.items():
        assert row[1] == _expected_positive(qid)
        assert row[1] in _within(qid, 10.0)
        pool = set(range(NUM_DB)) - _within(qid, 25.0)
        assert row[2:].tolist() == _hardest(qid, pool, 2)
        assert not set(row[2:].tolist()) & _within(qid, 25.0)


def test_partial_samples_stated_numbers_and_is_deterministic(data):
    miner = TripletMiner(data, "partial", cache_refresh_rate=2, neg_samples_num=16, seed=3)
    calls: list[list[Path]] = []
    triplets = miner.mine(fake_feature_fn(calls), epoch=1, refresh=2)
    assert len(calls) == 1 and len(triplets) == 2
    queries = miner.sampled_queries(1, 2)
    sampled_db = miner.sampled_database(1, 2)
    assert len(queries) == 2 and len(sampled_db) == 16 and len(set(sampled_db.tolist())) == 16
    hard = set(np.concatenate([data.hard_positives[p] for p in queries]).tolist())
    db_rows = sorted(set(sampled_db.tolist()) | hard)
    ds = data.dataset
    # One call: the sampled database images and the queries' candidates, then the queries.
    assert calls[0] == [ds.database_paths[i] for i in db_rows] + [
        ds.query_paths[data.query_ids[p]] for p in queries
    ]
    for row in triplets.to_array():
        qid = int(row[0])
        assert row[1] == _expected_positive(qid)
        pool = set(sampled_db.tolist()) - _within(qid, 25.0)
        assert row[2:].tolist() == _hardest(qid, pool, 2)

    again = TripletMiner(data, "partial", cache_refresh_rate=2, neg_samples_num=16, seed=3)
    np.testing.assert_array_equal(
        again.mine(fake_feature_fn(), 1, 2).to_array(), triplets.to_array()
    )
    draws = set()
    for seed, epoch, refresh in [(3, 1, 2), (3, 1, 3), (3, 2, 2), (4, 1, 2), (3, 0, 0)]:
        m = TripletMiner(data, "partial", cache_refresh_rate=2, neg_samples_num=16, seed=seed)
        draws.add(tuple(m.sampled_database(epoch, refresh).tolist()))
    assert len(draws) == 5


def test_partial_too_few_sampled_negatives(data):
    # 10 database images can all be soft positives of a query: no negative left.
    miner = TripletMiner(data, "partial", negs_num_per_query=2, neg_samples_num=2)
    with pytest.raises(ValueError, match="raise neg_samples_num"):
        for refresh in range(20):
            miner.mine(fake_feature_fn(), 0, refresh)


# --------------------------------------------------------------------------- full


def test_full_mining_uses_whole_database_and_negative_cache(data):
    calls: list[list[Path]] = []
    miner = TripletMiner(data, "full", negs_num_per_query=2, neg_samples_num=1000)
    triplets = miner.mine(fake_feature_fn(calls), 0, 0)
    assert calls[0][:NUM_DB] == data.dataset.database_paths
    assert len(calls[0]) == NUM_DB + 4
    for row in triplets.to_array():
        qid = int(row[0])
        assert row[1] == _expected_positive(qid)
        pool = set(range(NUM_DB)) - _within(qid, 25.0)
        assert row[2:].tolist() == _hardest(qid, pool, 2)

    # With few random samples, the cache of last negatives makes later ones no easier.
    miner = TripletMiner(data, "full", negs_num_per_query=2, neg_samples_num=12, seed=1)
    first = {int(r[0]): r[2:] for r in miner.mine(fake_feature_fn(), 0, 0).to_array()}
    second = {int(r[0]): r[2:] for r in miner.mine(fake_feature_fn(), 0, 1).to_array()}
    for qid in first:
        d1 = [_feat_dist(qid, i) for i in first[qid]]
        d2 = [_feat_dist(qid, i) for i in second[qid]]
        assert all(b <= a for a, b in zip(d1, d2, strict=True))
        assert not set(second[qid].tolist()) & _within(qid, 25.0)


# --------------------------------------------------------------------------- random


def test_random_mining(data):
    miner = TripletMiner(data, "random", negs_num_per_query=3, seed=5)
    triplets = miner.mine(None, 0, 0)
    db = _db_xy()
    for row in triplets.to_array():
        qid = int(row[0])
        qe, qn = QUERIES[qid]
        nearest = min(_within(qid, 10.0), key=lambda i: math.hypot(db[i, 0] - qe, qn))
        assert row[1] == nearest  # without features: the geographically nearest candidate
        negs = row[2:].tolist()
        assert len(set(negs)) == 3 and not set(negs) & _within(qid, 25.0)
    np.testing.assert_array_equal(miner.mine(None, 0, 0).to_array(), triplets.to_array())
    assert not np.array_equal(miner.mine(None, 0, 1).to_array(), triplets.to_array())

    # With features (the VG benchmark): feature-nearest positive, features of queries and
    # their candidates only.
    calls: list[list[Path]] = []
    with_features = miner.mine(fake_feature_fn(calls), 0, 0)
    assert len(calls[0]) == 4 + len(np.unique(np.concatenate(data.hard_positives)))
    for row in with_features.to_array():
        assert row[1] == _expected_positive(int(row[0]))
    np.testing.assert_array_equal(with_features.negative_indices, triplets.negative_indices)


# --------------------------------------------------------------------------- precomputed


def _ranked_negatives(qid: int, width: int = 12) -> list[int]:
    ranked = _hardest(qid, set(range(NUM_DB)) - _within(qid, 25.0), width)
    return ranked + [-1] * (width - len(ranked))


def test_precomputed_kept_rows(data, tmp_path):
    path = tmp_path / "hard_final.npy"
    np.save(path, np.array([_ranked_negatives(qid) for qid in KEPT_IDS], dtype=np.int64))
    miner = TripletMiner(
        data, "precomputed", negs_num_per_query=2, neg_hardness=3, hard_negatives_file=path
    )
    triplets = miner.mine(fake_feature_fn(), 0, 0)
    for row in triplets.to_array():
        qid = int(row[0])
        assert row[1] == _expected_positive(qid)
        negs = row[2:].tolist()
        assert len(set(negs)) == 2 and set(negs) <= set(_ranked_negatives(qid)[:3])
    # Several refreshes use more than the top 2 of the top 3.
    seen = set()
    for refresh in range(12):
        seen |= {tuple(r[2:]) for r in miner.mine(None, 0, refresh).to_array() if r[0] == 2}
    assert len({n for pair in seen for n in pair}) == 3


def test_precomputed_rows_for_all_queries_and_padding(data, tmp_path):
    # One row per query of the split; the dropped query's row is all padding, so reading
    # the table by kept position would fail.
    table = np.full((5, 12), -1, dtype=np.int64)
    for qid in KEPT_IDS:
        table[qid] = _ranked_negatives(qid)
    path = tmp_path / "all_rows.npy"
    np.save(path, table)
    miner = TripletMiner(
        data, "precomputed", negs_num_per_query=2, neg_hardness=100, hard_negatives_file=path
    )
    for row in miner.mine(None, 0, 0).to_array():
        assert set(row[2:].tolist()) <= set(_ranked_negatives(int(row[0])))


def test_precomputed_soft_positives_skipped_and_too_few(data, tmp_path, caplog):
    table = np.array([_ranked_negatives(qid) for qid in KEPT_IDS], dtype=np.int64)
    soft = sorted(_within(2, 25.0))
    table[1, :3] = soft[:3]  # kept position 1 is query 2
    path = tmp_path / "stale.npy"
    np.save(path, table)
    miner = TripletMiner(
        data, "precomputed", negs_num_per_query=2, neg_hardness=5, hard_negatives_file=path
    )
    with caplog.at_level(logging.WARNING, logger="vprkit.data.triplets"):
        triplets = miner.mine(None, 0, 0)
    assert "soft positives" in caplog.text
    row = [r for r in triplets.to_array() if r[0] == 2][0]
    # The 3 soft positives took the places of the top 3: the 2 left of the top 5 remain.
    assert set(row[2:].tolist()) == set(_ranked_negatives(2)[3:5])

    table[1, :] = -1
    table[1, 0] = _ranked_negatives(2)[0]
    np.save(path, table)
    miner = TripletMiner(data, "precomputed", negs_num_per_query=2, hard_negatives_file=path)
    with pytest.raises(ValueError, match="stale.npy: row 1 has 1 usable negatives"):
        miner.mine(None, 0, 0)


@pytest.mark.parametrize(
    "content, message",
    [
        (np.arange(4), "expected shape"),
        (np.zeros((3, 12), dtype=np.int64), "expected shape"),
        (np.zeros((4, 12), dtype=np.float32), "integer database indices"),
        (np.full((4, 12), 30, dtype=np.int64), "out of range"),
        (np.full((4, 12), -2, dtype=np.int64), "out of range"),
        (np.array([[1, 2]] * 4, dtype=object), "not a readable .npy"),
    ],
)
def test_precomputed_bad_files(data, tmp_path, content, message):
    path = tmp_path / "bad_negatives.npy"
    np.save(path, content, allow_pickle=True)
    with pytest.raises(ValueError, match=message) as info:
        TripletMiner(data, "precomputed", hard_negatives_file=path)
    assert "bad_negatives.npy" in str(info.value)


def test_precomputed_missing_and_misused_file(data, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.npy"):
        TripletMiner(data, "precomputed", hard_negatives_file=tmp_path / "nothing.npy")
    with pytest.raises(ValueError, match="needs hard_negatives_file"):
        TripletMiner(data, "precomputed")
    with pytest.raises(ValueError, match="only used by mining='precomputed'"):
        TripletMiner(data, "partial", hard_negatives_file=tmp_path / "nothing.npy")
    with pytest.raises(ValueError, match="neg_hardness"):
        TripletMiner(
            data, "precomputed", negs_num_per_query=4, neg_hardness=3, hard_negatives_file="x"
        )
    np.savez(tmp_path / "archive.npz", a=np.zeros((4, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="archive.npz"):
        load_hard_negatives(tmp_path / "archive.npz", 4, NUM_DB)


# --------------------------------------------------------------------------- dataset


class _RecordingTransform:
    def __init__(self) -> None:
        self.seeds: list[int] = []

    def __call__(self, img: Image.Image, generator: torch.Generator) -> torch.Tensor:
        self.seeds.append(generator.initial_seed())
        torch.rand(1, generator=generator)  # the images of an item share one stream
        return to_tensor(img)


def _which_image(tensor: torch.Tensor, data: TripletData) -> tuple[str, int]:
    colour = tensor.mean(dim=(1, 2)) * 255
    options = [("db", i) for i in range(NUM_DB)] + [("q", j) for j in range(len(QUERIES))]
    return min(options, key=lambda o: float((colour - torch.tensor(_colour(*o))).abs().sum()))


def test_dataset_items_order_and_seeds(data):
    transform = _RecordingTransform()
    ds = TripletsDataset(
        data, "partial", negs_num_per_query=2, cache_refresh_rate=3, transform=transform, seed=7
    )
    assert len(ds) == 0
    with pytest.raises(RuntimeError, match="refresh"):
        ds[0]
    triplets = ds.refresh(fake_feature_fn())
    assert len(ds) == 3 and ds.refresh_index == 0 and ds.next_refresh == 1
    for i in range(len(ds)):
        images, indices = ds[i]
        assert images.shape == (4, 3, 8, 8) and indices.dtype == torch.int64
        assert indices.tolist() == triplets.to_array()[i].tolist()
        found = [_which_image(img, data) for img in images]
        assert found == [("q", int(indices[0]))] + [("db", int(k)) for k in indices[1:]]
    seeds = transform.seeds
    assert len(seeds) == 12 and all(s == seeds[0] for s in seeds[:4])
    assert len({seeds[0], seeds[4], seeds[8]}) == 3
    first = ds[1][0]
    ds[1]
    assert transform.seeds[-1] == seeds[4]  # same item, same generator

    second = ds.refresh(fake_feature_fn())
    assert ds.refresh_index == 1 and ds.next_refresh == 2
    np.testing.assert_array_equal(
        second.to_array(), ds.miner.mine(fake_feature_fn(), 0, 1).to_array()
    )
    ds[1]
    assert transform.seeds[-1] != seeds[4]  # another refresh, another generator
    ds.set_epoch(1)
    assert len(ds) == 0 and ds.next_refresh == 0

    # A rank that receives the broadcast triplets builds the same items.
    other = TripletsDataset(
        data, "partial", negs_num_per_query=2, cache_refresh_rate=3, transform=transform, seed=7
    )
    other.set_triplets(torch.from_numpy(triplets.to_array()), 0)
    torch.testing.assert_close(other[1][0], first)
    assert transform.seeds[-1] == seeds[4]


def test_collate_and_local_indices(data):
    ds = TripletsDataset(data, "random", negs_num_per_query=2, cache_refresh_rate=4)
    ds.refresh(None)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_triplets)
    images, indices = next(iter(loader))
    assert images.shape == (8, 3, 8, 8) and indices.shape == (2, 4)
    torch.testing.assert_close(images[4:8], ds[1][0])
    local = local_triplet_indices(2, 2)
    assert local.tolist() == [[0, 1, 2], [0, 1, 3], [4, 5, 6], [4, 5, 7]]
    with pytest.raises(ValueError, match="empty batch"):
        collate_triplets([])


def test_set_triplets_validation(data):
    ds = TripletsDataset(data, "random", negs_num_per_query=2)
    with pytest.raises(ValueError, match="negatives per query"):
        ds.set_triplets(np.zeros((2, 5), dtype=np.int64), 0)
    with pytest.raises(ValueError, match="database index out of range"):
        ds.set_triplets(np.array([[0, 1, 2, 30]]), 0)
    with pytest.raises(ValueError, match="shape"):
        ds.set_triplets(np.zeros((2, 2), dtype=np.int64), 0)
    t = Triplets.from_array(np.array([[0, 1, 20, 21]]))
    ds.set_triplets(t, 4)
    assert len(ds) == 1 and ds.next_refresh == 5


def test_model_feature_fn_restores_mode(data):
    class MeanColour(torch.nn.Module):
        def forward(self, x):
            return SimpleNamespace(global_desc=x.mean(dim=(2, 3)), local_desc=None)

    model = MeanColour().train()
    fn = model_feature_fn(model, Preprocess(normalize=False), batch_size=4)
    paths = data.dataset.database_paths[:5]
    feats = fn(paths)
    assert model.training
    expected = np.array([_colour("db", i) for i in range(5)], dtype=np.float32) / 255
    np.testing.assert_allclose(feats, expected, atol=3 / 255)


# --------------------------------------------------------------------------- errors


def test_errors(split, tmp_path, data):
    empty = tmp_path / "empty" / "images" / "train"
    (empty / "database").mkdir(parents=True)
    (empty / "queries").mkdir()
    with pytest.raises(FileNotFoundError, match="does not contain any images"):
        TripletData.from_folder(tmp_path / "empty")
    none = np.zeros((0, 2))
    with pytest.raises(ValueError, match="empty"):
        TripletData.from_dataset(PlaceDataset("e", tmp_path, [], [], none, none))

    full = read_vg_dataset(split, split="train")
    far = PlaceDataset(
        "far",
        full.root,
        full.database_paths,
        full.query_paths[1:2],
        full.database_utm,
        full.query_utm[1:2],
    )
    with pytest.raises(ValueError, match="none of the 1 queries"):
        TripletData.from_dataset(far)
    unlabelled = PlaceDataset("u", full.root, full.database_paths, full.query_paths)
    with pytest.raises(ValueError, match="UTM"):
        TripletData.from_dataset(unlabelled)
    with pytest.raises(ValueError, match="train_positives_dist_threshold"):
        TripletData.from_dataset(full, train_positives_dist_threshold=30.0)

    with pytest.raises(ValueError, match="negatives available"):
        TripletMiner(data, "random", negs_num_per_query=21)
    TripletMiner(data, "random", negs_num_per_query=20)  # 30 - 10 soft positives at most
    with pytest.raises(ValueError, match="neg_samples_num"):
        TripletMiner(data, "partial", negs_num_per_query=3, neg_samples_num=2)
    with pytest.raises(ValueError, match="mining must be one of"):
        TripletMiner(data, "hardest")
    with pytest.raises(ValueError, match="negs_num_per_query"):
        TripletMiner(data, "partial", negs_num_per_query=0)
    with pytest.raises(ValueError, match="needs a feature_fn"):
        TripletMiner(data, "partial").mine(None, 0, 0)
    with pytest.raises(ValueError, match="feature_fn must return"):
        TripletMiner(data, "partial").mine(lambda paths: np.zeros((1, 2)), 0, 0)
