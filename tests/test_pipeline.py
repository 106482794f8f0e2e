"""The pipeline's stages: alone, through their files and commands, equal to `vprkit eval`;
skip-if-done and refuse-if-different; a new model and a new dataset format in one file each."""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap

import numpy as np
import pytest
import torch

from tests.test_eval_golden import CASES, COMMON, RECORDED, _dataset_args
from vprkit.cli import main as cli_main
from vprkit.data.formats import open_dataset
from vprkit.data.images import Preprocess
from vprkit.errors import StageMismatchError, VprkitError
from vprkit.models.outputs import DescriptorOutput
from vprkit.models.registry import create_model, register_model
from vprkit.pipeline import (
    EvalConfig,
    evaluate,
    extract,
    load_features,
    load_predictions,
    rerank,
    retrieve,
    score,
)
from vprkit.pipeline.score import dataset_positives


def _recalls(metrics_or_summary: dict) -> dict:
    return {k: v for k, v in metrics_or_summary["recalls"].items()}


def _model_args(case: str) -> tuple[list[str], list[str]]:
    """A golden case's model flags, split into (model flags, run flags)."""
    args = CASES[case][1]
    model, run, i = [], [], 0
    while i < len(args):
        flag = args[i]
        if flag == "--image_size":
            run += args[i : i + 3]
            i += 3
        elif flag in ("--method", "--model_option", "--infer_batch_size"):
            (model if flag != "--infer_batch_size" else run).extend(args[i : i + 2])
            i += 2
        else:  # --rerank_num N, --reranker R
            i += 2
    return model, run


@pytest.mark.parametrize("case", ["corridor_selavpr_mnn", "gardenspoint_cricavpr"])
def test_stage_commands_through_files_equal_vprkit_eval(
    case, shared_data, tiny_synthetic, tmp_path, capsys
):
    """extract -> retrieve -> rerank -> score, each a command on the files the one before
    wrote, give the recorded figures of `vprkit eval`."""
    dataset = _dataset_args(CASES[case][0], shared_data, tiny_synthetic, tmp_path)
    model, run = _model_args(case)
    feats = tmp_path / "feats"
    torch.manual_seed(0)  # the same random weights as the recorded run
    assert (
        cli_main(
            ["extract", *model, "--weights", "random", *run, *dataset, "--num_workers", "0"]
            + ["--out", str(feats)]
        )
        == 0
    )
    reranks = "--rerank_num" in CASES[case][1]
    depth = CASES[case][1][CASES[case][1].index("--rerank_num") + 1] if reranks else None
    k = max(10, int(depth or 0))
    retrieved = tmp_path / "retrieved.npz"
    assert (
        cli_main(["retrieve", "--features", str(feats), "-k", str(k), "--out", str(retrieved)]) == 0
    )
    final = retrieved
    if reranks:
        final = tmp_path / "reranked.npz"
        argv = ["rerank", "--features", str(feats), "--predictions", str(retrieved)]
        assert cli_main([*argv, "--rerank_num", depth, "--out", str(final)]) == 0
    metrics = tmp_path / "metrics.json"
    argv = ["score", "--predictions", str(final), *dataset, "--recall_values", "1", "5", "10"]
    assert cli_main([*argv, "--out", str(metrics)]) == 0
    assert _recalls(json.loads(metrics.read_text())) == RECORDED[case]["recalls"]
    printed = capsys.readouterr().out
    assert "R@1: " in printed and "AUC-PR: " in printed

    # And the same predictions as one `vprkit eval` call, row for row.
    torch.manual_seed(0)
    save = tmp_path / "runs"
    argv = ["eval", *CASES[case][1], *dataset, *COMMON, "--save_dir", str(save)]
    assert cli_main(argv) == 0
    (run_dir,) = [p for p in save.glob("*/*") if p.is_dir()]
    staged = load_predictions(final)
    rows = (run_dir / "pairs.txt").read_text().splitlines()
    names = [
        f"{staged.query_names[q]} {staged.database_names[d]}"
        for q in range(len(staged.indices))
        for d in staged.indices[q]
    ]
    assert names == rows


class CountingModel(torch.nn.Module):
    """Mean colour per image, counting the images it sees."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(scale))
        self.images_seen = 0

    def forward(self, x):
        self.images_seen += len(x)
        local = torch.nn.functional.avg_pool2d(x, 8)  # (B, 3, h/8, w/8) "dense local features"
        return DescriptorOutput(
            torch.nn.functional.normalize(self.scale * x.mean(dim=(2, 3)), dim=1), local
        )


register_model(lambda scale=1.0: CountingModel(scale), name="_test_counting")


def test_a_stage_reuses_what_it_made_and_refuses_what_it_did_not(shared_data, tmp_path):
    paths = sorted((shared_data / "corridor" / "ref").glob("*.jpg"))[:20]
    model = create_model("_test_counting")
    pre = Preprocess(image_size=(32, 32))
    out = tmp_path / "db"
    first = extract(model, paths, out, preprocess=pre, root=shared_data)
    assert model.images_seen == 20
    again = extract(model, paths, out, preprocess=pre, root=shared_data, num_workers=0)
    assert model.images_seen == 20  # nothing recomputed; the worker count does not matter
    np.testing.assert_array_equal(again.global_desc, first.global_desc)

    with pytest.raises(StageMismatchError, match=r"model\.state_sha256"):
        extract(create_model("_test_counting", scale=2.0), paths, out, preprocess=pre)
    with pytest.raises(
        StageMismatchError, match=r"preprocess\.image_size \(\[32, 32\] there, \[48, 48\] now\)"
    ):
        extract(model, paths, out, preprocess=Preprocess(image_size=(48, 48)))
    # Features with local ones serve a request without them, not the other way round.
    with pytest.raises(StageMismatchError, match=r"local \(null there"):
        extract(model, paths, out, preprocess=pre, root=shared_data, local=True)
    with_local = extract(model, paths, tmp_path / "loc", preprocess=pre, local=True)
    assert with_local.has_local and model.images_seen == 40
    assert extract(model, paths, tmp_path / "loc", preprocess=pre).has_local
    assert model.images_seen == 40
    with pytest.raises(StageMismatchError, match=r"images\.count"):
        extract(model, paths[:10], out, preprocess=pre, root=shared_data)
    assert model.images_seen == 40

    # Retrieval: reused from its file with the same inputs, refused with other ones.
    queries = extract(model, paths[:5], tmp_path / "q", preprocess=pre, root=shared_data)
    found = retrieve(first, queries, 3, tmp_path / "p.npz")
    stamp = (tmp_path / "p.npz").stat().st_mtime_ns
    assert (
        retrieve(first, queries, 3, tmp_path / "p.npz").indices.tolist() == found.indices.tolist()
    )
    assert (tmp_path / "p.npz").stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(found.indices[:, 0], np.arange(5))  # each finds itself
    with pytest.raises(StageMismatchError, match=r"k \(3 there, 4 now\)"):
        retrieve(first, queries, 4, tmp_path / "p.npz")


def test_refusals_through_the_commands_name_what_differs(shared_data, tmp_path, capsys):
    base = [
        "extract",
        "--method",
        "dinov2_gem",
        "--weights",
        "random",
        "--model_option",
        "size=vits14",
        "--model_option",
        "depth=1",
        "--images",
        str(shared_data / "gardenspoint10" / "ref"),
        "--num_workers",
        "0",
        "--out",
        str(tmp_path / "f"),
    ]
    assert cli_main([*base, "--image_size", "28", "28"]) == 0
    capsys.readouterr()
    # Another input size, and another random init (seed 1): both differences are named.
    assert cli_main([*base, "--image_size", "42", "42", "--seed", "1"]) == 1
    refused = capsys.readouterr().err
    assert refused.startswith("vprkit extract: error: ") and refused.count("\n") == 1
    assert "image_size" in refused and "model.state_sha256" in refused
    features = load_features(tmp_path / "f")
    assert len(features) == 10 and features.fingerprint["preprocess"]["image_size"] == [28, 28]


def test_rerank_needs_local_features(shared_data, tmp_path):
    model = create_model("_test_counting")
    paths = sorted((shared_data / "gardenspoint10" / "ref").glob("*.jpg"))
    features = extract(model, paths, preprocess=Preprocess(image_size=(28, 28)))
    found = retrieve(features, features, 3)
    with pytest.raises(VprkitError, match="local features"):
        rerank(found, "mnn", features, features, 3)


def test_r2former_reranks_from_files_with_its_weights(tiny_synthetic, tmp_path, capsys):
    """`vprkit rerank` rebuilds R2Former from what the features record, with the weights
    file they were made with, and gives the re-ranking `vprkit eval` gives."""
    options = {"depth": 1, "embed_dim": 64, "num_heads": 2, "img_size": (64, 64), "num_local": 20}
    torch.manual_seed(3)
    weights = tmp_path / "r2former_tiny.pth"
    torch.save(create_model("r2former", **options).state_dict(), weights)
    model_args = ["--method", "r2former", "--weights", str(weights), "--image_size", "64", "64"]
    for key, value in options.items():
        model_args += ["--model_option", f"{key}={value!r}".replace(" ", "")]
    data = ["--dataset_folder", str(tiny_synthetic / "vg" / "synthetic")]
    feats = tmp_path / "feats"
    assert cli_main(["extract", *model_args, *data, "--num_workers", "0", "--out", str(feats)]) == 0
    # 4x4 patches: all 16 kept as local tokens.
    assert load_features(feats / "queries").local.feature_shape == (16, 131)
    retrieved, reranked = tmp_path / "r.npz", tmp_path / "rr.npz"
    assert (
        cli_main(["retrieve", "--features", str(feats), "-k", "10", "--out", str(retrieved)]) == 0
    )
    rerank_argv = ["rerank", "--features", str(feats), "--predictions", str(retrieved)]
    rerank_argv += ["--rerank_num", "8"]
    assert cli_main([*rerank_argv, "--out", str(reranked)]) == 0
    save = tmp_path / "runs"
    argv = ["eval", *model_args, *data, *COMMON, "--rerank_num", "8", "--save_dir", str(save)]
    assert cli_main(argv) == 0
    (run_dir,) = [p for p in save.glob("*/*") if p.is_dir()]
    staged = load_predictions(reranked)
    assert (run_dir / "pairs.txt").read_text().splitlines() == [
        f"{staged.query_names[q]} {staged.database_names[d]}"
        for q in range(len(staged.indices))
        for d in staged.indices[q]
    ]
    # Other weights than the features were made with are refused.
    torch.manual_seed(4)
    other = tmp_path / "other.pth"
    torch.save(create_model("r2former", **options).state_dict(), other)
    assert cli_main([*rerank_argv, "--weights", str(other), "--out", str(tmp_path / "x.npz")]) == 1
    assert "other weights" in capsys.readouterr().err


def _import_file(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


TOY_FORMAT = '''
"""A toy layout: <folder>/places.csv listing path,east,north,side."""
import csv

import numpy as np

from vprkit.data.datasets import PlaceDataset
from vprkit.data.formats import DatasetFormat, register_format


@register_format
class ToyCsvPlaces(DatasetFormat):
    name = "_toy_csv_places"
    description = "<folder>/places.csv with path,east,north,side"

    def detect(self, path):
        return (path / "places.csv").is_file()

    def read(self, path, *, no_labels=False):
        rows = list(csv.DictReader(open(path / "places.csv", newline="")))
        sides = {s: [r for r in rows if r["side"] == s] for s in ("database", "query")}
        utm = {
            s: np.array([[float(r["east"]), float(r["north"])] for r in sides[s]]) for s in sides
        }
        return PlaceDataset(
            name=path.name, root=path,
            database_paths=[path / r["path"] for r in sides["database"]],
            query_paths=[path / r["path"] for r in sides["query"]],
            database_utm=utm["database"], query_utm=utm["query"],
        )
'''

TOY_MODEL = '''
"""A toy model: the mean colour of the image, at 16x16."""
import torch

from vprkit.models.info import ModelInfo
from vprkit.models.outputs import DescriptorOutput
from vprkit.models.registry import register_model


class MeanColour(torch.nn.Module):
    def forward(self, x):
        return DescriptorOutput(torch.nn.functional.normalize(x.mean(dim=(2, 3)), dim=1))


@register_model(name="_toy_mean_colour", info=ModelInfo(image_size=(16, 16), infer_batch_size=2))
def toy_mean_colour():
    return MeanColour()
'''


def test_a_new_format_and_a_new_model_in_one_file_each(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "plugins").mkdir()
    for name, text in (("toy_csv_format", TOY_FORMAT), ("toy_mean_model", TOY_MODEL)):
        (tmp_path / "plugins" / f"{name}.py").write_text(textwrap.dedent(text))
        _import_file(tmp_path / "plugins" / f"{name}.py")
    folder = tmp_path / "toy_set"
    folder.mkdir()
    colours = np.random.default_rng(0).uniform(20, 235, (5, 3))
    lines = ["path,east,north,side"]
    for i, colour in enumerate(colours):
        for side in ("database", "query"):
            Image.fromarray(np.full((20, 24, 3), colour, dtype=np.uint8)).save(
                folder / f"{side}{i}.png"
            )
            lines.append(f"{side}{i}.png,{1000.0 * i},0.0,{side}")
    (folder / "places.csv").write_text("\n".join(lines) + "\n")
    assert open_dataset(folder).layout == "_toy_csv_places"
    argv = [
        "eval",
        "--method",
        "_toy_mean_colour",
        "--dataset_folder",
        str(folder),
        "--num_workers",
        "0",
        "--recall_values",
        "1",
        "3",
        "--save_dir",
        str(tmp_path / "runs"),
    ]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "R@1: 100.0, R@3: 100.0" in printed
    (run_dir,) = [p for p in (tmp_path / "runs").glob("*/*") if p.is_dir()]
    summary = json.loads((run_dir / "recalls.json").read_text())
    assert summary["image_size"] == [16, 16] and summary["infer_batch_size"] == 2


def test_the_python_api_chains_like_the_command(shared_data, tmp_path):
    """`evaluate(model, dataset, config)` with a typed config, and the stages called alone on
    the same model give the same recalls."""
    dataset = open_dataset(shared_data / "corridor")
    torch.manual_seed(0)
    model = create_model("dinov2_gem", size="vits14", depth=1)
    config = EvalConfig(
        image_size=(56, 56), recall_values=(1, 5, 10), num_workers=0, save_dir=tmp_path / "runs"
    )
    result = evaluate(model, dataset, config)
    assert {f"R@{n}": v for n, v in result.recalls.items()} == RECORDED["corridor_dinov2_gem"][
        "recalls"
    ]
    pre = Preprocess(image_size=(56, 56))
    db = extract(model, dataset.database_paths, preprocess=pre, root=dataset.root)
    q = extract(model, dataset.query_paths, preprocess=pre, root=dataset.root)
    metrics = score(retrieve(db, q, 10), dataset_positives(dataset, 25), (1, 5, 10))
    assert metrics["recalls"] == result.recalls
    np.testing.assert_array_equal(retrieve(db, q, 10).indices, result.predictions)


def test_eval_config_checks_its_values():
    with pytest.raises(VprkitError, match="--infer_batch_size"):
        EvalConfig(infer_batch_size=0)
    with pytest.raises(VprkitError, match="recall values"):
        EvalConfig(recall_values=(0, 5))
    with pytest.raises(VprkitError, match="--pca_dim and --pca_dataset_folder"):
        EvalConfig(pca_dim=8)


def test_the_weights_hash_is_remembered_until_the_weights_change():
    from vprkit.pipeline.fingerprint import state_sha256

    model = create_model("dinov2_gem", size="vits14", depth=1)
    first = state_sha256(model)
    assert state_sha256(model) == first
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        next(model.parameters()).mul_(3)  # in place: a new version of the same storage
    changed = state_sha256(model)
    assert changed != first
    model.load_state_dict(saved)
    assert state_sha256(model) == first
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(2, 3, 56, 56)).global_desc.sum().backward()
    optimizer.step()
    assert state_sha256(model) not in (first, changed)
