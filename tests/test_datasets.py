"""Dataset readers: VG, VPR-Bench, GSV-Cities val lists, plain folders, the safe .npy loader."""

from __future__ import annotations

import io
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from numpy.lib import format as npy_format
from PIL import Image

from vprkit.data.datasets import (
    PlaceDataset,
    load_dataset,
    load_npy_safe,
    load_vprbench_ground_truth,
    parse_utm,
    read_folders,
    read_gsv_val,
    read_images_paths,
    read_vg_dataset,
    read_vprbench,
)

VPRBENCH_SETS = [
    "17places",
    "GardensPointWalking",
    "GardensPoint_TN",
    "Living",
    "Nordland",
    "Pittsburgh",
    "SPEDTEST",
    "Tokyo247",
]


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def touch(path: Path) -> Path:
    """An empty image file: the readers list files and never decode them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def utm_name(east: float, north: float, extra: str = "") -> str:
    return f"@{east}@{north}@{extra}@.jpg"


def make_vg(tmp_path: Path, split: str = "test") -> Path:
    root = tmp_path / "myset"
    split_dir = root / "images" / split
    # Nested subfolder: VG readers search recursively.
    touch(split_dir / "database" / utm_name(10.0, 20.0))
    touch(split_dir / "database" / "sub" / utm_name(30.5, 40.25, "pano"))
    touch(split_dir / "database" / utm_name(5.0, 6.0, "x"))
    # A real JPEG among them, so the tree looks like a dataset, not only placeholders.
    jpeg = touch(split_dir / "queries" / utm_name(11.0, 21.0))
    Image.new("RGB", (8, 6), (10, 200, 30)).save(jpeg)
    touch(split_dir / "queries" / utm_name(31.0, 41.0))
    return root


def save_object_array(path: Path, rows: list) -> Path:
    table = np.empty(len(rows), dtype=object)
    for i, row in enumerate(rows):
        table[i] = row
    np.save(path, table, allow_pickle=True)
    return path


def save_vprbench_gt(path: Path, refs_per_query: list) -> Path:
    table = np.empty((len(refs_per_query), 2), dtype=object)
    for i, refs in enumerate(refs_per_query):
        table[i, 0] = i
        table[i, 1] = refs
    np.save(path, table, allow_pickle=True)
    return path


def make_vprbench(tmp_path: Path, n_query: int = 12, n_ref: int = 12, gt: list | None = None):
    folder = tmp_path / "bench"
    # Unpadded numbers: string order (0, 1, 10, 11, 2...) differs from numeric order.
    for i in range(n_query):
        touch(folder / "query" / f"{i}.jpg")
    for i in range(n_ref):
        touch(folder / "ref" / f"{i}.jpg")
    if gt is None:
        gt = [[max(0, i - 1), i, min(n_ref - 1, i + 1)] for i in range(n_query)]
    save_vprbench_gt(folder / "ground_truth_new.npy", gt)
    return folder


def write_npy_with_pickle(path: Path, payload: bytes, shape: tuple = (1,)) -> Path:
    """A .npy whose header says 'object array' and whose body is an arbitrary pickle."""
    with open(path, "wb") as f:
        npy_format.write_array_header_1_0(
            f, {"descr": "|O", "fortran_order": False, "shape": shape}
        )
        f.write(payload)
    return path


class _CallsSystem:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def make_gsv(tmp_path: Path, name: str = "SPED") -> tuple[Path, Path]:
    lists = tmp_path / "gt_root" / name
    images = tmp_path / "sped_images"
    db = [f"ref/{i:05d}.jpg" for i in range(6)]
    q = [f"query/{i:05d}.jpg" for i in range(3)]
    for rel in db + q:
        touch(images / rel)
    lists.mkdir(parents=True)
    np.save(lists / f"{name}_dbImages.npy", np.array(db))
    np.save(lists / f"{name}_qImages.npy", np.array(q))
    save_object_array(
        lists / f"{name}_gt.npy", [np.array([0, 1]), np.array([2]), np.array([5, 3, 4])]
    )
    return lists, images


# ---------------------------------------------------------------------------------------
# PlaceDataset and parse_utm
# ---------------------------------------------------------------------------------------


def test_place_dataset_labels_and_repr(tmp_path):
    paths = [tmp_path / "a.jpg", tmp_path / "b.jpg"]
    unlabelled = PlaceDataset("x", tmp_path, paths, paths[:1])
    assert not unlabelled.has_labels()
    with_utm = PlaceDataset("x", tmp_path, paths, paths[:1], np.zeros((2, 2)), np.zeros((1, 2)))
    assert with_utm.has_labels()
    with_pos = PlaceDataset("x", tmp_path, paths, paths[:1], positives=[np.array([1])])
    assert with_pos.has_labels()
    assert "#database=2" in repr(with_pos) and "a.jpg" not in repr(with_pos)
    with pytest.raises(ValueError, match="shape"):
        PlaceDataset("x", tmp_path, paths, paths[:1], np.zeros((3, 2)), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="positive lists"):
        PlaceDataset("x", tmp_path, paths, paths[:1], positives=[])


def test_parse_utm():
    assert parse_utm("/data/@585000.5@4477000.25@17@N@.jpg") == (585000.5, 4477000.25)
    assert parse_utm(Path("x") / "@1@2@.png") == (1.0, 2.0)
    # Only the file name is split: an "@" in a folder name must not shift the fields.
    assert parse_utm("/we@ird/@3@4@.jpg") == (3.0, 4.0)
    for bad in ["db1.jpg", "@12@.jpg", "@east@north@.jpg", "@nan@1@.jpg", "@1@inf@.jpg"]:
        with pytest.raises(ValueError, match=re.escape(f"/d/{bad}: ")):
            parse_utm(f"/d/{bad}")


# ---------------------------------------------------------------------------------------
# VG layout
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ["", "images", "images/test"])
def test_read_vg_dataset_entry_points(tmp_path, entry):
    root = make_vg(tmp_path)
    ds = read_vg_dataset(root / entry if entry else root)
    split_dir = root / "images" / "test"
    assert ds.layout == "vg" and ds.name == "myset" and ds.root == split_dir
    assert ds.database_paths == sorted(ds.database_paths, key=str)
    assert all(p.is_absolute() for p in ds.database_paths + ds.query_paths)
    assert [p.relative_to(split_dir).as_posix() for p in ds.database_paths] == [
        "database/@10.0@20.0@@.jpg",
        "database/@5.0@6.0@x@.jpg",
        "database/sub/@30.5@40.25@pano@.jpg",
    ]
    np.testing.assert_array_equal(ds.database_utm, [[10, 20], [5, 6], [30.5, 40.25]])
    np.testing.assert_array_equal(ds.query_utm, [[11, 21], [31, 41]])
    assert ds.database_utm.dtype == np.float64 and ds.positives is None and ds.has_labels()


def test_read_vg_dataset_split_and_folder_names(tmp_path):
    root = make_vg(tmp_path, split="val")
    assert read_vg_dataset(root, split="val").num_database == 3
    with pytest.raises(FileNotFoundError, match="images/test"):
        read_vg_dataset(root)  # split defaults to test
    # SVOX-style query folder names.
    split_dir = root / "images" / "val"
    (split_dir / "queries").rename(split_dir / "queries_night")
    ds = read_vg_dataset(root, "val", queries_folder="queries_night")
    assert ds.num_queries == 2


def test_vg_skips_hidden_and_non_images(tmp_path):
    root = make_vg(tmp_path)
    db = root / "images" / "test" / "database"
    touch(db / "._@1@2@.jpg")  # macOS resource fork
    touch(db / ".cache" / "@1@2@.jpg")
    touch(db / "notes.txt")
    touch(db / "@7@8@.PNG")
    ds = read_vg_dataset(root)
    assert sorted(p.name for p in ds.database_paths) == sorted(
        ["@10.0@20.0@@.jpg", "@5.0@6.0@x@.jpg", "@30.5@40.25@pano@.jpg", "@7@8@.PNG"]
    )


def test_vg_no_labels_and_unparsable_names(tmp_path):
    split_dir = tmp_path / "plain" / "images" / "test"
    touch(split_dir / "database" / "db1.jpg")
    touch(split_dir / "queries" / "q1.jpg")
    with pytest.raises(ValueError, match=r"db1\.jpg.*no_labels=True"):
        read_vg_dataset(tmp_path / "plain")
    ds = read_vg_dataset(tmp_path / "plain", no_labels=True)
    assert ds.database_utm is None and not ds.has_labels()


def test_vg_missing_and_empty_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_vg_dataset(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="database/ and queries/"):
        read_vg_dataset(tmp_path)
    split_dir = tmp_path / "empty" / "images" / "test"
    touch(split_dir / "queries" / utm_name(1, 2))
    (split_dir / "database").mkdir()
    touch(split_dir / "database" / "readme.txt")
    with pytest.raises(FileNotFoundError, match=r"database does not contain any images"):
        read_vg_dataset(tmp_path / "empty")


def test_images_paths_txt_is_used(tmp_path):
    root = make_vg(tmp_path)
    split_dir = root / "images" / "test"
    # Lists only two of the three images: proves the file, not a folder walk, was read.
    (split_dir / "database_images_paths.txt").write_text(
        "sub/@30.5@40.25@pano@.jpg\n@10.0@20.0@@.jpg\n\n"
    )
    ds = read_vg_dataset(root)
    assert [p.name for p in ds.database_paths] == ["@10.0@20.0@@.jpg", "@30.5@40.25@pano@.jpg"]
    assert ds.database_paths[1] == split_dir / "database" / "sub" / "@30.5@40.25@pano@.jpg"
    np.testing.assert_array_equal(ds.database_utm, [[10, 20], [30.5, 40.25]])
    assert len(ds.query_paths) == 2  # no list for queries: walked


def test_images_paths_txt_errors(tmp_path):
    root = make_vg(tmp_path)
    db = root / "images" / "test" / "database"
    listing = db.parent / "database_images_paths.txt"
    listing.write_text("@10.0@20.0@@.jpg\n@99@99@.jpg\n")
    # The missing file is the last line: the sample check always includes it.
    with pytest.raises(FileNotFoundError, match=r"@99@99@\.jpg.*database_images_paths\.txt"):
        read_images_paths(db)
    names = [f"@{i}@{i}@.jpg" for i in range(100)]
    for n in names:
        touch(db / n)
    listing.write_text("\n".join(names[:50] + ["@missing@1@.jpg"] + names[50:]) + "\n")
    with pytest.raises(FileNotFoundError, match="1 of 101 listed files are missing"):
        read_images_paths(db, check="all")
    listing.write_text("@10.0@20.0@@.jpg\n./@10.0@20.0@@.jpg\n")
    with pytest.raises(ValueError, match="duplicate image name"):
        read_images_paths(db)
    listing.write_text("\n")
    with pytest.raises(FileNotFoundError, match="lists no images"):
        read_images_paths(db)
    with pytest.raises(ValueError, match="check must be"):
        read_images_paths(db, check="none")


# ---------------------------------------------------------------------------------------
# Safe .npy loading
# ---------------------------------------------------------------------------------------


def test_load_npy_safe_plain_and_object_arrays(tmp_path):
    np.save(tmp_path / "ints.npy", np.arange(5))
    np.testing.assert_array_equal(load_npy_safe(tmp_path / "ints.npy"), np.arange(5))
    # Lists holding NumPy scalars need scalar reconstruction; empty arrays too.
    rows = [[np.int64(3), 4], np.array([], dtype=np.int64), np.array([1, 2], dtype=np.int32)]
    loaded = load_npy_safe(save_object_array(tmp_path / "obj.npy", rows))
    assert loaded.dtype == object and loaded.shape == (3,)
    assert loaded[0] == [3, 4] and loaded[1].size == 0 and loaded[2].tolist() == [1, 2]


def test_load_npy_safe_protocol_2_pickle(tmp_path):
    # Protocol-2 pickles from Python 3 encode bytes via _codecs.encode(..., "latin1").
    table = np.empty(2, dtype=object)
    table[0], table[1] = np.array([1, 2]), np.array([7])
    path = write_npy_with_pickle(tmp_path / "p2.npy", pickle.dumps(table, protocol=2), (2,))
    loaded = load_npy_safe(path)
    assert loaded[0].tolist() == [1, 2] and loaded[1].tolist() == [7]


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    table = np.empty(1, dtype=object)
    table[0] = _CallsSystem(marker)
    path = tmp_path / "evil.npy"
    np.save(path, table, allow_pickle=True)
    with pytest.raises(ValueError, match=r"evil\.npy.*refusing to load '(posix|os|nt)\.system'"):
        load_npy_safe(path)
    assert not marker.exists()
    with pytest.raises(ValueError, match="evil.npy"):
        load_vprbench_ground_truth(path)
    assert not marker.exists()


def test_malformed_pickles(tmp_path):
    evil = pickle.dumps(eval, protocol=4)  # builtins.eval by reference
    with pytest.raises(ValueError, match=r"e\.npy.*builtins\.eval"):
        load_npy_safe(write_npy_with_pickle(tmp_path / "e.npy", evil))
    with pytest.raises(ValueError, match=r"d\.npy.*header promises"):
        load_npy_safe(write_npy_with_pickle(tmp_path / "d.npy", pickle.dumps({"a": 1})))
    good = io.BytesIO()
    np.save(good, np.array([[0, [1]]], dtype=object), allow_pickle=True)
    (tmp_path / "t.npy").write_bytes(good.getvalue()[:-20])
    with pytest.raises(ValueError, match=r"t\.npy.*malformed pickle"):
        load_npy_safe(tmp_path / "t.npy")
    (tmp_path / "n.npy").write_bytes(b"not numpy at all")
    with pytest.raises(ValueError, match=r"n\.npy.*not a readable \.npy"):
        load_npy_safe(tmp_path / "n.npy")
    with pytest.raises(FileNotFoundError, match="absent.npy"):
        load_npy_safe(tmp_path / "absent.npy")


# ---------------------------------------------------------------------------------------
# VPR-Bench
# ---------------------------------------------------------------------------------------


def test_read_vprbench_numeric_order_and_positives(tmp_path):
    gt = [[0, 1]] + [i for i in range(1, 11)] + [np.array([11, 10], dtype=np.int64)]
    ds = read_vprbench(make_vprbench(tmp_path, gt=gt))
    assert ds.layout == "vprbench" and ds.name == "bench" and ds.database_utm is None
    assert [p.name for p in ds.query_paths] == [f"{i}.jpg" for i in range(12)]
    assert [p.name for p in ds.database_paths] == [f"{i}.jpg" for i in range(12)]
    assert ds.positives[0].tolist() == [0, 1] and ds.positives[5].tolist() == [5]
    assert ds.positives[11].tolist() == [10, 11]  # sorted
    assert all(p.dtype == np.int64 for p in ds.positives)


def test_vprbench_ground_truth_forms(tmp_path):
    # -1 is VPR-Bench's "no match" (GardensPoint_TN); duplicates collapse; (N,) of rows too.
    path = save_object_array(tmp_path / "gt.npy", [[0, [-1]], [1, [2, 2, 1]], [2, 0]])
    pos = load_vprbench_ground_truth(path, num_queries=3, num_database=3)
    assert [p.tolist() for p in pos] == [[], [1, 2], [0]]
    np.save(tmp_path / "int.npy", np.array([[0, 2], [1, 0]]))  # not pickled at all
    assert [p.tolist() for p in load_vprbench_ground_truth(tmp_path / "int.npy")] == [[2], [0]]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([[0, [1.5]]], "integer"),
        ([[0, ["3"]]], "integer"),
        ([[0, {"a": 1}]], "integer"),
        ([[0, True]], "integer"),
        ([[0.0, [1]]], "not an integer"),
        ([[1, [1]]], "rows must be in query order"),
        ([[0, [-2]]], "out of range"),
        ([[0, [1], 5]], "pair"),
    ],
)
def test_vprbench_ground_truth_content_refused(tmp_path, rows, message):
    path = save_object_array(tmp_path / "gt.npy", rows)
    with pytest.raises(ValueError, match=message):
        load_vprbench_ground_truth(path)


def test_vprbench_errors(tmp_path):
    folder = make_vprbench(tmp_path, gt=[[i] for i in range(11)] + [[12]])
    with pytest.raises(ValueError, match=r"ground_truth_new\.npy: query 11.*index 12.*0\.\.11"):
        read_vprbench(folder)
    save_vprbench_gt(folder / "ground_truth_new.npy", [[0]] * 5)
    with pytest.raises(ValueError, match="has 5 rows but there are 12 queries"):
        read_vprbench(folder)
    (folder / "ground_truth_new.npy").unlink()
    with pytest.raises(FileNotFoundError, match="no_labels=True"):
        read_vprbench(folder)
    ds = read_vprbench(folder, no_labels=True)
    assert ds.positives is None and not ds.has_labels()
    touch(folder / "ref" / "011.jpg")  # same number as 11.jpg
    with pytest.raises(ValueError, match="duplicate image number 11"):
        read_vprbench(folder, no_labels=True)
    (folder / "ref" / "011.jpg").unlink()
    for odd in ["night.jpg", "1_0.jpg"]:
        touch(folder / "query" / odd)
        with pytest.raises(ValueError, match=rf"{re.escape(odd)}.*named by number"):
            read_vprbench(folder, no_labels=True)
        (folder / "query" / odd).unlink()
    empty = tmp_path / "empty"
    (empty / "query").mkdir(parents=True)
    (empty / "ref").mkdir()
    with pytest.raises(FileNotFoundError, match="does not contain any images"):
        read_vprbench(empty, no_labels=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_vprbench(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------
# GSV-Cities validation lists
# ---------------------------------------------------------------------------------------


def test_read_gsv_val(tmp_path):
    lists, images = make_gsv(tmp_path)
    ds = read_gsv_val(lists, "SPED", image_root=images)
    assert ds.layout == "gsv_val" and ds.name == "SPED" and ds.root == images
    assert ds.database_paths[0] == images / "ref" / "00000.jpg"
    assert ds.query_paths[-1] == images / "query" / "00002.jpg"
    assert [p.tolist() for p in ds.positives] == [[0, 1], [2], [3, 4, 5]]
    # Same-length positives are saved by np.save as a plain 2-D integer array.
    np.save(lists / "SPED_gt.npy", np.array([[0, 1], [2, 3], [4, 5]]))
    assert read_gsv_val(lists, "SPED", image_root=images).positives[2].tolist() == [4, 5]


def test_read_gsv_val_msls_style(tmp_path):
    lists, images = make_gsv(tmp_path, name="msls_val")
    (lists / "msls_val_gt.npy").unlink()
    np.save(lists / "msls_val_qIdx.npy", np.array([2, 0]))
    save_object_array(lists / "msls_val_pIdx.npy", [np.array([4]), np.array([0, 1])])
    ds = read_gsv_val(lists, "msls_val", image_root=images)
    assert [p.name for p in ds.query_paths] == ["00002.jpg", "00000.jpg"]
    assert [p.tolist() for p in ds.positives] == [[4], [0, 1]]


def test_gsv_val_errors(tmp_path):
    lists, images = make_gsv(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"ref/00000\.jpg.*SPED_dbImages\.npy"):
        read_gsv_val(lists, "SPED")  # image root defaults to the lists folder: wrong here
    save_object_array(lists / "SPED_gt.npy", [np.array([0]), np.array([6]), np.array([1])])
    with pytest.raises(ValueError, match=r"SPED_gt\.npy: query 1.*index 6"):
        read_gsv_val(lists, "SPED", image_root=images)
    save_object_array(lists / "SPED_gt.npy", [np.array([0]), np.array([1])])
    with pytest.raises(ValueError, match="2 rows but there are 3 queries"):
        read_gsv_val(lists, "SPED", image_root=images)
    save_object_array(lists / "SPED_gt.npy", [np.array([0.5]), [1], [2]])
    with pytest.raises(ValueError, match="integer"):
        read_gsv_val(lists, "SPED", image_root=images)
    np.save(lists / "SPED_qImages.npy", np.array(["query/00000.jpg", "query/00000.jpg"]))
    with pytest.raises(ValueError, match="duplicate image name 'query/00000.jpg'"):
        read_gsv_val(lists, "SPED", image_root=images)
    (lists / "SPED_gt.npy").unlink()
    with pytest.raises(FileNotFoundError, match="SPED_gt.npy"):
        read_gsv_val(lists, "SPED", image_root=images)
    with pytest.raises(FileNotFoundError, match="Other_dbImages.npy"):
        read_gsv_val(lists, "Other", image_root=images)


def test_gsv_val_refuses_malicious_list(tmp_path):
    lists, images = make_gsv(tmp_path)
    marker = tmp_path / "pwned"
    table = np.empty(1, dtype=object)
    table[0] = _CallsSystem(marker)
    np.save(lists / "SPED_qImages.npy", table, allow_pickle=True)
    with pytest.raises(ValueError, match=r"SPED_qImages\.npy.*refusing"):
        read_gsv_val(lists, "SPED", image_root=images)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------
# Plain folders
# ---------------------------------------------------------------------------------------


def test_read_folders_labels(tmp_path):
    touch(tmp_path / "db" / utm_name(1, 2))
    touch(tmp_path / "db" / utm_name(3, 4))
    touch(tmp_path / "q" / utm_name(1.5, 2.5))
    ds = read_folders(tmp_path / "db", tmp_path / "q")
    assert ds.layout == "folders" and ds.root == tmp_path
    np.testing.assert_array_equal(ds.query_utm, [[1.5, 2.5]])
    ds = read_folders(tmp_path / "db", tmp_path / "q", no_labels=True)
    assert ds.query_utm is None and not ds.has_labels()
    with pytest.raises(ValueError, match="exclude each other"):
        read_folders(tmp_path / "db", tmp_path / "q", tmp_path / "gt.npy", no_labels=True)


def test_read_folders_with_vprbench_ground_truth(tmp_path):
    for i in range(11):
        touch(tmp_path / "refs" / f"{i}.jpg")
    for i in range(3):
        touch(tmp_path / "qs" / f"{i}.png")
    gt = save_vprbench_gt(tmp_path / "gt.npy", [[10], [2], [0, 1]])
    ds = read_folders(tmp_path / "refs", tmp_path / "qs", ground_truth=gt)
    assert [p.name for p in ds.database_paths][:3] == ["0.jpg", "1.jpg", "2.jpg"]
    assert ds.database_paths[10].name == "10.jpg"
    assert [p.tolist() for p in ds.positives] == [[10], [2], [0, 1]]
    save_vprbench_gt(gt, [[11], [2], [0]])
    with pytest.raises(ValueError, match="query 0.*index 11"):
        read_folders(tmp_path / "refs", tmp_path / "qs", ground_truth=gt)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_folders(tmp_path / "nowhere", tmp_path / "qs", no_labels=True)


# ---------------------------------------------------------------------------------------
# Layout detection
# ---------------------------------------------------------------------------------------


def test_load_dataset_detects_layouts(tmp_path):
    assert load_dataset(make_vg(tmp_path)).layout == "vg"
    assert load_dataset(make_vprbench(tmp_path)).layout == "vprbench"
    lists, images = make_gsv(tmp_path)
    ds = load_dataset(lists, image_root=images)
    assert ds.layout == "gsv_val" and ds.name == "SPED" and len(ds.positives) == 3
    np.save(lists / "Other_dbImages.npy", np.array(["ref/00000.jpg"]))
    with pytest.raises(ValueError, match="several GSV-Cities lists.*Other, SPED"):
        load_dataset(lists, image_root=images)
    assert load_dataset(lists, name="SPED", image_root=images).num_database == 6


def test_load_dataset_unknown_and_ambiguous(tmp_path):
    (tmp_path / "random").mkdir()
    with pytest.raises(ValueError, match=r"(?s)no known dataset layout.*vg:.*vprbench:.*gsv_val:"):
        load_dataset(tmp_path / "random")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset(tmp_path / "nowhere")
    both = make_vprbench(tmp_path)
    touch(both / "database" / utm_name(1, 2))
    touch(both / "queries" / utm_name(1, 2))
    with pytest.raises(ValueError, match="several layouts"):
        load_dataset(both)


# ---------------------------------------------------------------------------------------
# Real data (../shared/data)
# ---------------------------------------------------------------------------------------


def test_real_corridor(shared_data):
    ds = read_vprbench(shared_data / "corridor")
    assert ds.num_queries == 111 and ds.num_database == 111
    assert ds.query_paths[0].name == "0000000.jpg" and ds.database_paths[-1].name == "0000110.jpg"
    # Indices follow numeric order: query i's references are frames around i.
    for i, refs in enumerate(ds.positives):
        assert i in refs and np.abs(refs - i).max() <= 2
    assert load_dataset(shared_data / "corridor").num_queries == 111


@pytest.mark.parametrize("name", VPRBENCH_SETS)
def test_real_vprbench_ground_truth_files(shared_data, name):
    positives = load_vprbench_ground_truth(
        shared_data / "vprbench_ground_truth" / name / "ground_truth_new.npy"
    )
    assert len(positives) > 0
    assert all(p.dtype == np.int64 and (p >= 0).all() for p in positives)
    assert all((np.diff(p) > 0).all() for p in positives)
    if name == "GardensPoint_TN":
        assert sum(p.size == 0 for p in positives) == 200  # VPR-Bench's -1 "no match" rows


def test_real_toy_unlabeled(shared_data):
    folder = shared_data / "toy_unlabeled"
    ds = read_folders(folder / "database", folder / "queries", no_labels=True)
    assert ds.num_database == 17 and ds.num_queries == 5 and not ds.has_labels()
    assert load_dataset(folder, no_labels=True).num_database == 17
