"""Exact nearest-neighbour search of global descriptors, in memory or memory-bounded.

Ranking rule (both paths, always): descriptors are L2-normalized in float32 (``l2_normalize``);
the distance of a query q to a database row x is the squared L2 distance ``|q - x|^2``,
summed in float64 from those float32 values and rounded to float32; rows are ordered by
(distance, database index) ascending, so equal distances go to the smaller index.

Why not just the raw FAISS output: a float32 matrix product gives the same pair slightly
different distances depending on the shapes it is called with (FAISS even switches algorithm
below 20 queries), so a chunked search and a one-shot search could disagree on near ties. Both
paths therefore use float32 products only to find candidates, within a proven error margin of
the k-th candidate, and then rank those candidates with the float64 distance above, which
depends only on the two vectors. The returned distances are those float64 distances as float32,
i.e. what ``faiss.IndexFlatL2`` returns up to its own rounding.
"""

from __future__ import annotations

import mmap
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from vprkit.atomic import atomic_path
from vprkit.errors import VprkitError

__all__ = [
    "PCAProjection",
    "chunked_search",
    "exact_search",
    "fit_pca",
    "l2_normalize",
    "load_pca",
    "search",
    "unnormalized_search",
]

_UNIT_ROUNDOFF = 2.0**-24  # float32
# Rows normalized and added to the FAISS index per step, so the in-memory path never holds a
# second full float32 copy of the database besides the index.
_ADD_BLOCK = 4096
# Number of PCA training samples, as in the VG benchmark's compute_pca used by CricaVPR.
PCA_MAX_SAMPLES = 2**14


# --------------------------------------------------------------------------- normalization


def _row_sum_of_squares(x: np.ndarray) -> np.ndarray:
    """Sum of squares of each row of a 2-D array, by pairwise folding of the columns.

    Built from elementwise operations only, each exactly rounded, so a row's result depends on
    its values alone, never on how many rows are passed or how they lie in memory. numpy's own
    reductions do not promise that (einsum takes another code path for a single float64 row),
    and both search paths need the same bits for the same row.
    """
    s = x * x
    while s.shape[1] > 1:
        half = s.shape[1] // 2
        folded = s[:, :half] + s[:, half : 2 * half]
        if s.shape[1] % 2:
            folded[:, 0] += s[:, -1]
        s = folded
    return s[:, 0] if s.shape[1] else np.zeros(len(s), dtype=s.dtype)


def _normalize_rows_inplace(x: np.ndarray) -> np.ndarray:
    """Divide each row by its norm (zero rows untouched); returns the rows that are not finite."""
    norms = np.sqrt(_row_sum_of_squares(x))
    bad = ~np.isfinite(norms)
    norms[norms == 0] = 1.0
    x /= norms[:, None]
    return bad


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Return a float32 copy of ``x`` (N, D) with unit-norm rows; all-zero rows stay zero."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D (N, D) array of descriptors, got shape {arr.shape}")
    out = np.array(arr, dtype=np.float32, order="C", copy=True)
    _normalize_rows_inplace(out)
    return out


def _load_rows(
    x: np.ndarray, rows: slice | np.ndarray, name: str, out: np.ndarray | None = None
) -> np.ndarray:
    """Rows of ``x`` as normalized float32 (into ``out`` if given), rejecting non-finite rows.

    Reusing one ``out`` buffer across chunks matters: faulting in fresh pages costs several
    times the float16 -> float32 conversion itself.
    """
    src = x[rows]
    if out is None:
        block = np.array(src, dtype=np.float32, order="C", copy=True)
    else:
        block = out[: len(src)]
        np.copyto(block, src, casting="same_kind")
    bad = _normalize_rows_inplace(block)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        row = int(np.arange(len(x))[rows][i] if isinstance(rows, slice) else rows[i])
        raise ValueError(
            f"{name} row {row} has a non-finite value (NaN or inf) or is too large to "
            "normalize in float32"
        )
    return block


# --------------------------------------------------------------------------- shared pieces


def _check_inputs(database: np.ndarray, queries: np.ndarray, k: int) -> int:
    for name, arr in (("database", database), ("queries", queries)):
        if getattr(arr, "ndim", None) != 2:
            raise ValueError(
                f"{name} must be a 2-D (N, D) array of descriptors, "
                f"got shape {getattr(arr, 'shape', None)}"
            )
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"{name} must hold numbers, got dtype {arr.dtype}")
    if database.shape[1] != queries.shape[1]:
        raise ValueError(
            f"dimension mismatch: database descriptors have dimension {database.shape[1]} "
            f"but query descriptors have dimension {queries.shape[1]}"
        )
    if len(database) == 0:
        raise ValueError("the database is empty: there is nothing to search")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    n = len(database)
    if k > n:
        warnings.warn(
            f"k={k} is larger than the database ({n} descriptors): "
            f"returning all {n} database items per query",
            stacklevel=3,
        )
        return n
    return int(k)


def _error_margin(dim: int) -> float:
    """Bound on |approximate float32 distance - ranking distance| for normalized vectors.

    Any float32 dot product of length d is within gamma_d * sum|x_i y_i| of the true value,
    whatever the summation order (Higham, Accuracy and Stability, 3.1), gamma_d = d u / (1 - d u).
    The approximation |q|^2 + |x|^2 - 2 q.x (or a direct sum of squared differences) of unit
    vectors is then within 4 gamma_d, plus a few roundings of values <= 4, plus the final
    rounding of the ranking distance to float32. Candidates need twice this (``_slack``).
    """
    du = (dim + 2) * _UNIT_ROUNDOFF
    if du >= 0.5:
        return float("inf")
    gamma = du / (1.0 - du)
    return 1.05 * (4.0 * (1.0 + 2 * gamma) * gamma + 32.0 * _UNIT_ROUNDOFF)


def _slack(dim: int) -> float:
    # Every true top-k row j has approx(j) <= rank(j) + e <= rank_kth + e <= approx_kth + 2e:
    # rank_kth is at most the largest rank distance of the k approximately nearest rows.
    return 2.0 * _error_margin(dim)


def _rank_distances(query: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Ranking distances of one normalized query to normalized rows (float32 result)."""
    diff = rows.astype(np.float64)
    diff -= query.astype(np.float64)
    return _row_sum_of_squares(diff).astype(np.float32)  # depends only on the two vectors


def _rerank(
    query: np.ndarray,
    candidates: np.ndarray,
    k: int,
    get_rows: Callable[[np.ndarray], np.ndarray],
    rows_per_batch: int,
) -> tuple[np.ndarray, np.ndarray]:
    cand = np.unique(candidates.astype(np.int64))  # ascending: stable sort then breaks ties
    dist = np.empty(len(cand), dtype=np.float32)
    for s in range(0, len(cand), rows_per_batch):
        dist[s : s + rows_per_batch] = _rank_distances(
            query, get_rows(cand[s : s + rows_per_batch])
        )
    order = np.argsort(dist, kind="stable")[:k]
    return dist[order], cand[order]


def _candidate_lists(approx: np.ndarray, ids: np.ndarray, k: int, margin: float) -> list:
    """Per query, the ids whose approximate distance is within ``margin`` of the k-th."""
    kth = np.partition(approx, k - 1, axis=1)[:, k - 1]
    keep = approx <= (kth + margin)[:, None]
    return [ids[i][keep[i]] for i in range(len(ids))]


def _sufficient(approx: np.ndarray, k: int, margin: float, n: int) -> np.ndarray:
    """Whether each query's kept set provably holds every candidate within the margin.

    Items not kept are at least as far (approximately) as every kept item, so they can be
    ignored when the k-th approximate distance plus the margin is below the largest kept one.
    """
    if approx.shape[1] >= n:
        return np.ones(len(approx), dtype=bool)
    kth = np.partition(approx, k - 1, axis=1)[:, k - 1]
    return kth + margin < approx.max(axis=1)


def _initial_width(k: int, n: int, rescan_cost: str) -> int:
    # More than k so that most queries need no second look: the slack is about 5e-3 at
    # 10,752-D, which spans up to ~150 extra neighbours of random 75,984-row data. A second
    # look is cheap in memory (FAISS searches only the few unsettled queries again) but costs a
    # whole extra pass over the database in the bounded path, so that path keeps more.
    return min(n, 2 * k + 64 if rescan_cost == "cheap" else 4 * k + 256)


# --------------------------------------------------------------------------- in-memory path


def exact_search(
    database: np.ndarray, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN of L2-normalized descriptors with a ``faiss.IndexFlatL2`` index.

    Returns ``(distances, indices)``, both (num_queries, k): float32 squared L2 distances and
    int64 database indices, ordered by (distance, index); see the module docstring for the
    exact rule. ``k`` larger than the database is clipped to its size, with a warning.
    """
    k = _check_inputs(database, queries, k)
    return search_flat_index(flat_index(database), queries, k)


def flat_index(database: np.ndarray) -> faiss.IndexFlatL2:
    """A ``faiss.IndexFlatL2`` of the L2-normalized rows of ``database`` (a map keeps it in
    its folder: ``faiss.write_index``)."""
    n, dim = database.shape
    index = faiss.IndexFlatL2(dim)
    if hasattr(index.codes, "resize"):
        # Size the index storage once and normalize straight into it: index.add() would grow
        # a std::vector by doubling, briefly holding twice the database (+3 GiB at 10,752-D).
        index.codes.resize(n * dim * 4)
        index.ntotal = n
        stored = faiss.rev_swig_ptr(index.get_xb(), n * dim).reshape(n, dim)
        for start in range(0, n, _ADD_BLOCK):
            stop = min(n, start + _ADD_BLOCK)
            _load_rows(database, slice(start, stop), "database", stored[start:stop])
    else:  # older faiss: add in blocks
        buf = np.empty((min(n, _ADD_BLOCK), dim), dtype=np.float32)
        for start in range(0, n, _ADD_BLOCK):
            index.add(_load_rows(database, slice(start, start + _ADD_BLOCK), "database", buf))
        del buf
    return index


def search_flat_index(
    index: faiss.IndexFlatL2, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`exact_search` on a prebuilt :func:`flat_index` (same ranking rule)."""
    n, dim = index.ntotal, index.d
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise VprkitError(f"queries are {queries.shape}, the index holds {dim}-D descriptors")
    k = min(int(k), n)
    stored = faiss.rev_swig_ptr(index.get_xb(), n * dim).reshape(n, dim)
    q = _load_rows(queries, slice(None), "queries")
    margin = _slack(dim)

    width = _initial_width(k, n, "cheap")
    approx, ids = index.search(q, width)
    cand = _candidate_lists(approx, ids, k, margin)
    todo = np.flatnonzero(~_sufficient(approx, k, margin, n))
    while len(todo):  # rare: many near-equal distances around the k-th neighbour
        width = min(n, 4 * width)
        approx, ids = index.search(q[todo], width)
        more = _candidate_lists(approx, ids, k, margin)
        ok = _sufficient(approx, k, margin, n)
        for j, qi in enumerate(todo):
            cand[qi] = more[j]
        todo = todo[~ok]

    distances = np.empty((len(q), k), dtype=np.float32)
    indices = np.empty((len(q), k), dtype=np.int64)
    for qi in range(len(q)):
        distances[qi], indices[qi] = _rerank(q[qi], cand[qi], k, stored.__getitem__, max(1, n))
    return distances, indices


# --------------------------------------------------------------------------- bounded path


def _release_pages(arr: np.ndarray, start_row: int, stop_row: int) -> None:
    """Let the OS drop this process's resident pages of a file-backed memmap row range.

    A memmap read once stays resident and counts towards the process's memory until the OS
    needs it back; on a shared, file-backed mapping MADV_DONTNEED only unmaps those pages (the
    data stays in the file and the page cache), so working memory stays within the budget.
    Private (copy-on-write, mode "c") maps are left alone: that would discard the user's edits.
    """
    mm = getattr(arr, "_mmap", None)
    if not isinstance(arr, np.memmap) or not isinstance(mm, mmap.mmap) or arr.mode == "c":
        return
    if not arr.flags.c_contiguous or not hasattr(mm, "madvise") or stop_row <= start_row:
        return
    try:
        base = np.frombuffer(mm, dtype=np.uint8).ctypes.data
        row_bytes = arr.strides[0]
        begin = arr.ctypes.data - base + start_row * row_bytes
        end = arr.ctypes.data - base + stop_row * row_bytes
        begin -= begin % mmap.PAGESIZE
        mm.madvise(mmap.MADV_DONTNEED, begin, min(end, len(mm)) - begin)
    except (AttributeError, OSError, ValueError, TypeError, BufferError):
        pass  # best effort: only the resident-memory figure is affected


@dataclass(frozen=True)
class _Plan:
    query_chunk: int
    database_chunk: int
    rerank_rows: int


def _plan_chunks(
    num_queries: int,
    n: int,
    dim: int,
    itemsize: int,
    k: int,
    width: int,
    budget: int,
    mapped: bool = False,
) -> _Plan:
    # Bytes per element of each buffer, counted conservatively:
    #   query chunk: float32 copy; running top-width: distances + ids, twice while merging;
    #   database chunk: the mapped pages (stored dtype) + the float32 normalized copy + the
    #   squares folded to norms (1.5x float32);
    #   distance block: float32 values + int64 argpartition ids + a float32 temporary;
    #   reranking: gathered rows (mapped + copy) + float32 (+ squares) + float64 difference
    #   (+ squares).
    fixed = num_queries * k * 12 + (1 << 16)  # outputs + small bookkeeping
    per_query = dim * 4 + width * 24
    per_db_row = dim * (itemsize + 10) + 8
    per_pair = 16
    per_rerank_row = dim * (2 * itemsize + 40)
    minimum = fixed + per_query + per_db_row + per_pair + per_rerank_row
    if budget < minimum:
        raise ValueError(
            f"memory_budget_bytes={budget} is too small for {num_queries} queries of dimension "
            f"{dim} with k={k}: at least {minimum} bytes are needed"
        )
    avail = budget - fixed
    qc = int(max(1, min(num_queries, (avail // 4) // per_query)))
    rest = avail - qc * per_query
    bc = int(min(n, max(1, rest // (per_db_row + qc * per_pair))))
    rr = int(min(n, max(1, rest // per_rerank_row)))
    if mapped:
        # Reading scattered rows of a memmap maps whole page-cache folios around each row
        # (up to 2 MiB with large folios), not just the row: bound them by a quarter budget.
        rr = min(rr, max(1, (avail // 4) // (2 << 20)))
    return _Plan(qc, bc, rr)


def chunked_search(
    database: np.ndarray,
    queries: np.ndarray,
    k: int,
    memory_budget_bytes: int,
    *,
    query_chunk_size: int | None = None,
    database_chunk_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN in bounded memory; returns exactly what ``exact_search`` returns.

    ``database`` and ``queries`` may be ``np.memmap`` (e.g. ``np.load(path, mmap_mode="r")``)
    in float16/float32 on disk: they are read in chunks, converted to float32 and normalized,
    and per-chunk top candidates are merged. Working memory (chunks, distance blocks,
    candidates, outputs) stays under ``memory_budget_bytes``; the Python interpreter and the
    caller's arrays are not counted. Chunk sizes are derived from the budget unless given.
    """
    k = _check_inputs(database, queries, k)
    n, dim = database.shape
    nq = len(queries)
    width = _initial_width(k, n, "expensive")
    itemsize = max(database.dtype.itemsize, 4)
    plan = _plan_chunks(
        nq, n, dim, itemsize, k, width, int(memory_budget_bytes), isinstance(database, np.memmap)
    )
    qc = int(query_chunk_size or plan.query_chunk)
    bc = int(database_chunk_size or plan.database_chunk)
    if qc < 1 or bc < 1:
        raise ValueError(f"chunk sizes must be positive, got {qc} queries and {bc} rows")
    margin = _slack(dim)

    def get_rows(ids: np.ndarray) -> np.ndarray:
        rows = _load_rows(database, ids, "database")
        _release_pages(database, int(ids[0]), int(ids[-1]) + 1)
        return rows

    distances = np.empty((nq, k), dtype=np.float32)
    indices = np.empty((nq, k), dtype=np.int64)
    buf = np.empty((min(bc, n), dim), dtype=np.float32)  # reused: see _load_rows
    block_buf = np.empty((min(qc, nq), min(bc, n)), dtype=np.float32)
    for q0 in range(0, nq, qc):
        q1 = min(nq, q0 + qc)
        q = _load_rows(queries, slice(q0, q1), "queries")
        _release_pages(queries, q0, q1)
        q_sq = np.einsum("ij,ij->i", q, q)
        run_d = np.empty((q1 - q0, 0), dtype=np.float32)
        run_i = np.empty((q1 - q0, 0), dtype=np.int64)
        for b0 in range(0, n, bc):
            b1 = min(n, b0 + bc)
            x = _load_rows(database, slice(b0, b1), "database", buf)
            _release_pages(database, b0, b1)
            block = _approx_block(q, q_sq, x, block_buf)
            ids = np.arange(b0, b1, dtype=np.int64)
            if block.shape[1] > width:
                part = np.argpartition(block, width - 1, axis=1)[:, :width]
                block = np.take_along_axis(block, part, axis=1)
                ids = ids[part]
            else:
                ids = np.broadcast_to(ids, block.shape)
            run_d = np.concatenate([run_d, block], axis=1)
            run_i = np.concatenate([run_i, ids], axis=1)
            if run_d.shape[1] > width:
                part = np.argpartition(run_d, width - 1, axis=1)[:, :width]
                run_d = np.take_along_axis(run_d, part, axis=1)
                run_i = np.take_along_axis(run_i, part, axis=1)

        cand = _candidate_lists(run_d, run_i, k, margin)
        todo = np.flatnonzero(~_sufficient(run_d, k, margin, n))
        if len(todo):  # rare: collect every row within the margin in one more pass
            limit = np.partition(run_d[todo], k - 1, axis=1)[:, k - 1] + margin
            cand_more = _within(database, q[todo], q_sq[todo], limit, buf)
            for j, qi in enumerate(todo):
                cand[qi] = cand_more[j]
        for j in range(q1 - q0):
            distances[q0 + j], indices[q0 + j] = _rerank(
                q[j], cand[j], k, get_rows, plan.rerank_rows
            )
    return distances, indices


def _approx_block(
    q: np.ndarray, q_sq: np.ndarray, x: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """Approximate squared distances |q|^2 + |x|^2 - 2 q.x in float32, (len(q), len(x))."""
    if out is not None and out.shape[0] >= len(q) and out.shape[1] == len(x):
        block = np.matmul(q, x.T, out=out[: len(q)])
    else:
        block = q @ x.T
    block *= -2.0
    block += q_sq[:, None]
    block += np.einsum("ij,ij->i", x, x)[None, :]
    return block


def _within(
    database: np.ndarray, q: np.ndarray, q_sq: np.ndarray, limit: np.ndarray, buf: np.ndarray
) -> list[np.ndarray]:
    """Per query, every database row whose approximate distance is <= its limit."""
    found: list[list[np.ndarray]] = [[] for _ in range(len(q))]
    bc = len(buf)
    for b0 in range(0, len(database), bc):
        b1 = min(len(database), b0 + bc)
        x = _load_rows(database, slice(b0, b1), "database", buf)
        _release_pages(database, b0, b1)
        block = _approx_block(q, q_sq, x)
        rows, cols = np.nonzero(block <= limit[:, None])
        for r in np.unique(rows):
            found[r].append(cols[rows == r] + b0)
    return [np.concatenate(f) if f else np.empty(0, np.int64) for f in found]


def search(
    database: np.ndarray,
    queries: np.ndarray,
    k: int,
    memory_budget_bytes: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``exact_search`` when ``memory_budget_bytes`` is None, else ``chunked_search``.

    Both give the same result; the bounded path trades speed for memory.
    """
    if memory_budget_bytes is None:
        return exact_search(database, queries, k)
    return chunked_search(database, queries, k, memory_budget_bytes)


def unnormalized_search(
    database: np.ndarray, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Plain ``faiss.IndexFlatL2`` search of descriptors as they are, without normalizing:
    what the official code does with PCA-reduced descriptors (VG benchmark / CricaVPR
    ``test()``). FAISS's own order for ties."""
    k = _check_inputs(database, queries, k)
    index = faiss.IndexFlatL2(database.shape[1])
    index.add(np.ascontiguousarray(database, dtype=np.float32))
    distances, indices = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return distances, indices.astype(np.int64)


# --------------------------------------------------------------------------- PCA


@dataclass(frozen=True)
class PCAProjection:
    """A fitted PCA (sklearn's, without whitening): ``transform(x) = (x - mean) @ components.T``."""

    mean: np.ndarray  # (D,)
    components: np.ndarray  # (dim, D)
    explained_variance: np.ndarray  # (dim,)

    @property
    def input_dim(self) -> int:
        return int(self.components.shape[1])

    @property
    def output_dim(self) -> int:
        return int(self.components.shape[0])

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Project (N, D) descriptors to (N, dim), in the dtype of the fitted PCA."""
        arr = np.asarray(x)
        if arr.ndim != 2 or arr.shape[1] != self.input_dim:
            raise ValueError(
                f"PCA expects (N, {self.input_dim}) descriptors, got shape {arr.shape}"
            )
        centred = arr.astype(self.mean.dtype) - self.mean
        return centred @ self.components.T

    def save(self, path: str | Path) -> None:
        """Write to ``path`` (.npz), atomically: a temporary file renamed into place."""
        path = Path(path)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: no .npz added
            np.savez(
                f,
                mean=self.mean,
                components=self.components,
                explained_variance=self.explained_variance,
            )


def load_pca(path: str | Path) -> PCAProjection:
    """Read a PCA written by ``PCAProjection.save``."""
    path = Path(path)
    try:
        f = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise VprkitError(f"{path}: not a PCA file ({e}); give a vprkit pca.npz") from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise VprkitError(f"{path}: a plain .npy array, not a PCA file; give a vprkit pca.npz")
    with f:
        missing = {"mean", "components", "explained_variance"} - set(f.files)
        if missing:
            raise VprkitError(
                f"{path} is not a vprkit PCA file: missing {sorted(missing)}; give the pca.npz "
                "of a vprkit eval --pca_dim run"
            )
        pca = PCAProjection(f["mean"], f["components"], f["explained_variance"])
    if pca.components.ndim != 2 or pca.mean.shape != (pca.input_dim,):
        raise VprkitError(
            f"{path}: inconsistent PCA shapes, mean {pca.mean.shape}, "
            f"components {pca.components.shape}"
        )
    return pca


def fit_pca(descriptors: np.ndarray, dim: int, seed: int = 0) -> PCAProjection:
    """Fit ``sklearn.decomposition.PCA(dim)`` on at most 2**14 descriptors.

    Like the VG benchmark's ``compute_pca`` (used by CricaVPR), which fits on the first 2**14
    descriptors of a shuffled loader: here a seeded random subset when there are more.
    """
    from sklearn.decomposition import PCA

    arr = np.asarray(descriptors)
    if arr.ndim != 2:
        raise ValueError(f"expected (N, D) descriptors, got shape {arr.shape}")
    if not 1 <= dim <= min(arr.shape):
        raise ValueError(
            f"PCA dim must be between 1 and min(N, D) = {min(arr.shape)} for descriptors of "
            f"shape {arr.shape}, got {dim}"
        )
    if len(arr) > PCA_MAX_SAMPLES:
        rng = np.random.default_rng(seed)
        arr = arr[np.sort(rng.choice(len(arr), PCA_MAX_SAMPLES, replace=False))]
    pca = PCA(n_components=dim).fit(arr)
    return PCAProjection(pca.mean_.copy(), pca.components_.copy(), pca.explained_variance_.copy())
