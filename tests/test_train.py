"""The shared training loop: it learns, resumes exactly (also after kill -9), and a
2-process torchrun run equals the single-process run with the same global batch."""

import csv
import json
import signal
import subprocess
import sys

import pytest
import torch

import vprkit
from vprkit.errors import VprkitError
from vprkit.train.loop import train
from vprkit.weights import read_checkpoint

TINY_MODEL = {"size": "vits14", "depth": 2, "embed_dim": 64, "num_heads": 4}


def settings(synth, tmp_path, **overrides):
    base = {
        "gsv_root": str(synth / "gsv"),
        "model": "dinov2_gem",
        "model_options": TINY_MODEL,
        "image_size": [56, 56],
        "places_per_batch": 16,
        "num_workers": 0,
        "lr": 1e-3,
        "save_dir": str(tmp_path / "runs"),
        "recall_values": [1, 5, 10],
    }
    return {**base, **overrides}


def cli_args(cfg: dict) -> list[str]:
    args = []
    for key, value in cfg.items():
        args += ["--set", f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}"]
    return args


def torchrun_two_steps(method: str, cfg: dict) -> None:
    """`vprkit train METHOD` for 2 steps in 2 processes (torchrun on a free port)."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "vprkit",
        "train",
        method,
        *cli_args(cfg),
        "--max_steps",
        "2",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def final_weights(run_dir):
    return read_checkpoint(run_dir / "last.pth")["state_dict"]


def assert_same_weights(a: dict, b: dict, atol: float = 0.0):
    assert a.keys() == b.keys()
    for key in a:
        if atol:
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)
        else:
            assert torch.equal(a[key], b[key]), key


def test_training_learns_and_writes_its_run_folder(tiny_synthetic, tmp_path):
    cfg = settings(
        tiny_synthetic,
        tmp_path,
        val_dataset_folder=str(tiny_synthetic / "vg" / "synthetic"),
        epochs=6,
        validate_at_start=True,
        save_best="R@1",
    )
    run_dir, summary = train("gsv", cfg)
    rows = list(csv.DictReader(open(run_dir / "train_log.csv")))
    losses = [float(r["loss"]) for r in rows]
    assert len(losses) == 6 * 3
    assert sum(losses[-3:]) < sum(losses[:3])
    history = summary["history"]
    assert history[0]["epoch"] == -1 and len(history) == 7
    before, best = history[0]["R@1"], max(h["R@1"] for h in history[1:])
    assert best > before, history
    assert summary["best"] == best
    val_rows = list(csv.DictReader(open(run_dir / "val_log.csv")))
    assert [int(r["epoch"]) for r in val_rows] == list(range(6))
    assert [float(r["val/R@1"]) for r in val_rows] == [h["R@1"] for h in history[1:]]
    for name in ("config.json", "log.txt", "summary.json", "last.pth", "best.pth"):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "config.json").read_text())["lr"] == 1e-3
    model = vprkit.create_model("dinov2_gem", weights=run_dir / "best.pth", **TINY_MODEL)
    assert model.vprkit_name == "dinov2_gem"


def test_resume_mid_epoch_gives_identical_weights(tiny_synthetic, tmp_path):
    # 48 places / 16 per batch = 3 steps per epoch: the resume point is mid-epoch and the
    # run crosses an epoch boundary. RandAugment exercises the per-image random draws.
    cfg = settings(tiny_synthetic, tmp_path, epochs=3, rand_augment_ops=2)
    straight, _ = train("gsv", {**cfg, "max_steps": 5, "run_name": "straight"})
    first, _ = train("gsv", {**cfg, "max_steps": 2, "run_name": "resumed"})
    assert read_checkpoint(first / "last.pth")["batch_in_epoch"] == 2
    steps = []
    # Changes resume allows: they never touch a step's numbers (a loader worker, another
    # checkpoint rhythm), so the weights still come out bit-identical.
    allowed = {"max_steps": 5, "num_workers": 1, "checkpoint_every": 1}
    resumed, summary = train(
        "gsv", {**cfg, **allowed}, resume=first / "last.pth", on_step=steps.append
    )
    assert resumed == first and summary["step"] == 5 and steps == [3, 4, 5]
    assert_same_weights(final_weights(straight), final_weights(resumed))


# A training process that SIGKILLs itself right after optimizer step `kill_at` (through the
# `on_step` callback), so the kill lands at an exact point without timing races.
KILL_AT_STEP = """
import json, os, signal, sys
from vprkit.train.loop import train

cfg, kill_at = json.loads(sys.argv[1]), int(sys.argv[2])

def on_step(step):
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

train("gsv", cfg, on_step=on_step)
"""


def test_kill_9_loses_only_the_steps_since_the_last_checkpoint(tiny_synthetic, tmp_path):
    cfg = settings(tiny_synthetic, tmp_path, epochs=3, checkpoint_every=2, run_name="killed")
    command = [sys.executable, "-c", KILL_AT_STEP, json.dumps({**cfg, "max_steps": 5}), "3"]
    killed = subprocess.run(command, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    (run_dir,) = (tmp_path / "runs" / "killed").iterdir()
    checkpoint = read_checkpoint(run_dir / "last.pth")  # intact, from step 2
    assert checkpoint["step"] == 2
    assert not list(run_dir.glob("*.tmp"))
    killed_rows = list(csv.DictReader(open(run_dir / "train_log.csv")))
    assert [int(r["step"]) for r in killed_rows] == [1, 2, 3]  # step 3 is redone on resume
    _, summary = train("gsv", {**cfg, "max_steps": 5}, resume=run_dir / "last.pth")
    straight, _ = train("gsv", {**cfg, "max_steps": 5, "run_name": "straight"})
    assert summary["step"] == 5
    assert_same_weights(final_weights(straight), final_weights(run_dir))
    # The log has every step once, with the losses of the uninterrupted run.
    rows = list(csv.DictReader(open(run_dir / "train_log.csv")))
    straight_rows = list(csv.DictReader(open(straight / "train_log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in rows] == [r["loss"] for r in straight_rows]


def test_two_processes_match_one_with_the_same_global_batch(tiny_synthetic, tmp_path):
    # SGD: Adam divides by sqrt(v), which turns ulp-level differences of near-zero
    # gradients into lr-sized steps; SGD keeps them ulp-sized.
    cfg = settings(tiny_synthetic, tmp_path, epochs=1, run_name="ddp", optimizer="sgd")
    torchrun_two_steps("gsv", cfg)
    (ddp_dir,) = (tmp_path / "runs" / "ddp").iterdir()
    single, _ = train("gsv", {**cfg, "max_steps": 2, "run_name": "single"})
    assert "(2 processes)" in (ddp_dir / "log.txt").read_text()
    assert_same_weights(final_weights(single), final_weights(ddp_dir), atol=1e-5)


def test_config_file_then_command_line(tiny_synthetic, tmp_path):
    config = tmp_path / "train.toml"
    config.write_text('lr = 0.002\noptimizer = "sgd"\nepochs = 1\nmax_steps = 1\n')
    run_dir, _ = train("gsv", settings(tiny_synthetic, tmp_path, lr=5e-4), config_file=config)
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["optimizer"] == "sgd" and saved["lr"] == 5e-4  # the command line wins


def test_bad_settings_are_clear(tiny_synthetic, tmp_path):
    with pytest.raises(ValueError, match="unknown setting.*'lrr'"):
        train("gsv", {**settings(tiny_synthetic, tmp_path), "lrr": 1})
    with pytest.raises(ValueError, match="unknown training method 'nope'"):
        train("nope", {})
    with pytest.raises(ValueError, match="match no parameter"):
        train("gsv", settings(tiny_synthetic, tmp_path, train_only=["*nothing*"]))
    empty = tmp_path / "gsv_empty"
    (empty / "Dataframes").mkdir(parents=True)
    (empty / "Images").mkdir()
    with pytest.raises((ValueError, FileNotFoundError), match="Dataframes"):
        train("gsv", settings(tiny_synthetic, tmp_path, gsv_root=str(empty)))


def test_resume_refuses_other_settings(tiny_synthetic, tmp_path):
    # Before the fix, a changed lr or loss parameter was accepted: the run kept the old
    # value while its checkpoints recorded the new one.
    cfg = settings(tiny_synthetic, tmp_path, epochs=2, max_steps=1)
    run_dir, _ = train("gsv", cfg)
    with pytest.raises(VprkitError, match="other settings.*image_size"):
        train("gsv", {**cfg, "image_size": [42, 42]}, resume=run_dir / "last.pth")
    changed = {**cfg, "lr": 2e-3, "ms_beta": 40.0, "max_steps": 2}
    with pytest.raises(VprkitError) as info:
        train("gsv", changed, resume=run_dir / "last.pth")
    message = str(info.value)
    assert "lr: 0.001 there, 0.002 now" in message and "ms_beta: 50.0 there, 40.0 now" in message
    assert "max_steps" not in message.split(". ")[0]  # an allowed change is not listed
    assert read_checkpoint(run_dir / "last.pth")["step"] == 1  # nothing was trained


def test_cricavpr_recipe_trains_a_tiny_model_from_scratch(tiny_synthetic, tmp_path):
    tiny = {"depth": 2, "embed_dim": 64, "num_heads": 4, "encoder_heads": 4, "encoder_ff_dim": 128}
    cfg = settings(
        tiny_synthetic,
        tmp_path,
        model_options=tiny,
        train_only=None,
        epochs=5,
        rand_augment_ops=0,
        validate_at_start=True,
        save_best="R@1",
        val_dataset_folder=str(tiny_synthetic / "vg" / "synthetic"),
    )
    del cfg["model"]  # the recipe's own: cricavpr
    run_dir, summary = train("cricavpr", cfg)
    history = summary["history"]
    assert max(h["R@1"] for h in history[1:]) > history[0]["R@1"], history
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["model"] == "cricavpr" and saved["scheduler"] == "step"


TINY_CRICAVPR = {
    "depth": 1,
    "embed_dim": 64,
    "num_heads": 4,
    "encoder_heads": 4,
    "encoder_ff_dim": 128,
}


def test_cricavpr_encoder_across_ranks(tiny_synthetic, tmp_path):
    model = vprkit.create_model("cricavpr", **TINY_CRICAVPR).train()
    x = torch.randn(4, 3, 56, 56)
    torch.manual_seed(0)
    coupled = model(x).global_desc
    model.batch_mode = "gathered"  # a world of one: the same as coupled
    torch.manual_seed(0)
    torch.testing.assert_close(model(x).global_desc, coupled)

    cfg = settings(
        tiny_synthetic,
        tmp_path,
        model_options=TINY_CRICAVPR,
        epochs=1,
        run_name="across",
        encoder_across_ranks=True,
    )
    del cfg["model"]
    torchrun_two_steps("cricavpr", cfg)
    (run_dir,) = (tmp_path / "runs" / "across").iterdir()
    assert read_checkpoint(run_dir / "last.pth")["step"] == 2
