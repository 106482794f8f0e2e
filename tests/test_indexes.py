"""Index choices (`vprkit.retrieval.indexes`): compressed FAISS indexes against exact flat
search on spatially structured descriptors, exact re-scoring, save/reload, the auto rule,
errors, maps built and grown with a compressed index, and the retrieve stage."""

from __future__ import annotations

import json
import shutil

import faiss
import numpy as np
import pytest

from vprkit.cli import main
from vprkit.data.descriptor_field import DescriptorField, layout_positions
from vprkit.errors import VprkitError
from vprkit.pipeline.features import Features
from vprkit.pipeline.retrieve import retrieve
from vprkit.retrieval.ground_truth import positives_within_radius
from vprkit.retrieval.indexes import (
    auto_choice,
    build_index,
    parse_index,
    read_index,
    search,
    write_index,
)
from vprkit.retrieval.metrics import recall_at_n
from vprkit.retrieval.search import exact_search

DIM = 32
IVFPQ = "IVF16,PQ8x4"  # tiny: 16 lists, 8 sub-quantizers of 16 centroids


def _streets(n: int, rng: np.random.Generator) -> np.ndarray:
    """A synthetic street layout: a few random walks of 5 m steps (UTM-like metres)."""
    walks = []
    per = -(-n // 8)
    for _ in range(8):
        heading = np.cumsum(rng.normal(0, 0.05, per)) + rng.uniform(0, 2 * np.pi)
        steps = 5.0 * np.stack([np.cos(heading), np.sin(heading)], axis=1)
        walks.append(rng.uniform(0, 2000, 2) + np.cumsum(steps, axis=0))
    return np.concatenate(walks)[:n] + 4e6


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    xy = _streets(2400, rng)
    field = DescriptorField(DIM, seed=0)
    db = field.at(xy, 0.5, rng)
    pick = rng.choice(len(xy), 120, replace=False)
    qxy = xy[pick] + rng.normal(0, 5, (120, 2))
    q = field.at(qxy, 0.5, rng)
    return xy, db, qxy, q


def test_the_field_puts_neighbours_in_space_near_in_descriptor_space(data):
    xy, db, qxy, q = data
    _, ids = exact_search(db, q, 1)
    near = np.linalg.norm(xy[ids[:, 0]] - qxy, axis=1) <= 25
    assert near.mean() >= 0.7  # most queries find a photo within 25 m first (75% here)
    far = np.random.default_rng(1).permutation(len(xy))[: len(q)]
    # The same positions' descriptors agree more than random pairs do.
    same = np.einsum("ij,ij->i", q, db[ids[:, 0]]).mean()
    assert same > np.einsum("ij,ij->i", q, db[far]).mean() + 0.3
    # Blocks give the same rows as one call (same noise stream).
    field = DescriptorField(DIM, seed=0)
    a = field.at(xy[:50], 0.5, np.random.default_rng(3))
    b = np.concatenate(list(field.blocks(xy[:50], 0.5, np.random.default_rng(3), block=7)))
    np.testing.assert_array_equal(a, b)


def test_real_layout_positions_are_scaled_up(shared_data):
    layout = shared_data / "utm_ground_truth" / "tokyo247.npz"
    rng = np.random.default_rng(0)
    xy = layout_positions(layout, 80_000, rng)
    utm = np.load(layout)["utmDb"]
    assert xy.shape == (80_000, 2)
    assert np.abs(xy.mean(0) - utm.mean(0)).max() < 50


@pytest.mark.parametrize("spec", [IVFPQ, "HNSW16", "PCA16,IVF16,Flat"])
def test_rescoring_agrees_with_flat_and_recall_against_ground_truth(data, spec):
    xy, db, qxy, q = data
    k = 10
    flat_d, flat_i = exact_search(db, q, k)
    built = build_index(db, spec, seed=0)
    before_d, before_i = search(built.index, q, k, rescore=0)
    after_d, after_i = search(built.index, q, k, rescore=50, full_descriptors=db)
    agree_before = (before_i[:, 0] == flat_i[:, 0]).mean()
    agree_after = (after_i[:, 0] == flat_i[:, 0]).mean()
    assert agree_after >= 0.97 and agree_after >= agree_before
    positives = positives_within_radius(xy, qxy, 25.0)
    flat_r = recall_at_n(flat_i, positives, [1, 5])
    after_r = recall_at_n(after_i, positives, [1, 5])
    assert after_r[1] >= flat_r[1] - 3.0  # percent
    # Re-scored distances are the exact ones (same rule as flat) for the rows they share.
    same = after_i[:, 0] == flat_i[:, 0]
    np.testing.assert_array_equal(after_d[same, 0], flat_d[same, 0])
    # Distances ordered, ids valid.
    assert (np.diff(after_d, axis=1) >= 0).all() and (after_i >= 0).all()
    assert (np.diff(before_d, axis=1) >= 0).all()


@pytest.mark.parametrize("spec", [IVFPQ, "HNSW16"])
def test_rescoring_everything_equals_flat_exactly(data, spec, tmp_path):
    _, db, _, q = data
    flat = exact_search(db, q, 20)
    built = build_index(db, spec, seed=0)
    got = search(built.index, q, 20, rescore=len(db), full_descriptors=db)
    np.testing.assert_array_equal(got[1], flat[1])
    np.testing.assert_array_equal(got[0], flat[0])
    # From a memmap too.
    mm = np.lib.format.open_memmap(str(tmp_path / "db.npy"), "w+", np.float32, db.shape)
    mm[:] = db
    mm.flush()
    mm = np.load(tmp_path / "db.npy", mmap_mode="r")
    got = search(built.index, q, 20, rescore=len(db) + 5, full_descriptors=mm)
    np.testing.assert_array_equal(got[1], flat[1])


def test_a_query_with_too_few_candidates_is_ranked_over_everything(data):
    _, db, _, q = data
    built = build_index(db, "IVF64,Flat", seed=0)
    faiss.ParameterSpace().set_index_parameters(built.index, "nprobe=1")
    k = 200  # more than one list holds
    got = search(built.index, q, k, rescore=k, full_descriptors=db)
    flat = exact_search(db, q, k)
    short = [i for i in range(len(q)) if (built.index.search(q[i : i + 1], k)[1] >= 0).sum() < k]
    assert short, "expected some queries whose probed list is short"
    np.testing.assert_array_equal(got[1][short], flat[1][short])


def test_save_and_reload_search_the_same_without_retraining(data, tmp_path, monkeypatch):
    _, db, _, q = data
    built = build_index(db, IVFPQ, seed=3)
    path = tmp_path / "index.faiss"
    write_index(built.index, path)
    expected = search(built.index, q, 10, rescore=30, full_descriptors=db)
    raw = search(built.index, q, 10, rescore=0)

    def no_training(*a, **k):  # pragma: no cover - must not be called
        raise AssertionError("retrained")

    monkeypatch.setattr(faiss.Index, "train", no_training)
    again = read_index(path, built.choice)
    assert again.is_trained and again.ntotal == len(db)
    for got, want in zip(
        (search(again, q, 10, rescore=30, full_descriptors=db), search(again, q, 10, rescore=0)),
        (expected, raw),
        strict=True,
    ):
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    # Same seed, same index; another seed, another training sample.
    assert built.train == {"seed": 3, "size": len(db), "photos": len(db)}


def test_presets_the_auto_rule_and_reports():
    assert parse_index(None, 10, 8).flat and parse_index("flat", 10, 8).flat
    assert parse_index("Flat", 10, 8).flat
    small = auto_choice(1000, 512, memory_bytes=8 * 2**30)
    assert small.flat and "auto: flat" in small.reason and "N <= 1,000,000" in small.reason
    big = auto_choice(2_000_000, 512, memory_bytes=64 * 2**30)
    assert big.factory == "IVF4096,PQ64" and big.params == "nprobe=16"
    tight = auto_choice(300_000, 512, memory_bytes=2 * 2**30)  # 0.57 GiB > 0.5 GiB
    assert tight.factory == "IVF2048,PQ64" and "quarter of the available memory" in tight.reason
    assert parse_index("ivfpq", 1_000_000, 512).factory == "IVF4096,PQ64"
    assert parse_index("hnsw", 100, 512).factory == "HNSW32"
    assert parse_index("hnsw", 100, 512, "efSearch=200").params == "efSearch=200"
    small_ivf = parse_index("ivfpq", 2400, DIM)
    built = build_index(np.random.default_rng(0).standard_normal((2400, DIM)), small_ivf)
    assert built.index.ntotal == 2400 and 0 < built.bytes_per_photo < 4 * DIM
    assert "bytes per photo" in built.summary() and "trained on 2400 of 2400" in built.summary()


@pytest.mark.parametrize(
    "spec, message",
    [
        ("IVF4096,PQ8", "an IVF with 4096 lists needs at least 4096 training rows"),
        ("NotAnIndex", "FAISS rejects this index-factory string"),
        ("IVF16,PQ7", "FAISS rejects this index-factory string"),
        ("PQ8x10", "10-bit PQ codes need at least 1024 training rows"),
    ],
)
def test_bad_index_specs_are_one_line_errors(data, spec, message):
    _, db, _, _ = data
    with pytest.raises(VprkitError, match=message) as err:
        build_index(db[:1000], spec)
    assert "\n" not in str(err.value) and "--index" in str(err.value)


def test_bad_search_parameters_are_refused(data):
    _, db, _, _ = data
    with pytest.raises(VprkitError, match="--index_params"):
        build_index(db[:500], "IVF8,Flat", params="nosuch=3")


# ----------------------------------------------------------------------------- retrieve stage


def _features(desc, prefix):
    return Features([f"{prefix}{i}.jpg" for i in range(len(desc))], desc, (56, 56), {}, {})


def test_retrieve_with_an_index_rescored_fully_equals_flat(data):
    _, db, _, q = data
    database, queries = _features(db, "d"), _features(q, "q")
    flat = retrieve(database, queries, 10)
    assert "index" not in flat.fingerprint  # the default's records are unchanged
    got = retrieve(database, queries, 10, index=IVFPQ, rescore=len(db))
    np.testing.assert_array_equal(got.indices, flat.indices)
    np.testing.assert_array_equal(got.distances, flat.distances)
    assert got.fingerprint["index"]["factory"] == IVFPQ
    assert got.record["index"]["train"]["size"] == len(db)
    auto = retrieve(database, queries, 10, index="auto")
    np.testing.assert_array_equal(auto.indices, flat.indices)
    assert auto.record["index_rule"].startswith("auto: flat")


def test_eval_flags_are_checked():
    from vprkit.pipeline.config import EvalConfig

    with pytest.raises(VprkitError, match="--pca_dim"):
        EvalConfig(index="ivfpq", pca_dim=8, pca_dataset_folder="x")
    with pytest.raises(VprkitError, match="--memory_budget_mb"):
        EvalConfig(index="hnsw", memory_budget_mb=10)
    with pytest.raises(VprkitError, match="--rescore"):
        EvalConfig(rescore=-1)


# ----------------------------------------------------------------------------- maps

TINY_ARGS = ["--method", "dinov2_gem", "--model_option", "size=vits14", "--model_option", "depth=1"]


def _database(city):
    return city / "vg" / "synthetic" / "images" / "test" / "database"


def test_a_map_with_a_compressed_index_localizes_like_flat_and_grows(
    tiny_synthetic, tmp_path, capsys
):
    from vprkit.maps import Map, add_to_map

    photos = tmp_path / "photos"
    shutil.copytree(_database(tiny_synthetic), photos)
    later = tmp_path / "later"
    later.mkdir()
    names = sorted(p.name for p in photos.glob("*.jpg"))
    for name in names[-6:]:
        shutil.move(photos / name, later / name)
    common = TINY_ARGS + ["--weights", "random", "--image_size", "56", "56"]
    assert main(["map", "build", str(photos), "--out", str(tmp_path / "flat.map"), *common]) == 0
    spec = "IVF2,PQ16x4"
    args = ["--index", spec, "--rescore", "20", "--index_seed", "5"]
    assert (
        main(["map", "build", str(photos), "--out", str(tmp_path / "c.map"), *common, *args]) == 0
    )
    out = capsys.readouterr().out
    assert f"index: {spec}" in out and "bytes per photo" in out and "top 20 re-scored" in out
    flat, comp = Map.open(tmp_path / "flat.map"), Map.open(tmp_path / "c.map")
    entry = comp.meta["index"]
    assert entry["factory"] == spec and entry["rescore"] == 20
    assert entry["train"] == {"seed": 5, "size": flat.count, "photos": flat.count}
    assert "index" not in flat.meta and comp.meta["version"] == 1
    assert comp.verify() == []
    np.testing.assert_array_equal(comp.global_descriptors(), flat.global_descriptors())
    # Queries that are map photos themselves (an easy case): the same top-1 as flat.
    desc = flat.global_descriptors()[::3]
    np.testing.assert_array_equal(comp.search(desc, 5)[1][:, 0], flat.search(desc, 5)[1][:, 0])
    # Localizing map photos (through the model, the Localizer's path): the same top-1.
    files = [photos / p.path for p in flat.photos[::10]]
    loc_f = flat.localizer().localize(files, top_k=5)
    loc_c = comp.localizer().localize(files, top_k=5)
    top1 = [r.matches[0].photo_id for r in loc_c]
    assert top1 == [r.matches[0].photo_id for r in loc_f] == list(range(0, flat.count, 10))
    assert main(["map", "info", str(tmp_path / "c.map")]) == 0
    assert f"index: {spec}" in capsys.readouterr().out
    # map add: added to the trained index, not retrained.
    shutil.move(later, photos / "day2")
    grown, summary = add_to_map(tmp_path / "c.map", photos)
    assert "without retraining" in summary["index"]
    assert grown.index().ntotal == len(names) and grown.meta["index"]["train"] == entry["train"]
    assert grown.verify() == []
    new = grown.global_descriptors()[-6:]
    d, i = grown.search(new, 1)
    np.testing.assert_array_equal(i[:, 0], np.arange(len(names) - 6, len(names)))
    info = json.loads(json.dumps(grown.info()))
    assert info["index"]["factory"] == spec


def test_a_map_build_with_a_bad_index_is_one_line(tiny_synthetic, tmp_path, capsys):
    common = TINY_ARGS + ["--weights", "random", "--image_size", "56", "56"]
    out = tmp_path / "bad.map"
    code = main(
        [
            "map",
            "build",
            str(_database(tiny_synthetic)),
            "--out",
            str(out),
            *common,
            "--index",
            "IVF4096,Flat",
        ]  # fmt: skip
    )
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "--index 'IVF4096,Flat'" in err
    assert "4096 lists needs at least 4096 training rows" in err  # refused before encoding
    assert not out.exists()


def test_eval_with_a_compressed_index(shared_data, tmp_path, capsys):
    """`vprkit eval --index`: re-scoring every candidate gives flat's figures and pairs; the
    index, its build and memory are in the log and in recalls.json."""
    base = ["eval", "--method", "dinov2_gem", *TINY_ARGS[2:], "--weights", "random",
            "--num_workers", "0", "--image_size", "112", "112",
            "--dataset_folder", str(shared_data / "corridor"),
            "--features_dir", str(tmp_path / "features")]  # fmt: skip
    assert main([*base, "--save_dir", str(tmp_path / "flat")]) == 0
    spec = ["--index", "IVF4,PQ16x4", "--rescore", "1000"]
    assert main([*base, "--save_dir", str(tmp_path / "ivf"), *spec]) == 0
    runs = [next((tmp_path / side).glob("*/*")) for side in ("flat", "ivf")]
    flat, ivf = (json.loads((r / "recalls.json").read_text()) for r in runs)
    assert ivf["recalls"] == flat["recalls"] and "index" not in flat
    assert (runs[0] / "pairs.txt").read_text() == (runs[1] / "pairs.txt").read_text()
    assert ivf["index"]["index"]["factory"] == "IVF4,PQ16x4"
    assert ivf["index"]["index"]["bytes_per_photo"] < 4 * 384
    log = (runs[1] / "log.txt").read_text()
    assert "index IVF4,PQ16x4" in log and "bytes per photo" in log and "top 1000 re-scored" in log
    config = json.loads((runs[1] / "config.json").read_text())
    assert config["index"] == "IVF4,PQ16x4" and config["rescore"] == 1000


def test_a_map_built_with_auto_states_the_rule_and_stays_flat(tiny_synthetic, tmp_path, capsys):
    from vprkit.maps import Map

    common = TINY_ARGS + ["--weights", "random", "--image_size", "56", "56"]
    out = tmp_path / "auto.map"
    assert main(["map", "build", str(_database(tiny_synthetic)), "--out", str(out), *common,
                 "--index", "auto"]) == 0  # fmt: skip
    assert "index: exact flat (IndexFlatL2) [auto: flat, as 98 photos" in (capsys.readouterr().out)
    m = Map.open(out)
    assert m.meta["index"]["factory"] is None and m.index_choice()[0].flat
    assert m.meta["index"]["reason"].startswith("auto: flat")
    assert isinstance(m.index(), faiss.IndexFlatL2)
    desc = m.global_descriptors()[:5]
    np.testing.assert_array_equal(
        m.search(desc, 3)[1], exact_search(m.global_descriptors(), desc, 3)[1]
    )
    assert main(["map", "info", str(out)]) == 0
    assert "index: exact flat (IndexFlatL2) [auto: flat" in capsys.readouterr().out
