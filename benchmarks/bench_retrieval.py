"""Retrieval at Tokyo 24/7 scale: vprkit vs a straightforward numpy implementation.

Uses Tokyo 24/7's real layout (75,984 database and 315 query UTM positions from
../shared/data/utm_ground_truth/tokyo247.npz) with random descriptors stored as float16 .npy
files. Each approach runs in a fresh subprocess, so its peak resident memory (ru_maxrss) is its
own; times include reading the descriptors from the (warm) files.

    python benchmarks/bench_retrieval.py [--dims 512 10752] [--budget-gib 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from memory import MIB, peak_rss, rss_now  # benchmarks/memory.py

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LAYOUT = ROOT.parent / "shared" / "data" / "utm_ground_truth" / "tokyo247.npz"


# ----------------------------------------------------------------------------- child tasks


def numpy_positives(db_utm: np.ndarray, q_utm: np.ndarray, radius: float) -> list[np.ndarray]:
    d2 = ((q_utm[:, None, :] - db_utm[None, :, :]) ** 2).sum(-1)  # full distance matrix
    return [np.flatnonzero(row <= radius * radius) for row in d2]


def numpy_search(db: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    db = db.astype(np.float32)
    q = q.astype(np.float32)
    db /= np.maximum(np.linalg.norm(db, axis=1, keepdims=True), 1e-12)
    q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    dist = (q * q).sum(1)[:, None] + (db * db).sum(1)[None, :] - 2.0 * (q @ db.T)
    idx = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dist, idx, axis=1), idx


def run_child(args: argparse.Namespace) -> None:
    from vprkit.retrieval.ground_truth import positives_within_radius
    from vprkit.retrieval.search import chunked_search, exact_search

    work = Path(args.work)
    rss_start = rss_now()
    t0 = time.perf_counter()
    extra = {}
    if args.child.startswith("positives"):
        f = np.load(args.layout)
        db_utm, q_utm, radius = f["utmDb"], f["utmQ"], float(f["posDistThr"])
        t0 = time.perf_counter()
        fn = positives_within_radius if args.child == "positives-vprkit" else numpy_positives
        pos = fn(db_utm, q_utm, radius)
        seconds = time.perf_counter() - t0
        lengths = np.array([len(p) for p in pos])
        np.save(work / f"{args.child}.npy", np.concatenate([lengths, *pos]))
    else:
        db_path, q_path = work / f"db_{args.dim}.npy", work / f"q_{args.dim}.npy"
        if args.child == "search-chunked":
            db = np.load(db_path, mmap_mode="r")
            q = np.load(q_path, mmap_mode="r")
            # the budget left for working memory once the interpreter and libraries are in
            budget = args.budget - rss_now() - 64 * MIB
            extra["search_budget_mib"] = budget / MIB
            d, i = chunked_search(db, q, args.k, budget)
        else:
            db, q = np.load(db_path), np.load(q_path)
            fn = exact_search if args.child == "search-exact" else numpy_search
            d, i = fn(db, q, args.k)
        seconds = time.perf_counter() - t0
        np.save(work / f"{args.child}_{args.dim}_idx.npy", i)
        np.save(work / f"{args.child}_{args.dim}_dist.npy", d)
    print(
        json.dumps(
            {"seconds": seconds, "peak": peak_rss(), "rss_start": rss_start, **extra},
        )
    )


# ----------------------------------------------------------------------------- parent


def spawn(args: argparse.Namespace, child: str, dim: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--child", child, "--work", args.work]
    cmd += ["--layout", str(args.layout), "--dim", str(dim), "--k", str(args.k)]
    cmd += ["--budget", str(args.budget)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_descriptors(path: Path, n: int, dim: int, rng: np.random.Generator) -> None:
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, dim))
    for s in range(0, n, 4096):
        rows = min(4096, n - s)
        arr[s : s + rows] = rng.standard_normal((rows, dim), dtype=np.float32)
    arr.flush()
    del arr


def load_positives(path: Path, nq: int) -> list[np.ndarray]:
    flat = np.load(path)
    lengths, rest = flat[:nq], flat[nq:]
    return np.split(rest, np.cumsum(lengths)[:-1])


def row(name: str, r: dict, ref: dict | None) -> str:
    ratio_t = f"{r['seconds'] / ref['seconds']:.2f}x" if ref else ""
    ratio_m = f"{r['peak'] / ref['peak']:.2f}x" if ref else ""
    return (
        f"| {name:<38} | {r['seconds']:8.2f} | {ratio_t:>7} | {r['peak'] / MIB:12.0f} "
        f"| {ratio_m:>7} | {r['rss_start'] / MIB:9.0f} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--layout", type=Path, default=DEFAULT_LAYOUT, help="tokyo247.npz")
    p.add_argument("--dims", type=int, nargs="+", default=[512, 10752])
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--budget-gib", type=float, default=2.0, help="peak-RSS budget, bounded path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--dim", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--budget", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        run_child(args)
        return
    if not args.layout.is_file():
        sys.exit(f"Tokyo 24/7 layout not found at {args.layout} (see ../shared/data/README.md)")
    args.budget = int(args.budget_gib * (1 << 30))
    layout = np.load(args.layout)
    n, nq = len(layout["utmDb"]), len(layout["utmQ"])
    print(f"Tokyo 24/7 layout: {n} database, {nq} queries; k={args.k}; {_cores()} CPU cores")

    with tempfile.TemporaryDirectory(prefix="vprkit_bench_") as work:
        args.work = work
        header = ["approach", "time (s)", "vs np", "peak RSS MiB", "vs np", "start MiB"]
        widths = [38, 8, 7, 12, 7, 9]
        lines = [
            "| " + " | ".join(f"{h:<{w}}" for h, w in zip(header, widths, strict=True)) + " |",
            "|" + "|".join("-" * (w + 2) for w in widths) + "|",
        ]
        ref = spawn(args, "positives-numpy")
        mine = spawn(args, "positives-vprkit")
        a = load_positives(Path(work) / "positives-numpy.npy", nq)
        b = load_positives(Path(work) / "positives-vprkit.npy", nq)
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True)), "positives differ"
        lines += [row("positives: numpy full matrix", ref, None)]
        lines += [row("positives: vprkit (kd-tree)", mine, ref)]

        rng = np.random.default_rng(args.seed)
        notes = []
        for dim in args.dims:
            t = time.perf_counter()
            write_descriptors(Path(work) / f"db_{dim}.npy", n, dim, rng)
            write_descriptors(Path(work) / f"q_{dim}.npy", nq, dim, rng)
            print(f"wrote {dim}-D float16 descriptors in {time.perf_counter() - t:.1f} s")
            ref = spawn(args, "search-numpy", dim)
            exact = spawn(args, "search-exact", dim)
            chunked = spawn(args, "search-chunked", dim)
            ie, ic, inp, de, dc = (
                np.load(Path(work) / f"search-{name}_{dim}_{what}.npy")
                for name, what in [
                    ("exact", "idx"),
                    ("chunked", "idx"),
                    ("numpy", "idx"),
                    ("exact", "dist"),
                    ("chunked", "dist"),
                ]
            )
            assert np.array_equal(ie, ic) and np.array_equal(de, dc), "chunked != exact"
            assert chunked["peak"] < args.budget, f"bounded path peaked at {chunked['peak']} B"
            same = int((inp == ie).all(axis=1).sum())
            notes.append(
                f"{dim}-D: bounded == exact on all {nq} queries (indices and distances); "
                f"numpy argsort gives the same top-{args.k} list for {same}/{nq} queries "
                f"(float32 near-ties); bounded search was given "
                f"{chunked['search_budget_mib']:.0f} MiB of working memory"
            )
            lines += [row(f"top-{args.k} {dim}-D: numpy matrix+argsort", ref, None)]
            lines += [row(f"top-{args.k} {dim}-D: vprkit exact (faiss)", exact, ref)]
            lines += [row(f"top-{args.k} {dim}-D: vprkit bounded", chunked, ref)]
            for f in Path(work).glob(f"*_{dim}.npy"):
                f.unlink()
        print("\n".join(lines))
        for note in notes:
            print(note)
        print(f"peak-RSS budget of the bounded path: {args.budget / MIB:.0f} MiB (asserted)")


def _cores() -> int:
    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
