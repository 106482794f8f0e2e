"""`vprkit demo`: the main job end to end on data vprkit makes itself.

1. render a synthetic city (GSV-Cities training places, VG val/test streets never seen in
   training);
2. score raw-pixel matching and the untrained network on the test streets;
3. train the network from scratch with a method's real training recipe, validating on the
   val streets;
4. evaluate the best checkpoint on the test streets, with prediction pictures;
5. print and save the comparison.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from vprkit.data.synthetic import generate, raw_pixel_recall

log = logging.getLogger("vprkit.demo")

# Sizes: "full" is the README's main job (under 10 minutes on 2 CPU cores); "ci" is the
# reduced run the tests make.
SCALES = {
    "full": {
        "synth": {"train_places": 300, "val_queries": 100, "test_queries": 200, "eval_streets": 2},
        "epochs": 12,
    },
    "ci": {
        "synth": {"train_places": 48, "val_queries": 24, "test_queries": 32, "eval_streets": 1},
        "epochs": 4,
    },
}

# The model trained from scratch: a tiny ViT with the method's head.
DEMO_METHODS = {
    "gem": {
        "recipe": "gsv",
        "model": "dinov2_gem",
        "model_options": {"size": "vits14", "depth": 4, "embed_dim": 128, "num_heads": 4},
        "lr": 5e-4,
    },
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder")
    parser.add_argument("--method", choices=sorted(DEMO_METHODS), default="gem")
    parser.add_argument("--scale", choices=sorted(SCALES), default="full")
    parser.add_argument("--difficulty", default="medium", choices=["easy", "medium", "hard"])
    parser.add_argument("--image_size", type=int, default=112, help="square image side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_workers", type=int, default=2)


def _eval(
    method: dict,
    dataset: Path,
    weights: Path | None,
    save_dir: Path,
    name: str,
    image_size: int,
    pictures: int,
    num_workers: int,
) -> dict:
    from vprkit.evaluate import add_arguments as eval_arguments
    from vprkit.evaluate import evaluate

    parser = argparse.ArgumentParser()
    eval_arguments(parser)
    argv = [
        "--method",
        method["model"],
        "--dataset_folder",
        str(dataset),
        "--save_dir",
        str(save_dir),
        "--run_name",
        name,
        "--image_size",
        str(image_size),
        str(image_size),
        "--recall_values",
        "1",
        "5",
        "10",
        "--num_workers",
        str(num_workers),
        "--num_preds_to_save",
        str(pictures),
    ]
    for key, value in method["model_options"].items():
        argv += [
            "--model_option",
            f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}",
        ]
    if weights is not None:
        argv += ["--weights", str(weights)]
    result = evaluate(parser.parse_args(argv))
    return {
        "recalls": {f"R@{n}": v for n, v in result.recalls.items()},
        "run_dir": str(result.run_dir),
    }


def demo(
    out: Path,
    method_name: str = "gem",
    scale: str = "full",
    difficulty: str = "medium",
    image_size: int = 112,
    seed: int = 0,
    num_workers: int = 2,
) -> dict:
    from vprkit.train.loop import train

    method, sizes = DEMO_METHODS[method_name], SCALES[scale]
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    data = out / "data"
    start = time.perf_counter()
    if not (data / "meta.json").is_file():
        print(f"1/4 rendering a synthetic city into {data} ...")
        generate(
            data,
            image_size=(image_size, image_size),
            difficulty=difficulty,
            seed=seed,
            num_workers=num_workers,
            progress=True,
            **sizes["synth"],
        )
    times["generation_s"] = time.perf_counter() - start
    vg = data / "vg" / "synthetic"

    print("2/4 baselines on the unseen test streets ...")
    start = time.perf_counter()
    results = {"raw_pixels": {"recalls": {"R@1": 100 * raw_pixel_recall(vg / "images" / "test")}}}
    results["untrained"] = _eval(method, vg, None, out, "untrained", image_size, 0, num_workers)

    print("3/4 training from scratch ...")
    start_train = time.perf_counter()
    settings = {
        "gsv_root": str(data / "gsv"),
        "model": method["model"],
        "model_options": method["model_options"],
        "image_size": [image_size, image_size],
        "places_per_batch": 32,
        "val_dataset_folder": str(vg),
        "epochs": sizes["epochs"],
        "num_workers": num_workers,
        "lr": method["lr"],
        "save_dir": str(out),
        "run_name": "train",
        "recall_values": [1, 5, 10],
        "save_best": "R@1",
        "seed": seed,
    }
    run_dir, summary = train(method["recipe"], settings)
    times["training_s"] = time.perf_counter() - start_train

    print("4/4 evaluating the trained network on the unseen test streets ...")
    start_eval = time.perf_counter()
    results["trained"] = _eval(
        method, vg, run_dir / "best.pth", out, "trained", image_size, 3, num_workers
    )
    times["evaluation_s"] = time.perf_counter() - start_eval + (start_train - start)
    summary_out = {
        "method": method_name,
        "scale": scale,
        "difficulty": difficulty,
        "image_size": image_size,
        "results": results,
        "times": times,
        "training_run": str(run_dir),
        "validation_history": summary["history"],
    }
    (out / "demo_summary.json").write_text(json.dumps(summary_out, indent=2))

    print(f"\nRecall on {vg.name}'s test streets (never seen in training):")
    for name in ("raw_pixels", "untrained", "trained"):
        recalls = results[name]["recalls"]
        print(f"  {name:<11} " + ", ".join(f"{k}: {v:.1f}" for k, v in recalls.items()))
    total = sum(times.values())
    print(
        "time: "
        + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in times.items())
        + f", total {total:.0f} s"
    )
    print(f"prediction pictures: {results['trained']['run_dir']}/preds")
    return summary_out


def run(args: argparse.Namespace) -> int:
    demo(
        args.out,
        args.method,
        args.scale,
        args.difficulty,
        args.image_size,
        args.seed,
        args.num_workers,
    )
    return 0
