"""The aggregators of MegaLoc, SALAD and BoQ against their bare DINOv2 ViT-B/14 backbone.

Each method is built through `vprkit.create_model(name)` (random weights: speed does not
depend on them) and encodes one random batch at its evaluation size (`ModelInfo.image_size`,
322x322 for all three) next to its own backbone: the DINOv2 `VisionTransformer` inside the
model, the very same module and weights, called alone (all blocks and the final norm). The
two are timed in alternation (the order flips every repeat) in this process, fp32 and bf16
autocast, so machine noise hits both alike; the ratio of their median times is the whole
model's cost over the backbone, and the project's target is an aggregator costing under 5%
(ratio < 1.05). Multiply-adds per image (batch 1) come from
`torch.utils.flop_counter.FlopCounterMode` (matmuls, convs, attention, einsum; element-wise
ops such as the Sinkhorn's logsumexp are not counted). Methods not registered yet are skipped.
Models are built one at a time, so only one is in memory.

Batch size matters: a projection such as MegaLoc's (16640 -> 8448, 140M weights, 562 MB in
fp32) costs a fixed read of its weights per batch (MegaLoc runs it in fp32 even under bf16
autocast: casting the weights every batch took longer, about 0.1 s on 2 CPU threads), so its
share shrinks as the batch grows; the `--quick` batches of 2 overstate it (and one repeat on
a busy machine measures nothing). Backbone times vary by several percent between batches on
a CPU, so a small overhead needs more repeats than 3 to read off the ratio.

    python benchmarks/bench_aggregators.py [--batch 16] [--repeats 5] [--device cpu]
    python benchmarks/bench_aggregators.py --quick   # smoke run: batch 2, 1 repeat
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils import flop_counter

import vprkit
from vprkit.extract import autocast_context
from vprkit.models import VisionTransformer, model_info

METHODS = ("megaloc", "salad", "boq")
TARGET = 1.05  # the aggregator should add under 5% to the backbone's time


def bare_backbone(model: nn.Module) -> VisionTransformer:
    """The DINOv2 ViT inside `model` (the first `VisionTransformer` submodule)."""
    for module in model.modules():
        if isinstance(module, VisionTransformer):
            return module
    raise ValueError(f"{type(model).__name__} holds no VisionTransformer")


def _cpu_sdpa_flop(q, k, v, *args, out_shape=None, **kwargs) -> int:
    """FlopCounterMode has no formula for the CPU flash-attention kernel; it is plain SDPA."""
    return flop_counter.sdpa_flop_count(q, k, v)


def count_macs(fn: Callable[[Tensor], object], x: Tensor) -> float:
    """Multiply-adds of `fn(x)`."""
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop}
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping=mapping)
    # The fused fast path of nn.TransformerEncoderLayer / nn.MultiheadAttention is invisible
    # to FlopCounterMode (BoQ's two encoder layers would count as nothing): count the plain
    # path, the same arithmetic.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), counter:
            fn(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return counter.get_total_flops() / 2


def time_pair(
    fns: dict[str, Callable[[], object]], repeats: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call of each function, alternating, the order flipped every repeat."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        for name in list(fns)[:: 1 if r % 2 == 0 else -1]:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fns[name]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return times


def bench_method(name: str, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """One row per precision for method `name`."""
    torch.manual_seed(args.seed)
    model = vprkit.create_model(name).eval().requires_grad_(False).to(device)
    backbone = bare_backbone(model)
    height, width = model_info(name).image_size
    x = torch.randn(args.batch, 3, height, width, device=device)
    fns = {
        "backbone": lambda: backbone(x).cls_token,
        "model": lambda: model(x).global_desc,
    }
    macs = {}
    if device.type == "cpu":
        macs = {
            "backbone": count_macs(lambda t: backbone(t), x[:1]),
            "model": count_macs(lambda t: model(t), x[:1]),
        }
    dim = None
    rows = []
    for precision in args.precisions:
        with torch.no_grad(), autocast_context(device.type, precision):
            for _ in range(args.warmup):
                dim = fns["model"]().shape[-1]
                fns["backbone"]()
            times = time_pair(fns, args.repeats, device)
        rows.append(
            {"method": name, "size": (height, width), "precision": precision, "times": times}
        )
    for row in rows:
        row["macs"], row["dim"] = macs, dim
    return rows


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--methods", nargs="+", default=list(METHODS), help="(megaloc salad boq)")
    p.add_argument("--batch", type=int, default=16, help="images per batch (default 16)")
    p.add_argument("--repeats", type=int, default=5, help="timed batches per model (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed batches first (default 1)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], help="(fp32 bf16)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: batch 2, 1 repeat")
    args = p.parse_args()
    if args.quick:
        args.batch, args.repeats = 2, 1
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    known = set(vprkit.list_models())
    skipped = [m for m in args.methods if m not in known]
    rows = []
    for name in args.methods:
        if name in known:
            rows += bench_method(name, args, device)
            gc.collect()  # the method's model is gone before the next one is built

    where = f"{device}" + (f", {args.threads} threads" if device.type == "cpu" else "")
    print(
        f"Aggregators vs their bare DINOv2 ViT-B/14, batch {args.batch}, {where}, "
        f"torch {torch.__version__}, {args.repeats} alternating repeats"
        + (" (--quick: a smoke run, not a measurement)" if args.quick else "")
    )
    if skipped:
        print(f"skipped (not registered): {', '.join(skipped)}")
    seen = set()
    for row in rows:
        if row["macs"] and row["method"] not in seen:
            seen.add(row["method"])
            bb, full = row["macs"]["backbone"], row["macs"]["model"]
            print(
                f"multiply-adds per image, {row['method']} ({row['dim']}-D): backbone "
                f"{bb / 1e9:.2f} G, model {full / 1e9:.2f} G (aggregator +{(full - bb) / bb:.2%})"
            )
    print()
    print(
        "| method | size | precision | backbone img/s | model img/s | time ratio (median) "
        "| time ratio (best) | aggregator overhead | target < 5% |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        times = row["times"]
        med = {k: statistics.median(v) for k, v in times.items()}
        best = {k: min(v) for k, v in times.items()}
        ratio, ratio_best = med["model"] / med["backbone"], best["model"] / best["backbone"]
        h, w = row["size"]
        print(
            f"| {row['method']} | {h}x{w} | {row['precision']} | "
            f"{args.batch / med['backbone']:.2f} | {args.batch / med['model']:.2f} | "
            f"{ratio:.3f} | {ratio_best:.3f} | {ratio - 1:+.1%} | "
            f"{'met' if ratio < TARGET else 'missed'} |"
        )
    print()
    for row in rows:
        line = ", ".join(f"{n} {' '.join(f'{s:.3f}' for s in t)}" for n, t in row["times"].items())
        print(f"seconds per batch, {row['method']} {row['precision']}: {line}")


if __name__ == "__main__":
    main()
