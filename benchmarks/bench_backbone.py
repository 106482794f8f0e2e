"""Feature-extraction throughput of vprkit's ViT against the official DINOv2 code, and
against the machine's limit.

Same weights, same inputs, same run; the models are timed in alternation so that machine
noise hits them alike. `--compile` adds vprkit's model through torch.compile (`--compile` of
the extraction commands; compile time not counted). The machine's limit, a 2048^3 matmul's
GFLOP/s in fp32 and bf16, is measured in the same run (benchmarks/machine.py); each model's
GFLOP per image (torch's FlopCounterMode: matrix products and attention) times its img/s is
its achieved GFLOP/s, printed as a fraction of the limit of its precision. Freed memory is
kept for reuse as the vprkit command does (`vprkit.keep_freed_memory`; `--release-memory`
turns that off). Needs the test-only reference package:
    pip install --no-deps dinov2==0.0.1.dev2
Run:  python benchmarks/bench_backbone.py [--model vitb14] [--sizes 224 322] [--batch 16]
          [--compile] [--release-memory]
"""

from __future__ import annotations

import argparse
import time

import torch
from machine import count_flops, describe_limits, machine_limits, share  # benchmarks/machine.py

import vprkit
from vprkit.cpu_precision import native_on_cpu
from vprkit.extract import autocast_context


def official_model(size: str):
    from dinov2.models import vision_transformer as vt

    build = {"vits14": vt.vit_small, "vitb14": vt.vit_base, "vitl14": vt.vit_large}[size]
    return build(patch_size=14, img_size=518, init_values=1.0, block_chunks=0).eval()


def time_once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vitb14", choices=["vits14", "vitb14", "vitl14"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 322])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--precisions",
        nargs="+",
        help="default: fp32 and bf16, or fp32 alone on a CPU that emulates bf16",
    )

    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument(
        "--release-memory",
        action="store_true",
        help="hand freed memory back to the OS (glibc's default) instead of keeping it for "
        "reuse as the vprkit command does (benchmarks/bench_allocator.py compares the two)",
    )
    args = parser.parse_args()
    kept = not args.release_memory and vprkit.keep_freed_memory()
    if args.precisions is None:
        emulated = native_on_cpu("bf16") is False
        args.precisions = ["fp32"] if emulated else ["fp32", "bf16"]
        if emulated:
            print("bf16 left out: this CPU emulates it (pass --precisions fp32 bf16 to time it)")

    torch.manual_seed(0)
    official = official_model(args.model)
    ours = vprkit.create_model(f"dinov2_{args.model}", weights=official.state_dict()).eval()
    compiled = torch.compile(ours) if args.compile else None
    limits = machine_limits()
    print(
        f"DINOv2 {args.model}, batch {args.batch}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, freed memory {'kept' if kept else 'released'}; "
        f"{describe_limits(limits)}"
    )
    print(
        "| size | precision | GFLOP/img | official img/s (% of limit) | vprkit img/s (%) | "
        "ratio | max abs diff vs official | max abs diff vs fp32"
        + (
            " | compiled img/s (%) | compiled max abs diff vs plain |"
            if compiled is not None
            else " |"
        )
    )
    print("|---" * (10 if compiled is not None else 8) + "|")
    for size in args.sizes:
        x = torch.randn(args.batch, 3, size, size)
        with torch.no_grad():
            reference = official.forward_features(x)["x_norm_clstoken"]
            gflop = count_flops(lambda x=x: ours(x[:1])) / 1e9
        for precision in args.precisions:
            runs = {
                "official": lambda x=x: official.forward_features(x)["x_norm_clstoken"],
                "vprkit": lambda x=x: ours(x).cls_token,
            }
            if compiled is not None:
                runs["compiled"] = lambda x=x: compiled(x).cls_token
            with torch.no_grad(), autocast_context("cpu", precision):
                outs = {name: run().float() for name, run in runs.items()}  # warm-up, compile
                times = {name: [] for name in runs}
                for _ in range(args.repeats):
                    for name, run in runs.items():
                        times[name].append(time_once(run))
            ips = {name: args.batch / min(t) for name, t in times.items()}
            pct = {name: share(gflop * v, limits, precision) for name, v in ips.items()}
            diff = (outs["vprkit"] - outs["official"]).abs().max().item()
            diff_fp32 = (outs["vprkit"] - reference).abs().max().item()
            row = (
                f"| {size} | {precision} | {gflop:.1f} | {ips['official']:.2f} "
                f"({pct['official']}) | {ips['vprkit']:.2f} ({pct['vprkit']}) | "
                f"{ips['vprkit'] / ips['official']:.2f} | {diff:.1e} | {diff_fp32:.1e} |"
            )
            if compiled is not None:
                cdiff = (outs["compiled"] - outs["vprkit"]).abs().max().item()
                row += f" {ips['compiled']:.2f} ({pct['compiled']}) | {cdiff:.1e} |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
