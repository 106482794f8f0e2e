"""Mutual-nearest-neighbour counting (SelaVPR's re-ranking score) against a brute-force
loop written from the official definition, and the chunked, budgeted, cached and
low-precision paths against each other."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vprkit.rerank import mutual_nn_count, rerank_by_mnn
from vprkit.rerank.local_features import LocalFeatureCache


def brute_force(query: torch.Tensor, cands: torch.Tensor) -> list[int]:
    """The official rule spelled out with loops: S = C Q^T (one fp32 product per candidate),
    first index wins every tie, count j with q(c(j)) == j."""
    q = query.reshape(query.shape[0], -1).T.float()
    counts = []
    for cand in cands:
        c = cand.reshape(cand.shape[0], -1).T.float()
        s = (c @ q.T).tolist()  # s[k][j]
        lc, lq = len(s), len(s[0])
        best_q = []
        for k in range(lc):
            b = 0
            for j in range(1, lq):
                if s[k][j] > s[k][b]:
                    b = j
            best_q.append(b)
        n = 0
        for j in range(lq):
            b = 0
            for k in range(1, lc):
                if s[k][j] > s[b][j]:
                    b = k
            n += best_q[b] == j
        counts.append(n)
    return counts


def official_batched(query: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
    """`match_batch_tensor` as the official code runs it: one (K, L, L) tensor."""
    fm1 = query.reshape(query.shape[0], -1).T
    fm2 = cands.reshape(cands.shape[0], cands.shape[1], -1).transpose(1, 2)
    m = torch.matmul(fm2, fm1.T)
    max1, max2 = m.argmax(dim=1), m.argmax(dim=2)
    q_of_c = max2[torch.arange(m.shape[0]).reshape(-1, 1), max1]
    return (torch.arange(m.shape[-1]).repeat(m.shape[0], 1) == q_of_c).sum(dim=1)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_maps(k: int, d: int, h: int, w: int, seed: int = 0):
    """A query and candidates that resemble it to varying degrees (unit-norm features)."""
    g = gen(seed)
    q = F.normalize(torch.randn(d, h, w, generator=g), dim=0)
    noise = torch.linspace(0.02, 0.5, k).reshape(k, 1, 1, 1)
    c = F.normalize(q + noise * torch.randn(k, d, h, w, generator=g), dim=1)
    return q, c


def integer_maps(k: int, d: int, h: int, w: int, seed: int = 0, values: int = 2):
    """Features in {-values..values}: every dot product is exact, so ties are real ties
    whatever the summation order, and plentiful."""
    g = gen(seed)
    q = torch.randint(-values, values + 1, (d, h, w), generator=g).float()
    c = torch.randint(-values, values + 1, (k, d, h, w), generator=g).float()
    return q, c


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_random(seed):
    q, c = random_maps(4, 16, 5, 7, seed)
    assert mutual_nn_count(q, c).tolist() == brute_force(q, c)


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_brute_force_with_ties(seed):
    q, c = integer_maps(5, 4, 6, 6, seed, values=1)
    expected = brute_force(q, c)
    assert mutual_nn_count(q, c).tolist() == expected
    assert official_batched(q, c).tolist() == expected


def test_duplicated_and_constant_features():
    g = gen(3)
    q = F.normalize(torch.randn(8, 4, 4, generator=g), dim=0)
    dup = q.clone()
    dup[:, :, 2:] = dup[:, :, :2]  # every query feature appears twice in the candidate
    const = torch.ones(8, 4, 4)  # all similarities equal: everything ties
    shifted = torch.roll(q, 1, dims=2)
    cands = torch.stack([q, dup, const, shifted])
    expected = brute_force(q, cands)
    assert mutual_nn_count(q, cands).tolist() == expected
    # Constant candidate: c(j) = 0 for every j, q(0) = 0, so exactly one mutual pair.
    assert expected[2] == 1
    # A constant query against itself: one pair too.
    assert mutual_nn_count(const, const[None]).tolist() == [1]
    assert mutual_nn_count(q, q[None]).tolist() == [16]  # identical distinct features


def test_small_cases_and_layouts():
    q, c = random_maps(1, 8, 1, 1)
    assert mutual_nn_count(q, c).tolist() == [1]  # one feature each: always mutual
    q, c = random_maps(3, 8, 1, 2, seed=4)
    assert mutual_nn_count(q, c).tolist() == brute_force(q, c)
    # (L, D) and (K, L, D) inputs, numpy inputs, fp16 inputs
    flat_q, flat_c = q.flatten(1).T, c.flatten(2).transpose(1, 2)
    assert torch.equal(mutual_nn_count(flat_q, flat_c), mutual_nn_count(q, c))
    assert torch.equal(mutual_nn_count(q.numpy(), c.numpy()), mutual_nn_count(q, c))
    assert mutual_nn_count(q, c[:0]).shape == (0,)
    # Candidates with another map size than the query
    q2, _ = random_maps(1, 8, 3, 5, seed=5)
    assert mutual_nn_count(q2, c).tolist() == brute_force(q2, c)


def test_bad_inputs():
    q, c = random_maps(2, 8, 3, 3)
    with pytest.raises(ValueError, match="feature dimension"):
        mutual_nn_count(q, c[:, :4])
    with pytest.raises(ValueError, match="query_local must have shape"):
        mutual_nn_count(q[None, None], c)
    with pytest.raises(ValueError, match="precision"):
        mutual_nn_count(q, c, precision="int8")
    bad = c.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        mutual_nn_count(q, bad)
    with pytest.raises(ValueError, match="chunk_size"):
        mutual_nn_count(q, c, chunk_size=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"chunk_size": 1},
        {"chunk_size": 3},
        {"chunk_size": 100},
        {"memory_budget_bytes": 1},  # the floor: one candidate, 64 rows at a time
        {"memory_budget_bytes": 100 * 256 * 4},  # 100 rows: a partial last block
        {"memory_budget_bytes": 3 * 256 * 256 * 4},  # 3 whole candidates per block
        {"memory_budget_bytes": 2**30, "chunk_size": 2},
    ],
)
def test_chunked_and_budgeted_paths_agree(kwargs):
    # 16x16 = 256 rows: several row blocks, so ties across blocks are exercised too.
    q, c = integer_maps(7, 6, 16, 16, seed=6, values=1)
    c[3, :, 8:, :] = c[3, :, :8, :]  # duplicated rows in different blocks
    expected = official_batched(q, c)
    assert torch.equal(mutual_nn_count(q, c, **kwargs), expected)
    qr, cr = random_maps(5, 16, 16, 16, seed=7)
    assert torch.equal(mutual_nn_count(qr, cr, **kwargs), official_batched(qr, cr))


def test_block_merge_keeps_first_index_across_blocks():
    # Every candidate row identical: the column argmax must be row 0 (first block), so only
    # query features whose best candidate row is 0 and whose own best is j can match.
    q, _ = integer_maps(1, 4, 12, 12, seed=8)
    c = q[:, :1, :1].expand(4, 12, 12).clone()[None]
    expected = brute_force(q, c)
    for budget in (1, 64 * 144 * 4, None):
        assert mutual_nn_count(q, c, memory_budget_bytes=budget).tolist() == expected


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_gives_fp32_counts(precision):
    # Random unit features have many near-ties at low precision: the recheck must catch them.
    q, c = random_maps(6, 32, 20, 20, seed=9)
    fp32 = mutual_nn_count(q, c)
    assert torch.equal(mutual_nn_count(q, c, precision=precision), fp32)
    assert torch.equal(mutual_nn_count(q, c, precision=precision, memory_budget_bytes=1), fp32)
    # Exact ties everywhere (margin 0): all recomputed in fp32.
    qi, ci = integer_maps(4, 6, 16, 16, seed=10, values=1)
    assert torch.equal(mutual_nn_count(qi, ci, precision=precision), official_batched(qi, ci))
    ids = np.arange(len(c)) * 10
    assert np.array_equal(rerank_by_mnn(q, c, ids, precision=precision), rerank_by_mnn(q, c, ids))


def test_low_precision_rechecks_only_part_of_a_clear_case():
    # Candidates close to the query: margins are large, so most argmaxes are certified.
    from vprkit.rerank import mnn

    q, c = random_maps(2, 64, 16, 16, seed=11)
    c = F.normalize(q[None] + 0.01 * c, dim=1)
    calls = []
    original = mnn._fp32_argmaxes

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    mnn._fp32_argmaxes = spy
    try:
        out = mutual_nn_count(q, c, precision="bf16")
    finally:
        mnn._fp32_argmaxes = original
    assert not calls  # no whole-candidate fallback was needed
    assert torch.equal(out, official_batched(q, c))


def test_rerank_order_is_stable_and_keeps_types():
    q, c = integer_maps(6, 4, 5, 5, seed=12, values=1)
    counts = mutual_nn_count(q, c).tolist()
    ids = [50, 40, 30, 20, 10, 0]
    expected = [ids[i] for i in sorted(range(6), key=lambda i: (-counts[i], i))]
    assert rerank_by_mnn(q, c, ids) == expected
    assert rerank_by_mnn(q, c, np.array(ids)).tolist() == expected
    assert rerank_by_mnn(q, c, torch.tensor(ids)).tolist() == expected
    ranked, got = rerank_by_mnn(q, c, ids, return_counts=True)
    assert got.tolist() == counts
    # equal counts keep the global order
    same = torch.stack([c[0]] * 4)
    assert rerank_by_mnn(q, same, [7, 3, 9, 1]) == [7, 3, 9, 1]
    with pytest.raises(ValueError, match="candidate ids"):
        rerank_by_mnn(q, c, ids[:3])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cache_roundtrip_and_counts(tmp_path, dtype):
    q, c = random_maps(5, 16, 9, 9, seed=13)
    path = tmp_path / "db" / "local.npy"
    with LocalFeatureCache.create(path, 5, (16, 9, 9), dtype=dtype) as cache:
        cache.write([0, 1], c[:2])
        assert not path.exists()  # published only when complete
        cache.write(torch.tensor([4, 2, 3]), c[[4, 2, 3]])
    assert path.exists() and not list(path.parent.glob("*.tmp"))
    cache = LocalFeatureCache.open(path)
    assert len(cache) == 5 and cache.feature_shape == (16, 9, 9) and cache.dtype == dtype
    back = cache[[3, 0]]
    assert back.dtype == torch.float32
    if dtype == "float32":
        assert torch.equal(back, c[[3, 0]])
        assert torch.equal(mutual_nn_count(q, cache[range(5)]), mutual_nn_count(q, c))
    else:
        assert torch.equal(back, c[[3, 0]].half().float())
        stored = c.half().float()
        assert torch.equal(mutual_nn_count(q, cache[range(5)]), mutual_nn_count(q, stored))
        assert torch.equal(cache[2], stored[2])


def test_cache_is_atomic(tmp_path):
    _, c = random_maps(3, 4, 3, 3)
    path = tmp_path / "local.npy"
    with pytest.raises(RuntimeError, match="boom"):
        with LocalFeatureCache.create(path, 3, (4, 3, 3)) as cache:
            cache.write([0], c[:1])
            raise RuntimeError("boom")
    assert not path.exists() and not list(tmp_path.iterdir())
    cache = LocalFeatureCache.create(path, 3, (4, 3, 3))
    cache.write([0, 2], c[[0, 2]])
    with pytest.raises(ValueError, match="1 of 3 rows were never written"):
        cache.close()
    assert not list(tmp_path.iterdir())
    cache = LocalFeatureCache.create(path, 3, (4, 3, 3))
    with pytest.raises(ValueError, match="expected"):
        cache.write([0], c[:2])
    with pytest.raises(IndexError):
        cache.write([3], c[:1])
    cache.abort()
    with pytest.raises(FileNotFoundError):
        LocalFeatureCache.open(path)
    with pytest.raises(ValueError, match="float16 or float32"):
        LocalFeatureCache.create(path, 3, (4, 3, 3), dtype="int8")


def test_fp16_storage_effect_is_small():
    """How much fp16 storage changes counts on random data (documented in the cache):
    individual counts may move by a few, the ranking stays almost always the same."""
    q, c = random_maps(20, 32, 16, 16, seed=14)
    exact = mutual_nn_count(q, c)
    stored = mutual_nn_count(q, c.half().float())
    diff = (exact - stored).abs()
    assert diff.max() <= 5
    assert (diff > 0).float().mean() <= 0.5
