"""The dataset-format registry: detection, open_dataset, options, training data, result files,
and a format added in one file."""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from test_datasets import make_gsv, make_vg, make_vprbench, touch, utm_name
from test_msls import CPH_DB, CPH_Q, MIAMI_DB, MIAMI_Q, SF_DB, SF_Q, write_side

import vprkit.data.formats as formats
from vprkit.data.datasets import PlaceDataset, load_dataset, read_folders, read_vg_dataset
from vprkit.data.formats import (
    OPTION_DEFAULTS,
    TRAINING_OPTION_DEFAULTS,
    detect_format,
    get_format,
    list_formats,
    open_dataset,
    open_training_data,
    register_format,
    write_results,
)
from vprkit.data.msls import read_msls
from vprkit.data.triplets import TripletData

BUILTIN = ["msls", "vg", "vprbench", "gsv_val", "folders"]


def assert_same(a: PlaceDataset, b: PlaceDataset) -> None:
    """Same images in the same order, same labels: evaluations give the same figures."""
    assert (a.name, a.root) == (b.name, b.root)
    assert a.database_paths == b.database_paths and a.query_paths == b.query_paths
    for x, y in ((a.database_utm, b.database_utm), (a.query_utm, b.query_utm)):
        assert (x is None) == (y is None)
        if x is not None:
            np.testing.assert_array_equal(x, y)
    assert (a.positives is None) == (b.positives is None)
    if a.positives is not None:
        assert len(a.positives) == len(b.positives)
        for p, q in zip(a.positives, b.positives, strict=True):
            np.testing.assert_array_equal(p, q)


@pytest.fixture
def msls_root(tmp_path: Path) -> Path:
    base = tmp_path / "msls"
    for city, db, q in (("cph", CPH_DB, CPH_Q), ("sf", SF_DB, SF_Q)):
        write_side(base / "train_val" / city / "database", city, db)
        write_side(base / "train_val" / city / "query", city, q)
    write_side(base / "test" / "miami" / "database", "miami", MIAMI_DB, labelled=False)
    write_side(base / "test" / "miami" / "query", "miami", MIAMI_Q, labelled=False)
    return base


def make_plain(tmp_path: Path) -> Path:
    folder = tmp_path / "plain"
    for name in ("db1.jpg", "db2.jpg", "db10.jpg"):
        touch(folder / "database" / name)
    touch(folder / "queries" / "q1.jpg")
    return folder


@pytest.fixture
def restore_registry():
    before = dict(formats._FORMATS)
    yield
    formats._FORMATS.clear()
    formats._FORMATS.update(before)


# ---------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------


def test_builtin_formats() -> None:
    assert list_formats()[:5] == BUILTIN
    for name in BUILTIN:
        fmt = get_format(name)
        assert fmt.name == name and fmt.description and "\n" not in fmt.description
    assert get_format("msls").write_results is not None
    assert get_format("vg").read_training is not None
    assert get_format("vprbench").read_training is None
    with pytest.raises(ValueError, match="unknown dataset format 'nope'.*msls, vg"):
        get_format("nope")


def test_builtin_read_defaults_are_the_documented_ones() -> None:
    # A format ignores a common option only at its default: the two must agree.
    import inspect

    for name in BUILTIN:
        fmt = get_format(name)
        for method, defaults in (
            (fmt.read, OPTION_DEFAULTS),
            (fmt.read_training, TRAINING_OPTION_DEFAULTS),
        ):
            if method is None:
                continue
            for p in list(inspect.signature(method).parameters.values())[1:]:
                assert p.name in defaults, (name, p.name)
                assert p.default == defaults[p.name], (name, p.name)


def test_register_format_errors(restore_registry) -> None:
    class NoRead(formats.DatasetFormat):
        name = "no_read"
        description = "x"
        read = None

    with pytest.raises(ValueError, match="no read"):
        register_format(NoRead)
    with pytest.raises(ValueError, match="'vg' is already registered"):
        register_format(type("VG2", (formats.DatasetFormat,), {"name": "vg", "description": ""}))


# ---------------------------------------------------------------------------------------
# Detection and reading: the same datasets as the readers of today
# ---------------------------------------------------------------------------------------


def test_open_dataset_vg_vprbench_gsv(tmp_path: Path) -> None:
    vg = make_vg(tmp_path)
    ds = open_dataset(vg)
    assert ds.layout == "vg" and detect_format(vg).name == "vg"
    assert_same(ds, read_vg_dataset(vg))
    assert_same(ds, load_dataset(vg))
    for sub in (vg / "images", vg / "images" / "test"):  # the images/ or split folder too
        assert_same(open_dataset(sub), read_vg_dataset(sub))
    assert open_dataset(vg, no_labels=True).database_utm is None

    bench = make_vprbench(tmp_path)
    ds = open_dataset(bench)
    assert ds.layout == "vprbench" and [p.tolist() for p in ds.positives][:2] == [[0, 1], [0, 1, 2]]
    assert_same(ds, load_dataset(bench))
    assert not open_dataset(bench, no_labels=True).has_labels()

    lists, images = make_gsv(tmp_path)
    ds = open_dataset(lists, image_root=images)
    assert ds.layout == "gsv_val" and ds.name == "SPED"
    assert_same(ds, load_dataset(lists, image_root=images))


def test_open_dataset_vg_splits(tmp_path: Path) -> None:
    root = make_vg(tmp_path, split="val")
    assert_same(open_dataset(root, split="val"), read_vg_dataset(root, "val"))
    with pytest.raises(FileNotFoundError, match=r"no split 'test'.*splits found: val"):
        open_dataset(root)  # split defaults to test


def test_open_dataset_msls(msls_root: Path) -> None:
    assert detect_format(msls_root).name == "msls"
    ds = open_dataset(msls_root)
    assert ds.layout == "msls" and ds.name == "msls_val"
    assert_same(ds, read_msls(msls_root, "val"))
    assert ds.query_keys == read_msls(msls_root, "val").query_keys
    test = open_dataset(msls_root, msls_split="test", msls_cities=["miami"])
    assert_same(test, read_msls(msls_root, "test", cities=["miami"]))
    down = open_dataset(msls_root, msls_val_split="downloader")
    assert_same(down, read_msls(msls_root, "val", val_split="downloader"))
    n2d = open_dataset(msls_root, msls_subtask="n2d", msls_cities=["sf"])
    assert_same(n2d, read_msls(msls_root, "val", cities=["sf"], subtask="n2d"))
    # What `vprkit eval` passes at its defaults is accepted.
    assert_same(
        open_dataset(msls_root, **{k: v for k, v in OPTION_DEFAULTS.items()}),
        read_msls(msls_root, "val"),
    )


def test_msls_test_only_root(msls_root: Path) -> None:
    # evaluate.read_dataset: a root with test/ only is MSLS with msls_split="test".
    import shutil

    shutil.rmtree(msls_root / "train_val")
    assert detect_format(msls_root).name == "msls"
    ds = open_dataset(msls_root, msls_split="test", msls_cities=["miami"])
    assert_same(ds, read_msls(msls_root, "test", cities=["miami"]))


def test_plain_folders(tmp_path: Path) -> None:
    plain = make_plain(tmp_path)
    assert detect_format(plain).name == "folders"
    ds = open_dataset(plain, no_labels=True)
    assert ds.layout == "folders" and not ds.has_labels()
    assert_same(ds, read_folders(plain / "database", plain / "queries", no_labels=True))
    assert [p.name for p in ds.database_paths] == ["db1.jpg", "db10.jpg", "db2.jpg"]
    with pytest.raises(ValueError, match=r"db1\.jpg.*no_labels=True"):
        open_dataset(plain)
    # With @UTM@ names the same two folders are a VG split folder.
    utm = tmp_path / "utm"
    touch(utm / "database" / utm_name(1, 2))
    touch(utm / "queries" / utm_name(3, 4))
    assert detect_format(utm).name == "vg"
    assert_same(open_dataset(utm), read_vg_dataset(utm))
    # A VPR-Bench ground truth labels plain folders (numbered images).
    bench = make_vprbench(tmp_path)
    (bench / "ref").rename(bench / "database")
    (bench / "query").rename(bench / "queries")
    ds = open_dataset(bench, ground_truth=bench / "ground_truth_new.npy")
    assert ds.layout == "folders" and len(ds.positives) == 12


def test_format_forces_a_layout(tmp_path: Path) -> None:
    both = make_vprbench(tmp_path)
    touch(both / "database" / utm_name(1, 2))
    touch(both / "queries" / utm_name(1, 2))
    with pytest.raises(ValueError, match=r"several layouts \(vg, vprbench\).*format="):
        open_dataset(both)
    assert open_dataset(both, format="vprbench").layout == "vprbench"
    assert open_dataset(both, format="vg").num_database == 1
    assert open_dataset(both, format="folders").layout == "folders"


def test_no_known_layout(tmp_path: Path) -> None:
    (tmp_path / "random").mkdir()
    with pytest.raises(ValueError, match=r"(?s)no known dataset layout.*msls:.*vg:.*folders:"):
        open_dataset(tmp_path / "random")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_dataset(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------
# Options a format cannot honour
# ---------------------------------------------------------------------------------------


def test_refuses_options_the_format_does_not_take(tmp_path: Path, msls_root: Path) -> None:
    bench = make_vprbench(tmp_path)
    with pytest.raises(ValueError, match=r"split was given \(split='val'\).*'vprbench' format"):
        open_dataset(bench, split="val")
    with pytest.raises(ValueError, match=r"no_labels.*'msls' format.*msls_split"):
        open_dataset(msls_root, no_labels=True)
    with pytest.raises(ValueError, match=r"split was given.*'msls' format"):
        open_dataset(msls_root, split="val")
    with pytest.raises(ValueError, match=r"msls_split.*'vg' format"):
        open_dataset(make_vg(tmp_path), msls_split="test")
    with pytest.raises(ValueError, match=r"name was given.*'vg' format"):
        load_dataset(make_vg(tmp_path / "b"), name="SPED")
    with pytest.raises(ValueError, match=r"typo was given.*'vprbench' format"):
        open_dataset(bench, typo=1)
    # At their defaults the same options are ignored.
    assert open_dataset(bench, split="test", msls_split="val", name=None).layout == "vprbench"


# ---------------------------------------------------------------------------------------
# Training data and result files
# ---------------------------------------------------------------------------------------


def test_open_training_data(tmp_path: Path) -> None:
    root = make_vg(tmp_path, split="train")
    radii = {"train_positives_dist_threshold": 20.0, "val_positive_dist_threshold": 30.0}
    data = open_training_data(root, **radii)
    expected = TripletData.from_folder(root, "train", **radii)
    assert_same(data.dataset, expected.dataset)
    assert data.query_ids.tolist() == expected.query_ids.tolist()
    with pytest.raises(ValueError, match=r"msls_cities was given.*'vg' format"):
        open_training_data(root, msls_cities=["london"])
    bench = make_vprbench(tmp_path)
    with pytest.raises(FileNotFoundError, match="no training data found: neither a Mapillary"):
        open_training_data(bench)
    with pytest.raises(ValueError, match="'vprbench' format has no training data"):
        open_training_data(bench, format="vprbench")


def test_write_results(tmp_path: Path, msls_root: Path) -> None:
    test = open_dataset(msls_root, msls_split="test", msls_cities=["miami"])
    run = tmp_path / "run"
    run.mkdir()
    predictions = np.array([[1, 0], [0, 1]])
    assert write_results(test, run, predictions) == [run / "msls_submission.csv"]
    q, db = test.query_keys, test.database_keys
    assert (run / "msls_submission.csv").read_text().splitlines()[0] == f"{q[0]} {db[1]} {db[0]}"
    written = write_results(test, run, predictions, predictions[:, ::-1])
    assert written == [run / "msls_submission.csv", run / "msls_submission_global.csv"]
    assert (run / "msls_submission_global.csv").read_text().splitlines()[0].endswith(db[1])
    other = tmp_path / "other"
    other.mkdir()
    assert write_results(open_dataset(make_vg(tmp_path)), other, predictions) == []
    assert not list(other.iterdir())


# ---------------------------------------------------------------------------------------
# A format added in one file, with no edit elsewhere
# ---------------------------------------------------------------------------------------

CSV_FORMAT = '''
"""A toy layout: <folder>/places.csv with rows path,east,north,side."""

import csv

import numpy as np

from vprkit.data.datasets import PlaceDataset
from vprkit.data.formats import DatasetFormat, register_format


@register_format
class CsvPlaces(DatasetFormat):
    name = "csv_places"
    description = "<folder>/places.csv listing path,east,north,side (database or query)"

    def detect(self, path):
        return (path / "places.csv").is_file()

    def read(self, path, *, no_labels=False):
        sides = {"database": [], "query": []}
        with open(path / "places.csv", newline="") as f:
            for row in csv.DictReader(f):
                sides[row["side"]].append(row)

        def utm(rows):
            return np.array([[float(r["east"]), float(r["north"])] for r in rows]).reshape(-1, 2)

        return PlaceDataset(
            name=path.name,
            root=path,
            database_paths=[path / r["path"] for r in sides["database"]],
            query_paths=[path / r["path"] for r in sides["query"]],
            database_utm=None if no_labels else utm(sides["database"]),
            query_utm=None if no_labels else utm(sides["query"]),
        )
'''


def test_format_added_in_one_file(tmp_path: Path, monkeypatch, restore_registry) -> None:
    plugin = tmp_path / "plugins"
    plugin.mkdir()
    (plugin / "csv_places_format.py").write_text(textwrap.dedent(CSV_FORMAT))
    data = tmp_path / "places"
    data.mkdir()
    rows = ["path,east,north,side", "a.jpg,0,0,database", "b.jpg,50,0,database"]
    rows += ["q.jpg,1,0,query"]
    (data / "places.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match="no known dataset layout"):
        open_dataset(data)

    monkeypatch.syspath_prepend(str(plugin))
    monkeypatch.delitem(sys.modules, "csv_places_format", raising=False)
    importlib.import_module("csv_places_format")
    assert list_formats()[-1] == "csv_places"
    ds = open_dataset(data)
    assert ds.layout == "csv_places" and ds.num_database == 2 and ds.num_queries == 1
    assert ds.query_paths == [data / "q.jpg"]
    np.testing.assert_array_equal(ds.database_utm, [[0, 0], [50, 0]])
    assert not open_dataset(data, no_labels=True).has_labels()
    assert load_dataset(data).layout == "csv_places"  # every caller goes through the registry
    with pytest.raises(ValueError, match=r"split was given.*'csv_places' format"):
        open_dataset(data, split="val")
    with pytest.raises(ValueError, match=r"(?s)Known layouts:.*csv_places: <folder>/places\.csv"):
        open_dataset(tmp_path / "plugins")
    assert write_results(ds, tmp_path, np.zeros((1, 1), int)) == []


# ---------------------------------------------------------------------------------------
# Real data (../shared/data)
# ---------------------------------------------------------------------------------------


def test_real_corridor(shared_data: Path) -> None:
    ds = open_dataset(shared_data / "corridor")
    assert ds.layout == "vprbench" and ds.num_queries == 111 and ds.num_database == 111
    assert_same(ds, load_dataset(shared_data / "corridor"))


def test_real_toy_unlabeled(shared_data: Path) -> None:
    folder = shared_data / "toy_unlabeled"
    ds = open_dataset(folder, no_labels=True)
    assert ds.layout == "folders" and ds.num_database == 17 and ds.num_queries == 5
    assert_same(ds, read_folders(folder / "database", folder / "queries", no_labels=True))
    assert_same(ds, read_vg_dataset(folder, no_labels=True))  # how load_dataset read it before
    with pytest.raises(ValueError, match="no_labels=True"):
        open_dataset(folder)
