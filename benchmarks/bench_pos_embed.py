"""What keeping the interpolated pos-embed per input size saves, at 112, 224 and 322.

A DINOv2 ViT stores its pos-embed for 518x518 and resizes it (bicubic) for every other input
size. `VisionTransformer.interpolate_pos_embed` keeps the result per size while the weights are
unchanged; before, every forward pass recomputed it. This times one forward pass (random
weights, batch 1 as `vprkit localize` runs a query, and batch 16 as extraction runs) with the
kept pos-embed against the same pass recomputing it (the model's own `_interpolate_pos_embed`,
called as before), alternating the two, and the resize alone. Outputs are checked bit-identical.
The saving is at most the resize's share of a forward pass (the "resize / forward" column);
the two forward columns differ by machine noise when that share is small.

    python benchmarks/bench_pos_embed.py [--model dinov2_vitb14] [--repeats 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import vprkit


def _median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dinov2_vitb14")
    parser.add_argument("--sizes", type=int, nargs="+", default=[112, 224, 322])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = vprkit.create_model(args.model).eval()
    print(f"{args.model}, {args.threads} threads, load {os.getloadavg()[0]:.2f}")
    print(
        "| size | batch | resize ms | resize / forward | forward kept ms | recomputed ms | saved |"
    )
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        for batch in args.batches:
            x = torch.randn(batch, 3, size, size)
            with torch.no_grad():
                kept = model(x).patch_tokens
                model.__dict__["_pos_embed_cache"] = {}
                resize = _median_s(lambda s=size: model._interpolate_pos_embed(s, s), 20)

                def forward_kept(x=x):
                    return model(x)

                def forward_recomputed(x=x, s=size):
                    model.__dict__["_pos_embed_cache"] = {}  # as every forward was before
                    return model(x)

                assert torch.equal(forward_recomputed().patch_tokens, kept)
                times = {"kept": [], "recomputed": []}
                for r in range(args.repeats):  # alternate, the order flipping every repeat
                    order = ("kept", "recomputed") if r % 2 == 0 else ("recomputed", "kept")
                    for which in order:
                        fn = forward_kept if which == "kept" else forward_recomputed
                        times[which].append(_median_s(fn, 1))
            k, c = (statistics.median(times[w]) for w in ("kept", "recomputed"))
            print(
                f"| {size} | {batch} | {1e3 * resize:.2f} | {100 * resize / k:.2f}% | "
                f"{1e3 * k:.1f} | {1e3 * c:.1f} | "
                f"{100 * (c - k) / c:+.1f}% |"
            )
    print(f"load at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
