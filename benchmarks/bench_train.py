"""Training throughput on CPU: the data loader alone, the optimizer step alone, and the whole
loop with 1 process vs 2 processes (torchrun, gloo) on the same machine, as ratios.

Run:  python benchmarks/bench_train.py [--configs tiny vits14] [--steps 6]
It renders a small synthetic GSV-Cities city first (kept in --data between runs).
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from vprkit.train.distributed import World
from vprkit.train.loop import Trainer, resolve_config
from vprkit.train.recipes import get_recipe

CONFIGS = {
    "tiny": {
        "model_options": {"size": "vits14", "depth": 2, "embed_dim": 64, "num_heads": 4},
        "image_size": [56, 56],
        "places_per_batch": 16,
    },
    "vits14": {
        "model_options": {"size": "vits14"},
        "image_size": [224, 224],
        "places_per_batch": 8,
    },
}


def settings(name: str, data: Path, save_dir: Path) -> dict:
    return {
        **CONFIGS[name],
        "gsv_root": str(data / "gsv"),
        "model": "dinov2_gem",
        "num_workers": 1,
        "epochs": 100,
        "save_dir": str(save_dir),
        "checkpoint_every": 10**6,
    }


def loader_and_step(cfg: dict, steps: int) -> tuple[float, float]:
    """Images/s of the loader alone and of forward+backward+step on a fixed batch."""
    recipe = get_recipe("gsv")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(recipe, resolve_config(recipe, {}, cfg), Path(tmp), World())
        trainer.source.set_epoch(0)
        batches = iter(trainer.source)
        batch = next(batches)
        start, images = time.perf_counter(), 0
        for _, b in zip(range(steps), batches, strict=False):
            images += len(b[0])
        loader_ips = images / (time.perf_counter() - start)
        trainer.model.train()
        start = time.perf_counter()
        for _ in range(steps):
            loss, _ = recipe.loss(trainer.model, batch, trainer.cfg, World(), trainer.loss_fn)
            loss.backward()
            trainer.optimizer.step()
            trainer.optimizer.zero_grad()
        step_ips = steps * len(batch[0]) / (time.perf_counter() - start)
    return loader_ips, step_ips


def whole_loop(cfg: dict, steps: int, processes: int, save_dir: Path, tag: str) -> float:
    """Images/s of the whole loop, from the run's own log (first step excluded: warm-up)."""
    args = []
    for key, value in {**cfg, "run_name": tag, "max_steps": steps}.items():
        args += ["--set", f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}"]
    launcher = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(processes),
        ]
        if processes > 1
        else [sys.executable]
    )
    subprocess.run(
        [*launcher, "-m", "vprkit", "train", "gsv", *args], check=True, capture_output=True
    )
    (run_dir,) = (save_dir / tag).iterdir()
    rows = list(csv.DictReader(open(run_dir / "train_log.csv")))[1:]
    return sum(float(r["images_per_s"]) for r in rows) / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "vits14"], choices=CONFIGS)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--data", type=Path, default=Path("data/bench_train_synth"))
    args = parser.parse_args()
    if not args.data.exists():
        from vprkit.data.synthetic import generate

        generate(args.data, train_places=64, val_queries=4, test_queries=4, eval_streets=1)
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(
        f"{'config':>7} {'loader img/s':>13} {'step img/s':>11} {'loader/step':>12} "
        f"{'1 proc img/s':>13} {'2 proc img/s':>13} {'2p/1p':>6}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        save_dir = Path(tmp)
        for name in args.configs:
            cfg = settings(name, args.data, save_dir)
            loader_ips, step_ips = loader_and_step(cfg, args.steps)
            one = whole_loop(cfg, args.steps, 1, save_dir, f"{name}_1")
            two = whole_loop(cfg, args.steps, 2, save_dir, f"{name}_2")
            print(
                f"{name:>7} {loader_ips:>13.1f} {step_ips:>11.1f} "
                f"{loader_ips / step_ips:>12.2f} {one:>13.1f} {two:>13.1f} {two / one:>6.2f}"
            )


if __name__ == "__main__":
    main()
