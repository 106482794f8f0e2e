"""SelaVPR re-ranking of one query's top-K candidates (61x61x128 local features):
vprkit's `mutual_nn_count` vs the official batched approach (`local_matching.py`: one
(K, 3721, 3721) fp32 similarity tensor, argmax over both axes), and vs the geometric-
verification baseline on the same features (`vprkit.rerank.ransac`: mutual nearest
neighbours, then an OpenCV RANSAC homography fit per candidate, at 224x224). The SelaVPR paper
puts its mutual-NN re-ranking at about 3% of a spatial-verification pipeline's time; the
ratio here is measured on the CPU.

The inputs (a query and K candidates that resemble it to varying degrees) are written once
to a .npy file; each approach runs in a fresh subprocess that reads the same file, so its
peak resident memory (ru_maxrss) is its own; the extra memory is the peak minus the resident
size after loading the inputs. The counts of every approach must be identical.

    python benchmarks/bench_mnn.py [--k 100] [--repeats 3] [--with-bf16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import describe_limits, machine_limits, share  # benchmarks/machine.py
from memory import MIB, peak_rss, rss_now  # benchmarks/memory.py

IMAGE_HW = (224, 224)  # SelaVPR's input: 61x61 maps of 224x224 images


def official_batched(query, cands):
    """`match_batch_tensor(fm1, fm2, trainflag=False)` for one query, on the CPU."""
    import torch

    fm1 = query.reshape(query.shape[0], -1).T  # (l, D), row-major over (h, w)
    fm2 = cands.reshape(cands.shape[0], cands.shape[1], -1).transpose(1, 2)  # (N, l, D)
    m = torch.matmul(fm2, fm1.T)  # (N, l, l)
    max1 = torch.argmax(m, dim=1)
    max2 = torch.argmax(m, dim=2)
    q_of_c = max2[torch.arange(m.shape[0]).reshape((-1, 1)), max1]
    valid = torch.arange(m.shape[-1]).repeat((m.shape[0], 1)) == q_of_c
    return valid.sum(dim=1)


def run_child(args: argparse.Namespace) -> None:
    import torch

    from vprkit.rerank import mutual_nn_count

    torch.set_num_threads(args.threads)
    data = np.load(args.inputs)
    query = torch.from_numpy(data[0])
    cands = torch.from_numpy(data[1:])
    del data
    if args.method == "official":

        def fn():
            return official_batched(query, cands)
    elif args.method == "ransac":
        import cv2

        from vprkit.rerank.ransac import dense_keypoints, ransac_scores

        cv2.setNumThreads(args.threads)

        def fn():
            keypoints = [dense_keypoints(c, IMAGE_HW) for c in cands.numpy()]
            return torch.from_numpy(
                ransac_scores(dense_keypoints(query.numpy(), IMAGE_HW), keypoints)
            )
    else:
        precision = {"vprkit": "fp32", "vprkit-bf16": "bf16"}[args.method]

        def fn():
            return mutual_nn_count(query, cands, precision=precision)

    with torch.no_grad():
        # A small run first pages in the code (BLAS kernels, ...) so that `extra` counts
        # only the memory the computation itself needs.
        small_q, small_c = query[:, :20, :20].contiguous(), cands[:2, :, :20, :20].contiguous()
        if args.method == "official":
            official_batched(small_q, small_c)
        elif args.method == "ransac":
            pass  # its first candidate pages the code in; the peak is the same
        else:
            mutual_nn_count(small_q, small_c, precision=precision)
        base = rss_now()
        t0 = time.perf_counter()
        counts = fn()  # the first call also sets the peak memory
        times = [time.perf_counter() - t0]
        peak = peak_rss()
        for _ in range(args.repeats - 1):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    print(
        json.dumps(
            {
                "counts": counts.tolist(),
                "times": times,
                "peak": peak,
                "extra": peak - base,
                "inputs_rss": base,
            }
        )
    )


def make_inputs(path: Path, k: int, side: int, dim: int, seed: int) -> None:
    """Unit-norm features; candidate i = query + noise of growing strength, so the counts
    spread out (noise 0.5 to 8 times the per-element feature scale)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((dim, side, side), dtype=np.float32)
    q /= np.linalg.norm(q, axis=0, keepdims=True)
    out = np.lib.format.open_memmap(
        path, mode="w+", dtype=np.float32, shape=(k + 1, dim, side, side)
    )
    out[0] = q
    scale = 1 / np.sqrt(dim)
    for i, s in enumerate(np.linspace(0.5, 8.0, k)):
        c = q + np.float32(s * scale) * rng.standard_normal(q.shape, dtype=np.float32)
        c /= np.linalg.norm(c, axis=0, keepdims=True)
        out[i + 1] = c
    out.flush()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--k", type=int, default=100, help="candidates re-ranked per query")
    p.add_argument("--side", type=int, default=61, help="local map side (61 at 224x224)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--with-bf16", action="store_true", help="also time precision='bf16'")
    p.add_argument("--no-ransac", action="store_true", help="skip the RANSAC baseline")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--inputs", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        run_child(args)
        return

    methods = ["official", "vprkit"] + (["vprkit-bf16"] if args.with_bf16 else [])
    methods += [] if args.no_ransac else ["ransac"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "locals.npy"
        make_inputs(inputs, args.k, args.side, args.dim, args.seed)
        for method in methods:
            cmd = [sys.executable, __file__, "--child", "--method", method, "--inputs", str(inputs)]
            cmd += ["--repeats", str(args.repeats), "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[method] = json.loads(out.strip().splitlines()[-1])
    import torch

    torch.set_num_threads(args.threads)
    limits = machine_limits()  # after the children: measured on an otherwise idle process
    ref = results["official"]["counts"]
    for method, r in results.items():
        if method != "ransac":  # inliers, not mutual-NN counts
            assert r["counts"] == ref, f"{method} counts differ from the official approach"
    l = args.side * args.side
    print(
        f"MNN re-ranking, one query, K={args.k} candidates of {args.side}x{args.side}x{args.dim} "
        f"(L={l}), CPU, {args.threads} threads, median of {args.repeats}; inputs "
        f"{results['official']['inputs_rss'] / MIB:.0f} MiB resident in each process"
    )
    print(f"mutual-NN counts identical across methods: yes (min {min(ref)}, max {max(ref)})")
    print()
    print("| method | time per query (s) | peak RSS (MiB) | extra over inputs (MiB) |")
    print("|---|---|---|---|")
    base = results["official"]
    for method, r in results.items():
        t = float(np.median(r["times"]))
        speed = float(np.median(base["times"])) / t
        mem = base["extra"] / max(r["extra"], 1)
        note = "" if method == "official" else f" ({speed:.1f}x faster, {mem:.0f}x less extra)"
        if method == "ransac":
            note = f" ({speed:.2f}x the official MNN's speed)"
        print(f"| {method} | {t:.2f}{note} | {r['peak'] / MIB:.0f} | {r['extra'] / MIB:.0f} |")
    flops = 2 * l * l * args.dim * args.k  # the similarity products; argmax is not counted
    print()
    print(f"{describe_limits(limits)}; similarities: {flops / 1e9:.0f} GFLOP per query")
    for method in [m for m in results if m.startswith("vprkit")]:
        achieved = flops / float(np.median(results[method]["times"])) / 1e9
        pct = share(achieved, limits, "bf16" if method.endswith("bf16") else "fp32")
        print(f"{method}: {achieved:.0f} GFLOP/s = {pct} of the limit")
    if "ransac" in results:
        inliers = results["ransac"]["counts"]
        t_ransac = float(np.median(results["ransac"]["times"]))
        t_mnn = float(np.median(results["vprkit"]["times"]))
        print()
        print(
            f"RANSAC inliers per candidate: min {min(inliers)}, max {max(inliers)}; "
            f"vprkit's mutual-NN re-ranking takes {t_mnn / t_ransac:.1%} of RANSAC's time "
            f"({t_ransac / t_mnn:.1f}x faster; the SelaVPR paper: about 3%)"
        )


if __name__ == "__main__":
    main()
