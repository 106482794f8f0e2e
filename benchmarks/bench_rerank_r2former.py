"""R2Former re-ranking of one query's top-K candidates: the re-ranking transformer
(`R2Former.rerank_scores`) against the RANSAC baseline (`vprkit.rerank.ransac`: mutual nearest
neighbours, then an OpenCV homography fit per candidate) on the same tokens.

Tokens are synthesized as R2Former gives them at 480x640 (a 30x40 grid of 16-pixel patches):
500 per image, `[x, y, attention, feature128]`, x and y the patch centres over 640, attention
descending from 1, features L2-normalized. Candidate k shares a fraction of the query's
tokens (from `--overlap-max` down to 0, decaying quadratically over the K candidates, as a
retrieval top-K has few true matches): their positions are the query's moved by a random
near-identity homography and snapped to the patch grid, their features the query's plus noise;
the other tokens are random cells with random features. The re-ranker has random weights
(its cost does not depend on them). All inputs are written once to .npy files.

Times: both approaches run in this process, alternating query by query (the order flips every
query), median over the queries. Peak memory: one fresh subprocess per approach re-ranks the
first query (ru_maxrss; `extra` is the peak minus the resident size just before it). They run
before this process imports torch, as a child's ru_maxrss starts from its parent's size.

    python benchmarks/bench_rerank_r2former.py [--queries 5] [--k 100] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from memory import MIB, peak_rss, rss_now  # benchmarks/memory.py

IMAGE_HW = (480, 640)
PATCH = 16
FEAT_DIM = 128
GLOBAL_DIM = 256
METHODS = ("ransac", "r2former")


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _tokens(cells: np.ndarray, feats: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, 131) tokens for patch `cells` (row-major ids), sorted by descending attention."""
    cols = IMAGE_HW[1] // PATCH
    side = float(max(IMAGE_HW))
    x = (cells % cols * PATCH + PATCH // 2) / side
    y = (cells // cols * PATCH + PATCH // 2) / side
    att = np.sort(rng.lognormal(0.0, 0.5, len(cells)))[::-1]
    order = rng.permutation(len(cells))  # which token gets which attention rank
    out = np.concatenate([x[:, None], y[:, None], (att / att[0])[:, None], feats], axis=1)
    return out[order].astype(np.float32)


def _random_homography(rng: np.random.Generator) -> np.ndarray:
    """Near identity: scale +-10%, rotation +-5 degrees, shift +-40 px, slight perspective."""
    s, a = 1 + rng.uniform(-0.1, 0.1), np.deg2rad(rng.uniform(-5, 5))
    h = np.array(
        [
            [s * np.cos(a), -s * np.sin(a), rng.uniform(-40, 40)],
            [s * np.sin(a), s * np.cos(a), rng.uniform(-40, 40)],
            [rng.uniform(-1e-4, 1e-4), rng.uniform(-1e-4, 1e-4), 1.0],
        ]
    )
    return h


def make_candidate(
    q_cells: np.ndarray, q_feats: np.ndarray, overlap: float, rng: np.random.Generator
) -> np.ndarray:
    """Tokens sharing about `overlap` of the query's (moved by a homography, noisy features)."""
    rows, cols = IMAGE_HW[0] // PATCH, IMAGE_HW[1] // PATCH
    n = len(q_cells)
    shared = rng.choice(n, int(round(overlap * n)), replace=False)
    px = np.stack(
        [q_cells[shared] % cols * PATCH + PATCH / 2, q_cells[shared] // cols * PATCH + PATCH / 2]
    )
    moved = _random_homography(rng) @ np.vstack([px, np.ones(len(shared))])
    c, r = np.floor(moved[:2] / moved[2] / PATCH).astype(np.int64)
    inside = (c >= 0) & (c < cols) & (r >= 0) & (r < rows)
    cells, first = np.unique((r * cols + c)[inside], return_index=True)
    shared = shared[inside][first]
    noise = rng.standard_normal((len(shared), q_feats.shape[1])) / np.sqrt(q_feats.shape[1])
    feats = _unit(q_feats[shared] + noise)  # cosine about 0.7 with the query's
    free = np.setdiff1d(np.arange(rows * cols), cells)
    extra = rng.choice(free, n - len(cells), replace=False)
    other = _unit(rng.standard_normal((len(extra), q_feats.shape[1])))
    return _tokens(np.concatenate([cells, extra]), np.concatenate([feats, other]), rng)


def make_inputs(folder: Path, args: argparse.Namespace) -> np.ndarray:
    """Writes tokens.npy (Q, 1 + K, N, 131) and globals.npy (Q, 1 + K, 256), query first;
    returns the overlap of each candidate rank."""
    rng = np.random.default_rng(args.seed)
    n_cells = (IMAGE_HW[0] // PATCH) * (IMAGE_HW[1] // PATCH)
    overlaps = args.overlap_max * np.linspace(1.0, 0.0, args.k) ** 2
    shape = (args.queries, args.k + 1, args.tokens, 3 + FEAT_DIM)
    tokens = np.lib.format.open_memmap(folder / "tokens.npy", "w+", np.float32, shape)
    globals_ = np.empty((args.queries, args.k + 1, GLOBAL_DIM), dtype=np.float32)
    for q in range(args.queries):
        cells = rng.choice(n_cells, args.tokens, replace=False)
        feats = _unit(rng.standard_normal((args.tokens, FEAT_DIM)))
        tokens[q, 0] = _tokens(cells, feats, rng)
        for k, overlap in enumerate(overlaps):
            tokens[q, k + 1] = make_candidate(cells, feats, overlap, rng)
        g = rng.standard_normal(GLOBAL_DIM)
        noise = rng.standard_normal((args.k, GLOBAL_DIM)) * (2 - overlaps[:, None])
        globals_[q, 0] = _unit(g)
        globals_[q, 1:] = _unit(g + noise / np.sqrt(GLOBAL_DIM))
    tokens.flush()
    del tokens
    np.save(folder / "globals.npy", globals_)
    return overlaps


class Rerankers:
    """Both approaches on query `q` of the inputs; each call returns the K scores."""

    def __init__(self, folder: Path, threads: int, methods: tuple[str, ...] = METHODS) -> None:
        import cv2
        import torch

        import vprkit

        torch.set_num_threads(threads)
        cv2.setNumThreads(threads)
        self.tokens = np.load(folder / "tokens.npy")
        self.globals = np.load(folder / "globals.npy")
        self.t_tokens = torch.from_numpy(self.tokens)
        self.t_globals = torch.from_numpy(self.globals)
        self.model = None
        if "r2former" in methods:
            torch.manual_seed(0)
            self.model = vprkit.create_model("r2former").eval()

    def ransac(self, q: int, k: int | None = None) -> np.ndarray:
        from vprkit.rerank.ransac import r2former_keypoints, ransac_scores

        tokens = self.tokens[q, : None if k is None else k + 1]
        query = r2former_keypoints(tokens[0], IMAGE_HW)
        cands = [r2former_keypoints(t, IMAGE_HW) for t in tokens[1:]]
        return ransac_scores(query, cands, model="homography")

    def r2former(self, q: int, k: int | None = None) -> np.ndarray:
        import torch

        end = None if k is None else k + 1
        tokens, globals_ = self.t_tokens[q, :end], self.t_globals[q, :end]
        with torch.no_grad():
            scores = self.model.rerank_scores(globals_[0], tokens[0], globals_[1:], tokens[1:])
        return scores.numpy()


def run_child(args: argparse.Namespace) -> None:
    """Peak memory of one approach re-ranking the first query, in this fresh process."""
    rr = Rerankers(Path(args.inputs), args.threads, (args.method,))
    fn = getattr(rr, args.method)
    fn(0, 2)  # pages in the code and kernels, so `extra` counts the computation only
    base = rss_now()
    t0 = time.perf_counter()
    fn(0)
    seconds = time.perf_counter() - t0
    peak = peak_rss()
    print(json.dumps({"peak": peak, "extra": peak - base, "base": base, "s": seconds}))


def child_memory(args: argparse.Namespace, method: str, inputs: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", "--method", method, "--inputs", str(inputs)]
    cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--queries", type=int, default=5, help="queries timed (default 5)")
    p.add_argument("--k", type=int, default=100, help="candidates per query (default 100)")
    p.add_argument("--tokens", type=int, default=500, help="tokens per image (default 500)")
    p.add_argument("--overlap-max", type=float, default=0.8, help="top candidate's overlap")
    p.add_argument("--threads", type=int, default=2, help="torch and OpenCV threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-memory", action="store_true", help="no subprocess memory runs")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--inputs", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        run_child(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        overlaps = make_inputs(folder, args)
        mem = {}
        if not args.skip_memory:  # first, while this process is small (see the module doc)
            mem = {method: child_memory(args, method, folder) for method in METHODS}
        rr = Rerankers(folder, args.threads)
        for method in METHODS:
            getattr(rr, method)(0, 2)  # warm-up
        times: dict[str, list[float]] = {m: [] for m in METHODS}
        scores: dict[str, list[np.ndarray]] = {m: [] for m in METHODS}
        for q in range(args.queries):
            for method in METHODS[:: 1 if q % 2 == 0 else -1]:
                t0 = time.perf_counter()
                scores[method].append(getattr(rr, method)(q))
                times[method].append(time.perf_counter() - t0)

    import torch

    med = {m: statistics.median(t) for m, t in times.items()}
    inliers = np.stack(scores["ransac"])
    rho = statistics.median(_spearman(s, overlaps) for s in inliers)
    print(
        f"R2Former re-ranking vs RANSAC (homography), one query, K={args.k} candidates of "
        f"{args.tokens} tokens x {3 + FEAT_DIM} at {IMAGE_HW[0]}x{IMAGE_HW[1]}, CPU, "
        f"{args.threads} threads, torch {torch.__version__}, median of {args.queries} queries"
    )
    print(
        f"RANSAC inliers per candidate: min {inliers.min()}, median {np.median(inliers):.0f}, "
        f"max {inliers.max()}; Spearman rho with the synthetic overlap {rho:.2f} "
        f"(overlap {overlaps[0]:.2f} -> {overlaps[-1]:.2f})"
    )
    print()
    print("| method | time per query (s) | per candidate (ms) | peak RSS (MiB) | extra (MiB) |")
    print("|---|---|---|---|---|")
    for method in METHODS:
        t = med[method]
        note = "" if method == "ransac" else f" ({med['ransac'] / t:.2f}x RANSAC's speed)"
        peak = f"{mem[method]['peak'] / MIB:.0f}" if mem else "-"
        extra = f"{mem[method]['extra'] / MIB:.0f}" if mem else "-"
        ms = 1000 * t / args.k
        print(f"| {method} | {t:.3f}{note} | {ms:.1f} | {peak} | {extra} |")
    print()
    for method in METHODS:
        print(f"seconds per query, {method}: {' '.join(f'{s:.3f}' for s in times[method])}")


if __name__ == "__main__":
    main()
