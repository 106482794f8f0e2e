"""The command line's error contract, tried as a hostile user would.

Every verb reports an expected failure as one line on stderr,
`vprkit <verb>: error: <what>, <which file or option>, <what to do>`, exit status 1 (2 for a
usage error), no traceback (unless --debug), and leaves no output behind; Ctrl-C exits with 130
and one line.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vprkit.cli import main as cli_main
from vprkit.models.info import ModelInfo
from vprkit.models.outputs import DescriptorOutput
from vprkit.models.registry import register_model


class _Tiny(torch.nn.Module):
    """Mean colour (scaled by a weight) and 2x2 colour maps as local features."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(scale))

    def forward(self, x):
        local = torch.nn.functional.avg_pool2d(x, 8)
        return DescriptorOutput(torch.nn.functional.normalize(self.scale * x.mean((2, 3))), local)


# Models with parameters and no official weights: `--weights` must be given.
register_model(lambda scale=1.0: _Tiny(scale), name="_cli_tiny", info=ModelInfo((16, 16)))
register_model(lambda scale=1.0: _Tiny(scale), name="_cli_other", info=ModelInfo((16, 16)))

TINY = ["--method", "_cli_tiny", "--weights", "random", "--num_workers", "0"]
VIT = ["--method", "dinov2_gem", "--model_option", "size=vits14", "--model_option", "depth=1"]


def _vg(root: Path, places: int = 4) -> Path:
    for side in ("database", "queries"):
        folder = root / "images" / "test" / side
        folder.mkdir(parents=True)
        for i in range(places):
            colour = (40 * i + 30, 200 - 30 * i, 90 + (side == "queries") * 5)
            name = f"@{500000 + 1000 * i:.2f}@{4000000:.2f}@@@@@@@@@@@@@@.png"
            Image.new("RGB", (24, 16), colour).save(folder / name)
    return root


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> dict[str, str]:
    """Files to be hostile with: a dataset, features of two models, predictions."""
    base = tmp_path_factory.mktemp("cli_errors")
    vg = _vg(base / "vg")
    feats, other = base / "feats", base / "other"
    data = ["--dataset_folder", str(vg), "--local"]
    assert cli_main(["extract", *TINY, *data, "--out", str(feats)]) == 0
    other_model = ["--method", "_cli_other", "--weights", "random", "--num_workers", "0"]
    assert cli_main(["extract", *other_model, *data, "--out", str(other)]) == 0
    predictions = base / "retrieved.npz"
    assert (
        cli_main(["retrieve", "--features", str(feats), "-k", "3", "--out", str(predictions)]) == 0
    )
    # VPR-Bench-style folder, a malformed ground truth, a folder with a non-image among images
    bench = base / "bench"
    for side in ("query", "ref"):
        (bench / side).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), (10 * i, 0, 0)).save(bench / side / f"{i}.jpg")
    bad_gt = base / "bad_gt.npy"
    np.save(bad_gt, np.zeros((3, 3)))
    broken = _vg(base / "broken")
    next((broken / "images" / "test" / "queries").iterdir()).write_bytes(b"not an image")
    synth_out = base / "synth_used"
    synth_out.mkdir()
    (synth_out / "something").write_text("x")
    return {
        "vg": str(vg),
        "db": str(vg / "images" / "test" / "database"),
        "q": str(vg / "images" / "test" / "queries"),
        "feats": str(feats),
        "other": str(other),
        "predictions": str(predictions),
        "global_npy": str(feats / "database" / "global.npy"),
        "bench": str(bench),
        "bad_gt": str(bad_gt),
        "broken": str(broken),
        "synth_used": str(synth_out),
        "dir": str(base),
        "missing": str(base / "missing"),
    }


# (argv with {placeholders}; exit status; text the error line must contain; the run may have
# started, so that progress bars may come before the line)
ROWS = [
    # eval: flags checked when parsed
    (["eval", *TINY, "--dataset_folder", "{vg}", "--recall_values", "-5"], 2, "--recall_values"),
    (
        ["eval", *VIT, "--weights", "random", "--dataset_folder", "{vg}", "--image_size", "13"],
        2,
        "use 14 or 28",
    ),
    (["eval", *VIT, "--model_option", "depth=abc", "--dataset_folder", "{vg}"], 2, "depth="),
    (["eval", *VIT, "--model_option", "foo=1", "--dataset_folder", "{vg}"], 2, "foo"),
    (["eval", *TINY, "--model_option", "foo=1", "--dataset_folder", "{vg}"], 2, "known options"),
    (["eval", *TINY, "--dataset_folder", "{vg}", "--num_workers", "-1"], 2, "--num_workers"),
    (
        ["eval", *TINY, "--dataset_folder", "{vg}", "--infer_batch_size", "0"],
        2,
        "--infer_batch_size",
    ),
    (
        ["eval", "--method", "_cli_tiny", "--weights", "{dir}", "--dataset_folder", "{vg}"],
        2,
        "is a folder",
    ),
    (
        ["eval", "--method", "_cli_tiny", "--weights", "{missing}.pth", "--dataset_folder", "{vg}"],
        2,
        "neither a file nor an official name",
    ),
    (["eval", *TINY, "--dataset_folder", "{vg}", "--rerank_num", "-1"], 2, "--rerank_num"),
    (
        ["eval", *TINY, "--dataset_folder", "{vg}", "--positive_dist_threshold", "-3"],
        2,
        "--positive_dist_threshold",
    ),
    (["eval", *TINY, "--dataset_folder", "{vg}", "--positive_dist_threshold", "nan"], 2, "finite"),
    (["eval", *TINY, "--dataset_folder", "{missing}"], 2, "no such folder"),
    (["eval", "--method", "nope", "--dataset_folder", "{vg}"], 2, "unknown method 'nope'"),
    (["eval", *TINY, "--dataset_folder", "{vg}", "--database_folder", "{db}"], 2, "not both"),
    (
        ["eval", *TINY, "--database_folder", "{bench}", "--queries_folder", "{q}"],
        2,
        "--dataset_folder",
    ),
    (
        [
            "eval",
            *TINY,
            "--database_folder",
            "{db}",
            "--queries_folder",
            "{q}",
            "--ground_truth",
            "{dir}",
        ],
        2,
        "--ground_truth",
    ),
    (
        ["eval", *TINY, "--dataset_folder", "{bench}", "--no_labels", "--ground_truth", "{bad_gt}"],
        2,
        "exclude each other",
    ),
    # eval: refused after parsing, before any folder is made
    (["eval", "--method", "_cli_tiny", "--dataset_folder", "{vg}"], 1, "--weights random"),
    (["eval", *VIT, "--dataset_folder", "{vg}"], 1, "changes dinov2_gem's architecture"),
    (["eval", *TINY, "--dataset_folder", "{bench}", "--ground_truth", "{bad_gt}"], 1, "bad_gt.npy"),
    (["eval", "--method", "r2former", "--dataset_folder", "{vg}"], 1, "save it as"),
    # eval: the run has started (a run folder marked .incomplete is the contract)
    (["eval", *TINY, "--dataset_folder", "{broken}"], 1, "not a recognised image", "started"),
    # extract
    (["extract", *TINY, "--dataset_folder", "{vg}"], 2, "--out"),
    (["extract", *TINY, "--images", "{global_npy}", "--out", "{out}"], 2, "is a file"),
    (
        ["extract", *TINY, "--images", "{db}", "--dataset_folder", "{vg}", "--out", "{out}"],
        2,
        "not both",
    ),
    (
        ["extract", *TINY, "--images", "{db}", "--image_size", "1", "2", "3", "--out", "{out}"],
        2,
        "--image_size",
    ),
    (
        [
            "extract",
            "--method",
            "_cli_other",
            "--weights",
            "random",
            "--num_workers",
            "0",
            "--dataset_folder",
            "{vg}",
            "--local",
            "--out",
            "{feats}",
        ],
        1,
        "model.name",
    ),
    # retrieve
    (
        [
            "retrieve",
            "--database",
            "{feats}/database",
            "--queries",
            "{other}/queries",
            "--out",
            "{out}.npz",
        ],
        1,
        "different models",
    ),
    (["retrieve", "--features", "{predictions}", "--out", "{out}.npz"], 2, "is a file"),
    (["retrieve", "--features", "{feats}", "-k", "0", "--out", "{out}.npz"], 2, "-k"),
    (["retrieve", "--features", "{feats}", "--out", "{dir}"], 2, "is a folder"),
    (["retrieve", "--features", "{dir}", "--out", "{out}.npz"], 1, "not a features folder"),
    # rerank
    (
        [
            "rerank",
            "--features",
            "{feats}",
            "--predictions",
            "{feats}",
            "--reranker",
            "mnn",
            "--out",
            "{out}.npz",
        ],
        2,
        "is a folder",
    ),
    (
        [
            "rerank",
            "--features",
            "{feats}",
            "--predictions",
            "{global_npy}",
            "--reranker",
            "mnn",
            "--out",
            "{out}.npz",
        ],
        1,
        "not a predictions file",
    ),
    (
        [
            "rerank",
            "--features",
            "{feats}",
            "--predictions",
            "{predictions}",
            "--reranker",
            "mnn",
            "--rerank_num",
            "0",
            "--out",
            "{out}.npz",
        ],
        2,
        "--rerank_num",
    ),
    (
        ["rerank", "--features", "{feats}", "--predictions", "{predictions}", "--out", "{out}.npz"],
        2,
        "choose --reranker",
    ),
    # score
    (["score", "--predictions", "{missing}.npz", "--dataset_folder", "{vg}"], 2, "no such file"),
    (
        [
            "score",
            "--predictions",
            "{predictions}",
            "--dataset_folder",
            "{vg}",
            "--recall_values",
            "0",
        ],
        2,
        "--recall_values",
    ),
    (["score", "--predictions", "{global_npy}", "--dataset_folder", "{vg}"], 1, "global.npy"),
    (
        ["score", "--predictions", "{predictions}", "--dataset_folder", "{bench}", "--no_labels"],
        1,
        "not those of",
    ),
    (
        [
            "score",
            "--predictions",
            "{predictions}",
            "--dataset_folder",
            "{vg}",
            "--out",
            "/dev/full",
        ],
        1,
        "disk full, while writing /dev/full",
        "started",
    ),
    # synth, mine, train, demo, weights, models
    (["synth", "{out}", "--p_fog", "2"], 2, "--p_fog"),
    (["synth", "{out}", "--image_size", "4", "4"], 2, "--image_size"),
    (["synth", "{out}", "--city", "a b"], 1, "--city must be letters and digits"),
    (
        ["score", "--predictions", "{synth_used}/something", "--dataset_folder", "{vg}"],
        1,
        "not a vprkit",
    ),
    (
        [
            "synth",
            "{synth_used}",
            "--train_places",
            "0",
            "--val_queries",
            "0",
            "--test_queries",
            "0",
        ],
        1,
        "is not an empty folder",
    ),
    (["mine", "--dataset_folder", "{vg}", "--out", "{out}.npy", "--keep", "0"], 2, "--keep"),
    (["mine", "--dataset_folder", "{missing}", "--out", "{out}.npy"], 2, "no such folder"),
    (["train"], 2, "required: method"),
    (["demo", "--scale", "huge"], 2, "--scale"),
    (["weights", "verify", "{missing}.pth"], 1, "no such file"),
    (["models", "a", "b"], 2, "unrecognized arguments"),
]


def _argv(row: list[str], ctx: dict[str, str], out: Path) -> list[str]:
    return [arg.format(out=out, **ctx) for arg in row]


def _error_line(err: str, verb: str, started: bool) -> str:
    """The one error line; before any work it is all stderr holds."""
    assert "Traceback" not in err, err
    if not started:
        assert err.count("\n") == 1 and err.endswith("\n"), err
    pieces = [p for p in re.split(r"[\r\n]", err) if "error:" in p]
    assert len(pieces) == 1, err
    assert pieces[0].startswith(f"vprkit {verb}: error: "), err
    assert err.rstrip("\n").endswith(pieces[0]), err  # the last thing printed
    return pieces[0]


@pytest.mark.parametrize(
    "row", ROWS, ids=[f"{i:02d}-{' '.join(r[0][:1] + r[0][-2:])}" for i, r in enumerate(ROWS)]
)
def test_bad_input_is_one_line_and_leaves_nothing(row, ctx, tmp_path, capsys, monkeypatch):
    argv, status, needle, *started = row
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    monkeypatch.setenv("VPRKIT_HOME", str(tmp_path / "home"))  # no official file is there
    monkeypatch.delenv("VPRKIT_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)  # the default --save_dir runs/ would land here
    capsys.readouterr()
    out = tmp_path / "out"
    assert cli_main(_argv(argv, ctx, out)) == status
    line = _error_line(capsys.readouterr().err, argv[0], bool(started))
    assert needle.format(**ctx) in line, line
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "home")
    if started and argv[0] == "eval":  # only a run folder marked unfinished
        (run,) = (tmp_path / "runs").glob("*/*")
        assert run.name.endswith(".incomplete")
    else:
        assert leftovers == [], leftovers


def test_device_cuda_without_cuda(ctx, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    for argv in (
        ["eval", *TINY, "--dataset_folder", ctx["vg"], "--device", "cuda"],
        [
            "rerank",
            "--features",
            ctx["feats"],
            "--predictions",
            ctx["predictions"],
            "--out",
            "x.npz",
            "--device",
            "cuda:0",
        ],
    ):
        assert cli_main(argv) == 2
        line = _error_line(capsys.readouterr().err, argv[0], False)
        assert "CUDA is not available here; use --device cpu" in line


def test_a_full_disk_is_one_line(ctx, tmp_path, capsys):
    """A real full file system (a 4 KiB tmpfs, as root); /dev/full where mounts are refused
    (the row `score --out /dev/full` above)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        out = disk / "feats"
        argv = ["extract", *TINY, "--dataset_folder", ctx["vg"], "--out", str(out)]
        (disk / "filler").write_bytes(b"\0" * 2048)
        assert cli_main(argv) == 1
        line = _error_line(capsys.readouterr().err, "extract", True)
        assert "disk full, while writing" in line and str(disk) in line
        assert not (out / "database" / "features.json").exists()  # nothing looks complete
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_debug_shows_the_traceback(ctx, capsys, monkeypatch):
    argv = ["score", "--predictions", ctx["global_npy"], "--dataset_folder", ctx["vg"]]
    monkeypatch.delenv("VPRKIT_DEBUG", raising=False)
    for debug_argv in (["--debug", *argv], [*argv, "--debug"]):
        assert cli_main(debug_argv) == 1
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and "VprkitError" in err
        assert err.splitlines()[-1].startswith("vprkit score: error: ")
    monkeypatch.setenv("VPRKIT_DEBUG", "1")
    assert cli_main(argv) == 1
    assert "Traceback" in capsys.readouterr().err


def test_a_bug_keeps_its_traceback(ctx, monkeypatch):
    """A plain error from deep inside is not dressed up as the user's fault."""

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr("vprkit.stage_commands.score", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli_main(["score", "--predictions", ctx["predictions"], "--dataset_folder", ctx["vg"]])


def test_random_weights_are_explicit_and_recorded(ctx, tmp_path):
    import json

    save = tmp_path / "runs"
    argv = ["eval", *TINY, "--dataset_folder", ctx["vg"], "--save_dir", str(save), "--seed", "3"]
    assert cli_main(argv) == 0
    (run,) = save.glob("*/*")
    summary = json.loads((run / "recalls.json").read_text())
    assert summary["weights"] == "random" and summary["random_init"] is True
    assert "random weights" in (run / "log.txt").read_text()
    record = json.loads((Path(ctx["feats"]) / "queries" / "features.json").read_text())["record"]
    assert record["weights"] == "random" and record["random_init"] is True
    assert record["seed"] == 0


def test_ctrl_c_is_one_line_and_exit_130(tmp_path):
    out = tmp_path / "city"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("VPRKIT_DEBUG", None)
    argv = ["synth", str(out), "--num_workers", "1", "--train_places", "400"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "vprkit", *argv, "--image_size", "64", "64"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        # A shell running the tests in the background ignores SIGINT, and children inherit
        # that (Python then installs no KeyboardInterrupt handler): give it back, as a
        # terminal would have it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        # Mid-work once its progress bar has counted the first chunk (32 images): wait for
        # that on stderr, up to a deadline.
        err, deadline = b"", time.monotonic() + 120
        while b" 32/" not in err:
            left = deadline - time.monotonic()
            assert left > 0 and proc.poll() is None, err.decode()
            if select.select([proc.stderr], [], [], left)[0]:
                err += os.read(proc.stderr.fileno(), 4096)
        # Known and not yet fixed: about one first Ctrl-C in 20 is lost at this point of
        # `vprkit synth` (the run goes on); a user presses again, and so does the test.
        rest = b""
        for _ in range(3):
            proc.send_signal(signal.SIGINT)
            try:
                _, rest = proc.communicate(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue
    finally:
        if proc.poll() is None:
            proc.kill()
    err = (err + rest).decode()
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    lines = [p for p in re.split(r"[\r\n]", err) if "interrupted" in p]
    assert len(lines) == 1 and lines[0].startswith("vprkit synth: interrupted"), err
    assert not out.exists()  # the unfinished city stays in its .partial folder
