"""SelaVPR's re-ranking: count mutual nearest neighbours between dense local feature maps.

The definition is the official `local_matching.match_batch_tensor` (Lu-Feng/SelaVPR), for a
query Q (Lq x D) and a candidate C (Lc x D), both flattened row-major from (D, h, w):

    S = C @ Q^T                         (Lc, Lq)
    c(j) = argmax_k S[k, j]             best candidate feature of query feature j
    q(k) = argmax_j S[k, j]             best query feature of candidate feature k
    count = #{ j : q(c(j)) == j }

Each argmax returns the first index among equal maxima (torch's documented rule), so ties
break exactly as in the official code.

The official code builds one (K, Lc, Lq) fp32 tensor per query (5.5 GB for 100 candidates at
61x61). Here candidates are processed in blocks of rows whose similarity fits a memory
budget: the row argmax of a block is final, and the column argmax is merged across blocks
with a strict `>` so the earlier (smaller) index wins ties, as a single argmax would. The
block values are the same fp32 GEMM outputs (blocks of at least 64 rows, which on the BLAS
backends tried give bit-identical results to the full product), so the counts are identical.

`precision="bf16"` / `"fp16"` computes S in low precision and then recomputes in fp32 every
row and column whose argmax it cannot certify (rule below), so the counts (and therefore the
ranking) equal the fp32 ones.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from vprkit.cpu_precision import warn_if_emulated
from vprkit.rerank.base import (
    Reranker,
    RerankInputs,
    ScoreFn,
    register_reranker,
    rerank_by_scores,
)
from vprkit.rerank.local_features import LOCAL_DESC

_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# Row blocks smaller than this may take a different BLAS kernel (GEMV-like) whose rounding
# differs in the last bit from the full product; keeping blocks at >= 64 rows keeps the
# values, hence near-tie argmaxes, identical to one big matmul.
MIN_BLOCK_ROWS = 64
DEFAULT_CPU_BUDGET = 6 * 2**20  # a similarity block that stays in the CPU caches (fastest)
DEFAULT_CUDA_BUDGET = 2**30
# Low precision: if more than this fraction of a candidate's rows/columns must be recomputed
# in fp32, recompute the whole candidate in fp32 instead (cheaper than many small blocks).
_FALLBACK_FRACTION = 0.5


def _as_features(x: Tensor | np.ndarray, *, batched: bool, name: str) -> Tensor:
    """(D, h, w) -> (L, D) for the query, (K, D, h, w) -> (K, L, D) for candidates; already
    flattened (L, D) / (K, L, D) inputs pass through."""
    x = torch.as_tensor(x)
    map_ndim = 4 if batched else 3
    if x.ndim == map_ndim:
        x = x.flatten(-2).transpose(-1, -2)
    elif x.ndim != map_ndim - 1:
        shape = "(K, D, h, w) or (K, L, D)" if batched else "(D, h, w) or (L, D)"
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {x.dtype}")
    return x


@contextlib.contextmanager
def _exact_cuda_matmul(device: torch.device) -> Iterator[None]:
    """TF32 and reduced-precision reductions would change fp32 results (and break the
    low-precision error bound): switch them off for the duration of the call."""
    if device.type != "cuda":
        yield
        return
    m = torch.backends.cuda.matmul
    saved = (
        m.allow_tf32,
        m.allow_fp16_reduced_precision_reduction,
        m.allow_bf16_reduced_precision_reduction,
    )
    m.allow_tf32 = False
    m.allow_fp16_reduced_precision_reduction = False
    m.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        (
            m.allow_tf32,
            m.allow_fp16_reduced_precision_reduction,
            m.allow_bf16_reduced_precision_reduction,
        ) = saved


def _plan(
    num_cands: int,
    lc: int,
    lq: int,
    itemsize: int,
    chunk_size: int | None,
    memory_budget_bytes: int | None,
    device: torch.device,
) -> tuple[int, int]:
    """(candidates per block, rows per block) so that one similarity block fits the budget."""
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if memory_budget_bytes is None and chunk_size is not None:
        return chunk_size, lc
    budget = memory_budget_bytes
    if budget is None:
        budget = DEFAULT_CUDA_BUDGET if device.type == "cuda" else DEFAULT_CPU_BUDGET
    if budget <= 0:
        raise ValueError(f"memory_budget_bytes must be positive, got {budget}")
    per_cand = lc * lq * itemsize
    if per_cand <= budget:
        n = max(1, min(budget // per_cand, num_cands))
        if chunk_size is not None:
            n = min(n, chunk_size)
        return n, lc
    rows = max(MIN_BLOCK_ROWS, budget // (lq * itemsize))
    return 1, min(rows, lc)


def _row_argmax(s: Tensor) -> Tensor:
    """argmax over the last (contiguous) axis, first index on ties. On the CPU NumPy's SIMD
    argmax is several times faster than torch's; both return the first maximal index."""
    if s.device.type == "cpu":
        return torch.from_numpy(s.numpy().argmax(axis=-1))
    return s.argmax(dim=-1)


def _row_blocks(lc: int, rows: int) -> list[tuple[int, int]]:
    """[start, stop) row blocks of `rows`; a short last block joins the one before it, so no
    block has fewer than MIN_BLOCK_ROWS rows (unless the candidate has fewer)."""
    blocks = [(r0, min(lc, r0 + rows)) for r0 in range(0, lc, rows)]
    if len(blocks) > 1 and blocks[-1][1] - blocks[-1][0] < MIN_BLOCK_ROWS:
        blocks[-2:] = [(blocks[-2][0], lc)]
    return blocks


def _fp32_argmaxes(c: Tensor, qT: Tensor, rows_per_block: int) -> tuple[Tensor, Tensor]:
    """Row argmax q(k) (n, Lc) and column argmax c(j) (n, Lq) of S = c @ qT, first index on
    ties, computed block by block over candidate rows."""
    n, lc, _ = c.shape
    lq = qT.shape[1]
    cpu = c.device.type == "cpu"
    row_idx = torch.empty(n, lc, dtype=torch.long, device=c.device)
    col_idx = torch.empty(n, lq, dtype=torch.long, device=c.device)
    # On the CPU: one 2-D product per candidate into a reused buffer (no allocation and page
    # faults per block; a batched matmul with `out=` is much slower there).
    groups = [(i, i + 1) for i in range(n)] if cpu else [(0, n)]
    blocks = _row_blocks(lc, rows_per_block)
    buf = torch.empty(max(b - a for a, b in blocks), lq, device=c.device) if cpu else None
    for g0, g1 in groups:
        col_val = None
        for r0, r1 in blocks:
            t = r1 - r0
            if cpu:
                s = torch.mm(c[g0, r0 : r0 + t], qT, out=buf[:t])[None]
            else:
                s = torch.matmul(c[g0:g1, r0 : r0 + t], qT)  # (n, t, Lq)
            row_idx[g0:g1, r0 : r0 + t] = _row_argmax(s)
            val, idx = s.max(dim=1)  # first index among equal maxima inside the block
            if col_val is None:
                col_val, col_idx[g0:g1] = val, idx
            else:
                # strict: on equal values the earlier block (smaller row index) keeps the win
                better = val > col_val
                col_val = torch.where(better, val, col_val)
                col_idx[g0:g1] = torch.where(better, idx + r0, col_idx[g0:g1])
    return row_idx, col_idx


def _count(row_idx: Tensor, col_idx: Tensor) -> Tensor:
    lq = col_idx.shape[1]
    q_of_c = row_idx.gather(1, col_idx)  # q(c(j))
    return (q_of_c == torch.arange(lq, device=col_idx.device)).sum(dim=1)


def _error_factor(dtype: torch.dtype, depth: int) -> float:
    """eps such that |S_lowp[k, j] - S_fp32[k, j]| <= eps * |c_k| * |q_j|.

    Inputs rounded to `dtype` (relative error u each), products accumulated in fp32
    (gamma_D = D u32 / (1 - D u32), Higham's bound), the sum rounded to `dtype` on output,
    and the fp32 reference's own accumulation error (gamma_D again). 1% on top for the fp32
    arithmetic of the norms and the bound itself."""
    u = _UNIT_ROUNDOFF[dtype]
    u32 = _UNIT_ROUNDOFF[torch.float32]
    gamma = depth * u32 / (1 - depth * u32)
    grow = (1 + u) ** 2
    eps = (grow - 1) + gamma * grow + u * grow * (1 + gamma) + gamma
    return 1.01 * eps


def _top2_merge(best1: Tensor, idx1: Tensor, best2: Tensor, v: Tensor, vi: Tensor, v2: Tensor):
    """Merge a block's top-2 (v >= v2, index vi) into the running top-2 (best1 >= best2)."""
    better = v > best1
    new2 = torch.where(better, torch.maximum(best1, v2), torch.maximum(best2, v))
    return torch.where(better, v, best1), torch.where(better, vi, idx1), new2


def _blocks_of(mask: Tensor, size: int) -> list[tuple[int, int]]:
    """Aligned [start, stop) blocks of `size` that contain a True of the 1-D `mask`."""
    n = mask.shape[0]
    hit = torch.zeros((n + size - 1) // size, dtype=torch.bool, device=mask.device)
    hit.index_fill_(0, torch.nonzero(mask).flatten() // size, True)
    return [(int(b) * size, min(n, int(b) * size + size)) for b in torch.nonzero(hit).flatten()]


def _lowp_argmaxes(
    c: Tensor, qT: Tensor, q_norm: Tensor, rows_per_block: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """As `_fp32_argmaxes`, with S computed in `dtype` and uncertain argmaxes redone in fp32.

    Rule: let eps bound |S_lowp - S_fp32| / (|c_k| |q_j|) (`_error_factor`). A row k whose
    low-precision top-2 margin exceeds 2 eps |c_k| max_j |q_j| has the same argmax in fp32
    (the fp32 winner cannot fall, nor any other entry rise, by more than that bound), and
    likewise for a column j with margin > 2 eps |q_j| max_k |c_k|. Every other row/column
    (ties included, margin 0) is recomputed in fp32, in aligned blocks of MIN_BLOCK_ROWS
    rows/columns so the values are bit-identical to the fp32 path."""
    n, lc, depth = c.shape
    lq = qT.shape[1]
    eps = _error_factor(dtype, depth)
    c_lp, qT_lp = c.to(dtype), qT.to(dtype)
    c_norm = torch.linalg.vector_norm(c, dim=2)  # (n, Lc)
    row_tol = 2 * eps * c_norm * q_norm.max()
    col_tol = 2 * eps * q_norm[None, :] * c_norm.max(dim=1, keepdim=True).values  # (n, Lq)

    row_idx = torch.empty(n, lc, dtype=torch.long, device=c.device)
    row_gap = torch.empty(n, lc, dtype=torch.float32, device=c.device)
    best1 = idx1 = best2 = None
    for r0 in range(0, lc, rows_per_block):
        s = torch.matmul(c_lp[:, r0 : r0 + rows_per_block], qT_lp).float()  # (n, t, Lq)
        t = s.shape[1]
        rv, ri = s.topk(2, dim=2)  # margins only; ties (margin 0) are recomputed below
        row_idx[:, r0 : r0 + t] = ri[..., 0]
        row_gap[:, r0 : r0 + t] = rv[..., 0] - rv[..., 1]
        if t >= 2:
            cv, ci = s.topk(2, dim=1)
            v, vi, v2 = cv[:, 0], ci[:, 0] + r0, cv[:, 1]
        else:
            v, vi = s[:, 0], torch.full_like(s[:, 0], r0, dtype=torch.long)
            v2 = torch.full_like(v, -math.inf)
        if best1 is None:
            best1, idx1, best2 = v, vi, v2
        else:
            best1, idx1, best2 = _top2_merge(best1, idx1, best2, v, vi, v2)
        del s
    assert best1 is not None and idx1 is not None and best2 is not None
    col_idx = idx1
    row_bad = ~(row_gap > row_tol)
    col_bad = ~((best1 - best2) > col_tol)
    for i in range(n):
        if not (row_bad[i].any() or col_bad[i].any()):
            continue
        rb, cb = _blocks_of(row_bad[i], MIN_BLOCK_ROWS), _blocks_of(col_bad[i], MIN_BLOCK_ROWS)
        covered = sum(b - a for a, b in rb) / lc + sum(b - a for a, b in cb) / lq
        if covered > 2 * _FALLBACK_FRACTION:
            r, k = _fp32_argmaxes(c[i : i + 1], qT, rows_per_block)
            row_idx[i], col_idx[i] = r[0], k[0]
            continue
        for a, b in rb:
            if b - a < MIN_BLOCK_ROWS and lc >= MIN_BLOCK_ROWS:
                a = b - MIN_BLOCK_ROWS  # the last partial block: widen it to the left
            fixed = torch.matmul(c[i, a:b], qT).argmax(dim=1)
            row_idx[i, a:b] = torch.where(row_bad[i, a:b], fixed, row_idx[i, a:b])
        for a, b in cb:
            if b - a < MIN_BLOCK_ROWS and lq >= MIN_BLOCK_ROWS:
                a = b - MIN_BLOCK_ROWS
            fixed = torch.matmul(c[i], qT[:, a:b]).argmax(dim=0)
            col_idx[i, a:b] = torch.where(col_bad[i, a:b], fixed, col_idx[i, a:b])
    return row_idx, col_idx


def mutual_nn_count(
    query_local: Tensor | np.ndarray,
    candidate_locals: Tensor | np.ndarray,
    *,
    chunk_size: int | None = None,
    memory_budget_bytes: int | None = None,
    precision: str = "fp32",
) -> Tensor:
    """Number of mutual nearest-neighbour pairs between the query and each candidate (K,).

    query_local: (D, h, w) or (L, D); candidate_locals: (K, D, h', w') or (K, L', D); any
    float dtype (fp16-stored features are promoted to fp32, or to `precision`). Features
    must be finite. `chunk_size` caps the candidates per block; `memory_budget_bytes` caps the
    bytes of one similarity block (default 6 MiB on CPU, 1 GiB on CUDA; the floor is one block
    of 64 rows). `precision` "fp16"/"bf16" gives the same counts as "fp32" (see module doc);
    on CPUs without native bf16/fp16 matmul it is slower, not faster, and logs one warning.
    """
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(_PRECISIONS)}, got {precision!r}")
    q = _as_features(query_local, batched=False, name="query_local")
    cands = _as_features(candidate_locals, batched=True, name="candidate_locals")
    if cands.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"feature dimension differs: query {q.shape[-1]}, candidates {cands.shape[-1]}"
        )
    if cands.device != q.device:
        raise ValueError(f"query on {q.device} but candidates on {cands.device}")
    warn_if_emulated(q.device, precision)
    num, lc, _ = cands.shape
    lq = q.shape[0]
    if num == 0:
        return torch.zeros(0, dtype=torch.long, device=q.device)
    if lq == 0 or lc == 0:
        return torch.zeros(num, dtype=torch.long, device=q.device)
    if not torch.isfinite(q).all():
        raise ValueError("query_local contains NaN or inf")
    dtype = _PRECISIONS[precision]
    # Budget in fp32 bytes: the low-precision path upcasts each block for its margins.
    n_block, rows = _plan(num, lc, lq, 4, chunk_size, memory_budget_bytes, q.device)
    qT = q.float().T.contiguous()
    q_norm = torch.linalg.vector_norm(qT, dim=0)
    counts = torch.empty(num, dtype=torch.long, device=q.device)
    with torch.no_grad(), _exact_cuda_matmul(q.device):
        for k0 in range(0, num, n_block):
            c = cands[k0 : k0 + n_block].float().contiguous()
            if not torch.isfinite(c).all():  # per block: no candidate-sized temporary
                raise ValueError("candidate_locals contains NaN or inf")
            if dtype == torch.float32:
                row_idx, col_idx = _fp32_argmaxes(c, qT, rows)
            else:
                row_idx, col_idx = _lowp_argmaxes(c, qT, q_norm, rows, dtype)
            counts[k0 : k0 + len(c)] = _count(row_idx, col_idx)
    return counts


def rerank_by_mnn(
    query_local: Tensor | np.ndarray,
    candidate_locals: Tensor | np.ndarray,
    candidate_ids: Sequence[int] | np.ndarray | Tensor,
    *,
    return_counts: bool = False,
    tie_order: str = "stable",
    **kwargs,
):
    """`candidate_ids` re-sorted by mutual-NN count, descending. Equal counts keep their
    input (global-retrieval) order, or with `tie_order="official"` the order of SelaVPR's
    official code (`vprkit.rerank.descending_order`). Returns the ids in the type given (list,
    ndarray or tensor), and the counts in input order if `return_counts`. `kwargs` go to
    `mutual_nn_count`."""
    n_ids = len(candidate_ids)
    counts = mutual_nn_count(query_local, candidate_locals, **kwargs)
    if counts.shape[0] != n_ids:
        raise ValueError(f"{n_ids} candidate ids for {counts.shape[0]} candidate feature maps")
    ranked = rerank_by_scores(candidate_ids, counts.cpu().numpy(), tie_order)
    return (ranked, counts) if return_counts else ranked


def mnn_scorer(inputs: RerankInputs) -> ScoreFn:
    """The `mnn` re-ranker: mutual-NN counts of the query's map against each candidate's."""
    query_local, database_local, device = inputs.query_local, inputs.database_local, inputs.device

    def mnn(q: int, candidates: np.ndarray) -> np.ndarray:
        counts = mutual_nn_count(
            query_local[q].to(device),
            database_local[candidates].to(device),
            memory_budget_bytes=inputs.memory_budget_bytes,
            precision=inputs.precision,
        )
        return counts.cpu().numpy()

    return mnn


register_reranker(
    Reranker(
        "mnn",
        "SelaVPR: count of mutual nearest-neighbour pairs between dense local maps",
        mnn_scorer,
        local_features=(LOCAL_DESC,),
    )
)
