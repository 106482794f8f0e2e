"""Maps of geotagged photos and localization against them: build, add, resume after kill -9,
tampering, bad photos, the estimate, the run folder, and parity with `vprkit eval`."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vprkit.cli import main
from vprkit.data.images import Preprocess
from vprkit.data.synthetic import to_latlon
from vprkit.errors import StageMismatchError, VprkitError
from vprkit.maps import Map, add_to_map, build_map
from vprkit.maps.estimate import estimate_position, match_weights
from vprkit.maps.positions import exif_gps, geodesic_distance_m
from vprkit.models.registry import create_model
from vprkit.models.registry import model_info as vprkit_info
from vprkit.pipeline import extract

TINY = {"size": "vits14", "depth": 1}
TINY_ARGS = ["--method", "dinov2_gem", "--model_option", "size=vits14", "--model_option", "depth=1"]
SIZE = [56, 56]


def _tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    model = create_model("dinov2_gem", **TINY)
    model.vprkit_seed = seed  # as `--weights random --seed N` builds it
    return model


def _database(city: Path) -> Path:
    return city / "vg" / "synthetic" / "images" / "test" / "database"


def _queries(city: Path) -> Path:
    return city / "vg" / "synthetic" / "images" / "test" / "queries"


def _build(photos: Path, out: Path, **kw):
    options = dict(method="dinov2_gem", weights="random", model_options=TINY, image_size=SIZE)
    options.update(kw)
    return build_map(photos, out, num_workers=0, **options)


@pytest.fixture(scope="module")
def city_map(tiny_synthetic, tmp_path_factory) -> Map:
    m, _ = _build(_database(tiny_synthetic), tmp_path_factory.mktemp("maps") / "city.map")
    return m


# --------------------------------------------------------------------------- the estimate


def test_agreeing_matches_outvote_a_lone_top1_and_set_the_confidence():
    # Top-1 alone 500 m away; ranks 2-4 agree within a few metres of each other.
    east = np.array([500.0, 0.0, 3.0, -2.0, 900.0])
    north = np.array([0.0, 0.0, 1.0, 2.0, 900.0])
    weights = np.array([1.0, 0.9, 0.8, 0.7, 0.1])
    est = estimate_position(east, north, weights, radius_m=25)
    assert est.in_group.tolist() == [False, True, True, True, False]
    expected = (0.9 * 0 + 0.8 * 3 - 0.7 * 2) / 2.4, (0.8 * 1 + 0.7 * 2) / 2.4
    assert (est.east, est.north) == pytest.approx(expected)
    assert est.confidence == pytest.approx(2.4 / 3.5)
    # All agreeing: confidence 1; ties of support go to the best-ranked match's group.
    same = estimate_position(np.zeros(3), np.zeros(3), np.ones(3))
    assert same.confidence == 1.0 and same.spread_m == 0.0
    split = estimate_position(np.array([0.0, 100.0]), np.zeros(2), np.ones(2))
    assert split.in_group.tolist() == [True, False] and split.confidence == 0.5


def test_match_weights_from_distances_and_from_rerank_scores():
    w = match_weights(np.array([0.1, 0.2]), temperature=0.05)
    # similarity 1 - d/2: 0.95 and 0.9; exp(-0.05 / 0.05)
    assert w.tolist() == pytest.approx([1.0, np.exp(-1.0)])
    assert match_weights(np.zeros(3), np.array([10.0, 5.0, -1.0])).tolist() == [1.0, 0.5, 0.0]


# --------------------------------------------------------------------------- building


def test_a_map_of_the_synthetic_city_holds_every_photo_where_its_exif_says(
    city_map, tiny_synthetic
):
    m = Map.open(city_map.folder)
    photos = sorted(p.name for p in _database(tiny_synthetic).glob("*.jpg"))
    assert [p.path for p in m.photos] == photos
    assert m.excluded() == {}
    assert m.global_descriptors().shape == (len(photos), 384)
    assert m.index().ntotal == len(photos)
    # Positions are those of the rendering pose (the VG name), through EXIF, to centimetres.
    for p in m.photos[:5]:
        fields = p.path.split("@")
        lat, lon = to_latlon(float(fields[1]), float(fields[2]))
        assert geodesic_distance_m(lat, lon, p.latitude, p.longitude) < 0.2
        assert p.source == "exif" and p.heading is not None
    info = m.info()
    assert info["method"] == "dinov2_gem" and info["model_options"] == TINY
    assert info["utm_zone"]["number"] == 33 and info["extent_m"][0] > 50
    assert "batches of 16" in info["batch_rule"]
    assert m.verify(photos=True) == []
    # The descriptors are exactly those of the extract stage, batched the same way.
    features = extract(
        _tiny_model(),
        [m.photos_root / p.path for p in m.photos],
        preprocess=Preprocess(image_size=(56, 56)),
    )
    np.testing.assert_array_equal(m.global_descriptors(), features.global_desc)


def test_photos_without_a_position_are_listed_or_refused(tiny_synthetic, tmp_path):
    photos = tmp_path / "photos"
    shutil.copytree(_database(tiny_synthetic), photos)
    Image.new("RGB", (56, 56), (10, 20, 30)).save(photos / "no_gps.jpg")
    first = sorted(photos.glob("@*.jpg"))[0]
    (photos / "truncated.jpg").write_bytes(first.read_bytes()[:300])
    m, summary = _build(photos, tmp_path / "m")
    excluded = m.excluded()
    assert set(excluded) == {"no_gps.jpg", "truncated.jpg"}
    assert "no GPS position" in excluded["no_gps.jpg"]
    assert "truncated.jpg" in excluded["truncated.jpg"]
    assert summary["left_out"] == 2 and m.count == len(list(photos.glob("@*.jpg")))
    with pytest.raises(VprkitError, match=r"2 of \d+ photos have no usable position.*--positions"):
        _build(photos, tmp_path / "m2", require_positions=True)
    assert not (tmp_path / "m2").exists()


def test_a_table_overrides_exif_and_a_map_across_a_zone_border_keeps_true_distances(
    tmp_path,
):
    photos = tmp_path / "photos"
    photos.mkdir()
    rows = ["path,latitude,longitude,heading"]
    for i, lon in enumerate([11.9995, 11.9998, 12.0002, 12.0005]):  # UTM zones 32 and 33
        Image.new("RGB", (56, 56), (40 * i, 80, 120)).save(
            photos / f"{i}.jpg", exif=exif_gps(10.0, 10.0)
        )
        rows.append(f"{i}.jpg,48.0,{lon},90")
    table = tmp_path / "positions.csv"
    table.write_text("\n".join(rows) + "\n")
    m, _ = _build(photos, tmp_path / "m", positions=table)
    assert {p.source for p in m.photos} == {"table"}
    east, north = m.positions()
    metric = np.hypot(east[3] - east[0], north[3] - north[0])
    true = geodesic_distance_m(48.0, 11.9995, 48.0, 12.0005)
    assert abs(metric - true) / true < 1e-3


def test_a_killed_build_resumes_to_the_map_an_uninterrupted_build_gives(tiny_synthetic, tmp_path):
    photos = _database(tiny_synthetic)
    script = tmp_path / "build.py"
    script.write_text(
        f"""
import os, signal, sys, torch
from vprkit.maps import build_map
from vprkit.models.registry import create_model
from vprkit.models.registry import model_info as vprkit_info
torch.manual_seed(0)
model = create_model("dinov2_gem", size="vits14", depth=1)
model.vprkit_seed = 0
calls = [0]
def kill_after(module, inputs, output):
    calls[0] += 1
    if calls[0] == int(os.environ.get("KILL_AT_BATCH", "0")):
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 in the middle of the third chunk
model.register_forward_hook(kill_after)
build_map({str(photos)!r}, sys.argv[1], model=model, weights="random", image_size=[56, 56],
          batch_size=8, chunk_size=16, num_workers=0)
"""
    )
    env = {**os.environ, "KILL_AT_BATCH": "5"}
    killed = subprocess.run([sys.executable, str(script), str(tmp_path / "a")], env=env)
    assert killed.returncode == -signal.SIGKILL
    staging = tmp_path / "a.incomplete"
    assert not (tmp_path / "a").exists()
    done = sorted(p.parent.name for p in (staging / "chunks").glob("*/features.json"))
    assert done == ["000000", "000001"]  # two whole chunks survived, the third did not
    env.pop("KILL_AT_BATCH")
    for out in ("a", "b"):  # resume "a"; build "b" in one go
        subprocess.run([sys.executable, str(script), str(tmp_path / out)], env=env, check=True)
    a, b = Map.open(tmp_path / "a"), Map.open(tmp_path / "b")
    assert a.photos == b.photos
    np.testing.assert_array_equal(a.global_descriptors(), b.global_descriptors())
    for key in ("chunks", "sha256", "model", "files"):
        assert a.meta[key] == b.meta[key], key
    assert not staging.exists()


def test_map_add_appends_without_recomputing_and_refuses_other_weights(tiny_synthetic, tmp_path):
    photos = tmp_path / "photos"
    shutil.copytree(_database(tiny_synthetic), photos)
    names = sorted(p.name for p in photos.glob("*.jpg"))
    later = tmp_path / "later"
    later.mkdir()
    for name in names[-7:]:
        shutil.move(photos / name, later / name)
    m, _ = _build(photos, tmp_path / "m", chunk_size=16)
    before = m.global_descriptors().copy()
    old_chunks = m.meta["chunks"]
    shutil.move(later, photos / "day2")  # a second day's photos, under the map's root
    grown, summary = add_to_map(tmp_path / "m", photos)
    assert summary["mapped"] == 7 and summary["already_in_map"] == len(names) - 7
    assert grown.count == len(names) and grown.generation == 2
    assert [p.id for p in grown.photos] == list(range(len(names)))
    assert grown.photos[-1].path.startswith("day2/")
    assert grown.meta["chunks"][: len(old_chunks)] == old_chunks  # untouched
    np.testing.assert_array_equal(grown.global_descriptors()[: len(before)], before)
    # The new photos are encoded among themselves, as the extract stage would.
    new = [grown.photos_root / p.path for p in grown.photos[len(before) :]]
    alone = extract(_tiny_model(), new, preprocess=Preprocess(image_size=(56, 56)))
    np.testing.assert_array_equal(grown.global_descriptors()[len(before) :], alone.global_desc)
    assert grown.verify(photos=True) == []
    # Only the current generation's files remain; a second add finds nothing new.
    files = sorted(f.name for f in grown.folder.iterdir() if f.is_file())
    assert files == ["excluded-000002.csv", "index-000002.faiss", "map.json", "photos-000002.csv"]
    with pytest.raises(VprkitError, match="no new photo"):
        add_to_map(tmp_path / "m", photos)
    # Other weights are refused.
    Image.new("RGB", (56, 56)).save(photos / "extra.jpg", exif=exif_gps(36.13, 15.44))
    with pytest.raises(StageMismatchError, match="other weights"):
        add_to_map(tmp_path / "m", photos, model=_tiny_model(seed=1))
    assert Map.open(tmp_path / "m").count == len(names)


def test_a_tampered_damaged_or_newer_map_is_refused(city_map, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(city_map.folder, folder)
    meta = json.loads((folder / "map.json").read_text())
    photos = folder / meta["files"]["photos"]
    photos.write_text(photos.read_text().replace(",exif,", ",table,", 1))
    with pytest.raises(VprkitError, match=r"photos-000001\.csv: sha256 differs"):
        Map.open(folder)
    shutil.rmtree(folder)
    shutil.copytree(city_map.folder, folder)
    chunk = folder / meta["chunks"][0]["folder"] / "global.npy"
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 0xFF
    chunk.write_bytes(bytes(data))
    problems = Map.open(folder).verify()
    assert len(problems) == 1 and "global.npy: sha256 differs" in problems[0]
    assert main(["map", "verify", str(folder)]) == 1
    (folder / "map.json").write_text(json.dumps({**meta, "version": 2}))
    with pytest.raises(VprkitError, match="newer vprkit.*upgrade"):
        Map.open(folder)
    with pytest.raises(VprkitError, match="not a map folder"):
        Map.open(tmp_path)


# --------------------------------------------------------------------------- localizing


def test_localize_paths_and_pil_images_alike_and_bursts_batch_as_the_map(city_map, tiny_synthetic):
    queries = sorted(_queries(tiny_synthetic).glob("*.jpg"))[:4]
    localizer = city_map.localizer()
    by_path = localizer.localize(queries, top_k=5)
    by_image = localizer.localize([Image.open(q) for q in queries], top_k=5)
    for a, b in zip(by_path, by_image, strict=True):
        assert [m.photo_id for m in a.matches] == [m.photo_id for m in b.matches]
        assert (a.latitude, a.longitude, a.confidence) == (b.latitude, b.longitude, b.confidence)
    r = by_path[0]
    assert len(r.matches) == 5 and 0 < r.confidence <= 1
    assert [m.rank for m in r.matches] == [1, 2, 3, 4, 5]
    assert set(r.timings) == {"extract_s", "search_s", "rerank_s", "estimate_s"}
    # The estimate lies among its group's matches.
    group = [m for m in r.matches if m.in_group]
    assert (
        group and min(m.east for m in group) - 1e-6 <= r.east <= max(m.east for m in group) + 1e-6
    )
    json.dumps(r.to_dict())
    burst = localizer.localize(queries, top_k=5, burst=True)
    assert [m.photo_id for m in burst[0].matches] == [m.photo_id for m in by_path[0].matches]


def test_localize_from_the_command_line_writes_the_run_folder(
    city_map, tiny_synthetic, tmp_path, capsys
):
    out = tmp_path / "run"
    queries = _queries(tiny_synthetic)
    assert (
        main(
            [
                "localize",
                "--map",
                str(city_map.folder),
                str(queries),
                "--out",
                str(out),
                "--top_k",
                "3",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "error (estimate): median" in printed and "within 5 m" in printed
    n = len(list(queries.glob("*.jpg")))
    with open(out / "localizations.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n and all(float(r["error_m"]) >= 0 for r in rows)
    assert len(json.loads(rows[0]["match_ids"])) == 3
    geo = json.loads((out / "localizations.geojson").read_text())
    kinds = [f["properties"]["kind"] for f in geo["features"]]
    assert kinds.count("estimate") == n and kinds.count("truth") == n
    summary = json.loads((out / "summary.json").read_text())
    assert summary["errors"]["queries_with_position"] == n
    assert summary["pictures"] == n and len(list((out / "pictures").glob("*.jpg"))) == n
    page = (out / "map.html").read_text()
    assert "http" not in page.replace("http://www.w3.org/2000/svg", "")  # opens offline
    assert f'"count": {city_map.count}' in page
    assert (out / "confidence_curve.png").is_file()
    # A query that does not decode names the file; nothing is written.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.jpg").write_bytes(b"not a jpeg")
    assert (
        main(["localize", "--map", str(city_map.folder), str(bad), "--out", str(tmp_path / "r2")])
        == 1
    )
    assert "broken.jpg" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r2.incomplete").exists()


def test_map_commands(tiny_synthetic, tmp_path, capsys):
    out = tmp_path / "m"
    args = [
        "map",
        "build",
        str(_database(tiny_synthetic)),
        "--out",
        str(out),
        "--weights",
        "random",
    ]
    assert main(args + TINY_ARGS + ["--image_size", "56", "56", "--num_workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "mapped now:" in printed and "extent:" in printed
    assert main(["map", "info", str(out)]) == 0
    assert "method: dinov2_gem" in capsys.readouterr().out
    assert main(["map", "info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == Map.open(out).count
    assert main(["map", "verify", str(out), "--photos"]) == 0
    # Building over an existing map is refused.
    assert main(args + TINY_ARGS + ["--image_size", "56", "56"]) == 1
    assert "already a map" in capsys.readouterr().err


def test_localize_on_corridor_gives_the_top1_of_vprkit_eval(shared_data, tmp_path):
    """Positions made up from the ground truth's index order: reference i at 10 m steps
    along a line, each query at its first positive reference."""
    from vprkit.data.formats import open_dataset
    from vprkit.pipeline import EvalConfig, evaluate

    corridor = shared_data / "corridor"
    dataset = open_dataset(corridor)
    db_index = {Path(p).name: i for i, p in enumerate(dataset.database_paths)}

    def position(i: int) -> tuple[float, float]:
        return 45.0 + i * 10 / 111_000, 7.0

    table = tmp_path / "ref.csv"
    table.write_text(
        "path,latitude,longitude\n"
        + "".join(f"{name},{position(i)[0]},{position(i)[1]}\n" for name, i in db_index.items())
    )
    model = _tiny_model()
    m, _ = build_map(
        corridor / "ref",
        tmp_path / "m",
        model=model,
        weights="random",
        positions=table,
        image_size=[56, 56],
        num_workers=0,
    )
    results = m.localizer(model=model).localize(dataset.query_paths, top_k=1)
    run = evaluate(
        model,
        dataset,
        EvalConfig(image_size=(56, 56), recall_values=(1,), num_workers=0, save_dir=tmp_path),
    )
    top1 = [Path(dataset.database_paths[i]).name for i in run.predictions[:, 0]]
    assert [r.matches[0].path for r in results] == top1


def test_localize_reranks_as_the_rerank_stage_does(tiny_synthetic, tmp_path):
    """SelaVPR's map keeps its local features; `rerank=True` gives the order of the pipeline's
    retrieve + rerank stages on the same descriptors (queries encoded one at a time)."""
    from vprkit.pipeline import rerank, retrieve

    torch.manual_seed(0)
    model = create_model("selavpr", backbone="dinov2_vits14", depth=2)
    m, _ = build_map(
        _database(tiny_synthetic),
        tmp_path / "m",
        model=model,
        weights="random",
        image_size=SIZE,
        num_workers=0,
    )
    assert m.has_local and len(m.chunks) == 1
    queries = sorted(_queries(tiny_synthetic).glob("*.jpg"))[:3]
    results = m.localizer(model=model).localize(queries, top_k=5, rerank=True)
    pre = Preprocess(image_size=(56, 56))
    q = extract(model, queries, preprocess=pre, local=True, batch_size=1)
    depth = vprkit_info(model).rerank_num
    expected = rerank(retrieve(m.chunks[0], q, depth), "mnn", m.chunks[0], q, depth, model=model)
    for r, indices, scores in zip(results, expected.indices, expected.scores, strict=True):
        assert r.reranked and [x.photo_id for x in r.matches] == indices[:5].tolist()
        assert [x.score for x in r.matches] == scores[:5].tolist()
    with pytest.raises(VprkitError, match="no re-ranker of its own"):
        Map.open(_city_map_folder(tmp_path, tiny_synthetic)).localizer().localize(
            queries, rerank=True
        )


def _city_map_folder(tmp_path: Path, city: Path) -> Path:
    m, _ = _build(city / "vg" / "synthetic" / "images" / "val" / "database", tmp_path / "val")
    return m.folder


def test_cricavpr_queries_alone_or_as_a_burst_batched_like_extract(tiny_synthetic, tmp_path):
    """CricaVPR's cross-image encoder couples a batch: a query alone is a batch of one, a
    burst is batched as the map's photos were."""
    from vprkit.pipeline import retrieve

    torch.manual_seed(0)
    model = create_model("cricavpr", embed_dim=64, num_heads=4, depth=1)
    m, _ = build_map(
        _database(tiny_synthetic),
        tmp_path / "m",
        model=model,
        weights="random",
        image_size=SIZE,
        num_workers=0,
    )
    queries = sorted(_queries(tiny_synthetic).glob("*.jpg"))[:6]
    localizer = m.localizer(model=model)
    pre = Preprocess(image_size=(56, 56))
    for burst, batch_size in ((False, 1), (True, m.meta["batch_size"])):
        results = localizer.localize(queries, top_k=3, burst=burst)
        q = extract(model, queries, preprocess=pre, batch_size=batch_size)
        expected = retrieve(m.chunks[0], q, 3)
        for r, ids, dist in zip(results, expected.indices, expected.distances, strict=True):
            assert [x.photo_id for x in r.matches] == ids.tolist()
            assert [x.distance for x in r.matches] == pytest.approx(dist.tolist(), abs=1e-6)
    alone = localizer.localize(queries[:1], top_k=1)[0].matches[0].distance
    burst = localizer.localize(queries, top_k=1, burst=True)[0].matches[0].distance
    assert alone != burst  # the coupling is real


@pytest.mark.parametrize(
    "args, message",
    [
        (["localize", "--map", "{tmp}/nothing", "{q}"], "not a map folder"),
        (["localize", "--map", "{map}", "{tmp}/missing.jpg"], "missing.jpg does not exist"),
        (["localize", "--map", "{map}", "{q}", "--method", "cricavpr"], "made by dinov2_gem"),
        (["localize", "--map", "{map}", "{q}", "--top_k", "0"], "--top_k"),
        (["map", "info", "{tmp}"], "not a map folder"),
        (["map", "add", "{map}", "/"], "not under the map's photos root"),
        (["map", "build", "{tmp}/none", "--out", "{tmp}/m", "--method", "dinov2_gem"], "none"),
    ],
)
def test_bad_input_is_one_line(city_map, tiny_synthetic, tmp_path, capsys, args, message):
    values = {"tmp": tmp_path, "map": city_map.folder, "q": _queries(tiny_synthetic)}
    status = main([a.format(**values) for a in args])
    err = capsys.readouterr().err
    assert status in (1, 2) and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_the_map_page_draws_in_a_real_browser(city_map, tiny_synthetic, tmp_path):
    """The offline page's script draws every photo, estimate and true position in headless
    Chromium (Debian's; CI installs it)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium here: apt-get install chromium (CI installs it)")
    out = tmp_path / "run"
    queries = _queries(tiny_synthetic)
    assert main(["localize", "--map", str(city_map.folder), str(queries), "--out", str(out)]) == 0
    dom = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--dump-dom",
            (out / "map.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    n = len(list(queries.glob("*.jpg")))
    assert dom.count('class="db"') == city_map.count
    assert dom.count('class="est"') == n and dom.count('class="truth"') == n


def test_a_map_built_and_localized_with_an_exported_onnx_model(tiny_synthetic, tmp_path):
    pytest.importorskip("onnxruntime", reason="pip install vprkit[export]")
    onnx = tmp_path / "tiny.onnx"
    export = ["export", "--weights", "random", *TINY_ARGS, "--format", "onnx"]
    assert main(export + ["--image_size", "56", "56", "--out", str(onnx)]) == 0
    out = tmp_path / "m"
    build = ["map", "build", str(_database(tiny_synthetic)), "--onnx", str(onnx)]
    assert main(build + ["--out", str(out), "--num_workers", "0"]) == 0
    m = Map.open(out)
    assert m.meta["model"]["weights"] == str(onnx)
    queries = sorted(_queries(tiny_synthetic).glob("*.jpg"))[:3]
    from_onnx = m.localizer().localize(queries, top_k=3)
    torch_map, _ = _build(_database(tiny_synthetic), tmp_path / "t")
    from_torch = torch_map.localizer().localize(queries, top_k=3)
    for a, b in zip(from_onnx, from_torch, strict=True):
        assert [x.photo_id for x in a.matches] == [x.photo_id for x in b.matches]
        assert a.latitude == pytest.approx(b.latitude, abs=1e-7)
