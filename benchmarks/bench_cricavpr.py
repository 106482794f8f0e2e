"""CricaVPR descriptor extraction against its bare DINOv2 ViT-B/14 backbone.

The whole CricaVPR model (backbone with a conv adapter in every block, GeM region pyramid,
cross-image encoder) and `dinov2_vitb14` holding the same backbone weights (copied from the
CricaVPR state dict; fresh adapters output zero, so both give the same cls token, which is
checked) encode the same random batch, fp32 and bf16 autocast. The two are timed in
alternation (the order flips every repeat) in this process, so machine noise hits both alike;
the project's target is at most 20% more time than the bare backbone. Peak memory comes from
one fresh subprocess per model and precision (ru_maxrss; `extra` is the peak minus the
resident size just before the timed batch, i.e. what the forward itself needs). They run
before this process builds any model: a child's ru_maxrss starts from its parent's resident
size at the fork. Multiply-adds
are counted once per model by `torch.utils.flop_counter.FlopCounterMode` (matmuls, convs and
attention; element-wise ops such as GeM are not counted).

    python benchmarks/bench_cricavpr.py [--size 224] [--batch 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from memory import MIB, peak_rss, rss_now  # benchmarks/memory.py
from torch import Tensor, nn
from torch.utils import flop_counter

import vprkit
from vprkit.extract import autocast_context

TARGET = 1.20  # at most 20% more time than the bare backbone
MODELS = ("backbone", "cricavpr")


def build_models(seed: int) -> tuple[nn.Module, nn.Module]:
    """(bare DINOv2 ViT-B/14, CricaVPR) with identical backbone weights, frozen, in eval mode.

    Parameters do not require grad, so bf16 autocast keeps no cast-weight cache in either."""
    torch.manual_seed(seed)
    crica = vprkit.create_model("cricavpr").eval().requires_grad_(False)
    state = {
        k.removeprefix("backbone."): v
        for k, v in crica.state_dict().items()
        if k.startswith("backbone.") and "adapter" not in k
    }
    bare = vprkit.create_model("dinov2_vitb14", weights=state).eval().requires_grad_(False)
    return bare, crica


def descriptor_fn(name: str, model: nn.Module) -> Callable[[Tensor], Tensor]:
    """What extraction keeps: the cls token of the bare backbone, CricaVPR's global descriptor."""
    if name == "backbone":
        return lambda x: model(x).cls_token
    return lambda x: model(x).global_desc


def _cpu_sdpa_flop(q, k, v, *args, out_shape=None, **kwargs) -> int:
    """FlopCounterMode has no formula for the CPU flash-attention kernel; it is plain SDPA."""
    return flop_counter.sdpa_flop_count(q, k, v)


def count_macs(model: nn.Module, size: int) -> dict[str, float]:
    """Multiply-adds per image (batch of 1) of `model`, total and per top-level part."""
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop}
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping=mapping)
    with torch.no_grad(), counter:
        model(torch.randn(1, 3, size, size))
    per_module = {k: sum(v.values()) / 2 for k, v in counter.get_flop_counts().items()}
    return {
        "total": counter.get_total_flops() / 2,
        "adapters": sum(v for k, v in per_module.items() if k.endswith(".adapter")),
        "encoder": sum(v for k, v in per_module.items() if k.endswith(".encoder")),
    }


def run_child(args: argparse.Namespace) -> None:
    """Peak memory of one model at one precision, in this fresh process."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    name = "dinov2_vitb14" if args.model == "backbone" else "cricavpr"
    model = vprkit.create_model(name).eval().requires_grad_(False)
    fn = descriptor_fn(args.model, model)
    x = torch.randn(args.batch, 3, args.size, args.size)
    with torch.no_grad(), autocast_context("cpu", args.precision):
        fn(x[:1])  # pages in the code and kernels, so `extra` is the forward's own memory
        before = peak_rss()
        base = rss_now()
        t0 = time.perf_counter()
        fn(x)
        seconds = time.perf_counter() - t0
        peak = peak_rss()
    result = {"peak": peak, "extra": peak - base, "base": base, "before": before, "s": seconds}
    print(json.dumps(result))


def child_memory(args: argparse.Namespace, model: str, precision: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--model", model, "--precision", precision]
    cmd += ["--size", str(args.size), "--batch", str(args.batch), "--threads", str(args.threads)]
    cmd += ["--seed", str(args.seed)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def time_pair(fns: dict[str, Callable[[], Tensor]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function, alternating, the order flipped every repeat."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        for name in list(fns)[:: 1 if r % 2 == 0 else -1]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", type=int, default=224, help="square image side (default 224)")
    p.add_argument("--batch", type=int, default=16, help="images per batch (default 16)")
    p.add_argument("--repeats", type=int, default=3, help="timed batches per model (default 3)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], help="(fp32 bf16)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-memory", action="store_true", help="no subprocess memory runs")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", choices=MODELS, help=argparse.SUPPRESS)
    p.add_argument("--precision", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        run_child(args)
        return

    torch.set_num_threads(args.threads)
    mem: dict[str, dict[str, dict]] = {precision: {} for precision in args.precisions}
    if not args.skip_memory:  # first, while this process is small (see the module doc)
        for precision in args.precisions:
            mem[precision] = {name: child_memory(args, name, precision) for name in MODELS}
    bare, crica = build_models(args.seed)
    models = {"backbone": bare, "cricavpr": crica}
    macs = {name: count_macs(model, args.size) for name, model in models.items()}

    torch.manual_seed(args.seed)
    x = torch.randn(args.batch, 3, args.size, args.size)
    with torch.no_grad():
        cls_diff = (bare(x[:2]).cls_token - crica.backbone(x[:2]).cls_token).abs().max().item()
    rows = []
    for precision in args.precisions:
        with torch.no_grad(), autocast_context("cpu", precision):
            fns = {name: descriptor_fn(name, m) for name, m in models.items()}
            for fn in fns.values():
                fn(x[:2])  # warm-up
            times = time_pair({name: lambda fn=fn: fn(x) for name, fn in fns.items()}, args.repeats)
        rows.append((precision, times, mem[precision]))

    print(
        f"CricaVPR vs bare DINOv2 ViT-B/14, {args.size}x{args.size}, batch {args.batch}, CPU, "
        f"{args.threads} threads, torch {torch.__version__}, {args.repeats} alternating repeats"
    )
    bb, cr = macs["backbone"]["total"], macs["cricavpr"]["total"]
    ad, enc = macs["cricavpr"]["adapters"], macs["cricavpr"]["encoder"]
    print(
        f"multiply-adds per image: backbone {bb / 1e9:.2f} G, CricaVPR {cr / 1e9:.2f} G "
        f"(+{(cr - bb) / bb:.1%}: adapters {ad / 1e9:.2f} G = {ad / bb:.1%}, "
        f"encoder {enc / 1e9:.3f} G = {enc / bb:.2%}, rest {(cr - bb - ad - enc) / 1e6:.1f} M)"
    )
    print(f"same backbone weights: max |cls diff| (fresh adapters output 0) = {cls_diff:.1e}")
    print()
    print(
        "| precision | backbone img/s | CricaVPR img/s | time ratio (median) | time ratio (best) "
        "| target <= 1.20 | peak RSS backbone / CricaVPR (MiB) | extra over weights+input (MiB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for precision, times, mem in rows:
        med = {name: statistics.median(t) for name, t in times.items()}
        best = {name: min(t) for name, t in times.items()}
        ratio = med["cricavpr"] / med["backbone"]
        ratio_best = best["cricavpr"] / best["backbone"]
        verdict = "met" if ratio <= TARGET else "missed"
        if mem:
            peak = f"{mem['backbone']['peak'] / MIB:.0f} / {mem['cricavpr']['peak'] / MIB:.0f}"
            extra = f"{mem['backbone']['extra'] / MIB:.0f} / {mem['cricavpr']['extra'] / MIB:.0f}"
        else:
            peak = extra = "-"
        print(
            f"| {precision} | {args.batch / med['backbone']:.2f} | "
            f"{args.batch / med['cricavpr']:.2f} | {ratio:.2f} | {ratio_best:.2f} | {verdict} "
            f"| {peak} | {extra} |"
        )
    print()
    for precision, times, _ in rows:
        line = ", ".join(f"{n} {' '.join(f'{s:.2f}' for s in t)}" for n, t in times.items())
        print(f"seconds per batch, {precision}: {line}")


if __name__ == "__main__":
    main()
