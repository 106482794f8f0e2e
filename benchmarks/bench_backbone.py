"""Feature-extraction throughput of vprkit's ViT against the official DINOv2 code.

Same weights, same inputs, same run; the two models are timed in alternation so that
machine noise hits both alike. Needs the test-only reference package:
    pip install --no-deps dinov2==0.0.1.dev2
Run:  python benchmarks/bench_backbone.py [--model vitb14] [--sizes 224 322] [--batch 16]
"""

from __future__ import annotations

import argparse
import time

import torch

import vprkit
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
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    args = parser.parse_args()

    torch.manual_seed(0)
    official = official_model(args.model)
    ours = vprkit.create_model(f"dinov2_{args.model}", weights=official.state_dict()).eval()
    print(
        f"DINOv2 {args.model}, batch {args.batch}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )
    print(
        f"{'size':>5} {'prec':>5} {'official img/s':>15} {'vprkit img/s':>13} "
        f"{'ratio':>6} {'max |diff| cls':>15} {'max |diff| vs fp32':>19}"
    )
    for size in args.sizes:
        x = torch.randn(args.batch, 3, size, size)
        with torch.no_grad():
            reference = official.forward_features(x)["x_norm_clstoken"]
        for precision in args.precisions:
            with torch.no_grad(), autocast_context("cpu", precision):
                run_official = lambda x=x: official.forward_features(x)["x_norm_clstoken"]  # noqa: E731
                run_ours = lambda x=x: ours(x).cls_token  # noqa: E731
                run_official(), run_ours()  # warm-up
                t_off, t_ours = [], []
                for _ in range(args.repeats):
                    t_off.append(time_once(run_official))
                    t_ours.append(time_once(run_ours))
                out_off, out_ours = run_official().float(), run_ours().float()
            ips_off = args.batch / min(t_off)
            ips_ours = args.batch / min(t_ours)
            diff = (out_ours - out_off).abs().max().item()
            diff_fp32 = (out_ours - reference).abs().max().item()
            print(
                f"{size:>5} {precision:>5} {ips_off:>15.2f} {ips_ours:>13.2f} "
                f"{ips_ours / ips_off:>6.2f} {diff:>15.2e} {diff_fp32:>19.2e}"
            )


if __name__ == "__main__":
    main()
