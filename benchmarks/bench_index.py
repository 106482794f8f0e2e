"""Compressed FAISS indexes against exact flat search, ratios in one run.

Data (`vprkit.data.descriptor_field`, the generator documented there): database positions
from a real layout (`../shared/data/utm_ground_truth/<layout>.npz`: Tokyo 24/7 by default,
or Pitts30k, Nordland), scaled up to `--database` photos (every position once, then drawn
again, 3 m jitter); queries at the layout's query positions (`utmQ`, resampled the same
way); descriptors a smooth random field of position (random Fourier features at 30 m and
300 m, PCA-like decaying amplitudes) plus per-photo noise (`--noise` for the database, a
larger `--query-noise` for queries taken in other conditions: flat R@1 about 80%, R@5 about
98%, in the range of strong methods on Tokyo 24/7), L2-normalized. Neighbours in space
are thus neighbours in descriptor space, and the ground truth is the usual one: database
photos within 25 m of the query.

1. High-dimensional descriptors (`--highdim` rows of `--highdim-dim`, 10,752 by default as
   CricaVPR's): generated in blocks and reduced by PCA on the way (fitted on a seeded sample
   of `--pca-sample` rows), never held whole; the peak resident memory is reported against
   the size the whole matrix would take.
2. `--database` rows of `--dim` (512) written to a memory-mapped .npy (the map's chunks are
   memmaps too: exact re-scoring reads only the candidates' rows), `--queries` queries.
   Flat (`IndexFlatL2`, exact) against each `--index` (default: the ivfpq and hnsw presets):
   build time (training included), memory per photo (the index's own structures), query
   latency (all queries in one call, per query), R@1 agreement with flat, and recall@N
   against the ground truth, before re-scoring (the index's own order) and after exact
   re-scoring of the top `--rescore`. Part 1's reduced descriptors get the same comparison.

The default run (100,000 x 512-D and 100,000 x 10,752-D, 1,000 queries) takes a few minutes
on 2 busy cores; `--database 1000000 --highdim 200000` is the issue's scale (tens of
minutes: IVF training and HNSW construction dominate).

    python benchmarks/bench_index.py [--database 100000] [--highdim 20000] [--index ivfpq ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import MIB, peak_rss  # noqa: E402

from vprkit.data.descriptor_field import DescriptorField, layout_positions  # noqa: E402
from vprkit.retrieval.ground_truth import positives_within_radius  # noqa: E402
from vprkit.retrieval.indexes import build_index, parse_index, search  # noqa: E402
from vprkit.retrieval.metrics import recall_at_n  # noqa: E402
from vprkit.retrieval.search import PCA_MAX_SAMPLES, fit_pca  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = ROOT.parent / "shared" / "data" / "utm_ground_truth"
RECALLS = [1, 5, 10, 100]


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def write_memmap(path: Path, blocks, n: int, dim: int) -> np.ndarray:
    mm = np.lib.format.open_memmap(str(path), "w+", np.float32, (n, dim))
    s = 0
    for block in blocks:
        mm[s : s + len(block)] = block
        s += len(block)
    mm.flush()
    del mm
    return np.load(path, mmap_mode="r")


def compare(
    db: np.ndarray, q: np.ndarray, positives, specs: list[str], args, title: str
) -> tuple[list[str], dict]:
    """Flat vs each spec on (db, q): one table of absolute figures and ratios."""
    n, dim = db.shape
    k = min(max(RECALLS), n)
    rows, record = [], {}

    def timed(fn, *a, **kw):
        t = time.perf_counter()
        out = fn(*a, **kw)
        return time.perf_counter() - t, out

    flat = build_index(db, "flat")
    t_flat, (_, flat_i) = timed(search, flat.index, q, k)
    flat_r = recall_at_n(flat_i, positives, RECALLS)
    base = {"build": flat.build_s, "bpp": flat.bytes_per_photo, "lat": t_flat / len(q)}
    rows.append(("flat", "exact", flat, base["lat"], 1.0, flat_r))
    record["flat"] = {"build_s": flat.build_s, "bytes_per_photo": flat.bytes_per_photo,
                      "ms_per_query": 1e3 * base["lat"], "recalls": flat_r}  # fmt: skip
    del flat
    for spec in specs:
        choice = parse_index(spec, n, dim)
        built = build_index(db, choice, seed=args.seed)
        entry = {"factory": choice.factory, "params": choice.params, "build_s": built.build_s,
                 "train_s": built.train_s, "bytes_per_photo": built.bytes_per_photo}  # fmt: skip
        for label, r in (("own order", 0), (f"re-scored {args.rescore}", args.rescore)):
            t, (_, ids) = timed(search, built.index, q, k, rescore=r, full_descriptors=db)
            agree = float((ids[:, 0] == flat_i[:, 0]).mean())
            rec = recall_at_n(ids, positives, RECALLS)
            rows.append(
                (f"{choice.factory} ({choice.params})", label, built, t / len(q), agree, rec)
            )
            entry[label] = {"ms_per_query": 1e3 * t / len(q), "r1_agreement": agree, "recalls": rec}
        record[spec] = entry
        del built

    lines = [
        f"### {title}: {n} x {dim}-D database, {len(q)} queries, k={k}",
        "",
        "| index | search | build s | vs flat | bytes/photo | vs flat | ms/query | vs flat "
        "| R@1 agree | " + " | ".join(f"R@{x}" for x in RECALLS) + " | dR@1 vs flat |",
        "|---|---|---|---|---|---|---|---|---|" + "---|" * len(RECALLS) + "---|",
    ]
    for name, how, built, lat, agree, rec in rows:
        lines.append(
            f"| {name} | {how} | {built.build_s:.1f} | {built.build_s / base['build']:.1f}x | "
            f"{built.bytes_per_photo:.0f} | {built.bytes_per_photo / base['bpp']:.3f}x | "
            f"{1e3 * lat:.3f} | {lat / base['lat']:.3f}x | {100 * agree:.1f}% | "
            + " | ".join(f"{rec[x]:.1f}" for x in RECALLS)
            + f" | {rec[1] - flat_r[1]:+.1f} |"
        )
    lines.append(
        "(build includes training on the seeded sample; bytes/photo: the index's own "
        "structures; re-scoring reads the candidates' rows from the memory-mapped full "
        f"descriptors, {4 * dim} bytes per photo on disk; the flat row's search is exact)"
    )
    return lines, record


def part_highdim(args, work: Path, rng) -> tuple[list[str], dict]:
    n, big, small = args.highdim, args.highdim_dim, args.dim
    layout = LAYOUTS / f"{args.layout}.npz"
    xy = layout_positions(layout, n, rng)
    qxy = layout_positions(layout, args.queries, rng, key="utmQ")
    field = DescriptorField(big, seed=args.seed)
    t0 = time.perf_counter()
    sample = min(n, args.pca_sample, PCA_MAX_SAMPLES)
    pick = np.sort(rng.choice(n, sample, replace=False))
    train = field.at(xy[pick], args.noise, np.random.default_rng(args.seed + 1))
    pca = fit_pca(train, small, seed=args.seed)
    del train
    t_pca = time.perf_counter() - t0

    def reduced(points, seed, level):
        noise = np.random.default_rng(seed)
        for block in field.blocks(points, level, noise, block=args.block):
            out = pca.transform(block).astype(np.float32)
            yield out

    t0 = time.perf_counter()
    db = write_memmap(work / "highdim_db.npy", reduced(xy, args.seed + 2, args.noise), n, small)
    q = np.concatenate(list(reduced(qxy, args.seed + 3, args.query_noise)))
    t_gen = time.perf_counter() - t0
    peak = peak_rss()
    whole = n * big * 4
    lines = [
        f"## 1. {n} x {big}-D descriptors generated in blocks of {args.block}, reduced by PCA "
        f"to {small}-D on the way (PCA fitted on {sample} rows in {t_pca:.1f} s; generation + "
        f"projection {t_gen:.1f} s)",
        "",
        f"peak resident memory so far {peak / MIB:.0f} MiB, against {whole / MIB:.0f} MiB for "
        f"the whole {big}-D matrix (never held)",
        "",
    ]
    positives = positives_within_radius(xy, qxy, 25.0)
    table, record = compare(db, q, positives, args.index, args, f"PCA-{small} of {big}-D")
    record["peak_rss_mib"] = peak / MIB
    record["whole_mib"] = whole / MIB
    return lines + table, record


def part_main(args, work: Path, rng) -> tuple[list[str], dict]:
    layout = LAYOUTS / f"{args.layout}.npz"
    t0 = time.perf_counter()
    xy = layout_positions(layout, args.database, rng)
    qxy = layout_positions(layout, args.queries, rng, key="utmQ")
    field = DescriptorField(args.dim, seed=args.seed)
    db = write_memmap(
        work / "db.npy",
        field.blocks(xy, args.noise, np.random.default_rng(args.seed + 4)),
        len(xy),
        args.dim,
    )
    q = field.at(qxy, args.query_noise, np.random.default_rng(args.seed + 5))
    positives = positives_within_radius(xy, qxy, 25.0)
    t_gen = time.perf_counter() - t0
    lines = [
        f"## 2. {args.database} x {args.dim}-D ({args.layout} layout scaled up; data and "
        f"ground truth made in {t_gen:.1f} s; queries with no positive: "
        f"{sum(len(p) == 0 for p in positives)})",
        "",
    ]
    table, record = compare(db, q, positives, args.index, args, f"{args.dim}-D")
    return lines + table, record


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--layout", default="tokyo247", help="tokyo247, pitts30k_test or nordland")
    p.add_argument("--database", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--highdim", type=int, default=100_000, help="rows of part 1 (0: skip)")
    p.add_argument("--highdim-dim", type=int, default=10_752)
    p.add_argument("--pca-sample", type=int, default=4096)
    p.add_argument("--block", type=int, default=2048, help="rows generated at a time")
    p.add_argument("--index", action="append", help="index specs (repeat); default ivfpq, hnsw")
    p.add_argument("--rescore", type=int, default=100)
    p.add_argument("--noise", type=float, default=1.0, help="database noise (x rms amplitude)")
    p.add_argument(
        "--query-noise",
        type=float,
        default=2.0,
        help="query noise: queries are taken in other conditions (flat R@1 about 80%%)",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.index = args.index or ["ivfpq", "hnsw"]
    if not (LAYOUTS / f"{args.layout}.npz").is_file():
        sys.exit(f"layout not found at {LAYOUTS}/{args.layout}.npz (see ../shared/data/README.md)")
    import faiss

    print(f"{os.cpu_count()} CPUs, faiss {faiss.__version__} ({faiss.omp_get_max_threads()} "
          f"threads), load {load()}")  # fmt: skip
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    lines, record = [], {"args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="vprkit_bench_index_") as tmp:
        work = Path(tmp)
        if args.highdim:
            part, record["highdim"] = part_highdim(args, work, rng)
            lines += part + [""]
            print(f"(part 1 done, load {load()})", flush=True)
        part, record["main"] = part_main(args, work, rng)
        lines += part
    print("\n".join(lines))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; load average at the end {load()}")
    print(json.dumps(record, default=str))


if __name__ == "__main__":
    main()
