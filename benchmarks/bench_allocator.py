"""Extraction with freed memory kept for reuse (`vprkit.keep_freed_memory`, what the vprkit
command does) against glibc's default of handing large blocks back to the OS.

The setting is process-wide, so each side runs in fresh processes, alternated round by round
so that machine noise hits both alike. Each process builds the model (random weights, seed 0),
runs one warm-up batch and times `--batches` more; per side the best and the median batch over
all rounds are printed, with the page faults per timed batch and the process's peak RSS. The
machine's limit (a 2048^3 matmul, benchmarks/machine.py) is measured in the same run.
Run:  python benchmarks/bench_allocator.py [--model vitb14] [--sizes 224 322]
          [--precisions fp32 bf16] [--batch 16] [--rounds 3] [--batches 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from machine import count_flops, describe_limits, machine_limits, share  # benchmarks/machine.py

import vprkit
from vprkit.cpu_precision import native_on_cpu
from vprkit.extract import autocast_context

SIDES = ("released", "kept")


def worker(args) -> None:
    """One process, one side: prints {"times": [...], "faults": per batch, "peak_mib": ...}."""
    kept = args.worker == "kept" and vprkit.keep_freed_memory()
    if args.worker == "kept" and not kept:
        raise SystemExit("keep_freed_memory() is not in effect here (not glibc, or turned off)")
    torch.manual_seed(0)
    model = vprkit.create_model(f"dinov2_{args.model}").eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    times = []
    with torch.no_grad(), autocast_context("cpu", args.precision):
        model(x)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(args.batches):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"times": times, "faults": faults / args.batches, "peak_mib": peak}))


def run_side(args, side: str, size: int, precision: str) -> dict:
    command = [sys.executable, __file__, "--worker", side, "--model", args.model]
    command += ["--size", str(size), "--precision", precision, "--batch", str(args.batch)]
    command += ["--batches", str(args.batches)]
    env = {k: v for k, v in os.environ.items() if k != "VPRKIT_KEEP_FREED_MEMORY"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"the {side} process failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vitb14", choices=["vits14", "vitb14", "vitl14"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 322])
    parser.add_argument("--precisions", nargs="+", help="default: fp32, and bf16 where native")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="processes per side")
    parser.add_argument("--batches", type=int, default=3, help="timed batches per process")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.precisions is None:
        args.precisions = ["fp32"] + (["bf16"] if native_on_cpu("bf16") is not False else [])

    limits = machine_limits()
    model = vprkit.create_model(f"dinov2_{args.model}").eval()
    print(
        f"DINOv2 {args.model}, batch {args.batch}, {torch.get_num_threads()} threads, "
        f"{args.rounds} processes per side x {args.batches} batches; {describe_limits(limits)}"
    )
    print(
        "| size | precision | released img/s best / median (% of limit) | kept img/s best / "
        "median (%) | ratio of medians | page faults per batch released / kept | "
        "peak RSS MiB released / kept |"
    )
    print("|---" * 7 + "|")
    for size in args.sizes:
        with torch.no_grad():
            gflop = count_flops(lambda: model(torch.randn(1, 3, size, size))) / 1e9
        for precision in args.precisions:
            runs = {side: [] for side in SIDES}
            for round_ in range(args.rounds):
                for side in SIDES if round_ % 2 == 0 else SIDES[::-1]:
                    runs[side].append(run_side(args, side, size, precision))
            cells, medians = [], {}
            for side in SIDES:
                times = [t for run in runs[side] for t in run["times"]]
                best, medians[side] = args.batch / min(times), args.batch / statistics.median(times)
                pct = share(gflop * medians[side], limits, precision)
                cells.append(f"{best:.2f} / {medians[side]:.2f} ({pct})")
            faults = [statistics.median(r["faults"] for r in runs[s]) for s in SIDES]
            peaks = [max(r["peak_mib"] for r in runs[s]) for s in SIDES]
            print(
                f"| {size} | {precision} | {cells[0]} | {cells[1]} | "
                f"{medians['kept'] / medians['released']:.2f} | "
                f"{faults[0]:,.0f} / {faults[1]:,.0f} | {peaks[0]:,.0f} / {peaks[1]:,.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
