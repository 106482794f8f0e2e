"""Synthetic places: geometry, dataset formats, determinism, conditions and difficulty."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from vprkit.data import synthetic as S
from vprkit.data.datasets import read_vg_dataset
from vprkit.data.gsv_cities import GSV_COLUMNS
from vprkit.data.triplets import TripletData

TINY = dict(
    image_size=(48, 64),
    train_places=3,
    images_per_place=4,
    val_queries=4,
    test_queries=6,
    eval_streets=1,
    db_spacing=10.0,
)

# TINY plus a VG train split: everything else must come out byte for byte as in TINY.
TRAIN = dict(TINY, vg_train_queries=12, vg_train_streets=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return S.generate(tmp_path_factory.mktemp("tiny") / "out", seed=3, **TINY)


@pytest.fixture(scope="module")
def with_train(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return S.generate(tmp_path_factory.mktemp("with_train") / "out", seed=3, **TRAIN)


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def jaccard(a: list[int], b: list[int]) -> float:
    a, b = set(a), set(b)
    return len(a & b) / max(1, len(a | b))


def plain_scene() -> S.Street:
    """One 10 m x 6 m wall facing south, 20 m north of the origin, on a street heading north."""
    tex = np.zeros((48, 80, 5), np.uint8)
    tex[..., :3], tex[..., 3] = 128, S.M_WALL
    quads = S.make_quads(
        [
            dict(
                p0=(-5.0, 20.0),
                d=(1.0, 0.0),
                width=10.0,
                z0=0.0,
                height=6.0,
                kind=S.K_FACADE,
                id=7,
                cutout=False,
                tex=tex,
            )
        ]
    )
    lay = S.StreetLayout("test", 0, (0.0, -50.0), 0.0, 100.0, 16.0, 2.5)
    return S.Street(lay, quads, np.zeros((0, 3)))


# ----------------------------------------------------------------------------- geometry


def test_pinhole_projection_numbers() -> None:
    intr = S.Intrinsics(width=100, height=80, hfov_deg=90.0)
    assert intr.focal == pytest.approx(50.0)
    uv, z = S.project_points(
        intr, S.Pose(0, 0, 2, 0, 0), np.array([[1.0, 10.0, 2.0], [0.0, 10.0, 1.0]])
    )
    np.testing.assert_allclose(uv, [[55.0, 40.0], [50.0, 45.0]])
    np.testing.assert_allclose(z, [10.0, 10.0])
    # Yaw is a compass heading: 90 looks east. Pitching up moves the horizon down the image.
    uv, _ = S.project_points(intr, S.Pose(0, 0, 2, 90, 0), np.array([[10.0, 0.0, 2.0]]))
    np.testing.assert_allclose(uv, [[50.0, 40.0]], atol=1e-9)
    uv, _ = S.project_points(intr, S.Pose(0, 0, 2, 0, 10), np.array([[0.0, 1e6, 2.0]]))
    assert uv[0, 1] == pytest.approx(40 + 50 * math.tan(math.radians(10)), abs=1e-3)


def test_ray_cast_lands_where_the_pinhole_model_says() -> None:
    street = plain_scene()
    intr = S.Intrinsics(96, 72, 70.0)
    pose = S.Pose(1.0, 2.0, 1.7, 8.0, 4.0)
    gb, rays = S.render_gbuffer(street, pose, intr)
    cam = np.array([pose.east, pose.north, pose.height])
    rng = np.random.default_rng(0)
    for _ in range(50):
        x, z = rng.uniform(-4.5, 4.5), rng.uniform(0.5, 5.5)
        ((u, v),), depth = S.project_points(intr, pose, np.array([[x, 20.0, z]]))
        c, r = int(u), int(v)
        if not (0 <= c < intr.width and 0 <= r < intr.height):
            continue
        i = r * intr.width + c
        assert gb.quad[i] == 0, "a facade point must be seen on its facade"
        hit = cam + gb.t[i] * rays[i].astype(np.float64)
        footprint = depth[0] / intr.focal
        assert np.linalg.norm(hit - [x, 20.0, z]) < 1.5 * footprint / abs(rays[i][1])
    # Just outside the wall's edges there is no wall.
    for outside in ([-5.4, 20.0, 3.0], [5.4, 20.0, 3.0], [0.0, 20.0, 6.4]):
        ((u, v),), _ = S.project_points(intr, pose, np.array([outside]))
        assert gb.quad[int(v) * intr.width + int(u)] == -1


def test_views_of_one_place_share_facades() -> None:
    street = S.build_street(S.WorldParams(1, 6, 2), "val", 0)
    lay, intr = street.layout, S.Intrinsics(64, 48, 75.0)

    def seen(along: float, lateral: float = 0.0, dyaw: float = 0.0) -> list[int]:
        e, n = lay.point(along, lateral)
        pose = S.Pose(float(e), float(n), 2.5, lay.heading_deg + dyaw, 0.0)
        return S.render(street, pose, intr).visible_facades

    ref = seen(100.0)
    assert len(ref) >= 4
    assert jaccard(ref, seen(103.0, 1.5, 6.0)) > 0.5
    assert jaccard(ref, seen(190.0)) < 0.2


# ----------------------------------------------------------------------------- formats


def test_vg_names_give_exactly_the_metadata_positives(tiny: Path) -> None:
    poses = S.load_poses(tiny)
    for split in ("val", "test"):
        root = tiny / "vg" / "synthetic" / "images" / split
        db = sorted((root / "database").glob("*.jpg"))
        qs = sorted((root / "queries").glob("*.jpg"))
        assert db and qs
        for f in db + qs:
            parts = f.name.split("@")
            assert len(parts) == 16 and parts[0] == "" and parts[-1] == ".jpg"
            assert len(parts[1].split(".")[1]) == 2 and parts[3] == "33"
        by_path = {p["path"]: p for p in poses}
        meta = {f: by_path[f.relative_to(tiny).as_posix()] for f in db + qs}
        db_utm = np.array([S.parse_vg_utm(f.name) for f in db])
        db_meta = np.array([[meta[f]["east"], meta[f]["north"]] for f in db])
        for q in qs:
            from_names = np.linalg.norm(db_utm - S.parse_vg_utm(q.name), axis=1) <= 25
            m = meta[q]
            brute = np.array([math.hypot(e - m["east"], n - m["north"]) <= 25 for e, n in db_meta])
            assert (from_names == brute).all()
            assert from_names.any(), f"query {q.name} has no positive within 25 m"


def test_query_sees_what_its_database_neighbour_sees(tiny: Path) -> None:
    poses = S.load_poses(tiny)
    db = [p for p in poses if p["kind"] == "test_database"]
    near, far = [], []
    for q in (p for p in poses if p["kind"] == "test_queries"):
        same_dir = [d for d in db if abs((d["yaw"] - q["yaw"] + 180) % 360 - 180) < 90]
        dist = [math.hypot(d["east"] - q["east"], d["north"] - q["north"]) for d in same_dir]
        near.append(jaccard(q["facades"], same_dir[int(np.argmin(dist))]["facades"]))
        far.append(jaccard(q["facades"], same_dir[int(np.argmax(dist))]["facades"]))
    assert np.mean(near) > 0.5
    assert np.mean(far) < 0.1


def test_gsv_csv_and_files_agree(tiny: Path) -> None:
    gsv = tiny / "gsv"
    with open(gsv / "Dataframes" / "Synthville.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == GSV_COLUMNS
    names = set()
    for r in rows:
        # As GSVCitiesDataset.get_img_name rebuilds it from a pandas row.
        name = (
            f"{r['city_id']}_{int(r['place_id']) % 10**5:07d}_{int(r['year']):04d}_"
            f"{int(r['month']):02d}_{int(r['northdeg']):03d}_{float(r['lat'])}_"
            f"{float(r['lon'])}_{r['panoid']}.jpg"
        )
        assert (gsv / "Images" / r["city_id"] / name).is_file(), name
        names.add(name)
    assert names == {p.name for p in (gsv / "Images" / "Synthville").iterdir()}
    counts = Counter(int(r["place_id"]) for r in rows)
    assert sorted(counts) == list(range(TINY["train_places"]))
    assert min(counts.values()) >= 4
    meta = json.loads((tiny / "meta.json").read_text())
    assert meta["seed"] == 3 and meta["config"]["image_size"] == [48, 64]


def test_places_are_views_of_one_spot(tiny: Path) -> None:
    poses = [p for p in S.load_poses(tiny) if p["kind"] == "gsv"]
    for pid in range(TINY["train_places"]):
        imgs = [p for p in poses if p["place_id"] == pid]
        pos = np.array([[p["east"], p["north"]] for p in imgs])
        assert np.linalg.norm(pos - pos.mean(0), axis=1).max() < 10
        assert np.mean([jaccard(a["facades"], imgs[0]["facades"]) for a in imgs[1:]]) > 0.4


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes_any_worker_count(tiny: Path, tmp_path: Path) -> None:
    again = S.generate(tmp_path / "again", seed=3, num_workers=2, **TINY)
    assert tree_hash(again) == tree_hash(tiny)
    other = S.generate(tmp_path / "other", seed=4, **TINY)
    assert tree_hash(other) != tree_hash(tiny)


def test_refuses_to_overwrite_and_bad_config(tiny: Path) -> None:
    with pytest.raises(FileExistsError):
        S.generate(tiny, seed=3, **TINY)
    with pytest.raises(ValueError, match="images_per_place"):
        S.SynthConfig.create(images_per_place=3)
    with pytest.raises(ValueError, match="difficulty"):
        S.SynthConfig.create("impossible")
    with pytest.raises(ValueError, match="vg_train_queries"):
        S.SynthConfig.create(vg_train_queries=-1)
    with pytest.raises(ValueError, match="vg_train_streets"):
        S.SynthConfig.create(vg_train_queries=5, vg_train_streets=0)


# ----------------------------------------------------------------------------- VG train split


def test_no_vg_train_split_by_default(tiny: Path) -> None:
    assert not (tiny / "vg" / "synthetic" / "images" / "train").exists()
    meta = json.loads((tiny / "meta.json").read_text())
    # meta.json is written as it was before the split existed.
    assert not any(k.startswith("vg_train") for k in meta["config"])
    assert not any(k.startswith("vg_train") for k in meta["counts"])


def test_vg_train_split_leaves_everything_else_unchanged(tiny: Path, with_train: Path) -> None:
    for rel in ("gsv", "vg/synthetic/images/val", "vg/synthetic/images/test"):
        assert tree_hash(with_train / rel) == tree_hash(tiny / rel), rel
    # The train images are planned last: the other images' metadata lines come first, unchanged.
    old = (tiny / "poses.jsonl").read_text().splitlines()
    new = (with_train / "poses.jsonl").read_text().splitlines()
    assert new[: len(old)] == old
    assert all(json.loads(line)["split"] == "vg_train" for line in new[len(old) :])


def test_vg_train_split_reads_back_for_triplet_training(with_train: Path) -> None:
    vg = with_train / "vg" / "synthetic"
    poses = S.load_poses(with_train)
    kinds = Counter(p["kind"] for p in poses)
    ds = read_vg_dataset(vg, split="train")
    assert ds.num_queries == TRAIN["vg_train_queries"] == kinds["vg_train_queries"]
    assert ds.num_database == kinds["vg_train_database"] > 0
    # Queries sit along the database streets: most have a database image within 10 m.
    d = np.linalg.norm(ds.query_utm[:, None] - ds.database_utm[None], axis=2)
    assert np.mean(d.min(1) <= 10) >= 0.8
    assert (d.min(1) <= 25).all()
    data = TripletData.from_folder(vg, split="train")
    assert len(data.query_ids) == int((d.min(1) <= 10).sum()) >= 0.8 * ds.num_queries
    assert all(len(p) > 0 for p in data.hard_positives)
    # Streets of their own: far from every val/test image and training place, and not one
    # facade in common with them.
    train = [p for p in poses if p["split"] == "vg_train"]
    other = [p for p in poses if p["split"] != "vg_train"]
    assert {p["street_id"] for p in train} == set(range(TRAIN["vg_train_streets"]))
    a = np.array([[p["east"], p["north"]] for p in train])
    b = np.array([[p["east"], p["north"]] for p in other])
    assert np.linalg.norm(a[:, None] - b[None], axis=2).min() > 1000
    seen_train = {f for p in train for f in p["facades"]}
    assert seen_train and not seen_train & {f for p in other for f in p["facades"]}


def test_vg_train_split_same_bytes_any_worker_count(with_train: Path, tmp_path: Path) -> None:
    again = S.generate(tmp_path / "again", seed=3, num_workers=2, **TRAIN)
    assert tree_hash(again) == tree_hash(with_train)
    meta = json.loads((again / "meta.json").read_text())
    assert meta["config"]["vg_train_queries"] == TRAIN["vg_train_queries"]
    assert meta["counts"]["vg_train_queries"] == TRAIN["vg_train_queries"]


# ----------------------------------------------------------------------------- conditions


def test_conditions_change_the_image() -> None:
    street = S.build_street(S.WorldParams(2, 6, 2), "test", 1)
    lay, intr = street.layout, S.Intrinsics(96, 72, 75.0)
    e, n = lay.point(120.0, 0.0)
    pose = S.Pose(float(e), float(n), 2.5, lay.heading_deg, 0.0)

    def shot(**kw: object) -> S.RenderResult:
        cond = S.Condition(noise_sigma=0.0, cloudiness=0.0, **kw)
        return S.render(street, pose, intr, cond, np.random.default_rng(0))

    day, night = shot(), shot(time="night", lit_fraction=0.4, sun_elevation=-20)
    assert night.image.mean() < 0.4 * day.image.mean()
    foggy = shot(fog_density=0.04)

    def contrast_kept(lo: float, hi: float) -> float:
        sel = (day.depth >= lo) & (day.depth < hi)
        return foggy.image.mean(2)[sel].std() / day.image.mean(2)[sel].std()

    near, far = contrast_kept(0, 12), contrast_kept(40, 300)
    assert far < 0.35 < near, f"fog must wash out far contrast more (near {near}, far {far})"
    winter = S.render_gbuffer(street, pose, intr, S.Condition(season="winter").veg_density)[0]
    summer = S.render_gbuffer(street, pose, intr, S.Condition(season="summer").veg_density)[0]
    tree_px = lambda gb: np.isin(gb.quad, np.flatnonzero(street.quads.kind == S.K_TREE)).sum()  # noqa: E731
    assert tree_px(winter) < tree_px(summer)  # bare trees let the facades through


# ----------------------------------------------------------------------------- CLI and difficulty


def test_cli_tiny(tmp_path: Path) -> None:
    from vprkit.cli import main

    out = tmp_path / "cli"
    rc = main(
        [
            "synth",
            str(out),
            "--image_size",
            "32",
            "40",
            "--train_places",
            "2",
            "--val_queries",
            "2",
            "--test_queries",
            "2",
            "--eval_streets",
            "1",
            "--vg_train_queries",
            "3",
            "--vg_train_streets",
            "1",
            "--db_spacing",
            "20",
            "--num_workers",
            "1",
            "--yaw_deg",
            "3",
            "--difficulty",
            "hard",
        ]
    )
    assert rc == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["config"]["difficulty"] == "hard"
    assert meta["config"]["params"]["yaw_deg"] == 3.0
    assert meta["config"]["params"]["p_night"] == S.DIFFICULTIES["hard"].p_night
    assert len(list((out / "gsv" / "Images" / "Synthville").glob("*.jpg"))) == 8
    assert meta["config"]["vg_train_queries"] == 3 and meta["config"]["vg_train_streets"] == 1
    assert len(list((out / "vg" / "synthetic" / "images" / "train" / "queries").glob("*.jpg"))) == 3
    assert not (tmp_path / "cli.partial").exists()


def test_raw_pixels_do_not_solve_the_default_difficulty(tmp_path: Path) -> None:
    recall = {}
    for diff in ("easy", "medium"):
        out = S.generate(
            tmp_path / diff,
            seed=0,
            difficulty=diff,
            image_size=(64, 64),
            train_places=0,
            val_queries=0,
            test_queries=80,
            eval_streets=2,
            num_workers=2,
        )
        recall[diff] = S.raw_pixel_recall(out / "vg" / "synthetic" / "images" / "test")
    print(f"raw-pixel 16x16 R@1: easy {recall['easy']:.3f}, medium {recall['medium']:.3f}")
    assert recall["medium"] < 0.3
    assert recall["easy"] > recall["medium"] + 0.15
