"""ONNX Runtime against PyTorch on CPU: images/s of each method at its official input size,
fp32, on the same real photos, in one run, with the exactness of the export at full size.

For each method the full-size model (random weights, seeded: no official file can be
downloaded here; speed and exactness do not depend on the values) is exported with
`vprkit.export.onnx.export_onnx` at its official size, checked against PyTorch on two corridor
photos (batches of 2, 1 and 3), then both run the same batch of other photos, alternating
(PyTorch first on even repeats, ONNX Runtime first on odd ones) so machine noise hits both
alike. Both use the same number of threads (`--threads`). Outputs are everything the
model gives for re-ranking too (SelaVPR's local maps, R2Former's tokens), as extraction for
`vprkit eval` computes them. `--int8` also times ONNX Runtime's dynamic int8 quantization
(`onnxruntime.quantization.quantize_dynamic`, weights int8, activations quantized per run)
and reports how far its global descriptors move (cosine to fp32).

    python benchmarks/bench_export.py [--methods cricavpr selavpr r2former dinov2_gem]
        [--batch 4] [--repeats 3] [--threads 2] [--int8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import vprkit
from vprkit.data.datasets import read_images_paths
from vprkit.data.images import Preprocess, load_image
from vprkit.export.onnx import array_difference, export_onnx, tokens_difference
from vprkit.export.runtime import OnnxModel

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "corridor"


def photos(folder: Path, hw: tuple[int, int], start: int, count: int) -> torch.Tensor:
    preprocess = Preprocess(image_size=hw)
    paths = read_images_paths(folder)[start : start + count]
    return torch.stack([preprocess(load_image(p)) for p in paths])


def outputs(out) -> dict[str, np.ndarray]:
    return {k: v.float().numpy() for k, v in vars(out).items() if isinstance(v, torch.Tensor)}


def max_diff(a: dict, b: dict) -> float:
    """As the export checks: R2Former's tokens as sets (near-tied attention may reorder)."""
    return max(
        (tokens_difference if k == "local_tokens" else array_difference)(a[k], b[k]) for k in a
    )


def timed(fn, x, repeats: int) -> list[float]:
    return [_once(fn, x) for _ in range(repeats)]


def _once(fn, x) -> float:
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


def bench(method: str, args, folder: Path) -> dict:
    torch.manual_seed(0)
    model = vprkit.create_model(method).eval().requires_grad_(False)
    hw = vprkit.model_info(method).image_size
    sample = photos(DATA / "ref", hw, 0, 2)
    batch = photos(DATA / "query", hw, 0, args.batch)
    path = folder / f"{method}.onnx"
    start = time.perf_counter()
    meta = export_onnx(model, path, hw, sample=sample)
    export_s = time.perf_counter() - start
    onnx_model = OnnxModel(path, threads=args.threads)
    with torch.no_grad():
        expected = outputs(model(batch))
    got = outputs(onnx_model(batch))
    row = {
        "method": method,
        "size": f"{hw[0]}x{hw[1]}",
        "outputs": meta["outputs"],
        "export_s": round(export_s, 1),
        "file_mb": round(path.stat().st_size / 2**20, 1),
        "max_abs_diff_export_check": meta["verified_max_abs_diff"],
        "max_abs_diff_timed_batch": max_diff(expected, got),
    }
    torch_times, onnx_times = [], []

    def run_torch(x):
        with torch.no_grad():
            model(x)

    run_torch(batch[:1]), onnx_model(batch[:1])  # warm-up
    for i in range(args.repeats):
        order = [(run_torch, torch_times), (onnx_model, onnx_times)]
        for fn, times in order if i % 2 == 0 else order[::-1]:
            times.append(_once(fn, batch))
    row["torch_img_s"] = round(args.batch / statistics.median(torch_times), 3)
    row["onnx_img_s"] = round(args.batch / statistics.median(onnx_times), 3)
    row["onnx_over_torch"] = round(row["onnx_img_s"] / row["torch_img_s"], 3)
    if args.int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        q_path = folder / f"{method}.int8.onnx"
        try:  # the linear layers (nearly all the multiply-adds of a ViT)
            quantize_dynamic(
                str(path),
                str(q_path),
                weight_type=QuantType.QInt8,
                op_types_to_quantize=["MatMul", "Gemm"],
            )
        except Exception as err:  # report it beside the fp32 figures rather than stop
            row["int8_error"] = f"{type(err).__name__}: {err}"[:200]
            path.unlink()
            return row
        q_model = OnnxModel(q_path, threads=args.threads)
        q_out = outputs(q_model(batch))
        q_model(batch[:1])
        q_times = timed(q_model, batch, args.repeats)
        cos = (q_out["global_desc"] * got["global_desc"]).sum(1) / (
            np.linalg.norm(q_out["global_desc"], axis=1)
            * np.linalg.norm(got["global_desc"], axis=1)
        )
        row["int8_img_s"] = round(args.batch / statistics.median(q_times), 3)
        row["int8_over_fp32_onnx"] = round(row["int8_img_s"] / row["onnx_img_s"], 3)
        row["int8_min_cosine_to_fp32"] = round(float(cos.min()), 4)
        row["int8_file_mb"] = round(q_path.stat().st_size / 2**20, 1)
        q_path.unlink()
    path.unlink()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--methods", nargs="+", default=["cricavpr", "selavpr", "r2former", "dinov2_gem"]
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--int8", action="store_true")
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"needs the corridor photos at {DATA}")
    torch.set_num_threads(args.threads)
    print(f"load before: {os.getloadavg()}; torch {torch.__version__}, threads {args.threads}")
    import onnxruntime

    print(f"onnxruntime {onnxruntime.__version__}, batch {args.batch}, repeats {args.repeats}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="vprkit_bench_export_") as tmp:
        for method in args.methods:
            row = bench(method, args, Path(tmp))
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"load after: {os.getloadavg()}")
    print(
        f"\n{'method':<12}{'size':>9}{'torch img/s':>13}{'onnx img/s':>12}{'ratio':>7}"
        f"{'max |diff|':>12}"
    )
    for r in rows:
        diff = max(r["max_abs_diff_export_check"], r["max_abs_diff_timed_batch"])
        print(
            f"{r['method']:<12}{r['size']:>9}{r['torch_img_s']:>13.3f}{r['onnx_img_s']:>12.3f}"
            f"{r['onnx_over_torch']:>7.2f}{diff:>12.2g}"
        )


if __name__ == "__main__":
    main()
