"""`vprkit eval` end to end: on generated data with a known answer, on the real photos, and
on bad input."""

import csv
import json

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from vprkit.cli import main as cli_main
from vprkit.models.info import ModelInfo
from vprkit.models.outputs import DescriptorOutput
from vprkit.models.registry import register_model

TINY = ["--model_option", "size=vits14", "--model_option", "depth=1", "--num_workers", "0"]
TINY += ["--weights", "random"]  # a tiny ViT: no official file fits it


class MeanColour(torch.nn.Module):
    """A 'model' whose descriptor is the mean colour: places of distinct colours are found."""

    def forward(self, x):
        return DescriptorOutput(torch.nn.functional.normalize(x.mean(dim=(2, 3)), dim=1))


register_model(lambda: MeanColour(), name="_test_mean_colour", info=ModelInfo(image_size=(28, 28)))


def _make_vg(root, colours, query_offsets):
    """A VG-layout set: place i at east=1000*i, database and query of colour i; queries
    shifted by `query_offsets[i]` metres east."""
    for folder in ("database", "queries"):
        (root / "images" / "test" / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, colour in enumerate(colours):
        for folder, offset in (("database", 0.0), ("queries", query_offsets[i])):
            pixels = np.clip(colour + rng.normal(0, 3, (32, 40, 3)), 0, 255).astype(np.uint8)
            name = f"@{500000 + 1000 * i + offset:.2f}@{4000000:.2f}@@@@@@@@@@@@@@.jpg"
            Image.fromarray(pixels).save(root / "images" / "test" / folder / name, quality=95)


def _only_run_dir(save_dir):
    runs = [p for p in save_dir.glob("*/*") if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def test_known_answer_and_every_output(tmp_path, capsys):
    colours = np.random.default_rng(1).uniform(20, 235, (8, 3))
    offsets = [0.0] * 7 + [60.0]  # the last query is 60 m from its place: no positive
    _make_vg(tmp_path / "toyvg", colours, offsets)
    args = [
        "eval",
        "--method",
        "_test_mean_colour",
        "--dataset_folder",
        str(tmp_path / "toyvg"),
        "--save_dir",
        str(tmp_path / "runs"),
        "--num_workers",
        "0",
        "--recall_values",
        "1",
        "5",
        "--num_preds_to_save",
        "2",
        "--infer_batch_size",
        "3",
    ]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    # 7 of 8 queries find their place first; the one without positives counts as a miss.
    assert "R@1: 87.5, R@5: 87.5" in printed
    run = _only_run_dir(tmp_path / "runs")
    assert run.name.count(".") == 0  # renamed from <timestamp>.incomplete
    summary = json.loads((run / "recalls.json").read_text())
    assert summary["recalls"] == {"R@1": 87.5, "R@5": 87.5}
    assert summary["queries_without_positives"] == 1
    assert summary["num_database"] == 8 and summary["descriptor_dim"] == 3
    rows = list(csv.DictReader(open(run / "predictions.csv")))
    assert [r["correct_at_1"] for r in rows] == ["True"] * 7 + ["False"]
    assert json.loads(rows[0]["predictions"])[0] == rows[0]["query"].replace("queries", "database")
    assert rows[7]["positives"] == "[]" and rows[7]["first_correct_rank"] == ""
    pairs = (run / "pairs.txt").read_text().splitlines()
    assert len(pairs) == 8 * 5 and pairs[0].split()[0] == rows[0]["query"]
    descriptors = np.load(run / "queries_descriptors.npy")
    with h5py.File(run / "queries_descriptors.h5") as f:
        np.testing.assert_array_equal(f[rows[3]["query"]]["global_descriptor"][()], descriptors[3])
    assert len(list((run / "preds").glob("*.jpg"))) == 8
    config = json.loads((run / "config.json").read_text())
    assert config["method"] == "_test_mean_colour"
    assert "batches of 3" in (run / "log.txt").read_text()


def test_memory_bounded_search_gives_the_same_ranking(tmp_path):
    colours = np.random.default_rng(2).uniform(20, 235, (6, 3))
    _make_vg(tmp_path / "toyvg", colours, [0.0] * 6)
    base = [
        "eval",
        "--method",
        "_test_mean_colour",
        "--dataset_folder",
        str(tmp_path / "toyvg"),
        "--num_workers",
        "0",
        "--recall_values",
        "1",
        "3",
    ]
    cli_main([*base, "--save_dir", str(tmp_path / "a")])
    cli_main([*base, "--save_dir", str(tmp_path / "b"), "--memory_budget_mb", "0.1"])
    a = (_only_run_dir(tmp_path / "a") / "pairs.txt").read_text()
    b = (_only_run_dir(tmp_path / "b") / "pairs.txt").read_text()
    assert a == b


def test_real_photos_vprbench_layout(shared_data, tmp_path, capsys):
    args = [
        "eval",
        "--method",
        "dinov2_gem",
        *TINY,
        "--image_size",
        "112",
        "112",
        "--dataset_folder",
        str(shared_data / "corridor"),
        "--save_dir",
        str(tmp_path),
        "--num_preds_to_save",
        "1",
        "--save_only_wrong_preds",
    ]
    assert cli_main(args) == 0
    assert "R@1: " in capsys.readouterr().out
    run = _only_run_dir(tmp_path)
    summary = json.loads((run / "recalls.json").read_text())
    assert summary["num_queries"] == 111 and summary["num_database"] == 111
    assert set(summary["recalls"]) == {"R@1", "R@5", "R@10", "R@20", "R@100"}
    assert summary["recalls"]["R@100"] == 100.0  # every database image is retrieved
    wrong = sum(r["correct_at_1"] == "False" for r in csv.DictReader(open(run / "predictions.csv")))
    assert len(list((run / "preds").glob("*.jpg"))) == wrong


def test_real_photos_without_labels(shared_data, tmp_path, capsys):
    toy = shared_data / "toy_unlabeled"
    args = [
        "eval",
        "--method",
        "dinov2_cls",
        *TINY,
        "--image_size",
        "56",
        "56",
        "--no_labels",
        "--database_folder",
        str(toy / "database"),
        "--queries_folder",
        str(toy / "queries"),
        "--save_dir",
        str(tmp_path),
        "--num_preds_to_save",
        "2",
    ]
    assert cli_main(args) == 0
    assert "no recall computed" in capsys.readouterr().out
    run = _only_run_dir(tmp_path)
    summary = json.loads((run / "recalls.json").read_text())
    assert "recalls" not in summary and summary["num_queries"] == 5
    assert len((run / "pairs.txt").read_text().splitlines()) == 5 * 17
    assert len(list((run / "preds").glob("*.jpg"))) == 5


def test_bad_dataset_leaves_no_run_folder(tmp_path, capsys):
    argv = ["eval", "--method", "dinov2_cls", "--dataset_folder", str(tmp_path / "nowhere")]
    assert cli_main([*argv, "--save_dir", str(tmp_path / "runs")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    assert cli_main(["eval", "--method", "nope", "--dataset_folder", str(tmp_path)]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_failure_mid_run_is_marked_incomplete(tmp_path, capsys):
    colours = np.random.default_rng(3).uniform(20, 235, (4, 3))
    _make_vg(tmp_path / "toyvg", colours, [0.0] * 4)
    broken = sorted((tmp_path / "toyvg" / "images" / "test" / "queries").iterdir())[2]
    broken.write_bytes(broken.read_bytes()[:100])  # truncated JPEG
    argv = ["eval", "--method", "_test_mean_colour", "--num_workers", "0"]
    argv += ["--dataset_folder", str(tmp_path / "toyvg"), "--save_dir", str(tmp_path / "r")]
    assert cli_main(argv) == 1  # an ImageLoadError: one line naming the file
    assert broken.name in capsys.readouterr().err
    (run,) = [p for p in (tmp_path / "r").glob("*/*")]
    assert run.name.endswith(".incomplete")
    assert not (run / "recalls.json").exists()


def test_pca_is_fitted_saved_and_searched_unnormalized(tmp_path):
    import faiss

    from vprkit.retrieval.search import load_pca

    colours = np.random.default_rng(4).uniform(20, 235, (6, 3))
    _make_vg(tmp_path / "toyvg", colours, [0.0] * 6)
    database = tmp_path / "toyvg" / "images" / "test" / "database"
    args = [
        "eval",
        "--method",
        "_test_mean_colour",
        "--dataset_folder",
        str(tmp_path / "toyvg"),
        "--num_workers",
        "0",
        "--recall_values",
        "1",
        "3",
        "--save_dir",
        str(tmp_path / "r"),
        "--pca_dim",
        "2",
        "--pca_dataset_folder",
        str(database),
    ]
    assert cli_main(args) == 0
    run = _only_run_dir(tmp_path / "r")
    pca = load_pca(run / "pca.npz")
    assert pca.output_dim == 2
    db = pca.transform(np.load(run / "database_descriptors.npy"))
    q = pca.transform(np.load(run / "queries_descriptors.npy"))
    index = faiss.IndexFlatL2(2)
    index.add(db.astype(np.float32))
    _, expected = index.search(q.astype(np.float32), 3)
    rows = list(csv.DictReader(open(run / "predictions.csv")))
    db_names = sorted(p.name for p in database.iterdir())
    for row, exp in zip(rows, expected, strict=True):
        got = [name.split("/")[-1] for name in json.loads(row["predictions"])]
        assert got == [db_names[j] for j in exp]


class BlindGlobalSharpLocal(torch.nn.Module):
    """The same global descriptor for every image (the global ranking is blind), and a
    4x4 map of colours as local features: only re-ranking can find the place."""

    def forward(self, x):
        local = torch.nn.functional.adaptive_avg_pool2d(x, 4)
        local = torch.nn.functional.normalize(local + 3.0, dim=1)
        blind = torch.ones(len(x), 4) / 2
        return DescriptorOutput(global_desc=blind, local_desc=local)


register_model(
    lambda: BlindGlobalSharpLocal(), name="_test_blind_global", info=ModelInfo(image_size=(32, 32))
)


def _make_vg_patterns(root, num_places, seed=0):
    """Place i: a random 4x4 pattern of colour blocks, seen by its database image and by
    a slightly noisy query; places 1 km apart."""
    rng = np.random.default_rng(seed)
    for folder in ("database", "queries"):
        (root / "images" / "test" / folder).mkdir(parents=True)
    for i in range(num_places):
        blocks = rng.uniform(0, 255, (4, 4, 3))
        pattern = np.kron(blocks, np.ones((8, 8, 1)))
        for folder, noise in (("database", 0.0), ("queries", 4.0)):
            pixels = np.clip(pattern + rng.normal(0, noise + 1e-9, pattern.shape), 0, 255)
            name = f"@{500000 + 1000 * i:.2f}@{4000000:.2f}@@@@@@@@@@@@@@.png"
            Image.fromarray(pixels.astype(np.uint8)).save(root / "images" / "test" / folder / name)


@pytest.mark.parametrize("reranker", ["mnn", "ransac_homography"])
def test_reranking_finds_what_the_global_stage_cannot(tmp_path, capsys, reranker):
    _make_vg_patterns(tmp_path / "toyvg", num_places=6)
    cache = tmp_path / "local_cache"
    args = [
        "eval",
        "--method",
        "_test_blind_global",
        "--dataset_folder",
        str(tmp_path / "toyvg"),
        "--num_workers",
        "0",
        "--recall_values",
        "1",
        "3",
        "--save_dir",
        str(tmp_path / "r"),
        "--rerank_num",
        "6",
        "--reranker",
        reranker,
        "--local_features_cache",
        str(cache),
    ]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    run = _only_run_dir(tmp_path / "r")
    summary = json.loads((run / "recalls.json").read_text())
    assert summary["recalls_global"]["R@1"] < 50  # blind: ties broken by database order
    assert summary["recalls"] == {"R@1": 100.0, "R@3": 100.0}
    assert summary["reranker"] == {"method": reranker, "rerank_num": 6}
    assert "global retrieval: R@1:" in printed and f"re-ranked ({reranker}, top 6)" in printed
    # The features are kept as two features folders, local features memory-mapped.
    assert sorted(p.name for p in cache.iterdir()) == ["database", "queries"]
    for side in ("database", "queries"):
        assert sorted(p.name for p in (cache / side).iterdir()) == [
            "features.json",
            "global.npy",
            "local.npy",
        ]
    rows = list(csv.DictReader(open(run / "predictions.csv")))
    assert all(r["correct_at_1"] == "True" for r in rows)


def test_reranking_needs_a_reranker_and_local_features(tmp_path, capsys):
    _make_vg_patterns(tmp_path / "toyvg", num_places=3)
    base = [
        "eval",
        "--dataset_folder",
        str(tmp_path / "toyvg"),
        "--num_workers",
        "0",
        "--save_dir",
        str(tmp_path / "r"),
        "--rerank_num",
        "3",
    ]
    assert cli_main([*base, "--method", "_test_blind_global"]) == 1
    assert "has no re-ranker of its own" in capsys.readouterr().err
    assert cli_main([*base, "--method", "_test_mean_colour", "--reranker", "mnn"]) == 1
    assert "gives no local features" in capsys.readouterr().err


def test_r2former_reranks_with_its_own_transformer_by_default(tmp_path):
    _make_vg_patterns(tmp_path / "toyvg", num_places=4)
    args = [
        "eval",
        "--method",
        "r2former",
        "--model_option",
        "depth=1",
        "--weights",
        "random",
        "--image_size",
        "32",
        "48",
        "--dataset_folder",
        str(tmp_path / "toyvg"),
        "--num_workers",
        "0",
        "--recall_values",
        "1",
        "3",
        "--save_dir",
        str(tmp_path / "r"),
        "--rerank_num",
        "3",
    ]
    assert cli_main(args) == 0
    summary = json.loads((_only_run_dir(tmp_path / "r") / "recalls.json").read_text())
    assert summary["reranker"] == {"method": "r2former", "rerank_num": 3}
    assert set(summary["recalls_global"]) == set(summary["recalls"]) == {"R@1", "R@3"}
