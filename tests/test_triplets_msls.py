"""Triplet training data from a Mapillary SLS root: ``TripletData.from_msls`` and
``load_triplet_data``, on a miniature MSLS tree of two train cities.

Both cities are written with the *same* UTM origin, as happens for real: every MSLS city sits
in its own UTM zone, so easting/northing of two cities can coincide. Positives recomputed from
UTM would then pair images of different cities; the index's per-city lists must be used.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# The MSLS tree builder of the MSLS reader's tests (tests/ is on sys.path under pytest).
from test_msls import CITY_LATLON, CITY_ORIGIN, img, key, write_side

from vprkit.data.msls import read_msls_train
from vprkit.data.triplets import TripletData, TripletMiner, load_triplet_data
from vprkit.retrieval.ground_truth import positives_within_radius

CITIES = ["london", "tokyo"]  # official order: london before tokyo
ORIGIN = (700000.0, 5700000.0)  # shared by both cities (different zones in reality)
# Metres along one street per city.
LONDON_DB = [img(f"l{i}", x) for i, x in enumerate([0, 8, 20, 30, 60, 100, 150, 200, 300, 400])]
LONDON_DB.append(img("l10", 2, pano=True))  # panorama: never in the database
LONDON_Q = [
    img("a", 3),  # positives l0 (3 m), l1 (5 m); non-negatives also l2 (17 m)
    img("b", 62),  # l4 (2 m)
    img("c", 250),  # 50 m from l7 and l8: no positive, dropped
    img("d", 405, night=True),  # l9 (5 m)
]
TOKYO_DB = [img(f"t{i}", x) for i, x in enumerate([0, 5, 100, 200, 300, 1000])]
TOKYO_Q = [
    img("e", 2),  # t0 (2 m), t1 (3 m); in UTM also 1-6 m from london's l0 and l1
    img("f", 700),  # no positive, dropped
    img("g", 198),  # t3 (2 m)
]
DB_NAMES = [r["name"] for r in LONDON_DB if not r["pano"]] + [r["name"] for r in TOKYO_DB]
KEPT_QUERIES = ["a", "b", "d", "e", "g"]
POSITIVES = [["l0", "l1"], ["l4"], ["l9"], ["t0", "t1"], ["t3"]]
NON_NEGATIVES = [["l0", "l1", "l2"], ["l4"], ["l9"], ["t0", "t1"], ["t3"]]


@pytest.fixture
def msls_root(tmp_path: Path, monkeypatch) -> Path:
    for city in CITIES:
        monkeypatch.setitem(CITY_ORIGIN, city, ORIGIN)
        monkeypatch.setitem(CITY_LATLON, city, (51.5, -0.12))  # raw.csv only; unused here
    base = tmp_path / "msls"
    for city, db, q in (("london", LONDON_DB, LONDON_Q), ("tokyo", TOKYO_DB, TOKYO_Q)):
        write_side(base / "train_val" / city / "database", city, db)
        write_side(base / "train_val" / city / "query", city, q)
    return base


ROWS = {"london": LONDON_DB + LONDON_Q, "tokyo": TOKYO_DB + TOKYO_Q}
NAME_OF_KEY = {key(f"{c}/{r['name']}"): r["name"] for c, rows in ROWS.items() for r in rows}


def _names(paths: list[Path]) -> list[str]:
    """Image paths (``<key>.jpg``) as the row names above."""
    return [NAME_OF_KEY[p.stem] for p in paths]


def _as_names(data: TripletData, lists: list[np.ndarray]) -> list[list[str]]:
    """Database index lists as image names."""
    db = _names(data.dataset.database_paths)
    return [[db[i] for i in x.tolist()] for x in lists]


def _city(path: Path) -> str:
    return path.parts[-4]  # <root>/train_val/<city>/<side>/images/<key>.jpg


@pytest.fixture
def data(msls_root: Path) -> TripletData:
    return TripletData.from_msls(read_msls_train(msls_root, cities=CITIES, use_cache=False))


# ---------------------------------------------------------------------------------------
# from_msls
# ---------------------------------------------------------------------------------------


def test_from_msls_takes_the_index_lists(msls_root: Path) -> None:
    index = read_msls_train(msls_root, cities=CITIES, use_cache=False)
    data = TripletData.from_msls(index)
    ds = data.dataset
    # Kept query order and database order are the index's.
    assert ds.query_paths == index.query_paths and ds.database_paths == index.database_paths
    assert _names(ds.query_paths) == KEPT_QUERIES
    assert _names(ds.database_paths) == DB_NAMES
    assert data.query_ids.tolist() == list(range(len(KEPT_QUERIES)))
    assert data.num_queries == 5 and data.num_database == len(DB_NAMES)
    assert data.num_dropped_queries == 2  # c and f
    # Exactly the index's lists, which are the per-city ones.
    for ours, theirs in (
        (data.hard_positives, index.positives),
        (data.soft_positives, index.non_negatives),
    ):
        assert len(ours) == len(theirs)
        assert all(
            np.array_equal(o, t) and o.dtype == np.int64 for o, t in zip(ours, theirs, strict=True)
        )
    assert _as_names(data, data.hard_positives) == POSITIVES
    assert _as_names(data, data.soft_positives) == NON_NEGATIVES
    assert data.train_positives_dist_threshold == 10.0
    assert data.val_positive_dist_threshold == 25.0
    # A PlaceDataset with the UTM and the 25 m ground truth, so no one recomputes it.
    assert ds.layout == "msls" and ds.name == "msls_train"
    np.testing.assert_array_equal(ds.query_utm, index.query_utm)
    np.testing.assert_array_equal(ds.database_utm, index.database_utm)
    assert _as_names(data, ds.positives) == NON_NEGATIVES
    assert "dropped=2" in repr(data)


def test_utm_positives_would_mix_cities(data: TripletData) -> None:
    # The reason from_msls must not recompute: the fixture's cities overlap in UTM, and query e
    # (tokyo) is 1 m and 6 m from london's l0 and l1 there.
    ds = data.dataset
    naive = positives_within_radius(ds.database_utm, ds.query_utm, 10.0)
    assert _as_names(data, naive)[3] == ["l0", "l1", "t0", "t1"]
    assert _as_names(data, data.hard_positives)[3] == ["t0", "t1"]


def test_from_msls_errors(msls_root: Path) -> None:
    index = read_msls_train(msls_root, cities=CITIES, use_cache=False)
    with pytest.raises(TypeError, match="MSLSTrainIndex"):
        TripletData.from_msls(object())
    empty = dataclasses.replace(
        index,
        query_paths=[],
        query_keys=[],
        query_utm=np.zeros((0, 2)),
        positives=[],
        non_negatives=[],
        hard_non_negatives=[],
    )
    with pytest.raises(ValueError, match="no training query with a positive within 10 m"):
        TripletData.from_msls(empty)


# ---------------------------------------------------------------------------------------
# Mining on MSLS data
# ---------------------------------------------------------------------------------------


def utm_feature_fn(data: TripletData):
    """Features = UTM coordinates: the other city's images at the same spot look hardest."""
    ds = data.dataset
    table = {p: u for p, u in zip(ds.database_paths, ds.database_utm, strict=True)}
    table.update({p: u for p, u in zip(ds.query_paths, ds.query_utm, strict=True)})
    return lambda paths: np.array([table[p] - np.array(ORIGIN) for p in paths], np.float32)


def _check_triplets(data: TripletData, triplets, negs: int) -> None:
    ds = data.dataset
    assert len(triplets) == data.num_queries and triplets.negs_num_per_query == negs
    for q, pos, neg in zip(
        triplets.query_indices,
        triplets.positive_indices,
        triplets.negative_indices,
        strict=True,
    ):
        # Every query is kept, so query index == kept position.
        assert pos in data.hard_positives[q]
        assert _city(ds.database_paths[pos]) == _city(ds.query_paths[q])
        assert np.linalg.norm(ds.database_utm[pos] - ds.query_utm[q]) <= 10.0
        assert not np.isin(neg, data.soft_positives[q]).any()
        assert len(set(neg.tolist())) == negs


@pytest.mark.parametrize("mining", ["partial", "random"])
def test_mining_respects_the_msls_lists(data: TripletData, mining: str) -> None:
    miner = TripletMiner(data, mining, negs_num_per_query=3, neg_samples_num=1000, seed=3)
    for refresh in range(3):
        triplets = miner.mine(utm_feature_fn(data), epoch=0, refresh=refresh)
        _check_triplets(data, triplets, 3)
    if mining == "partial":
        # Features are UTM, so e's hardest negatives are london's l0/l1 (same spot, other
        # city) and l2: legitimate negatives that a UTM-based soft set would have excluded.
        e = KEPT_QUERIES.index("e")
        row = triplets.negative_indices[triplets.query_indices.tolist().index(e)]
        assert sorted(DB_NAMES[i] for i in row) == ["l0", "l1", "l2"]
    # Without features the positive is the geographically nearest, still within the city.
    _check_triplets(data, TripletMiner(data, "random", seed=1).mine(None, 0, 0), 2)


def test_precomputed_mining_skips_non_negatives(data: TripletData, tmp_path: Path, caplog) -> None:
    # Rows list every database image by UTM distance, non-negatives included: the miner must
    # skip those (and say so).
    ds = data.dataset
    dist = np.linalg.norm(ds.query_utm[:, None] - ds.database_utm[None], axis=2)
    path = tmp_path / "hard.npy"
    np.save(path, np.argsort(dist, axis=1, kind="stable").astype(np.int64))
    miner = TripletMiner(
        data, "precomputed", negs_num_per_query=2, neg_hardness=6, hard_negatives_file=path
    )
    with caplog.at_level(logging.WARNING, logger="vprkit.data.triplets"):
        triplets = miner.mine(None, 0, 0)
    _check_triplets(data, triplets, 2)
    assert "soft positives" in caplog.text


# ---------------------------------------------------------------------------------------
# load_triplet_data
# ---------------------------------------------------------------------------------------


def test_load_triplet_data_reads_msls(msls_root: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="vprkit.data.triplets"):
        data = load_triplet_data(msls_root, msls_cities=CITIES)
    assert "Mapillary SLS layout" in caplog.text and "london, tokyo" in caplog.text
    assert data.dataset.layout == "msls"
    assert _as_names(data, data.hard_positives) == POSITIVES
    assert _as_names(data, data.soft_positives) == NON_NEGATIVES
    assert data.num_dropped_queries == 2
    # The radii reach read_msls_train: at 4 m d (5 m from l9) loses its positive; at 30 m
    # a's non-negatives gain l3 (27 m).
    data = load_triplet_data(
        msls_root,
        msls_cities="tokyo,london",
        train_positives_dist_threshold=4.0,
        val_positive_dist_threshold=30.0,
    )
    assert (data.train_positives_dist_threshold, data.val_positive_dist_threshold) == (4.0, 30.0)
    assert _names(data.dataset.query_paths) == ["e", "g", "a", "b"]
    assert data.num_dropped_queries == 3
    assert _as_names(data, data.hard_positives)[2] == ["l0"]
    assert _as_names(data, data.soft_positives)[2] == ["l0", "l1", "l2", "l3"]


def test_load_triplet_data_msls_errors(msls_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Mapillary SLS root.*split must be 'train', got 'val'"):
        load_triplet_data(msls_root, "val", msls_cities=CITIES)
    # By default the 22 official train cities are required.
    with pytest.raises(FileNotFoundError, match="MSLS city folder .*trondheim"):
        load_triplet_data(msls_root)
    neither = tmp_path / "neither"
    (neither / "images").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="neither a Mapillary SLS root .* nor a VG"):
        load_triplet_data(neither)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_triplet_data(tmp_path / "missing")


def test_load_triplet_data_reads_vg(tmp_path: Path, caplog) -> None:
    root = tmp_path / "vg"
    for side, xs in (("database", [0, 5, 40, 80]), ("queries", [1, 60, 79])):
        folder = root / "images" / "train" / side
        folder.mkdir(parents=True)
        for x in xs:
            name = f"@{ORIGIN[0] + x:.2f}@{ORIGIN[1]:.2f}@{side}{x}@.jpg"
            Image.new("RGB", (4, 4)).save(folder / name)
    with caplog.at_level(logging.INFO, logger="vprkit.data.triplets"):
        data = load_triplet_data(root)
    assert "VG layout" in caplog.text
    assert data.dataset.layout == "vg"
    # The query at 60 m has nothing within 10 m: dropped, as from_folder does.
    assert data.query_ids.tolist() == [0, 2] and data.num_dropped_queries == 1
    assert [h.tolist() for h in data.hard_positives] == [[0, 1], [3]]
    with pytest.raises(ValueError, match="msls_cities was given"):
        load_triplet_data(root, msls_cities=["london"])
    with pytest.raises(FileNotFoundError, match=r"images/val/\{database,queries\}"):
        load_triplet_data(root, "val")
