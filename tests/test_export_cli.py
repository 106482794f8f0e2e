"""`vprkit export`, and exported files run by vprkit itself (`--backend onnxruntime --onnx
FILE`): eval on corridor gives the PyTorch path's recalls, extract records a fingerprint of
its own, and the flags' errors follow the contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vprkit.cli import main as cli_main

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

COMMON = ["--num_workers", "0", "--recall_values", "1", "5", "10"]

# method -> (model flags, input size, eval flags)
MODELS = {
    "dinov2_gem": (
        ["--model_option", "size=vits14", "--model_option", "depth=1"],
        ["56", "70"],
        [],
    ),
    "selavpr": (
        ["--model_option", "backbone=dinov2_vits14", "--model_option", "depth=1"],
        ["56", "56"],
        ["--rerank_num", "10"],
    ),
    "r2former": (
        ["--model_option", "depth=1", "--model_option", "num_local=20"],
        ["64", "80"],
        ["--rerank_num", "10"],
    ),
    "cricavpr": (
        [
            "--model_option",
            "embed_dim=64",
            "--model_option",
            "num_heads=4",
            "--model_option",
            "depth=1",
        ],
        ["56", "56"],
        [],
    ),
}


def model_flags(method: str) -> list[str]:
    return ["--method", method, "--weights", "random", *MODELS[method][0]]


def export(method: str, out: Path, *extra: str) -> int:
    size = MODELS[method][1]
    return cli_main(
        ["export", *model_flags(method), "--image_size", *size, "--out", str(out), *extra]
    )


def recalls(save_dir: Path) -> dict:
    (run,) = [p for p in save_dir.glob("*/*") if p.is_dir()]
    return json.loads((run / "recalls.json").read_text())


@pytest.mark.parametrize("method", sorted(MODELS))
def test_eval_onnxruntime_gives_the_pytorch_recalls(method, shared_data, tmp_path, capsys):
    path = tmp_path / f"{method}.onnx"
    assert export(method, path, "--verify_images", str(shared_data / "corridor" / "ref")) == 0
    printed = capsys.readouterr().out
    assert f"wrote {path}: {method} at" in printed
    if method == "r2former":
        assert (
            tmp_path / f"{method}.rerank.onnx"
        ).is_file() and "re-ranking transformer" in printed
    if method == "cricavpr":
        assert "batch-coupled" in printed
    dataset = ["--dataset_folder", str(shared_data / "corridor"), *COMMON, *MODELS[method][2]]
    size = ["--image_size", *MODELS[method][1]]
    torch_dir, onnx_dir = tmp_path / "torch", tmp_path / "onnx"
    assert (
        cli_main(["eval", *model_flags(method), *size, *dataset, "--save_dir", str(torch_dir)]) == 0
    )
    torch_out = capsys.readouterr().out
    # No --method, no --image_size: the file says both.
    onnx_args = ["eval", "--backend", "onnxruntime", "--onnx", str(path), *dataset]
    assert cli_main([*onnx_args, "--save_dir", str(onnx_dir)]) == 0
    onnx_out = capsys.readouterr().out
    a, b = recalls(torch_dir), recalls(onnx_dir)
    assert a["recalls"] == b["recalls"] and a["num_queries"] == b["num_queries"] == 111
    recall_lines = [line for line in torch_out.splitlines() if "R@1:" in line]
    assert recall_lines and recall_lines == [l for l in onnx_out.splitlines() if "R@1:" in l]


def test_extract_with_onnx_has_its_own_fingerprint(shared_data, tmp_path, capsys):
    path = tmp_path / "gem.onnx"
    assert export("dinov2_gem", path) == 0
    images = ["--images", str(shared_data / "corridor" / "query"), "--num_workers", "0"]
    out = tmp_path / "features"
    assert cli_main(["extract", "--onnx", str(path), *images, "--out", str(out)]) == 0
    assert "extracted in" in capsys.readouterr().out
    assert cli_main(["extract", "--onnx", str(path), *images, "--out", str(out)]) == 0
    assert "(reused)" in capsys.readouterr().out
    from vprkit.pipeline.features import load_features

    features = load_features(out)
    assert features.fingerprint["model"]["name"] == "dinov2_gem"
    assert features.record["weights"] == str(path) and "weights_file_sha256" in features.record
    # The same model in PyTorch made other features: refused, naming the weights hash.
    size = ["--image_size", *MODELS["dinov2_gem"][1]]
    code = cli_main(["extract", *model_flags("dinov2_gem"), *size, *images, "--out", str(out)])
    assert code == 1
    assert "state_sha256" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--backend", "onnxruntime"], "argument --backend: onnxruntime runs an exported file"),
        (["--backend", "torch", "--onnx", "{onnx}"], "argument --onnx: an ONNX file runs with"),
        (["--onnx", "{onnx}", "--method", "selavpr"], "exported from dinov2_gem, not selavpr"),
        (["--onnx", "{onnx}", "--weights", "random"], "argument --weights: "),
        (["--onnx", "{onnx}", "--image_size", "56", "56"], "was exported for 56x70 (H x W)"),
        (["--onnx", "{onnx}", "--model_option", "depth=2"], "its architecture is fixed"),
        (["--onnx", "{onnx}", "--precision", "bf16"], "runs in fp32"),
        ([], "the following arguments are required: --method"),
    ],
)
def test_flag_errors_are_one_line(flags, message, shared_data, tmp_path, capsys):
    path = tmp_path / "gem.onnx"
    assert export("dinov2_gem", path) == 0
    capsys.readouterr()
    flags = [f.replace("{onnx}", str(path)) for f in flags]
    args = ["eval", *flags, "--dataset_folder", str(shared_data / "corridor"), *COMMON]
    assert cli_main([*args, "--save_dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vprkit eval: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_wrong_size_at_run_time_names_the_file(shared_data, tmp_path, capsys):
    """An image size that bypasses the flags (a model built in Python) is refused too."""
    import torch

    from vprkit.cli_args import build_model
    from vprkit.errors import VprkitError

    path = tmp_path / "gem.onnx"
    assert export("dinov2_gem", path) == 0
    model, weights = build_model(None, str(path), [])
    assert weights == str(path) and model.vprkit_name == "dinov2_gem"
    with pytest.raises(
        VprkitError, match="gem.onnx was exported for 56x70.*export the model again"
    ):
        model(torch.zeros(1, 3, 56, 56))


def test_export_torchscript_and_errors(tmp_path, capsys):
    out = tmp_path / "gem.pt"
    assert export("dinov2_gem", out, "--format", "torchscript") == 0
    assert "max |torchscript - torch|" in capsys.readouterr().out
    from vprkit.export.torchscript import load_torchscript

    _, meta = load_torchscript(out)
    assert meta["method"] == "dinov2_gem" and meta["image_size"] == [56, 70]
    # Export flags are checked like any model flags.
    code = cli_main(
        ["export", "--method", "dinov2_gem", "--image_size", "50", "70", "--out", str(out)]
    )
    assert code == 2 and "not a multiple of" in capsys.readouterr().err
    code = cli_main(["export", "--method", "nope", "--out", str(out)])
    assert code == 2 and "unknown method 'nope'" in capsys.readouterr().err


def test_missing_onnx_package_is_one_line(tmp_path, capsys, monkeypatch):
    import vprkit.export as export_pkg

    real = export_pkg.require

    def missing(module):
        if module in ("onnx", "onnxruntime"):
            raise export_pkg.VprkitError(
                f"{module} is not installed: it is needed to export or run ONNX models; "
                f"{export_pkg.INSTALL_HINT}"
            )
        return real(module)

    monkeypatch.setattr(export_pkg, "require", missing)
    code = cli_main(
        [
            "export",
            *model_flags("dinov2_gem"),
            "--image_size",
            "56",
            "56",
            "--out",
            str(tmp_path / "x.onnx"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and err == (
        "vprkit export: error: onnx is not installed: it is needed to export or run ONNX "
        "models; pip install vprkit[export]\n"
    )


def test_stages_on_onnx_features_rerank_with_the_exported_reranker(shared_data, tmp_path):
    """extract (ONNX) -> retrieve -> rerank: `vprkit rerank` rebuilds the model from the
    features' record, here the ONNX file with its re-ranker graph, and re-ranks as `vprkit
    eval --backend onnxruntime` does."""
    from vprkit.pipeline.predictions import load_predictions

    path = tmp_path / "r2.onnx"
    assert export("r2former", path) == 0
    data = ["--dataset_folder", str(shared_data / "corridor"), "--num_workers", "0"]
    feats = tmp_path / "feats"
    assert cli_main(["extract", "--onnx", str(path), *data, "--out", str(feats)]) == 0
    retrieved, reranked = tmp_path / "r.npz", tmp_path / "rr.npz"
    assert (
        cli_main(["retrieve", "--features", str(feats), "-k", "10", "--out", str(retrieved)]) == 0
    )
    argv = ["rerank", "--features", str(feats), "--predictions", str(retrieved)]
    assert cli_main([*argv, "--rerank_num", "10", "--out", str(reranked)]) == 0
    save = tmp_path / "runs"
    eval_argv = ["eval", "--onnx", str(path), *data, *COMMON[2:], "--rerank_num", "10"]
    assert cli_main([*eval_argv, "--save_dir", str(save)]) == 0
    (run_dir,) = [p for p in save.glob("*/*") if p.is_dir()]
    staged = load_predictions(reranked)
    assert (run_dir / "pairs.txt").read_text().splitlines() == [
        f"{staged.query_names[q]} {staged.database_names[d]}"
        for q in range(len(staged.indices))
        for d in staged.indices[q]
    ]
    assert not (staged.indices == load_predictions(retrieved).indices).all()  # it re-ranked
