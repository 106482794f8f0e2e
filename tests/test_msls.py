"""MSLS reader (official and downloader splits, test cities, training lists), cache, submission."""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

import vprkit.data.msls as msls
from vprkit.data.datasets import PlaceDataset
from vprkit.data.msls import (
    MSLS_CITIES,
    MSLSDataset,
    is_msls_root,
    latlon_to_utm,
    read_msls,
    read_msls_train,
    write_submission,
)

SUBTASKS = ["all", "s2w", "w2s", "o2n", "n2o", "d2n", "n2d"]
# UTM origin of each city (postprocessed easting/northing = origin + x) and a lat/lon centre.
CITY_ORIGIN = {"cph": (724000.0, 6175000.0), "sf": (551000.0, 4182000.0)}
CITY_LATLON = {"cph": (55.6761, 12.5683), "sf": (37.7749, -122.4194), "miami": (25.76, -80.19)}


def key(name: str) -> str:
    """A real-looking 22-character MSLS key, stable per name."""
    return base64.urlsafe_b64encode(hashlib.sha1(name.encode()).digest()).decode()[:22]


def img(name: str, x: float, **flags) -> dict:
    row = {"name": name, "x": x, "pano": False, "night": False, "view": "Forward"}
    row.update({s: s == "all" for s in SUBTASKS})
    row.update(flags)
    return row


# Metres along one street. Comments give what each row tests.
CPH_DB = [
    img("d0", 0),
    img("d1", 20),
    img("d2", 30),  # exactly 25 m from q0: the radius is inclusive
    img("d3", 100),
    img("d4", 105, pano=True),  # panorama: never in the database
    img("d5", 110, all=False),  # outside subtask "all": only in training and the downloader
    img("d6", 200),
    img("d7", 1000),
    img("d8", 140),  # 37 m from q1: a 50 m "hard non-negative" only
]
CPH_Q = [
    img("q0", 5),
    img("q1", 103),
    img("q2", 600, night=True, view="Sideways"),  # no positive: dropped (not counted as night)
    img("q3", 0, pano=True),  # panorama query
    img("q4", 200, all=False),  # outside subtask "all"
    img("q5", 195, night=True, view="Sideways"),
    img("q6", 1000, night=True),
]
SF_DB = [img("e0", 0, n2d=True), img("e1", 8)]
SF_Q = [img("r0", 4, n2d=True), img("r1", 50)]
MIAMI_DB = [img("m0", 0), img("m1", 0, all=False), img("m2", 0)]
MIAMI_Q = [img("t0", 0), img("t1", 0, all=False), img("t2", 0)]


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def latlon(city: str, x: float) -> tuple[float, float]:
    lat0, lon0 = CITY_LATLON[city]
    return lat0, lon0 + x / (111320.0 * np.cos(np.radians(lat0)))


def write_side(folder: Path, city: str, rows: list[dict], labelled: bool = True) -> None:
    (folder / "images").mkdir(parents=True)
    keys = [key(f"{city}/{r['name']}") for r in rows]
    for k in keys:
        (folder / "images" / f"{k}.jpg").write_bytes(b"")  # never decoded by the reader
    _write_csv(
        folder / "seq_info.csv",
        ["", "key", "sequence_key", "frame_number"],
        [[i, k, key(f"seq/{city}"), i] for i, k in enumerate(keys)],
    )
    _write_csv(
        folder / "subtask_index.csv",
        ["", "key", *SUBTASKS],
        [
            [i, k, *(r[s] for s in SUBTASKS)]
            for i, (k, r) in enumerate(zip(keys, rows, strict=True))
        ],
    )
    if not labelled:
        return
    e0, n0 = CITY_ORIGIN[city]
    raw, post = [], []
    for i, (k, r) in enumerate(zip(keys, rows, strict=True)):
        lat, lon = latlon(city, r["x"])
        raw.append([i, k, f"{lon:.7f}", f"{lat:.7f}", 90.0, "2017-06-01 12:00:00", r["pano"]])
        post.append([i, k, f"{e0 + r['x']:.6f}", f"{n0:.6f}", r["night"], False, r["view"], 3])
    _write_csv(folder / "raw.csv", ["", "key", "lon", "lat", "ca", "captured_at", "pano"], raw)
    _write_csv(
        folder / "postprocessed.csv",
        ["", "key", "easting", "northing", "night", "control_panel", "view_direction", "cluster"],
        post,
    )


@pytest.fixture
def root(tmp_path: Path) -> Path:
    base = tmp_path / "msls"
    for city, db, q in (("cph", CPH_DB, CPH_Q), ("sf", SF_DB, SF_Q)):
        write_side(base / "train_val" / city / "database", city, db)
        write_side(base / "train_val" / city / "query", city, q)
    write_side(base / "test" / "miami" / "database", "miami", MIAMI_DB, labelled=False)
    write_side(base / "test" / "miami" / "query", "miami", MIAMI_Q, labelled=False)
    return base


def names(city: str, keys: list[str], rows_by_city: dict[str, list[dict]]) -> list[str]:
    lookup = {key(f"{c}/{r['name']}"): r["name"] for c, rows in rows_by_city.items() for r in rows}
    return [lookup[k] for k in keys]


ALL_ROWS = {"cph": CPH_DB + CPH_Q, "sf": SF_DB + SF_Q, "miami": MIAMI_DB + MIAMI_Q}


def as_names(keys: list[str]) -> list[str]:
    return names("", keys, ALL_ROWS)


# ---------------------------------------------------------------------------------------
# Official validation split
# ---------------------------------------------------------------------------------------


def test_official_val_split(root: Path) -> None:
    ds = read_msls(root, "val", use_cache=False)
    assert isinstance(ds, PlaceDataset) and isinstance(ds, MSLSDataset)
    assert ds.layout == "msls" and ds.name == "msls_val"
    assert ds.cities == ("cph", "sf") and ds.skipped_cities == ()
    # q2 and r1 have no positive (dropped), q3 is a panorama, q4 is outside subtask "all".
    assert as_names(ds.query_keys) == ["q0", "q1", "q5", "q6", "r0"]
    assert as_names(ds.database_keys) == ["d0", "d1", "d2", "d3", "d6", "d7", "d8", "e0", "e1"]
    assert as_names(ds.no_positive_query_keys) == ["q2", "r1"]
    assert ds.dropped_no_positive
    assert [p.tolist() for p in ds.positives] == [[0, 1, 2], [3], [4], [5], [7, 8]]
    # Paths: <root>/train_val/<city>/<side>/images/<key>.jpg, all existing.
    assert ds.query_paths[0] == root / "train_val" / "cph" / "query" / "images" / (
        ds.query_keys[0] + ".jpg"
    )
    assert ds.database_paths[-1].parts[-4] == "sf"
    assert all(p.is_file() for p in ds.query_paths + ds.database_paths)
    # Coordinates are postprocessed.csv's easting/northing.
    np.testing.assert_allclose(ds.query_utm[1], [724103.0, 6175000.0])
    assert ds.database_utm.shape == (9, 2)
    assert "5 queries" in ds.description and "official" in ds.description


def test_split_train_uses_validation_rules_and_city_order(root: Path) -> None:
    ds = read_msls(root, "train", cities="sf,cph", use_cache=False)
    assert ds.name == "msls_train" and ds.cities == ("sf", "cph")
    assert as_names(ds.query_keys) == ["r0", "q0", "q1", "q5", "q6"]
    assert [p.tolist() for p in ds.positives] == [[0, 1], [2, 3, 4], [5], [6], [7]]


def test_positive_radius_option(root: Path) -> None:
    ds = read_msls(root, cities=["cph"], positive_radius=10.0, use_cache=False)
    # q0 (x=5) keeps only d0 at 10 m; nothing else changes.
    assert as_names(ds.query_keys) == ["q0", "q1", "q5", "q6"]
    assert [p.tolist() for p in ds.positives] == [[0], [3], [4], [5]]


def test_subtask_skips_city_without_images(root: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="vprkit.data.msls"):
        ds = read_msls(root, subtask="n2d", use_cache=False)
    assert ds.cities == ("sf",) and ds.skipped_cities == ("cph",)
    assert as_names(ds.query_keys) == ["r0"] and as_names(ds.database_keys) == ["e0"]
    assert ds.name == "msls_val_n2d"
    assert "skipping city cph" in caplog.text
    with pytest.raises(ValueError, match="no city of cph, sf .* subtask 'o2n'"):
        read_msls(root, subtask="o2n", use_cache=False)


# ---------------------------------------------------------------------------------------
# Downloader split
# ---------------------------------------------------------------------------------------


def test_downloader_split(root: Path) -> None:
    ds = read_msls(root, "val", val_split="downloader", use_cache=False)
    assert ds.name == "msls_val_downloader" and ds.val_split == "downloader"
    # Every non-panorama image, no subtask filter; queries without a positive are kept.
    assert as_names(ds.query_keys) == ["q0", "q1", "q2", "q4", "q5", "q6", "r0", "r1"]
    assert as_names(ds.database_keys) == [
        *["d0", "d1", "d2", "d3", "d5", "d6", "d7", "d8"],
        *["e0", "e1"],
    ]
    assert not ds.dropped_no_positive
    assert as_names(ds.no_positive_query_keys) == ["q2", "r1"]
    assert ds.positives[2].size == 0 and ds.positives[7].size == 0
    assert 4 in ds.positives[1].tolist()  # d5 (outside "all") is a positive here
    # Coordinates: raw.csv lat/lon -> UTM, truncated to centimetres as in the downloader's names.
    assert all(float(f"{v:.2f}") == v for v in ds.query_utm.ravel().tolist())
    lat, lon = latlon("cph", 5)
    east, north, zone = latlon_to_utm(
        np.array([float(f"{lat:.7f}")]), np.array([float(f"{lon:.7f}")])
    )
    assert zone[0] == 33
    np.testing.assert_allclose(ds.query_utm[0], [east[0], north[0]], atol=0.0101)
    # Positives follow these coordinates within 25 m, city by city.
    for qi, pos in enumerate(ds.positives):
        same_city = [
            j
            for j, p in enumerate(ds.database_paths)
            if p.parts[-4] == ds.query_paths[qi].parts[-4]
        ]
        d = np.linalg.norm(ds.database_utm[same_city] - ds.query_utm[qi], axis=1)
        assert pos.tolist() == [same_city[j] for j in np.flatnonzero(d <= 25)]


def test_downloader_option_errors(root: Path) -> None:
    with pytest.raises(ValueError, match="only applies to split='val'"):
        read_msls(root, "test", val_split="downloader")
    with pytest.raises(ValueError, match="no subtasks"):
        read_msls(root, "val", subtask="s2w", val_split="downloader")
    with pytest.raises(ValueError, match="val_split must be one of"):
        read_msls(root, "val", val_split="gsv")


def test_latlon_to_utm_matches_utm_package() -> None:
    # utm.from_latlon(51.2, 7.5) == (395201.3103811303, 5673135.241182375, 32, 'U')
    east, north, zone = latlon_to_utm(np.array([51.2]), np.array([7.5]))
    assert abs(east[0] - 395201.3103811303) < 1e-6 and abs(north[0] - 5673135.241182375) < 1e-6
    assert zone[0] == 32
    _, north, zone = latlon_to_utm(np.array([-33.86, 60.0]), np.array([151.21, 5.0]))
    assert zone.tolist() == [56, 32]  # Sydney; south-west Norway's widened zone 32
    assert 6.2e6 < north[0] < 6.3e6  # southern hemisphere: false northing 10,000 km
    assert msls._truncate_cm(395201.3103811303) == 395201.31
    assert msls._truncate_cm(5673135.249) == 5673135.24
    with pytest.raises(ValueError, match="outside UTM"):
        latlon_to_utm(np.array([85.0]), np.array([0.0]))


# ---------------------------------------------------------------------------------------
# Test cities
# ---------------------------------------------------------------------------------------


def test_test_split_has_no_labels(root: Path) -> None:
    ds = read_msls(root, "test", cities=["miami"], use_cache=False)
    assert ds.positives is None and ds.query_utm is None and ds.database_utm is None
    assert not ds.has_labels() and ds.val_split is None
    assert as_names(ds.query_keys) == ["t0", "t2"] and as_names(ds.database_keys) == ["m0", "m2"]
    assert ds.query_paths[0].parts[-5:-2] == ("test", "miami", "query")
    assert "no labels" in ds.description


def test_default_test_cities_must_exist(root: Path) -> None:
    with pytest.raises(FileNotFoundError, match="athens"):
        read_msls(root, "test")  # only miami was made
    assert MSLS_CITIES["val"] == ("cph", "sf") and len(MSLS_CITIES["train"]) == 22


# ---------------------------------------------------------------------------------------
# Training lists
# ---------------------------------------------------------------------------------------


def test_train_index(root: Path) -> None:
    index = read_msls_train(root, cities=["cph", "sf"], use_cache=False)
    # No subtask filter; panoramas out; q2 and r1 have no positive within 10 m.
    assert as_names(index.query_keys) == ["q0", "q1", "q4", "q5", "q6", "r0"]
    assert as_names(index.database_keys) == [
        *["d0", "d1", "d2", "d3", "d5", "d6", "d7", "d8"],
        *["e0", "e1"],
    ]
    assert as_names(index.dropped_query_keys) == ["q2", "r1"]
    assert [p.tolist() for p in index.positives] == [[0], [3, 4], [5], [5], [6], [8, 9]]
    assert [p.tolist() for p in index.non_negatives] == [[0, 1, 2], [3, 4], [5], [5], [6], [8, 9]]
    assert [p.tolist() for p in index.hard_non_negatives] == [
        [0, 1, 2],
        [3, 4, 7],
        [5],
        [5],
        [6],
        [8, 9],
    ]
    # Indices among the kept queries: q5 (3) night and sideways, q6 (4) night; q2 was dropped.
    assert index.night_queries.tolist() == [3, 4]
    assert index.sideways_queries.tolist() == [3]
    n = 6
    expected = np.ones(n)
    expected[[3, 4]] += n / 2
    expected[3] += n / 1
    np.testing.assert_allclose(index.sampling_weights(), expected)
    assert index.query_utm.shape == (6, 2) and index.database_utm.shape == (10, 2)
    assert all(p.is_file() for p in index.query_paths + index.database_paths)


def test_train_radii_must_be_ordered(root: Path) -> None:
    with pytest.raises(ValueError, match="positive_radius <= non_negative_radius"):
        read_msls_train(root, cities=["cph"], positive_radius=30.0)


# ---------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------


def _forbid_parsing(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("CSV parsed although the cache is up to date")

    monkeypatch.setattr(msls, "_read_csv", fail)


def test_cache_loaded_when_unchanged(root: Path, monkeypatch) -> None:
    first = read_msls(root)
    assert not first.from_cache
    files = list((root / ".vprkit_msls_cache").glob("val_all_*.npz"))
    assert len(files) == 1
    with np.load(files[0], allow_pickle=False) as z:  # plain arrays, no pickles
        assert "query_keys" in z.files
    assert not list((root / ".vprkit_msls_cache").glob("*.tmp"))

    _forbid_parsing(monkeypatch)
    second = read_msls(root)
    assert second.from_cache
    assert second.query_keys == first.query_keys
    assert second.database_paths == first.database_paths
    assert [p.tolist() for p in second.positives] == [p.tolist() for p in first.positives]
    np.testing.assert_array_equal(second.query_utm, first.query_utm)
    assert second.no_positive_query_keys == first.no_positive_query_keys


def test_cache_separates_settings(root: Path, monkeypatch) -> None:
    read_msls(root)
    read_msls(root, val_split="downloader")
    read_msls(root, positive_radius=10.0)
    read_msls_train(root, cities=["cph", "sf"])
    assert len(list((root / ".vprkit_msls_cache").glob("*.npz"))) == 4
    _forbid_parsing(monkeypatch)
    assert read_msls(root, val_split="downloader").from_cache
    train = read_msls_train(root, cities=["cph", "sf"])
    assert train.from_cache and train.night_queries.tolist() == [3, 4]
    assert [p.tolist() for p in train.hard_non_negatives][1] == [3, 4, 7]


def test_cache_rebuilt_when_a_csv_changes(root: Path, monkeypatch) -> None:
    read_msls(root)
    raw = root / "train_val" / "sf" / "query" / "raw.csv"
    st = raw.stat()
    os.utime(raw, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # touch
    with monkeypatch.context() as m:
        _forbid_parsing(m)
        with pytest.raises(AssertionError, match="CSV parsed"):
            read_msls(root)
    rebuilt = read_msls(root)
    assert not rebuilt.from_cache
    assert read_msls(root).from_cache

    # A real edit: q0 becomes a panorama, and the new index says so.
    rows = list(csv.reader(open(root / "train_val" / "cph" / "query" / "raw.csv")))
    rows[1][-1] = "True"
    _write_csv(root / "train_val" / "cph" / "query" / "raw.csv", rows[0], rows[1:])
    changed = read_msls(root)
    assert not changed.from_cache and "q0" not in as_names(changed.query_keys)


def test_cache_corrupt_or_disabled(root: Path, caplog) -> None:
    read_msls(root)
    (cache,) = (root / ".vprkit_msls_cache").glob("val_all_*.npz")
    cache.write_bytes(b"not a zip")
    with caplog.at_level(logging.WARNING, logger="vprkit.data.msls"):
        ds = read_msls(root)
    assert not ds.from_cache and "unreadable" in caplog.text
    assert read_msls(root).from_cache
    assert not read_msls(root, use_cache=False).from_cache


def test_cache_dir_option(root: Path, tmp_path: Path) -> None:
    folder = tmp_path / "elsewhere"
    read_msls(root, cache_dir=folder)
    assert len(list(folder.glob("val_all_*.npz"))) == 1
    assert not (root / ".vprkit_msls_cache").exists()
    assert read_msls(root, cache_dir=folder).from_cache


def test_cached_index_notices_deleted_images(root: Path) -> None:
    ds = read_msls(root)
    ds.query_paths[0].unlink()  # the images folder changes: the index is rebuilt and checked
    with pytest.raises(FileNotFoundError, match=ds.query_keys[0]):
        read_msls(root)


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------


def test_missing_csv_names_the_file(root: Path) -> None:
    (root / "train_val" / "sf" / "database" / "raw.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"sf/database/raw\.csv does not exist"):
        read_msls(root, use_cache=False)


def test_missing_column_names_the_file(root: Path) -> None:
    path = root / "train_val" / "cph" / "query" / "postprocessed.csv"
    rows = list(csv.reader(open(path)))
    rows[0][2] = "utm_x"
    _write_csv(path, rows[0], rows[1:])
    with pytest.raises(ValueError, match=r"postprocessed\.csv: missing column\(s\) easting"):
        read_msls(root, use_cache=False)


def test_missing_subtask_column(root: Path) -> None:
    path = root / "train_val" / "cph" / "database" / "subtask_index.csv"
    rows = [[c for i, c in enumerate(r) if i != 8] for r in csv.reader(open(path))]  # drop n2d
    _write_csv(path, rows[0], rows[1:])
    with pytest.raises(ValueError, match=r"subtask_index\.csv: missing column\(s\) n2d"):
        read_msls(root, subtask="n2d", use_cache=False)
    assert read_msls(root, use_cache=False).num_queries == 5  # "all" is still there


def test_key_without_image(root: Path) -> None:
    missing = root / "train_val" / "cph" / "database" / "images" / f"{key('cph/d3')}.jpg"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{missing.name} does not exist \(1 of 7"):
        read_msls(root, use_cache=False)
    # An image whose frame is excluded (panorama d4) may be missing.
    missing.write_bytes(b"")
    (root / "train_val" / "cph" / "database" / "images" / f"{key('cph/d4')}.jpg").unlink()
    assert read_msls(root, use_cache=False).num_database == 9


def test_bad_values_name_file_and_line(root: Path) -> None:
    path = root / "train_val" / "cph" / "query" / "raw.csv"
    rows = list(csv.reader(open(path)))
    rows[3][-1] = "maybe"
    _write_csv(path, rows[0], rows[1:])
    with pytest.raises(ValueError, match=r"raw\.csv: line 4: column 'pano' is 'maybe'"):
        read_msls(root, use_cache=False)

    path = root / "train_val" / "sf" / "database" / "postprocessed.csv"
    rows = list(csv.reader(open(path)))
    rows[2][2] = "nan"
    _write_csv(path, rows[0], rows[1:])
    with pytest.raises(ValueError, match=r"line 3: column 'easting' is 'nan'"):
        read_msls(root, cities=["sf"], use_cache=False)


def test_mismatched_metadata_files(root: Path) -> None:
    path = root / "train_val" / "sf" / "query" / "seq_info.csv"
    rows = list(csv.reader(open(path)))
    rows[1][1], rows[2][1] = rows[2][1], rows[1][1]  # keys out of step with postprocessed.csv
    _write_csv(path, rows[0], rows[1:])
    with pytest.raises(ValueError, match="metadata files of this folder do not match"):
        read_msls(root, use_cache=False)

    path = root / "train_val" / "cph" / "database" / "raw.csv"
    rows = list(csv.reader(open(path)))
    _write_csv(path, rows[0], rows[1:-1])  # one row short
    with pytest.raises(ValueError, match=r"row label 8 has no row in .*raw\.csv"):
        read_msls(root, cities=["cph"], use_cache=False)


def test_empty_csv_and_bad_arguments(root: Path) -> None:
    (root / "train_val" / "sf" / "query" / "seq_info.csv").write_text("")
    with pytest.raises(ValueError, match=r"seq_info\.csv is empty"):
        read_msls(root, use_cache=False)
    with pytest.raises(ValueError, match="split must be one of"):
        read_msls(root, "training")
    with pytest.raises(ValueError, match="subtask must be one of"):
        read_msls(root, subtask="summer")
    with pytest.raises(FileNotFoundError, match="city folder"):
        read_msls(root, cities=["cph", "oslo"])
    with pytest.raises(FileNotFoundError, match="MSLS root"):
        read_msls(root / "nowhere")


# ---------------------------------------------------------------------------------------
# Challenge submission
# ---------------------------------------------------------------------------------------


def test_write_submission_format(root: Path, tmp_path: Path) -> None:
    ds = read_msls(root, "test", cities=["miami"], use_cache=False)
    predictions = np.array([[1, 0], [0, 1]])
    path = write_submission(
        tmp_path / "msls_prediction.csv", ds.query_keys, ds.database_keys, predictions
    )
    text = path.read_text()
    lines = text.splitlines()
    assert text.endswith("\n") and len(lines) == 2
    q, db = ds.query_keys, ds.database_keys
    assert lines[0] == f"{q[0]} {db[1]} {db[0]}"
    assert lines[1] == f"{q[1]} {db[0]} {db[1]}"
    # Read back as the official evaluate.py does.
    table = np.loadtxt(path, ndmin=2, dtype=str)
    assert table.shape == (2, 3) and table[:, 0].tolist() == q
    assert not list(tmp_path.glob("*.tmp"))


def test_write_submission_errors(tmp_path: Path) -> None:
    q, db = ["Q1", "Q2"], ["DB0", "DB1", "DB2"]
    out = tmp_path / "pred.csv"
    with pytest.raises(ValueError, match="same number of predictions"):
        write_submission(out, q, db, [[0, 1], [2]])
    with pytest.raises(ValueError, match="out of range"):
        write_submission(out, q, db, [[0, 3], [1, 2]])
    with pytest.raises(ValueError, match="twice"):
        write_submission(out, q, db, [[0, 0], [1, 2]])
    with pytest.raises(ValueError, match="appears twice"):
        write_submission(out, ["Q1", "Q1"], db, [[0, 1], [1, 2]])
    with pytest.raises(ValueError, match="not a valid MSLS key"):
        write_submission(out, ["Q 1", "Q2"], db, [[0, 1], [1, 2]])
    with pytest.raises(ValueError, match="2 query keys but predictions has 1 rows"):
        write_submission(out, q, db, [[0, 1]])
    with pytest.raises(ValueError, match="integer"):
        write_submission(out, q, db, np.zeros((2, 2)))
    assert not out.exists()


def test_write_submission_is_atomic(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "pred.csv"
    out.write_text("previous\n")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(msls.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_submission(out, ["Q1"], ["DB0", "DB1"], [[1, 0]])
    assert out.read_text() == "previous\n"
    assert [p.name for p in tmp_path.iterdir()] == ["pred.csv"]


# ---------------------------------------------------------------------------------------
# vprkit eval on an MSLS folder
# ---------------------------------------------------------------------------------------


def _real_images(base: Path) -> None:
    from PIL import Image

    for i, path in enumerate(sorted(base.rglob("*.jpg"))):
        Image.new("RGB", (28, 28), (i * 37 % 256, i * 91 % 256, i * 53 % 256)).save(path)


def test_eval_reads_msls_and_writes_the_challenge_files(root: Path, tmp_path: Path) -> None:
    from vprkit.cli import main as cli_main

    _real_images(root)
    base = [
        "eval",
        "--method",
        "dinov2_cls",
        "--weights",
        "random",
        "--model_option",
        "size='vits14'",
        "--model_option",
        "depth=1",
        "--image_size",
        "28",
        "28",
        "--dataset_folder",
        str(root),
        "--num_workers",
        "0",
        "--recall_values",
        "1",
        "2",
    ]
    assert cli_main([*base, "--save_dir", str(tmp_path / "val")]) == 0
    (run,) = (tmp_path / "val").glob("*/*")
    summary = json.loads((run / "recalls.json").read_text())
    official = read_msls(root, "val", use_cache=False)
    assert summary["num_queries"] == len(official.query_paths)
    assert "official" in (run / "log.txt").read_text()

    test_args = ["--msls_split", "test", "--msls_cities", "miami"]
    assert cli_main([*base, *test_args, "--save_dir", str(tmp_path / "test")]) == 0
    (run,) = (tmp_path / "test").glob("*/*")
    test = read_msls(root, "test", cities=["miami"], use_cache=False)
    lines = (run / "msls_submission.csv").read_text().splitlines()
    assert [line.split()[0] for line in lines] == list(test.query_keys)
    assert all(set(line.split()[1:]) <= set(test.database_keys) for line in lines)
    assert not (run / "recalls.json").read_text().count("R@1")  # no coordinates, no recall


def test_training_validates_on_the_official_val_set(root: Path) -> None:
    from vprkit.train.loop import load_validation_set

    ds = load_validation_set(root, "val")
    assert ds.name == "msls_val" and as_names(ds.query_keys) == ["q0", "q1", "q5", "q6", "r0"]
    assert is_msls_root(root) and not is_msls_root(root / "train_val")
