"""`vprkit train` settings: every value is checked for type and range before a run folder is
made; config files that do not parse name their line; YAML works out of the box."""

from __future__ import annotations

import json

import pytest
import torch

from vprkit.errors import VprkitError
from vprkit.train.loop import _check_resume, _cli_settings, add_arguments, read_config_file, train
from vprkit.train.recipes import RECIPES
from vprkit.train.settings import SETTINGS, check_settings

TINY_MODEL = {"size": "vits14", "depth": 2, "embed_dim": 64, "num_heads": 4}


def settings(synth, tmp_path, **overrides):
    base = {
        "gsv_root": str(synth / "gsv"),
        "model": "dinov2_gem",
        "model_options": TINY_MODEL,
        "image_size": [56, 56],
        "places_per_batch": 16,
        "num_workers": 0,
        "save_dir": str(tmp_path / "runs"),
        "recall_values": [1, 5, 10],
    }
    return {**base, **overrides}


def test_every_recipe_setting_has_a_check_its_default_passes():
    keys = set()
    for name, recipe in RECIPES.items():
        defaults = recipe.config_defaults()
        keys |= set(defaults)
        assert check_settings(defaults, defaults, "as defaults", name, {}) == defaults
    assert keys == set(SETTINGS)


BAD_GSV_SETTINGS = [
    ({"lr": "fast"}, r"lr=fast on the command line: lr must be a number > 0, e.g. lr=0\.0001"),
    ({"epochs": "two"}, r"epochs must be an integer >= 1, e.g. epochs=10"),
    ({"epochs": 2.5}, r"epochs must be an integer"),
    ({"epochs": 2.0}, r"without the decimal point: 2"),
    (
        {"checkpoint_every": 0},
        r"checkpoint_every must be an integer >= 1, e.g. checkpoint_every=100",
    ),
    ({"num_workers": -1}, r"num_workers must be an integer >= 0"),
    (
        {"lrr": 1e-3},
        r"unknown setting 'lrr' on the command line for recipe 'gsv'; did you mean lr\?",
    ),
    ({"margin": 0.2}, r"unknown setting 'margin'.*a setting of the triplet"),
    ({"places_per_batch": 0}, r"places_per_batch must be an integer >= 1"),
    ({"places_per_batch": -16}, r"places_per_batch must be an integer >= 1"),
    ({"places_per_batch": 49}, r"more than the 48 places .* set places_per_batch=48 or fewer"),
    ({"infer_batch_size": 0}, r"infer_batch_size must be an integer >= 1"),
    ({"optimizer": "adamm"}, r"one of adam, adamw, sgd \(did you mean adam\?\)"),
    ({"precision": "fp8"}, r"precision must be one of fp32, bf16, fp16"),
    ({"image_size": 56}, r"image_size must be \[height, width\]"),
    ({"seed": -1}, r"seed must be an integer in \[0, 4294967295\]"),
    ({"validate_at_start": "maybe"}, r"validate_at_start must be true or false"),
    ({"horizontal_flip_p": 1.5}, r"horizontal_flip_p must be a number in \[0, 1\]"),
    ({"lr": float("nan")}, r"lr must be a number > 0"),
    ({"model": "dinov2_gemm"}, r"did you mean dinov2_gem\?"),
    ({"gsv_root": "/no/such/folder"}, r"gsv_root must be an existing folder"),
    ({"init_weights": "dinov2_vitb15"}, r"did you mean dinov2_vitb14\?"),
    ({"save_best": "R@7"}, r"save_best=R@7 needs 7 among recall_values=\[1, 5, 10\]"),
    ({"save_best": "top5"}, r"save_best must be R@N"),
    ({"val_rerank_num": 10}, r"val_rerank_num=10 needs a model with a re-ranker"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_GSV_SETTINGS, ids=lambda v: str(v)[:40])
def test_bad_settings_are_refused_before_any_folder_exists(tiny_synthetic, tmp_path, bad, message):
    with pytest.raises(VprkitError, match=message):
        train("gsv", settings(tiny_synthetic, tmp_path, **bad))
    assert not (tmp_path / "runs").exists()


def test_device_without_cuda_and_triplet_batches_are_refused_early(tiny_synthetic, tmp_path):
    if not torch.cuda.is_available():
        with pytest.raises(VprkitError, match="device=cuda .*CUDA is not available"):
            train("gsv", settings(tiny_synthetic, tmp_path, device="cuda"))
    triplet = {
        "train_dataset_folder": str(tiny_synthetic / "vg" / "synthetic"),
        "model": "dinov2_gem",
        "model_options": TINY_MODEL,
        "save_dir": str(tmp_path / "runs"),
        "recall_values": [1, 5],
    }
    with pytest.raises(VprkitError, match=r"train_batch_size=500 is more than the \d+ training"):
        train("triplet", {**triplet, "train_batch_size": 500})
    with pytest.raises(VprkitError, match=r"cache_refresh_rate=2 mines fewer queries"):
        train("triplet", {**triplet, "train_batch_size": 4, "cache_refresh_rate": 2})
    with pytest.raises(VprkitError, match="mining=precomputed needs hard_negatives_file"):
        train("triplet", {**triplet, "mining": "precomputed"})
    assert not (tmp_path / "runs").exists()


def test_command_line_spellings(tiny_synthetic, tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["gsv", "--set", "lr"])
    with pytest.raises(VprkitError, match="--set expects KEY=VALUE, got 'lr'"):
        _cli_settings(args)
    args = parser.parse_args(["gsv", "--model_option", "depth"])
    with pytest.raises(VprkitError, match="--model_option expects KEY=VALUE"):
        _cli_settings(args)
    # Values as typed: numbers, booleans in any case, none for an optional setting.
    args = parser.parse_args(
        ["gsv", "--set", "lr=1", "--set", "city_grouped=false", "--set", "max_steps=none"]
    )
    cfg = settings(tiny_synthetic, tmp_path, **_cli_settings(args), epochs=1)
    from vprkit.train.loop import resolve_config

    resolved = resolve_config(RECIPES["gsv"], {}, cfg)
    assert resolved["lr"] == 1.0 and isinstance(resolved["lr"], float)
    assert resolved["city_grouped"] is False and resolved["max_steps"] is None


@pytest.mark.parametrize(
    ("name", "text", "where"),
    [
        (
            "bad.toml",
            'lr = 0.001\noptimizer = "sgd\nepochs = 1\n',
            r"bad\.toml, line 2, column \d+",
        ),
        ("bad.toml", "lr = 0.001\nlr = 0.002\n", r"bad\.toml, line 2, column \d+"),
        ("bad.yaml", "lr: 0.001\noptimizer: [sgd\nepochs: 1\n", r"bad\.yaml, line 3, column \d+"),
        ("bad.yml", "lr: 0.001\n  epochs: 1\n", r"bad\.yml, line 2, column \d+"),
    ],
)
def test_malformed_config_files_name_the_file_and_line(tmp_path, name, text, where):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(VprkitError, match=where + r": not valid (TOML|YAML)"):
        read_config_file(path)


def test_config_files_that_are_not_settings(tmp_path):
    listing = tmp_path / "list.yaml"
    listing.write_text("- lr\n- epochs\n")
    with pytest.raises(VprkitError, match="expected a mapping of settings"):
        read_config_file(listing)
    with pytest.raises(VprkitError, match="config files are .toml, .yaml or .yml"):
        (tmp_path / "settings.json").write_text("{}")
        read_config_file(tmp_path / "settings.json")
    with pytest.raises(FileNotFoundError, match="config file not found"):
        read_config_file(tmp_path / "missing.toml")
    bad_value = tmp_path / "train.toml"
    bad_value.write_text('lr = "fast"\n')
    with pytest.raises(VprkitError, match=r"lr=fast in config file .*train\.toml: lr must be"):
        train("gsv", {"gsv_root": str(tmp_path)}, config_file=bad_value)


def test_yaml_config_trains(tiny_synthetic, tmp_path):
    config = tmp_path / "train.yaml"
    # `1e-3` without a decimal point is a string in YAML 1.1: taken as the number it reads.
    config.write_text("lr: 1e-3\noptimizer: sgd\nepochs: 1\nmax_steps: 1\ncity_grouped: false\n")
    run_dir, summary = train("gsv", settings(tiny_synthetic, tmp_path), config_file=config)
    saved = json.loads((run_dir / "config.json").read_text())
    assert (saved["lr"], saved["optimizer"], saved["city_grouped"]) == (1e-3, "sgd", False)
    assert summary["step"] == 1


def _fake_checkpoint(method: str, cfg: dict, step: int = 3, epoch: int = 1) -> dict:
    return {"method": method, "config": dict(cfg), "step": step, "epoch": epoch}


def test_resume_rules_for_each_kind_of_change(tmp_path):
    cfg = RECIPES["triplet"].config_defaults()
    checkpoint = _fake_checkpoint("triplet", cfg)
    path = tmp_path / "last.pth"
    # May change: they never touch a step's numbers.
    allowed = {
        "num_workers": 8,
        "checkpoint_every": 7,
        "max_steps": 50,
        "epochs": 20,
        "run_name": "x",
        "save_dir": "elsewhere",
    }
    _check_resume(checkpoint, {**cfg, **allowed}, "triplet", path)
    # Must not: each refused change is listed, old there and new now.
    with pytest.raises(VprkitError) as info:
        _check_resume(checkpoint, {**cfg, "lr": 2e-4, "margin": 0.3}, "triplet", path)
    message = str(info.value)
    assert "lr: 0.0001 there, 0.0002 now" in message and "margin: 0.1 there, 0.3 now" in message
    with pytest.raises(VprkitError, match="max_steps: None there, 2 now .*already at step 3"):
        _check_resume(checkpoint, {**cfg, "max_steps": 2}, "triplet", path)
    cosine = {**cfg, "scheduler": "cosine"}
    with pytest.raises(VprkitError, match="epochs: 10 there, 20 now .*scheduler=cosine"):
        _check_resume(
            _fake_checkpoint("triplet", cosine), {**cosine, "epochs": 20}, "triplet", path
        )
    with pytest.raises(VprkitError, match="'triplet' run, not 'gsv'"):
        _check_resume(checkpoint, cfg, "gsv", path)
    other = "cuda" if cfg["device"] == "cpu" else "cpu"
    with pytest.raises(VprkitError, match=f"device: '{cfg['device']}' there, '{other}' now"):
        _check_resume(checkpoint, {**cfg, "device": other}, "triplet", path)
