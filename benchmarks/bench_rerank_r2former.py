"""R2Former re-ranking of one query's top-K candidates: the re-ranking transformer
(`R2Former.rerank_scores`) against the RANSAC baseline (`vprkit.rerank.ransac`: mutual nearest
neighbours, then an OpenCV homography fit per candidate) on the same tokens. Three versions of
the transformer, same weights:
- `r2former`: what vprkit runs, with its CPU kernels (`vprkit.kernels`) where they are built;
- `r2former_torch`: the same code on PyTorch's ops only (`vprkit.kernels.disabled()`);
- `r2former_old`: the previous implementation, copied here (full argsort, the (B, 1000, 5, 7)
  pair tensor, every token through every block, 100 pairs per forward), on PyTorch's ops.
Their probabilities must agree within 1e-5 and rank the candidates in the same order.

Tokens are synthesized as R2Former gives them at 480x640 (a 30x40 grid of 16-pixel patches):
500 per image, `[x, y, attention, feature128]`, x and y the patch centres over 640, attention
descending from 1, features L2-normalized. Candidate k shares a fraction of the query's
tokens (from `--overlap-max` down to 0, decaying quadratically over the K candidates, as a
retrieval top-K has few true matches): their positions are the query's moved by a random
near-identity homography and snapped to the patch grid, their features the query's plus noise;
the other tokens are random cells with random features. The re-ranker has random weights
(its cost does not depend on them). All inputs are written once to .npy files.

The machine's limit (a 2048^3 matmul's GFLOP/s, fp32 and bf16) is measured in the same run;
the transformer's FLOPs per query (matrix products and attention, counted by torch's
FlopCounterMode on `r2former_torch`) over its time give its achieved GFLOP/s, printed as a
fraction of the fp32 limit.

Times: all approaches run in this process, alternating query by query (the order rotates every
query), median over the queries; new vs old is the median of the per-query ratios (the CPU may
be shared: the ratios of neighbouring runs are steadier than the times). Peak memory: one
fresh subprocess per approach re-ranks the first query (ru_maxrss; `extra` is the peak minus
the resident size just before it). They run before this process imports torch, as a child's
ru_maxrss starts from its parent's size.

    python benchmarks/bench_rerank_r2former.py [--queries 5] [--k 100] [--threads 2]
        [--batch-size N] [--no-old]
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
from machine import count_flops, describe_limits, machine_limits  # benchmarks/machine.py
from memory import MIB, peak_rss, rss_now  # benchmarks/memory.py

IMAGE_HW = (480, 640)
PATCH = 16
FEAT_DIM = 128
GLOBAL_DIM = 256
METHODS = ("ransac", "r2former", "r2former_torch", "r2former_old")
OLD_BATCH = 100  # the previous default pairs per forward


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


def previous_logits(rr, x_tokens, y_tokens):
    """The previous `R2FormerReranker.forward`'s logits (2-class), for the comparison."""
    import torch
    import torch.nn.functional as F

    from vprkit.models.r2former import sincos_2d

    x_feat = F.normalize(x_tokens[..., 3:], p=2, dim=2)
    y_feat = F.normalize(y_tokens[..., 3:], p=2, dim=2)
    x_coord = x_tokens[..., :3].clamp(min=0, max=1)
    y_coord = y_tokens[..., :3].clamp(min=0, max=1)
    corr = torch.matmul(x_feat, y_feat.transpose(1, 2))
    B, N, M = corr.shape
    k, D = rr.num_corr, rr.embed_dim
    batch = torch.arange(B)[:, None, None]
    j = torch.argsort(corr, dim=2, descending=True)[:, :, :k]
    i = torch.arange(N)[None, :, None].expand(B, N, k)
    select_q = torch.cat([x_coord[batch, i], y_coord[batch, j], corr[batch, i, j, None]], -1)
    i = torch.argsort(corr, dim=1, descending=True)[:, :k, :].transpose(1, 2)
    j = torch.arange(M)[None, :, None].expand(B, M, k)
    select_k = torch.cat([x_coord[batch, i], y_coord[batch, j], corr[batch, i, j, None]], -1)
    select = torch.cat([select_q, select_k], dim=1)
    G = select.shape[1]
    pairs = rr.pair_head(select.reshape(B * G * k, 7)).reshape(B * G, k, D)
    pairs = pairs + sincos_2d(D, select[..., 3:5].reshape(B * G, k, 2))
    x = torch.cat([rr.cls_token_2.expand(B * G, -1, -1), pairs], dim=1)
    for blk in rr.blocks_2:
        x = blk(x)
    x = rr.decoder_norm(x)
    groups = rr.pair_head_2(x[:, 0]).reshape(B, G, D) + sincos_2d(D, select[:, :, 0, 0:2])
    x = torch.cat([rr.cls_token.expand(B, -1, -1), groups], dim=1)
    for blk in rr.blocks:
        x = blk(x)
    return rr.decoder_pred(rr.decoder_norm(x)[:, 0])


class Rerankers:
    """Each approach on query `q` of the inputs; each call returns the K scores."""

    def __init__(
        self,
        folder: Path,
        threads: int,
        methods: tuple[str, ...] = METHODS,
        batch_size: int | None = None,
    ) -> None:
        import cv2
        import torch

        import vprkit

        torch.set_num_threads(threads)
        cv2.setNumThreads(threads)
        self.tokens = np.load(folder / "tokens.npy")
        self.globals = np.load(folder / "globals.npy")
        self.t_tokens = torch.from_numpy(self.tokens)
        self.t_globals = torch.from_numpy(self.globals)
        self.batch_size = batch_size
        self.model = None
        if any(m.startswith("r2former") for m in methods):
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
            scores = self.model.rerank_scores(
                globals_[0], tokens[0], globals_[1:], tokens[1:], self.batch_size
            )
        return scores.numpy()

    def r2former_torch(self, q: int, k: int | None = None) -> np.ndarray:
        from vprkit import kernels

        with kernels.disabled():
            return self.r2former(q, k)

    def r2former_old(self, q: int, k: int | None = None) -> np.ndarray:
        import torch

        from vprkit import kernels

        tokens = self.t_tokens[q, : None if k is None else k + 1]
        scores = []
        with torch.no_grad(), kernels.disabled():
            for start in range(1, len(tokens), OLD_BATCH):
                cands = tokens[start : start + OLD_BATCH]
                query = tokens[:1].expand(len(cands), -1, -1)
                logits = previous_logits(self.model.Reranker, query, cands)
                scores.append(logits.softmax(dim=1)[:, 1])
        return torch.cat(scores).numpy()


def run_child(args: argparse.Namespace) -> None:
    """Peak memory of one approach re-ranking the first query, in this fresh process."""
    rr = Rerankers(Path(args.inputs), args.threads, (args.method,), args.batch_size)
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
    if args.batch_size is not None:
        cmd += ["--batch-size", str(args.batch_size)]
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
    p.add_argument(
        "--batch-size", type=int, help="pairs per re-ranker forward (default: the model's)"
    )
    p.add_argument("--no-old", action="store_true", help="skip the previous implementation")
    p.add_argument("--skip-memory", action="store_true", help="no subprocess memory runs")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--inputs", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        run_child(args)
        return

    methods = METHODS[:3] if args.no_old else METHODS
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        overlaps = make_inputs(folder, args)
        mem = {}
        if not args.skip_memory:  # first, while this process is small (see the module doc)
            mem = {method: child_memory(args, method, folder) for method in methods}
        rr = Rerankers(folder, args.threads, methods, args.batch_size)
        for method in methods:
            getattr(rr, method)(0, 2)  # warm-up
        times: dict[str, list[float]] = {m: [] for m in methods}
        scores: dict[str, list[np.ndarray]] = {m: [] for m in methods}
        for q in range(args.queries):
            shift = q % len(methods)  # each method takes each turn in the order
            for method in methods[shift:] + methods[:shift]:
                t0 = time.perf_counter()
                scores[method].append(getattr(rr, method)(q))
                times[method].append(time.perf_counter() - t0)
        flops = count_flops(lambda: rr.r2former_torch(0))  # the kernels are not counted
        limits = machine_limits()

    import torch

    from vprkit import kernels

    med = {m: statistics.median(t) for m, t in times.items()}
    inliers = np.stack(scores["ransac"])
    rho = statistics.median(_spearman(s, overlaps) for s in inliers)
    batch = rr.model.rerank_batch_cpu if args.batch_size is None else args.batch_size
    print(
        f"R2Former re-ranking vs RANSAC (homography), one query, K={args.k} candidates of "
        f"{args.tokens} tokens x {3 + FEAT_DIM} at {IMAGE_HW[0]}x{IMAGE_HW[1]}, CPU, "
        f"{args.threads} threads, torch {torch.__version__}, median of {args.queries} queries; "
        f"r2former {batch} pairs per forward"
        + ("" if args.no_old else f", r2former_old {OLD_BATCH}")
    )
    print(
        f"RANSAC inliers per candidate: min {inliers.min()}, median {np.median(inliers):.0f}, "
        f"max {inliers.max()}; Spearman rho with the synthetic overlap {rho:.2f} "
        f"(overlap {overlaps[0]:.2f} -> {overlaps[-1]:.2f})"
    )
    print()
    print("| method | time per query (s) | per candidate (ms) | peak RSS (MiB) | extra (MiB) |")
    print("|---|---|---|---|---|")
    for method in methods:
        t = med[method]
        note = "" if method == "ransac" else f" ({med['ransac'] / t:.2f}x RANSAC's speed)"
        peak = f"{mem[method]['peak'] / MIB:.0f}" if mem else "-"
        extra = f"{mem[method]['extra'] / MIB:.0f}" if mem else "-"
        ms = 1000 * t / args.k
        print(f"| {method} | {t:.3f}{note} | {ms:.1f} | {peak} | {extra} |")
    print()
    achieved = flops / med["r2former"] / 1e9
    print(
        f"{describe_limits(limits)}; the transformer: {flops / 1e9:.1f} GFLOP per query, "
        f"{achieved:.0f} GFLOP/s with vprkit's kernels "
        f"({'built' if kernels.load() is not None else 'NOT built: PyTorch ops only'}) = "
        f"{achieved / limits['fp32']:.0%} of the fp32 limit"
    )
    reference = "r2former_torch" if args.no_old else "r2former_old"
    for method in [m for m in methods if m.startswith("r2former") and m != reference]:
        ratios = [o / n for o, n in zip(times[reference], times[method], strict=True)]
        diff = max(
            float(np.abs(n - o).max())
            for n, o in zip(scores[method], scores[reference], strict=True)
        )
        same_order = all(
            np.array_equal(np.argsort(-n, kind="stable"), np.argsort(-o, kind="stable"))
            for n, o in zip(scores[method], scores[reference], strict=True)
        )
        print(
            f"{method} vs {reference}: {statistics.median(ratios):.2f}x faster (median of "
            f"per-query ratios {' '.join(f'{r:.2f}' for r in ratios)}); max |probability "
            f"difference| {diff:.1e} ({'within' if diff <= 1e-5 else 'OVER'} 1e-5); candidate "
            f"order {'identical' if same_order else 'DIFFERENT'}"
        )
    for method in methods:
        print(f"seconds per query, {method}: {' '.join(f'{s:.3f}' for s in times[method])}")


if __name__ == "__main__":
    main()
