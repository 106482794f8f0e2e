"""Index choices: exact flat (the default), or a compressed FAISS index with exact re-scoring.

A spec names the index:

- ``flat`` (the default everywhere): ``faiss.IndexFlatL2``, searched exactly by
  :func:`vprkit.retrieval.search.search_flat_index`; benchmark numbers stay comparable with
  the papers'.
- a FAISS index-factory string, e.g. ``IVF4096,PQ64``, ``PCA512,IVF4096,PQ64``, ``HNSW32``
  (``Flat`` is the flat index above);
- a preset: ``ivfpq`` (``IVF<nlist>,PQ<m>``, nlist the power of two nearest 4 sqrt(N), at
  most N/39, m the largest divisor of D up to min(64, D/4), 8-bit codes or fewer for a small
  training sample), ``hnsw`` (``HNSW32``), or ``auto`` (:func:`auto_choice`: ``flat`` while
  N <= 1,000,000 and the flat index takes at most a quarter of the available memory, else
  ``ivfpq``; the rule and the choice are stated in the log).

A compressed index is trained on a seeded random sample of the L2-normalized database
(``train_size`` rows, :func:`default_train_size`) and holds all its rows. Searching it
(:func:`search`) takes each query's top ``rescore`` candidates from the index and ranks them
again exactly, with the float64 rule of ``search.py`` (squared L2 of the L2-normalized
float32 vectors summed in float64, ties to the smaller database index), reading the rows
from the full descriptors (an array or a memmap; only the candidates' rows are read). So
with ``rescore >= N`` the result equals the flat search bit for bit, and ``rescore=0``
returns the index's own approximate order and distances. A query for which the index yields
fewer than ``k`` candidates (an IVF whose probed lists hold fewer rows) is ranked exactly
over the whole database, so every result is complete.

Indexes are saved and read with ``faiss.write_index`` / ``faiss.read_index``: a reloaded
index searches exactly as the saved one, without retraining.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field

import faiss
import numpy as np

from vprkit.errors import VprkitError
from vprkit.retrieval.search import (
    _load_rows,
    _rerank,
    flat_index,
    search_flat_index,
)

__all__ = [
    "AUTO_FLAT_MAX_PHOTOS",
    "DEFAULT_RESCORE",
    "IndexChoice",
    "auto_choice",
    "build_index",
    "index_bytes",
    "is_flat",
    "parse_index",
    "search",
]

DEFAULT_RESCORE = 100  # candidates re-scored exactly per query (at least k)
AUTO_FLAT_MAX_PHOTOS = 1_000_000
AUTO_FLAT_MEMORY_SHARE = 0.25  # of the available memory
DEFAULT_NPROBE = 16
DEFAULT_HNSW_EF = 64
PRESETS = ("flat", "ivfpq", "hnsw", "auto")
TRAIN_MIN, TRAIN_PER_LIST, TRAIN_MAX = 50_000, 50, 262_144


@dataclass(frozen=True)
class IndexChoice:
    """A resolved index spec: what was asked, the factory string used (None: exact flat),
    the search parameters, and why (for ``auto``)."""

    spec: str  # as given: flat, ivfpq, hnsw, auto or a factory string
    factory: str | None  # None: the exact flat index
    params: str = ""  # FAISS ParameterSpace string applied before searching
    reason: str = ""  # the auto rule, stated

    @property
    def flat(self) -> bool:
        return self.factory is None

    def describe(self) -> str:
        what = "exact flat (IndexFlatL2)" if self.flat else self.factory
        extra = f", {self.params}" if self.params else ""
        return f"{what}{extra}" + (f" [{self.reason}]" if self.reason else "")

    def to_json(self) -> dict:
        return {"spec": self.spec, "factory": self.factory, "params": self.params,
                "reason": self.reason}  # fmt: skip


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _ivfpq_factory(n: int, dim: int) -> tuple[str, int]:
    nlist = 2 ** max(0, round(math.log2(4 * math.sqrt(max(n, 1)))))
    while nlist > 1 and nlist > n // 39:
        nlist //= 2
    m = max(d for d in range(1, max(1, min(64, dim // 4)) + 1) if dim % d == 0)
    train = min(n, default_train_size(n, nlist))
    nbits = max(1, min(8, int(math.log2(max(2, train // 39)))))
    return f"IVF{nlist},PQ{m}" + ("" if nbits == 8 else f"x{nbits}"), nlist


def auto_choice(n: int, dim: int, memory_bytes: int | None = None) -> IndexChoice:
    """The ``auto`` rule: flat while ``n <= 1,000,000`` and the flat index (``n * dim * 4``
    bytes) fits in a quarter of the available memory; else the ``ivfpq`` preset."""
    memory = available_memory_bytes() if memory_bytes is None else int(memory_bytes)
    flat_bytes = n * dim * 4
    budget = int(AUTO_FLAT_MEMORY_SHARE * memory)
    sizes = (
        f"{n} photos x {dim}-D: flat index {flat_bytes / 2**30:.2f} GiB, a quarter of the "
        f"available memory {budget / 2**30:.2f} GiB"
    )
    if n <= AUTO_FLAT_MAX_PHOTOS and flat_bytes <= budget:
        return IndexChoice("auto", None, "", f"auto: flat, as {sizes} and N <= 1,000,000")
    factory, nlist = _ivfpq_factory(n, dim)
    return IndexChoice(
        "auto",
        factory,
        f"nprobe={min(DEFAULT_NPROBE, nlist)}",
        f"auto: {factory}, as {sizes} or N > 1,000,000",
    )


def parse_index(spec: str | None, n: int, dim: int, params: str | None = None) -> IndexChoice:
    """Resolve ``spec`` (module doc) for ``n`` descriptors of dimension ``dim``; a spec FAISS
    rejects is a `VprkitError` naming ``--index``. ``params`` (e.g. ``nprobe=32``,
    ``efSearch=128``) replaces the default search parameters."""
    spec = "flat" if spec is None else str(spec).strip()
    key = spec.lower()
    if key in ("flat", "") or spec == "Flat":
        return IndexChoice("flat", None, "")
    if key == "auto":
        choice = auto_choice(n, dim)
    elif key == "ivfpq":
        factory, nlist = _ivfpq_factory(n, dim)
        choice = IndexChoice(spec, factory, f"nprobe={min(DEFAULT_NPROBE, nlist)}")
    elif key == "hnsw":
        choice = IndexChoice(spec, "HNSW32", f"efSearch={DEFAULT_HNSW_EF}")
    else:
        try:
            probe = faiss.index_factory(dim, spec)
        except RuntimeError as e:
            detail = _faiss_message(e)
            raise VprkitError(
                f"--index {spec!r}: FAISS rejects this index-factory string for {dim}-D "
                f"descriptors ({detail}); give flat, ivfpq, hnsw, auto or a factory string "
                "such as IVF4096,PQ64 or HNSW32"
            ) from None
        if not probe.metric_type == faiss.METRIC_L2:
            raise VprkitError(f"--index {spec!r}: only L2 indexes are supported")
        nlist = _nlist(probe)
        default = ""
        if nlist:
            default = f"nprobe={min(DEFAULT_NPROBE, nlist)}"
        elif "HNSW" in spec:
            default = f"efSearch={DEFAULT_HNSW_EF}"
        choice = IndexChoice(spec, spec, default)
    if params is not None and not choice.flat:
        choice = IndexChoice(choice.spec, choice.factory, params, choice.reason)
    return choice


def _faiss_message(err: Exception) -> str:
    """FAISS's own reason, without its C++ location."""
    text = " ".join(str(err).split())
    if "Error: " in text:
        text = text.split("Error: ", 1)[1]
    return text[:160] or "refused"


def _nlist(index) -> int:
    try:
        return int(faiss.extract_index_ivf(index).nlist)
    except (RuntimeError, AttributeError):
        return 0


def default_train_size(n: int, nlist: int = 0) -> int:
    """Training sample: max(50,000, 50 per IVF list), at most 262,144 rows and the database."""
    return int(min(n, max(TRAIN_MIN, TRAIN_PER_LIST * nlist), TRAIN_MAX))


def is_flat(index) -> bool:
    return isinstance(faiss.downcast_index(index), faiss.IndexFlatL2)


@dataclass
class BuiltIndex:
    index: object
    choice: IndexChoice
    train: dict = field(default_factory=dict)  # seed, size, photos (None for flat)
    build_s: float = 0.0
    train_s: float = 0.0
    bytes: int = 0

    @property
    def bytes_per_photo(self) -> float:
        return self.bytes / max(1, self.index.ntotal)

    def summary(self) -> str:
        trained = (
            f", trained on {self.train['size']} of {self.train['photos']} rows (seed "
            f"{self.train['seed']}) in {self.train_s:.1f} s"
            if self.train
            else ""
        )
        return (
            f"index {self.choice.describe()}: {self.index.ntotal} rows built in "
            f"{self.build_s:.1f} s{trained}; {self.bytes_per_photo:.1f} bytes per photo "
            f"({self.bytes / 2**20:.1f} MiB)"
        )


def _blocks(database, block: int = 16384):
    n = len(database)
    buf = np.empty((min(n, block), database.shape[1]), dtype=np.float32)
    for start in range(0, n, block):
        yield _load_rows(database, slice(start, min(n, start + block)), "database", buf)


def build_index(
    database,
    choice: IndexChoice | str | None = None,
    *,
    seed: int = 0,
    train_size: int | None = None,
    params: str | None = None,
) -> BuiltIndex:
    """The index ``choice`` over ``database`` (N, D) (array or memmap, read in blocks),
    trained on ``train_size`` rows drawn with ``seed`` (sorted, so a memmap reads forward)."""
    n, dim = database.shape
    if not isinstance(choice, IndexChoice):
        choice = parse_index(choice, n, dim, params)
    start = time.perf_counter()
    if choice.flat:
        index = flat_index(database)
        built = BuiltIndex(index, choice, {}, time.perf_counter() - start)
        built.bytes = index_bytes(index)
        return built
    index = faiss.index_factory(dim, choice.factory)
    size = default_train_size(n, _nlist(index)) if train_size is None else int(train_size)
    size = min(size, n)
    train = {"seed": int(seed), "size": size, "photos": n}
    t0 = time.perf_counter()
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(n, size, replace=False)) if size < n else np.arange(n)
        sample = _load_rows(database, rows, "database")
        _check_trainable(index, choice, size)
        _no_polysemous_training(index)
        try:
            index.train(sample)
        except RuntimeError as e:
            raise VprkitError(
                f"--index {choice.spec!r}: FAISS could not train {choice.factory} on {size} "
                f"rows ({_faiss_message(e)}); choose a smaller index"
            ) from None
        del sample
    train_s = time.perf_counter() - t0
    for block in _blocks(database):
        index.add(block)
    apply_params(index, choice.params)
    built = BuiltIndex(index, choice, train, time.perf_counter() - start, train_s)
    built.bytes = index_bytes(index)
    return built


def check_spec_size(spec: str | None, n: int) -> None:
    """What can be refused before any descriptor exists: an IVF with more lists, or PQ codes
    with more centroids, than the ``n`` rows it would be trained on."""
    if spec is None or str(spec).strip().lower() in PRESETS:
        return
    match = re.search(r"IVF(\d+)", spec)
    if match:
        _check_trainable(None, IndexChoice(spec, spec), min(n, TRAIN_MAX), int(match.group(1)))
    elif "PQ" in spec:
        _check_trainable(None, IndexChoice(spec, spec), min(n, TRAIN_MAX))


def _no_polysemous_training(index) -> None:
    """index_factory turns on polysemous training for PQ codes (a code reordering for
    Hamming-distance filtering that vprkit never uses); it is 25x slower than the PQ
    training itself (53 s against 2 s for PQ64 on 20,000 x 512-D here): off."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    if hasattr(index, "do_polysemous_training"):
        index.do_polysemous_training = False


def _check_trainable(index, choice: IndexChoice, size: int, nlist: int | None = None) -> None:
    nlist = _nlist(index) if nlist is None else nlist
    if nlist and size < nlist:
        raise VprkitError(
            f"--index {choice.spec!r}: an IVF with {nlist} lists needs at least {nlist} "
            f"training rows, the database has {size}; use fewer lists (e.g. "
            f"IVF{2 ** max(0, int(math.log2(max(1, size // 39))))},...) or --index flat"
        )
    match = re.search(r"PQ(\d+)(?:x(\d+))?", choice.factory or "")
    if match:
        nbits = int(match.group(2) or 8)
        if size < 2**nbits:
            raise VprkitError(
                f"--index {choice.spec!r}: {nbits}-bit PQ codes need at least {2**nbits} "
                f"training rows, the database has {size}; use PQ{match.group(1)}x"
                f"{max(1, int(math.log2(max(2, size))))} or --index flat"
            )


def apply_params(index, params: str) -> None:
    if params:
        try:
            faiss.ParameterSpace().set_index_parameters(index, params)
        except RuntimeError as e:
            raise VprkitError(
                f"--index_params {params!r}: FAISS refuses it for this index "
                f"({_faiss_message(e)}); e.g. nprobe=16 (IVF), "
                "efSearch=64 (HNSW)"
            ) from None


def index_bytes(index) -> int:
    """Bytes the index holds in memory (codes, ids, coarse centroids, graph, transforms)."""
    index = faiss.downcast_index(index)
    total = 0
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            vt = faiss.downcast_VectorTransform(index.chain.at(i))
            total += 4 * (vt.A.size() + vt.b.size()) if hasattr(vt, "A") else 0
        index = faiss.downcast_index(index.index)
    if isinstance(index, faiss.IndexIVF):
        inv = index.invlists
        rows = sum(inv.list_size(i) for i in range(inv.nlist))
        total += rows * (inv.code_size + 8) + index_bytes(index.quantizer)
        pq = getattr(index, "pq", None)
        if pq is not None:
            total += 4 * pq.centroids.size()
        return total
    if isinstance(index, faiss.IndexHNSW):
        h = index.hnsw
        total += 4 * h.neighbors.size() + 4 * h.levels.size() + 8 * h.offsets.size()
        return total + index_bytes(index.storage)
    if isinstance(index, faiss.IndexFlatCodes):
        return total + index.ntotal * index.code_size
    return total + faiss.serialize_index(index).nbytes


def search(
    index,
    queries: np.ndarray,
    k: int,
    *,
    rescore: int = DEFAULT_RESCORE,
    full_descriptors=None,
) -> tuple[np.ndarray, np.ndarray]:
    """The top ``k`` per query (module doc). A flat index is searched exactly; a compressed
    one gives ``rescore`` (at least ``k``) candidates ranked exactly from
    ``full_descriptors`` (N, D), or its own order and distances when ``rescore`` is 0."""
    if is_flat(index):
        return search_flat_index(faiss.downcast_index(index), queries, k)
    n, dim = index.ntotal, index.d
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise VprkitError(f"queries are {queries.shape}, the index holds {dim}-D descriptors")
    k = min(int(k), n)
    q = _load_rows(queries, slice(None), "queries")
    if not rescore:
        approx, ids = _search_wide(index, q, k)
        return _sorted_approx(approx, ids, k)
    if full_descriptors is None or len(full_descriptors) != n:
        raise ValueError("exact re-scoring needs the full (N, D) descriptors of the index")
    width = max(int(rescore), k)

    def rows(ids: np.ndarray) -> np.ndarray:
        return _load_rows(full_descriptors, ids, "database")

    distances = np.empty((len(q), k), dtype=np.float32)
    indices = np.empty((len(q), k), dtype=np.int64)
    if width >= n:
        everything = np.arange(n)
        cand = [everything] * len(q)
    else:
        _, ids = _search_wide(index, q, width)
        cand = [row[row >= 0] for row in ids]
    for qi in range(len(q)):
        c = cand[qi] if len(cand[qi]) >= k else np.arange(n)  # too few: all rows
        distances[qi], indices[qi] = _rerank(q[qi], c, k, rows, max(1, len(c)))
    return distances, indices


def _search_wide(index, q: np.ndarray, width: int):
    """index.search with HNSW's efSearch raised to at least ``width`` (restored after)."""
    hnsw = _hnsw(index)
    if hnsw is None or hnsw.efSearch >= width:
        return index.search(q, width)
    ef = hnsw.efSearch
    hnsw.efSearch = width
    try:
        return index.search(q, width)
    finally:
        hnsw.efSearch = ef


def _hnsw(index):
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return index.hnsw if isinstance(index, faiss.IndexHNSW) else None


def _sorted_approx(approx: np.ndarray, ids: np.ndarray, k: int):
    """The index's own distances, ordered by (distance, id); missing results (-1) last."""
    approx = np.where(ids < 0, np.inf, approx).astype(np.float32)
    order = np.lexsort((ids, approx), axis=-1)
    return np.take_along_axis(approx, order, 1)[:, :k], np.take_along_axis(ids, order, 1)[:, :k]


def read_index(path: str | os.PathLike, choice: IndexChoice | None = None):
    """``faiss.read_index`` with the choice's search parameters applied (no retraining)."""
    index = faiss.read_index(str(path))
    if choice is not None and not choice.flat:
        apply_params(index, choice.params)
    return index


def write_index(index, path: str | os.PathLike) -> None:
    from vprkit.atomic import atomic_path

    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))
