"""`vprkit demo` at its reduced "ci" scale: the main job end to end, through the CLI.

It renders a small synthetic city, trains a tiny network from scratch with a method's real
training recipe and evaluates it on unseen test streets. The margin below held for every
seed tried while calibrating the "ci" scale (see the demo's module notes).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from vprkit import demo
from vprkit.cli import main

# Trained R@1 minus untrained R@1 (points) on the ci test streets: the smallest gain seen
# over the seeds tried was well above this.
MIN_GAIN_R1 = 20.0

ROW = r"-?\d+\.\d"


def test_demo_ci_learns_and_leaves_its_run_folder(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--scale", "ci"]) == 0
    captured = capsys.readouterr()
    printed = captured.out

    summary = json.loads((out / "demo_summary.json").read_text())
    results = summary["results"]
    trained = results["trained"]["recalls"]
    untrained = results["untrained"]["recalls"]
    assert set(trained) == set(untrained) == {"R@1", "R@5", "R@10"}
    assert trained["R@1"] >= untrained["R@1"] + MIN_GAIN_R1, results
    assert 0.0 <= results["raw_pixels"]["recalls"]["R@1"] <= 100.0

    # The run folder: the synthetic city, both evaluation runs with their prediction
    # pictures and a log of the evaluation (not of the demo's command), the training run.
    assert (out / "data" / "meta.json").is_file()
    for name in ("untrained", "trained"):
        run_dir = Path(results[name]["run_dir"])
        assert run_dir.is_dir() and run_dir.parent == out / name
        assert sorted((run_dir / "preds").glob("*.jpg")), f"no prediction pictures ({name})"
        log = (run_dir / "log.txt").read_text()
        assert f"vprkit eval: vprkit demo: evaluation of the {name} cricavpr on" in log
        saved = json.loads((run_dir / "config.json").read_text())
        assert saved["seed"] == 0 and saved["dataset_folder"].endswith("synthetic")
    assert (Path(summary["training_run"]) / "best.pth").is_file()

    # The map of the test streets (EXIF GPS) localizes the queries far better once trained.
    where = {name: results[name]["localization"] for name in ("untrained", "trained")}
    assert where["trained"]["median_error_m"] < where["untrained"]["median_error_m"] / 2, where
    assert where["trained"]["within_m"]["25"] > where["untrained"]["within_m"]["25"] + 20, where
    run = Path(where["trained"]["run_dir"])
    assert (run / "map.html").is_file() and (run / "localizations.geojson").is_file()
    assert [h["epoch"] for h in summary["validation_history"]] == list(
        range(len(summary["validation_history"]))
    )

    # The table, printed the way the field does.
    assert re.search(rf"^  raw_pixels +R@1: {ROW}$", printed, re.M)
    for name in ("untrained", "trained"):
        row = rf"^  {name} +R@1: {ROW}, R@5: {ROW}, R@10: {ROW} +localized: median {ROW} m, "
        assert re.search(row + rf"within 25 m: {ROW}%$", printed, re.M), printed
    assert f"R@1: {trained['R@1']:.1f}" in printed
    assert re.search(r"^time: .*, total \d+ s$", printed, re.M)

    # The training bar says which epoch of how many, and the time left overall.
    bar = captured.err
    assert "epoch 1 of 4" in bar and "epoch 4 of 4" in bar, bar[-2000:]
    assert re.search(r"left=(\d+m)?\d+s", bar), bar[-2000:]

    # The untrained network's initialization is seeded: its figures come out again.
    vg = out / "data" / "vg" / "synthetic"
    method = demo.DEMO_METHODS[summary["method"]]
    again = demo.evaluate_model(method, vg, None, tmp_path / "again", "untrained", 112, 2)
    assert again["recalls"] == untrained
