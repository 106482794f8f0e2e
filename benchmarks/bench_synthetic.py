"""Speed of the synthetic place generator, single process, and its raw-pixel difficulty.

    python benchmarks/bench_synthetic.py                 # images/s at 224x224 on one core
    python benchmarks/bench_synthetic.py --recall        # + raw-pixel R@1 per difficulty

End-to-end throughput is measured with ``generate(num_workers=1)`` (street building, ray
casting, shading, JPEG writing, metadata), the way a user runs it; a per-stage breakdown of
single renders follows so regressions can be located.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from vprkit.data import synthetic as S


def end_to_end(size: int, places: int, queries: int) -> tuple[int, float]:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        out = S.generate(
            Path(tmp) / "bench",
            seed=0,
            image_size=(size, size),
            train_places=places,
            val_queries=0,
            test_queries=queries,
            eval_streets=1,
            num_workers=1,
        )
        elapsed = time.perf_counter() - t0
        n = len(S.load_poses(out))
    return n, elapsed


def stages(size: int, n: int) -> dict[str, float]:
    """Mean milliseconds per image of each stage, over ``n`` random medium-difficulty views."""
    cfg = S.SynthConfig.create("medium")
    world = S.WorldParams(0, cfg.n_styles, cfg.params.unique_details)
    t0 = time.perf_counter()
    street = S.build_street(world, "test", 0)
    build = time.perf_counter() - t0
    lay, intr = street.layout, S.Intrinsics(size, size, cfg.hfov_deg)
    times = {"ray cast": 0.0, "shade + camera effects": 0.0, "jpeg": 0.0}
    for i in range(n):
        rng = np.random.default_rng(i)
        along = float(rng.uniform(20, lay.length - 20))
        e, n_ = lay.point(along, float(rng.uniform(-3, 3)))
        pose = S.Pose(float(e), float(n_), 2.2, lay.heading_deg + float(rng.uniform(-20, 20)), 0)
        cond = S.sample_condition(rng, cfg.params)
        occ = S.make_occluders(rng, lay, along, 1, 2)
        t0 = time.perf_counter()
        S.render_gbuffer(street, pose, intr, cond.veg_density, occ)
        t1 = time.perf_counter()
        res = S.render(street, pose, intr, cond, rng, occ)  # includes a second ray cast
        t2 = time.perf_counter()
        Image.fromarray(res.image).save(io.BytesIO(), format="JPEG", quality=90)
        t3 = time.perf_counter()
        times["ray cast"] += t1 - t0
        times["shade + camera effects"] += (t2 - t1) - (t1 - t0)
        times["jpeg"] += t3 - t2
    out = {k: 1000 * v / n for k, v in times.items()}
    out["build one street (once per street)"] = 1000 * build
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--places", type=int, default=60, help="training places (x4 images)")
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--recall", action="store_true", help="also raw-pixel R@1 per difficulty")
    args = p.parse_args()

    n, sec = end_to_end(args.size, args.places, args.queries)
    print(
        f"end to end, 1 process, {args.size}x{args.size}: {n} images in {sec:.1f} s = "
        f"{n / sec:.1f} images/s = {60 * n / sec:.0f} images/min"
    )
    for name, ms in stages(args.size, 30).items():
        print(f"  {name:36s} {ms:7.1f} ms")
    if args.recall:
        for diff in S.DIFFICULTIES:
            with tempfile.TemporaryDirectory() as tmp:
                out = S.generate(
                    Path(tmp) / diff,
                    seed=0,
                    difficulty=diff,
                    image_size=(args.size, args.size),
                    train_places=0,
                    val_queries=0,
                    test_queries=200,
                    eval_streets=3,
                    num_workers=2,
                )
                r1 = S.raw_pixel_recall(out / "vg" / "synthetic" / "images" / "test")
                poses = S.load_poses(out)
            n_db = sum(p["kind"] == "test_database" for p in poses)
            print(
                f"raw pixels (16x16 grey, L2) R@1 @25 m, {diff:6s}: {100 * r1:5.1f}%  "
                f"(200 queries, {n_db} database images)"
            )


if __name__ == "__main__":
    main()
