"""`vprkit demo`: the main job end to end on data vprkit makes itself.

1. render a synthetic city (GSV-Cities training places, VG val/test streets never seen in
   training);
2. score raw-pixel matching and the untrained network (its initialization seeded by
   `--seed`) on the test streets, with prediction pictures;
3. train the network from scratch with a method's real training recipe, validating on the
   val streets;
4. evaluate the best checkpoint on the test streets, with prediction pictures;
5. build a map from the test streets' database photos (their EXIF GPS) with the untrained and
   the trained network, localize the test queries on it and measure the error in metres;
6. print and save the comparison.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vprkit.data.synthetic import DIFFICULTIES, generate, raw_pixel_recall

# Sizes: "full" is the README's main job (about 4 minutes on 2 idle CPU cores, under 10 on
# busy ones); "ci" is the one-minute run the tests make: a smaller city in the "easy" world
# (day light, near-identical viewpoints), where a minute of training is enough to learn.
SCALES = {
    "full": {
        "synth": {"train_places": 1000, "val_queries": 100, "test_queries": 200, "eval_streets": 2},
        "difficulty": "demo",
        "epochs": 8,
    },
    "ci": {
        "synth": {"train_places": 300, "val_queries": 40, "test_queries": 80, "eval_streets": 2},
        "difficulty": "easy",
        "epochs": 4,
    },
}

# The model trained from scratch: a tiny ViT with the method's head, and the training
# settings (on top of the recipe's defaults) that make it learn within the demo's budget.
DEMO_METHODS = {
    # SelaVPR's global head without adapters: GeM over L2-normalized patch tokens.
    "gem": {
        "recipe": "gsv",
        "model": "dinov2_gem",
        "model_options": {"size": "vits14", "depth": 4, "embed_dim": 128, "num_heads": 4},
        "train": {
            "lr": 1e-3,
            "optimizer": "adamw",
            "weight_decay": 0.05,
            "scheduler": "cosine",
            "warmup_epochs": 1,
            "places_per_batch": 16,
        },
    },
    # CricaVPR: multi-scale conv adapters, regional GeM pyramid, cross-image encoder; every
    # parameter trains (the released recipe freezes the pretrained backbone).
    "cricavpr": {
        "recipe": "gsv",
        "model": "cricavpr",
        "model_options": {
            "depth": 4,
            "embed_dim": 128,
            "num_heads": 4,
            "encoder_heads": 4,
            "encoder_ff_dim": 256,
            "encoder_layers": 1,
        },
        "train": {
            "train_only": ["*"],
            "lr": 1e-3,
            "optimizer": "adamw",
            "weight_decay": 0.05,
            "scheduler": "cosine",
            "warmup_epochs": 1,
            "places_per_batch": 16,
        },
    },
}
DEFAULT_METHOD = "cricavpr"

RECALL_VALUES = (1, 5, 10)
PREDS_PER_QUERY = 3  # prediction pictures: each query with its first 3 predictions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder")
    parser.add_argument("--method", choices=sorted(DEMO_METHODS), default=DEFAULT_METHOD)
    parser.add_argument("--scale", choices=sorted(SCALES), default="full")
    parser.add_argument(
        "--difficulty",
        choices=sorted(DIFFICULTIES),
        help="synthetic world preset (default: the scale's)",
    )
    parser.add_argument(
        "--image_size", type=int, default=112, help="square image side, a multiple of 14"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the synthetic city, the untrained network's initialization and training",
    )
    parser.add_argument("--num_workers", type=int, default=2)


def model_options(method: dict, image_size: int) -> dict:
    """The method's tiny configuration, with its pos-embed stored at the demo's image size
    (no interpolation at every forward pass)."""
    return {**method["model_options"], "img_size": image_size}


def render_city(
    data: Path, scale: str, difficulty: str, image_size: int, seed: int, num_workers: int
) -> None:
    """Render the synthetic city into `data`, unless a previous run left it there."""
    if (data / "meta.json").is_file():
        print(f"1/5 reusing the synthetic city in {data}")
        return
    print(f"1/5 rendering a synthetic city into {data} ...")
    generate(
        data,
        image_size=(image_size, image_size),
        difficulty=difficulty,
        seed=seed,
        num_workers=num_workers,
        progress=True,
        **SCALES[scale]["synth"],
    )


def evaluate_model(
    method: dict,
    dataset: Path,
    weights: Path | None,
    out: Path,
    name: str,
    image_size: int,
    num_workers: int,
    seed: int = 0,
) -> dict:
    """`vprkit eval`'s pipeline on the test streets, with prediction pictures; the recalls
    and the run folder. The model's initialization is seeded: without weights, that is the
    whole model, so the untrained figures can be reproduced."""
    from vprkit.data.formats import open_dataset
    from vprkit.pipeline import EvalConfig, evaluate

    options = model_options(method, image_size)
    model = demo_model(method, weights, image_size, seed)
    config = EvalConfig(
        recall_values=RECALL_VALUES,
        image_size=(image_size, image_size),
        num_workers=num_workers,
        save_dir=out,
        run_name=name,
        num_preds_to_save=PREDS_PER_QUERY,
    )
    # The run's log and config.json record this evaluation, as `vprkit eval` flags would.
    record = {
        "_command": f"vprkit demo: evaluation of the {name} {method['model']} on {dataset}",
        "method": method["model"],
        "model_option": options,
        "weights": str(weights) if weights else None,
        "dataset_folder": str(dataset),
        "seed": seed,
    }
    result = evaluate(model, open_dataset(dataset), config, weights=weights, record=record)
    return {
        "recalls": {f"R@{n}": v for n, v in result.recalls.items()},
        "run_dir": str(result.run_dir),
    }


def demo_model(method: dict, weights: Path | None, image_size: int, seed: int):
    """The demo's network: trained weights, or the initialization `seed` gives."""
    import torch

    from vprkit.models.registry import create_model

    with torch.random.fork_rng(devices=[]):  # seeded here without touching the caller's RNG
        torch.manual_seed(seed)
        model = create_model(method["model"], weights=weights, **model_options(method, image_size))
    if weights is None:
        model.vprkit_seed = seed  # a map records it: the same network can be rebuilt
    return model


def localize_on_map(
    method: dict,
    vg: Path,
    weights: Path | None,
    out: Path,
    name: str,
    image_size: int,
    num_workers: int,
    seed: int = 0,
) -> dict:
    """Build a map from the test streets' database photos (positions from their EXIF GPS),
    localize the test queries on it, and measure the error of the estimates in metres. The
    queries are localized as one burst, batched as the evaluation batches them (CricaVPR's
    cross-image encoder couples the images of a batch)."""
    import shutil

    from vprkit.data.datasets import read_images_paths
    from vprkit.maps import build_map
    from vprkit.maps.positions import collect_positions
    from vprkit.maps.report import write_run

    model = demo_model(method, weights, image_size, seed)
    map_dir, run_dir = out / f"map_{name}", out / f"localize_{name}"
    for folder in (map_dir, run_dir):  # this demo's own outputs of an earlier run
        shutil.rmtree(folder, ignore_errors=True)
    images = vg / "images" / "test"
    m, _ = build_map(
        images / "database",
        map_dir,
        model=model,
        weights=str(weights) if weights else "random",
        image_size=[image_size, image_size],
        num_workers=num_workers,
    )
    queries = read_images_paths(images / "queries")
    results = m.localizer(model=model).localize(queries, burst=True)
    positions, _ = collect_positions(queries, images / "queries")
    truth = [positions.get(q.name) for q in queries]
    run_dir.mkdir(parents=True)
    summary = write_run(run_dir, m, results, queries, truth, pictures=PREDS_PER_QUERY)
    errors = summary["errors"]
    return {
        "median_error_m": errors["median_error_m"],
        "within_m": errors["within_m"],
        "run_dir": str(run_dir),
        "map": str(map_dir),
    }


def train_model(
    method: dict, data: Path, out: Path, scale: str, image_size: int, seed: int, num_workers: int
) -> tuple[Path, dict]:
    """Train from scratch with the method's recipe, keeping the best epoch on the val streets."""
    from vprkit.train.loop import train

    settings = {
        "gsv_root": str(data / "gsv"),
        "model": method["model"],
        "model_options": model_options(method, image_size),
        "image_size": [image_size, image_size],
        "val_dataset_folder": str(data / "vg" / "synthetic"),
        "epochs": SCALES[scale]["epochs"],
        "num_workers": num_workers,
        "save_dir": str(out),
        "run_name": "train",
        "recall_values": list(RECALL_VALUES),
        "save_best": "R@1",
        "seed": seed,
        **method["train"],
    }
    return train(method["recipe"], settings)


def format_results(results: dict, times: dict, dataset_name: str) -> str:
    """The comparison table, recalls printed the way the field does (`R@1: 12.3, ...`)."""
    lines = [f"Recall on {dataset_name}'s test streets (never seen in training):"]
    for name in ("raw_pixels", "untrained", "trained"):
        recalls = results[name]["recalls"]
        line = f"  {name:<11} " + ", ".join(f"{k}: {v:.1f}" for k, v in recalls.items())
        where = results[name].get("localization")
        if where:
            line = f"{line:<48} localized: median {where['median_error_m']:.1f} m, "
            line += f"within 25 m: {where['within_m']['25']:.1f}%"
        lines.append(line)
    lines.append(
        "time: "
        + ", ".join(f"{k.removesuffix('_s')} {v:.0f} s" for k, v in times.items())
        + f", total {sum(times.values()):.0f} s"
    )
    lines.append(
        f"prediction pictures: {results['untrained']['run_dir']}/preds, "
        f"{results['trained']['run_dir']}/preds"
    )
    if results["trained"].get("localization"):
        lines.append(
            f"localization: {results['trained']['localization']['run_dir']}/map.html "
            "(estimates, matches and true positions), pictures/"
        )
    return "\n".join(lines)


def demo(
    out: Path,
    method_name: str = DEFAULT_METHOD,
    scale: str = "full",
    difficulty: str | None = None,
    image_size: int = 112,
    seed: int = 0,
    num_workers: int = 2,
) -> dict:
    method = DEMO_METHODS[method_name]
    difficulty = difficulty or SCALES[scale]["difficulty"]
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    vg = data / "vg" / "synthetic"
    times: dict[str, float] = {}

    start = time.perf_counter()
    render_city(data, scale, difficulty, image_size, seed, num_workers)
    times["generation_s"] = time.perf_counter() - start

    print("2/5 baselines on the unseen test streets ...")
    start = time.perf_counter()
    results = {"raw_pixels": {"recalls": {"R@1": 100 * raw_pixel_recall(vg / "images" / "test")}}}
    results["untrained"] = evaluate_model(
        method, vg, None, out, "untrained", image_size, num_workers, seed
    )
    times["baselines_s"] = time.perf_counter() - start

    print("3/5 training from scratch ...")
    start = time.perf_counter()
    run_dir, summary = train_model(method, data, out, scale, image_size, seed, num_workers)
    times["training_s"] = time.perf_counter() - start

    print("4/5 evaluating the trained network on the unseen test streets ...")
    start = time.perf_counter()
    results["trained"] = evaluate_model(
        method, vg, run_dir / "best.pth", out, "trained", image_size, num_workers, seed
    )
    times["evaluation_s"] = time.perf_counter() - start

    print("5/5 building a map of the test streets and localizing their queries ...")
    start = time.perf_counter()
    for name, weights in (("untrained", None), ("trained", run_dir / "best.pth")):
        results[name]["localization"] = localize_on_map(
            method, vg, weights, out, name, image_size, num_workers, seed
        )
    times["localization_s"] = time.perf_counter() - start

    summary_out = {
        "method": method_name,
        "scale": scale,
        "difficulty": difficulty,
        "image_size": image_size,
        "seed": seed,
        "results": results,
        "times": times,
        "training_run": str(run_dir),
        "validation_history": summary["history"],
    }
    (out / "demo_summary.json").write_text(json.dumps(summary_out, indent=2))
    print("\n" + format_results(results, times, vg.name))
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
