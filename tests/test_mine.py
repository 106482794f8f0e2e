"""`vprkit mine`: R2Former's pre-computed hard negatives, on a tiny VG train split (a line of
database images every 5 m, a few queries beside it, one of them dropped)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_triplets import EAST0, KEPT_IDS, NORTH0, NUM_DB, QUERIES  # the same line of places
from torch import nn

from vprkit.cli import main as cli_main
from vprkit.data.images import Preprocess
from vprkit.data.triplets import TripletData, TripletMiner, load_hard_negatives
from vprkit.mine import hard_negatives_from_descriptors, mine_hard_negatives, sidecar_path
from vprkit.models.outputs import DescriptorOutput


def _within(qid: int, radius: float) -> set[int]:
    qe, qn = QUERIES[qid]
    return {i for i in range(NUM_DB) if math.hypot(5.0 * i - qe, qn) <= radius}


@pytest.fixture(scope="module")
def dataset_folder(tmp_path_factory) -> Path:
    """Solid-colour PNGs: red = image index, green = 0 (database) or 255 (query)."""
    root = tmp_path_factory.mktemp("vg") / "line"
    db = root / "images" / "train" / "database"
    q = root / "images" / "train" / "queries"
    db.mkdir(parents=True)
    q.mkdir(parents=True)
    for i in range(NUM_DB):
        Image.new("RGB", (8, 8), (i, 0, 90)).save(db / f"@{EAST0 + 5 * i:.2f}@{NORTH0:.2f}@.png")
    for j, (e, n) in enumerate(QUERIES):
        Image.new("RGB", (8, 8), (j, 255, 90)).save(
            q / f"@{EAST0 + e:.2f}@{NORTH0 + n:.2f}@q{j}@.png"
        )
    return root


@pytest.fixture(scope="module")
def data(dataset_folder) -> TripletData:
    return TripletData.from_folder(dataset_folder)


def reference(db, queries, soft, candidates, keep):
    """Brute force: float64 distances of normalized rows, ties to the lower index."""
    db = np.asarray(db, np.float64)
    queries = np.asarray(queries, np.float64)
    db = db / np.linalg.norm(db, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    out = np.full((len(queries), keep), -1, dtype=np.int64)
    for i, q in enumerate(queries):
        dist = ((db - q) ** 2).sum(axis=1)
        order = np.lexsort((np.arange(len(db)), dist))[:candidates]
        negatives = [j for j in order if j not in set(soft[i].tolist())][:keep]
        out[i, : len(negatives)] = negatives
    return out


# --------------------------------------------------------------------------- pure function


def test_matches_brute_force_with_ties_removal_and_padding():
    rng = np.random.default_rng(0)
    db = rng.normal(size=(40, 16)).astype(np.float32)
    db[17] = db[5]  # an exact tie: 5 must come first
    queries = rng.normal(size=(6, 16)).astype(np.float32)
    queries[0] = db[5] + 0.01 * rng.normal(size=16)  # ranks 5 then 17 first
    ranked = reference(db, queries, [np.empty(0, np.int64)] * 6, 40, 40)
    soft = [
        np.empty(0, np.int64),  # nothing removed: a full row
        np.sort(ranked[1, :10]),  # its 10 nearest removed: 5 of 15 candidates left, padded
        np.array([0, 1, 2, 3], np.int64),
        np.sort(rng.choice(40, 20, replace=False)),
        np.arange(40),  # everything is a soft positive: an all -1 row
        ranked[5, 2:3],  # one in the middle: order kept around it
    ]
    got = hard_negatives_from_descriptors(db, queries, soft, candidates=15, keep=10)
    want = reference(db, queries, soft, 15, 10)
    assert got.dtype == np.int64 and got.shape == (6, 10)
    np.testing.assert_array_equal(got, want)
    assert got[0, :2].tolist() == [5, 17]
    assert got[1, :5].tolist() == ranked[1, 10:15].tolist() and (got[1, 5:] == -1).all()
    assert (got[4] == -1).all()
    assert got[5].tolist() == [*ranked[5, :2], *ranked[5, 3:11]]
    for row, s in zip(got, soft, strict=True):
        assert not np.isin(row, s).any()


def test_small_database_is_searched_whole_without_warning():
    rng = np.random.default_rng(1)
    db = rng.normal(size=(12, 8))
    queries = rng.normal(size=(3, 8))
    soft = [np.array([0, 5], np.int64), np.empty(0, np.int64), np.arange(4, 12)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the search warns when k > database; not here
        got = hard_negatives_from_descriptors(db, queries, soft, candidates=500, keep=200)
    assert got.shape == (3, 200)
    np.testing.assert_array_equal(got, reference(db, queries, soft, 500, 200))
    assert [int((row >= 0).sum()) for row in got] == [10, 12, 4]
    # The bounded-memory search gives the same table.
    bounded = hard_negatives_from_descriptors(
        db, queries, soft, candidates=500, keep=200, memory_budget_bytes=1 << 20
    )
    np.testing.assert_array_equal(bounded, got)


@pytest.mark.parametrize(
    ("candidates", "keep", "match"),
    [
        (10, 20, "keep=20 is larger than candidates=10"),
        (0, 0, "candidates must be a positive integer"),
        (10, -1, "keep must be a positive integer"),
        (10.0, 5, "candidates must be a positive integer"),
    ],
)
def test_bad_counts(candidates, keep, match):
    db = np.ones((4, 2))
    with pytest.raises(ValueError, match=match):
        hard_negatives_from_descriptors(db, db, [np.empty(0)] * 4, candidates=candidates, keep=keep)


def test_soft_positives_must_match_queries():
    db = np.eye(3)
    with pytest.raises(ValueError, match="soft positives for 2 queries but 3"):
        hard_negatives_from_descriptors(db, db, [np.empty(0)] * 2, candidates=3, keep=2)


# --------------------------------------------------------------------------- with a model


class LookupModel(nn.Module):
    """Returns a fixed descriptor per image, read from the image's colour (see the fixture)."""

    def __init__(self, db: np.ndarray, queries: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("db", torch.as_tensor(db, dtype=torch.float32))
        self.register_buffer("queries", torch.as_tensor(queries, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> DescriptorOutput:
        rgb = torch.round(x.mean(dim=(2, 3)) * 255).long()
        index, is_query = rgb[:, 0], rgb[:, 1] > 127
        desc = torch.where(
            is_query[:, None],
            self.queries[index.clamp(max=len(self.queries) - 1)],
            self.db[index.clamp(max=len(self.db) - 1)],
        )
        return DescriptorOutput(global_desc=desc)


def test_rows_follow_the_kept_queries(data):
    rng = np.random.default_rng(2)
    db = rng.normal(size=(NUM_DB, 16))
    all_queries = rng.normal(size=(len(QUERIES), 16))
    model = LookupModel(db, all_queries)
    got = mine_hard_negatives(
        model, data, Preprocess(image_size=(8, 8), normalize=False), candidates=18, keep=12
    )
    assert data.query_ids.tolist() == KEPT_IDS
    # Built independently of TripletData: descriptors of the kept queries, 25 m by hand.
    soft = [np.array(sorted(_within(j, 25.0)), np.int64) for j in KEPT_IDS]
    want = reference(db, all_queries[KEPT_IDS], soft, 18, 12)
    assert got.shape == (4, 12)
    np.testing.assert_array_equal(got, want)


def test_counts_are_checked_before_extraction(data):
    class Exploding(nn.Module):
        def forward(self, x):
            raise AssertionError("extraction should not start")

    with pytest.raises(ValueError, match="keep=300 is larger than candidates=200"):
        mine_hard_negatives(Exploding(), data, Preprocess(), candidates=200, keep=300)


# --------------------------------------------------------------------------- command line


def mine_args(dataset_folder: Path, out: Path, *extra: str) -> list[str]:
    return [
        "mine",
        "--dataset_folder",
        str(dataset_folder),
        "--out",
        str(out),
        "--model_option",
        "depth=1",
        "--model_option",
        "img_size=(32, 32)",
        "--weights",
        "random",
        "--image_size",
        "32",
        "32",
        "--batch_size",
        "8",
        "--num_workers",
        "0",
        "--device",
        "cpu",
        *extra,
    ]


@pytest.fixture(scope="module")
def mined(dataset_folder, tmp_path_factory) -> tuple[Path, str]:
    """One `vprkit mine` run with a tiny R2Former: the file and what it printed."""
    out = tmp_path_factory.mktemp("mined") / "hard_negatives.npy"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert cli_main(mine_args(dataset_folder, out, "--keep", "25")) == 0
    return out, stdout.getvalue()


def test_cli_writes_a_file_training_can_read(mined, data):
    out, _ = mined
    table = load_hard_negatives(out, data.num_queries, data.num_database)
    assert table.shape == (4, 25)
    assert np.load(out).dtype == np.int64
    for j, row in enumerate(table):
        valid = row[row >= 0]
        assert (row[len(valid) :] == -1).all()  # padding only at the end
        # 500 candidates > 30 images: every non-soft image is ranked, in some order.
        qid = int(data.query_ids[j])
        assert sorted(valid.tolist()) == sorted(set(range(NUM_DB)) - _within(qid, 25.0))
    assert (table == -1).any(axis=1).all()  # 30 - 9..10 soft positives < 25: all padded


def test_cli_file_drives_precomputed_mining(mined, data):
    out, _ = mined
    miner = TripletMiner(
        data,
        "precomputed",
        hard_negatives_file=out,
        neg_hardness=10,
        negs_num_per_query=3,
        cache_refresh_rate=4,
    )
    table = np.load(out)
    triplets = miner.mine(None, epoch=0, refresh=0)
    assert len(triplets) == 4
    for qid, negatives in zip(triplets.query_indices, triplets.negative_indices, strict=True):
        row = KEPT_IDS.index(int(qid))
        assert not set(negatives.tolist()) & _within(int(qid), 25.0)
        assert set(negatives.tolist()) <= set(table[row, :10].tolist())


def test_cli_sidecar_and_summary(mined, dataset_folder):
    out, printed = mined
    side = sidecar_path(out)
    assert side.name == "hard_negatives.npy.json"
    info = json.loads(side.read_text())
    assert info["method"] == "r2former" and info["weights"] == "random"
    assert info["random_init"] is True and info["seed"] == 0
    assert info["model_options"] == {"depth": 1, "img_size": [32, 32]}
    assert info["dataset_folder"] == str(dataset_folder) and info["split"] == "train"
    assert info["num_queries"] == 4 and info["num_dropped_queries"] == 1
    assert info["num_database"] == NUM_DB and info["shape"] == [4, 25]
    assert info["candidates"] == 500 and info["keep"] == 25
    assert info["positive_radius"] == 10.0 and info["non_negative_radius"] == 25.0
    assert info["image_size"] == [32, 32] and info["rows_with_fewer_than_keep"] == 4
    assert info["vprkit_version"]
    assert "30 database images, 4 training queries (1 without" in printed
    assert "4 row(s) have fewer than 25 negatives" in printed
    assert str(out) in printed


def test_cli_options_reach_the_file(dataset_folder, tmp_path):
    out = tmp_path / "hn.npy"
    args = mine_args(dataset_folder, out, "--candidates", "8", "--keep", "5")
    args += ["--positive_radius", "2.5", "--non_negative_radius", "12", "--split", "train"]
    assert cli_main(args) == 0
    table = np.load(out)
    # Within 2.5 m only queries 0 ((12, 1) m: 2.2 m from 10 m) and 3 ((101, 0): 1 m from 100 m).
    assert table.shape == (2, 5)
    soft = [_within(0, 12.0), _within(3, 12.0)]
    for row, s in zip(table, soft, strict=True):
        assert not set(row.tolist()) & s
    assert json.loads(sidecar_path(out).read_text())["candidates"] == 8


# --------------------------------------------------------------------------- errors


@pytest.fixture
def no_model(monkeypatch):
    """Fails if the model gets built: argument errors must come before any expensive work."""

    from vprkit import cli_args

    build = cli_args.create_model

    def fail(*args, **kwargs):
        # The options are checked on a model on the meta device (no memory, no weights).
        if torch.get_default_device().type != "meta":
            raise AssertionError("the model was built before the arguments were checked")
        return build(*args, **kwargs)

    monkeypatch.setattr("vprkit.cli_args.create_model", fail)


def _refused(argv: list[str], capsys, status: int, match: str) -> None:
    """`vprkit mine ARGV` fails with `status` and one line on stderr matching `match`."""
    assert cli_main(argv) == status
    # Progress bars may precede it (they end with a carriage return, not a newline).
    lines = [line for line in re.split(r"[\r\n]", capsys.readouterr().err) if "error" in line]
    assert len(lines) == 1 and lines[0].startswith("vprkit mine: error: "), lines
    assert re.search(match, lines[0]), lines


@pytest.mark.usefixtures("no_model")
@pytest.mark.parametrize(
    ("extra", "status", "match"),
    [
        (["--keep", "600"], 2, "--keep: 600 is larger than --candidates 500"),
        (["--candidates", "0"], 2, "--candidates: expected a positive integer"),
        (["--keep", "-3"], 2, "--keep: expected a positive integer"),
        (["--positive_radius", "0"], 2, "--positive_radius.*expected a number > 0"),
        (["--non_negative_radius", "5"], 2, "must be at least --positive_radius"),
        (["--batch_size", "0"], 2, "--batch_size.*expected a positive integer"),
        (["--image_size", "1", "2", "3"], 2, "--image_size.*takes one value"),
        (["--method", "nope"], 2, "unknown method 'nope'"),
    ],
)
def test_bad_arguments(dataset_folder, tmp_path, capsys, extra, status, match):
    _refused(mine_args(dataset_folder, tmp_path / "hn.npy", *extra), capsys, status, match)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.usefixtures("no_model")
def test_missing_dataset_folder(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    argv = mine_args(missing, tmp_path / "hn.npy")
    _refused(
        argv, capsys, 2, re.escape(f"--dataset_folder/--dataset-folder: no such folder: {missing}")
    )


@pytest.mark.usefixtures("no_model")
def test_dataset_folder_without_a_train_split(tmp_path, capsys):
    argv = mine_args(tmp_path, tmp_path / "hn.npy")
    _refused(argv, capsys, 1, "neither a Mapillary SLS root .* nor a VG dataset")


@pytest.mark.usefixtures("no_model")
def test_output_folder_must_exist(dataset_folder, tmp_path, capsys):
    out = tmp_path / "missing" / "hn.npy"
    _refused(
        mine_args(dataset_folder, out),
        capsys,
        1,
        re.escape(f"the folder {out.parent} does not exist"),
    )
    assert not out.parent.exists()


@pytest.mark.usefixtures("no_model")
def test_output_must_not_be_a_folder(dataset_folder, tmp_path, capsys):
    _refused(
        mine_args(dataset_folder, tmp_path), capsys, 2, re.escape(f"--out: {tmp_path} is a folder")
    )


@pytest.mark.usefixtures("no_model")
def test_output_folder_must_be_writable(dataset_folder, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o500)
    real_access = os.access
    # root may write anywhere: the check is made to see the folder as a user would.
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if Path(p) == folder else real_access(p, mode)
    )
    try:
        _refused(mine_args(dataset_folder, folder / "hn.npy"), capsys, 1, "is not writable")
    finally:
        folder.chmod(0o700)


def test_failed_mining_leaves_an_existing_file_untouched(dataset_folder, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(dataset_folder, broken)
    (broken / "images/train/database" / f"@{EAST0 + 1:.2f}@{NORTH0:.2f}@.png").write_bytes(
        b"not an image"
    )
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "hn.npy"
    out.write_bytes(b"old table")
    sidecar_path(out).write_text("old sidecar")
    _refused(mine_args(broken, out), capsys, 1, "not an image|cannot (load|identify)")
    assert out.read_bytes() == b"old table"
    assert sidecar_path(out).read_text() == "old sidecar"
    assert sorted(p.name for p in out_dir.iterdir()) == ["hn.npy", "hn.npy.json"]
