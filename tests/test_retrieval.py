"""Ground truth, exact and memory-bounded search, PCA and metrics against brute force."""

from __future__ import annotations

import warnings

import faiss
import numpy as np
import pytest
from sklearn.decomposition import PCA

from vprkit.retrieval import search as search_mod
from vprkit.retrieval.ground_truth import positives_within_radius, queries_without_positives
from vprkit.retrieval.metrics import (
    auc_pr,
    first_correct_rank,
    format_recalls,
    per_query_correct,
    precision_recall_curve,
    recall_at_100_precision,
    recall_at_n,
)
from vprkit.retrieval.search import (
    chunked_search,
    exact_search,
    fit_pca,
    l2_normalize,
    load_pca,
    search,
)

# ----------------------------------------------------------------------------- ground truth


def brute_positives(db: np.ndarray, q: np.ndarray, radius: float, block: int = 256) -> list:
    db = np.asarray(db, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    out = []
    for s in range(0, len(q), block):
        diff = q[s : s + block, None, :] - db[None, :, :]
        d2 = (diff * diff).sum(-1)
        out.extend(np.flatnonzero(row <= radius * radius) for row in d2)
    return out


def assert_same_positives(got: list, want: list) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == np.int64
        np.testing.assert_array_equal(g, w)


def test_positives_hand_made_inclusive_radius():
    db = np.array([[0.0, 0.0], [15.0, 20.0], [15.0, 20.001], [25.0, 0.0], [100.0, 100.0]])
    q = np.array([[0.0, 0.0], [500.0, 500.0], [100.0, 90.0]])
    pos = positives_within_radius(db, q, radius=25.0)
    # distance exactly 25 is a positive (sklearn's radius_neighbors keeps d <= radius)
    np.testing.assert_array_equal(pos[0], [0, 1, 3])
    assert pos[1].size == 0 and pos[1].dtype == np.int64
    np.testing.assert_array_equal(pos[2], [4])
    np.testing.assert_array_equal(queries_without_positives(pos), [1])
    assert queries_without_positives(pos).dtype == np.int64


def test_positives_random_vs_brute_force():
    rng = np.random.default_rng(0)
    db = rng.uniform(0, 300, size=(2000, 2)) + 5e5  # UTM-sized numbers
    q = rng.uniform(0, 300, size=(300, 2)) + 5e5
    q[:10] = db[:10]  # some queries sit exactly on database points
    assert_same_positives(positives_within_radius(db, q, 25.0), brute_positives(db, q, 25.0))


def test_positives_small_database_and_errors():
    # a tiny database, where sklearn's "auto" would switch to inexact brute force
    db = np.array([[500000.0, 4000000.0], [500015.0, 4000020.0]])
    np.testing.assert_array_equal(positives_within_radius(db, db[:1], 25.0)[0], [0, 1])
    assert [p.size for p in positives_within_radius(np.empty((0, 2)), db)] == [0, 0]
    with pytest.raises(ValueError, match="query_utm"):
        positives_within_radius(db, np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="non-finite"):
        positives_within_radius(db, np.array([[np.nan, 0.0]]))
    with pytest.raises(ValueError, match="radius"):
        positives_within_radius(db, db, radius=-1)


@pytest.mark.parametrize("name", ["pitts30k_test", "tokyo247"])
def test_positives_real_layouts(shared_data, name):
    f = np.load(shared_data / "utm_ground_truth" / f"{name}.npz")
    db, q, radius = f["utmDb"], f["utmQ"], float(f["posDistThr"])
    assert radius == 25.0
    got = positives_within_radius(db, q, radius)
    assert_same_positives(got, brute_positives(db, q, radius, block=32))
    assert sum(len(p) for p in got) > 0
    if name == "tokyo247":
        assert (len(db), len(q)) == (75984, 315)
    else:
        assert (len(db), len(q)) == (10000, 6816)


# ----------------------------------------------------------------------------- search


def brute_search(db: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Float64 squared distances of the float32-normalized vectors, as float32; ties by index."""
    dbn = l2_normalize(db).astype(np.float64)
    qn = l2_normalize(q).astype(np.float64)
    d = ((qn[:, None, :] - dbn[None, :, :]) ** 2).sum(-1).astype(np.float32)
    idx = np.empty((len(q), k), dtype=np.int64)
    for i, row in enumerate(d):
        idx[i] = np.lexsort((np.arange(len(row)), row))[:k]
    return np.take_along_axis(d, idx, axis=1), idx


def data_with_ties(rng, n: int, nq: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    db = rng.standard_normal((n, dim)).astype(np.float32)
    db[n // 2 : n // 2 + 20] = db[:20]  # exact duplicates: equal distances, any query
    db[n - 5 :] = db[3]
    db[7] = 0.0  # a zero row stays zero
    db[8] = 3.0 * db[9]  # same direction, so the same normalized vector (up to rounding)
    q = rng.standard_normal((nq, dim)).astype(np.float32)
    q[:5] = db[:5]  # queries at database items
    q[5] = 0.0
    return db, q


def test_l2_normalize():
    x = np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float64)
    y = l2_normalize(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, [[0.6, 0.8], [0.0, 0.0]], rtol=1e-7)
    assert x[0, 0] == 3.0  # input untouched
    # a row gets the same bits alone as within the whole array (both paths rely on it)
    z = np.random.default_rng(1).standard_normal((50, 37)).astype(np.float16)
    full = l2_normalize(z)
    for i in (0, 17, 49):
        np.testing.assert_array_equal(l2_normalize(z[i : i + 1])[0], full[i])


def test_row_sums_do_not_depend_on_the_batch():
    # numpy's einsum gives a single float64 row different bits; the ranking must not
    x = np.random.default_rng(2).standard_normal((300, 10752))
    full = search_mod._row_sum_of_squares(x)
    for rows in (slice(0, 1), slice(5, 7), slice(100, 299)):
        np.testing.assert_array_equal(search_mod._row_sum_of_squares(x[rows]), full[rows])
    np.testing.assert_allclose(full, (x * x).sum(1), rtol=1e-13)


def test_exact_search_hand_made():
    db = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 2, 0], [1, 1, 0]], dtype=np.float32)
    q = np.array([[0, 1, 0], [1, 0, 0.001]], dtype=np.float32)
    d, i = exact_search(db, q, k=3)
    # query 0: items 1 and 3 are both at distance 0 (3 normalizes onto 1): smaller index first
    np.testing.assert_array_equal(i[0], [1, 3, 4])
    np.testing.assert_allclose(d[0], [0, 0, 2 - np.sqrt(2)], atol=1e-6)
    np.testing.assert_array_equal(i[1], [0, 4, 2])
    assert d.dtype == np.float32 and i.dtype == np.int64


@pytest.mark.parametrize("dim", [16, 96])
def test_exact_search_random_vs_brute_force(dim):
    rng = np.random.default_rng(dim)
    db, q = data_with_ties(rng, 700, 60, dim)
    want_d, want_i = brute_search(db, q, 25)
    got_d, got_i = exact_search(db, q, 25)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(got_d, want_d)
    # and the distances are what faiss.IndexFlatL2 reports, up to its float32 rounding
    index = faiss.IndexFlatL2(dim)
    index.add(l2_normalize(db))
    faiss_d, _ = index.search(l2_normalize(q), 25)
    np.testing.assert_allclose(got_d, faiss_d, atol=2e-5)


def test_exact_search_all_equal_database_needs_wider_search():
    # every database row is the same: all distances tie, ranking falls back to the index
    db = np.ones((300, 8), dtype=np.float32)
    q = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    d, i = exact_search(db, q, 10)
    np.testing.assert_array_equal(i, np.tile(np.arange(10), (4, 1)))
    d2, i2 = chunked_search(db, q, 10, 1 << 22, database_chunk_size=7)
    np.testing.assert_array_equal(i2, i)
    np.testing.assert_array_equal(d2, d)


def test_search_errors_and_k_clipping():
    db = np.zeros((5, 4), dtype=np.float32)
    with pytest.raises(ValueError, match=r"database descriptors have dimension 4.*dimension 3"):
        exact_search(db, np.zeros((2, 3), np.float32), 1)
    with pytest.raises(ValueError, match=r"dimension 4.*dimension 3"):
        chunked_search(db, np.zeros((2, 3), np.float32), 1, 1 << 20)
    with pytest.raises(ValueError, match="k must be"):
        exact_search(db, np.zeros((2, 4), np.float32), 0)
    with pytest.raises(ValueError, match="empty"):
        exact_search(np.zeros((0, 4), np.float32), np.zeros((2, 4), np.float32), 1)
    with pytest.raises(ValueError, match="too small"):
        chunked_search(db, np.zeros((2, 4), np.float32), 1, 100)
    bad = np.zeros((2, 4), np.float32)
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="queries row 1"):
        exact_search(db, bad, 1)
    with pytest.warns(UserWarning, match="k=8 is larger than the database"):
        d, i = exact_search(np.eye(5, 4, dtype=np.float32), np.eye(2, 4, dtype=np.float32), 8)
    assert i.shape == (2, 5)
    with pytest.warns(UserWarning, match="k=8"):
        d2, i2 = search(np.eye(5, 4, dtype=np.float32), np.eye(2, 4, dtype=np.float32), 8, 1 << 20)
    np.testing.assert_array_equal(i2, i)


@pytest.mark.parametrize("dim", [12, 200])
def test_chunked_equals_exact_with_ties_and_fp16_memmap(tmp_path, dim):
    rng = np.random.default_rng(100 + dim)
    db, q = data_with_ties(rng, 900, 70, dim)
    db16, q16 = db.astype(np.float16), q.astype(np.float16)
    np.save(tmp_path / "db.npy", db16)
    np.save(tmp_path / "q.npy", q16)
    db_mm = np.load(tmp_path / "db.npy", mmap_mode="r")
    q_mm = np.load(tmp_path / "q.npy", mmap_mode="r")
    k = 30
    # a tiny budget: the plan must split both queries and database into many chunks
    budget = 110_000 + dim * 600
    plan = search_mod._plan_chunks(len(q), len(db), dim, 4, k, 4 * k + 256, budget)
    assert plan.query_chunk < len(q) // 3 and plan.database_chunk < len(db) // 5
    got = chunked_search(db_mm, q_mm, k, budget)
    # fp16 storage ranks exactly as float32 computed from the same fp16 values
    want = exact_search(db16.astype(np.float32), q16.astype(np.float32), k)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(exact_search(db_mm, q_mm, k)[1], want[1])
    bd, bi = brute_search(db16, q16, k)
    np.testing.assert_array_equal(want[1], bi)
    np.testing.assert_array_equal(want[0], bd)
    # float32 data, odd explicit chunk sizes and the search() front door agree as well
    exact = search(db, q, k)
    for qc, bc in [(1, 1000), (7, 13), (70, 64), (3, 1)]:
        res = chunked_search(db, q, k, 1 << 30, query_chunk_size=qc, database_chunk_size=bc)
        np.testing.assert_array_equal(res[1], exact[1])
        np.testing.assert_array_equal(res[0], exact[0])
    np.testing.assert_array_equal(search(db, q, k, memory_budget_bytes=budget)[1], exact[1])


def test_chunked_releases_memmap_pages_without_changing_data(tmp_path):
    x = np.random.default_rng(3).standard_normal((64, 1024)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    search_mod._release_pages(mm, 0, 64)
    np.testing.assert_array_equal(np.asarray(mm), x)


# ----------------------------------------------------------------------------- PCA


def test_pca_matches_sklearn_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 32)).astype(np.float32) @ rng.standard_normal((32, 32)).astype(
        np.float32
    )
    pca = fit_pca(x, 8)
    ref = PCA(n_components=8).fit(x)
    np.testing.assert_allclose(pca.transform(x), ref.transform(x), rtol=1e-5, atol=1e-4)
    assert pca.transform(x).shape == (500, 8)
    pca.save(tmp_path / "pca.npz")
    loaded = load_pca(tmp_path / "pca.npz")
    np.testing.assert_array_equal(loaded.transform(x), pca.transform(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pca.npz"]  # no temporary left
    with pytest.raises(ValueError, match="expects"):
        pca.transform(x[:, :5])
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    with pytest.raises(ValueError, match=r"bad\.npz.*missing"):
        load_pca(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="dim"):
        fit_pca(x, 64)


def test_pca_uses_at_most_2_pow_14_samples():
    x = np.random.default_rng(0).standard_normal((2**14 + 50, 4))
    x[-50:] = 1000.0  # if all rows were used, the mean would move by about 3
    pca = fit_pca(x, 2, seed=0)
    sub = np.sort(np.random.default_rng(0).choice(len(x), 2**14, replace=False))
    np.testing.assert_allclose(pca.mean, x[sub].mean(0))


# ----------------------------------------------------------------------------- metrics


def test_recall_hand_made_vg_convention():
    preds = np.array([[3, 1, 2], [0, 5, 6], [9, 9, 9], [4, 7, 8]])
    positives = [np.array([1]), np.array([0, 3]), np.array([], dtype=np.int64), np.array([8])]
    r = recall_at_n(preds, positives, ns=(1, 2, 3, 100))
    # q1 at rank 1, q0 at rank 2, q3 at rank 3; q2 has no positives: a failure for every N
    assert r == {1: 25.0, 2: 50.0, 3: 75.0, 100: 75.0}
    assert format_recalls(r) == "R@1: 25.0, R@2: 50.0, R@3: 75.0, R@100: 75.0"
    assert format_recalls({1: 94.94, 5: 97.25}) == "R@1: 94.9, R@5: 97.2"
    np.testing.assert_array_equal(per_query_correct(preds, positives, 2), [1, 1, 0, 0])
    with pytest.raises(ValueError, match="3 queries but positives cover 6"):
        recall_at_n(preds[:3], positives[:2] + positives)


def test_first_correct_rank_hand_made():
    preds = np.array([[3, 1, 2], [0, 5, 6], [9, 9, 9], [4, 7, 8], [8, 8, 1]])
    positives = [np.array([1]), np.array([0, 3]), np.array([], dtype=np.int64), [8], [8, 1]]
    ranks = first_correct_rank(preds, positives)
    assert ranks.dtype == np.int64
    np.testing.assert_array_equal(ranks, [2, 1, 0, 3, 1])  # 1-based; 0: none correct
    np.testing.assert_array_equal(first_correct_rank(preds[:, 0], positives), [0, 1, 0, 0, 1])
    assert first_correct_rank(np.zeros((0, 3), dtype=np.int64), []).shape == (0,)
    with pytest.raises(ValueError, match="5 queries but positives cover 4"):
        first_correct_rank(preds, positives[:4])


def test_first_correct_rank_random_vs_loop():
    rng = np.random.default_rng(1)
    preds = np.array([rng.permutation(40)[:10] for _ in range(100)])
    positives = [rng.choice(40, size=rng.integers(0, 6), replace=False) for _ in range(100)]
    expected = []
    for row, pos in zip(preds, positives, strict=True):
        hits = [i + 1 for i, p in enumerate(row) if p in set(pos.tolist())]
        expected.append(hits[0] if hits else 0)
    np.testing.assert_array_equal(first_correct_rank(preds, positives), expected)


def test_recall_random_vs_loops():
    rng = np.random.default_rng(0)
    nq, k, n = 200, 20, 60
    preds = np.array([rng.permutation(n)[:k] for _ in range(nq)])
    positives = [np.sort(rng.choice(n, rng.integers(0, 4), replace=False)) for _ in range(nq)]
    ns = (1, 5, 10, 20, 100)
    got = recall_at_n(preds, positives, ns)
    for n_ in ns:
        hits = 0
        for qi in range(nq):
            if any(p in positives[qi] for p in preds[qi][:n_]):
                hits += 1
        assert got[n_] == pytest.approx(100.0 * hits / nq, abs=1e-12)


def direct_pr(correct: np.ndarray, scores: np.ndarray):
    precision, recall = [], []
    thresholds = np.unique(scores)
    for t in thresholds:
        accepted = scores >= t
        tp = np.count_nonzero(correct & accepted)
        precision.append(tp / np.count_nonzero(accepted))
        recall.append(tp / np.count_nonzero(correct))
    return np.array(precision + [1.0]), np.array(recall + [0.0]), thresholds


def test_precision_recall_hand_made():
    preds = np.array([[0, 9], [1, 9], [2, 9], [3, 9]])
    positives = [np.array([0]), np.array([5]), np.array([2]), np.array([], dtype=np.int64)]
    scores = np.array([[0.9, 0], [0.8, 0], [0.7, 0], [0.1, 0]])
    p, r, t = precision_recall_curve(preds, positives, scores)
    np.testing.assert_allclose(p, [0.5, 2 / 3, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(r, [1.0, 1.0, 0.5, 0.5, 0.0])
    np.testing.assert_allclose(t, [0.1, 0.7, 0.8, 0.9])
    assert recall_at_100_precision(preds, positives, scores) == 0.5
    # trapezoids over recall: 0.5 * (1 + 1) / 2... from r=0 to 0.5 at precision 1, then to 1
    assert auc_pr(preds, positives, scores) == pytest.approx(0.5 * 1.0 + 0.5 * (0.5 + 2 / 3) / 2)
    # the most confident match wrong: no threshold reaches precision 1
    assert recall_at_100_precision(preds, positives, -scores) == 0.0
    # nothing correct: recall zero rather than NaN, AUC 0
    none = [np.array([7])] * 4
    assert auc_pr(preds, none, scores) == 0.0
    assert recall_at_100_precision(preds, none, scores) == 0.0


def test_precision_recall_random_vs_direct():
    rng = np.random.default_rng(0)
    nq = 300
    preds = rng.integers(0, 50, size=(nq, 5))
    positives = [np.sort(rng.choice(50, rng.integers(0, 20), replace=False)) for _ in range(nq)]
    scores = np.round(rng.standard_normal((nq, 5)), 1)  # many tied scores
    correct = np.array([preds[i, 0] in positives[i] for i in range(nq)])
    p, r, t = precision_recall_curve(preds, positives, scores)
    dp, dr, dt = direct_pr(correct, scores[:, 0])
    np.testing.assert_allclose(p, dp)
    np.testing.assert_allclose(r, dr)
    np.testing.assert_allclose(t, dt)
    area = sum((dr[i] - dr[i + 1]) * (dp[i] + dp[i + 1]) / 2 for i in range(len(dr) - 1))
    assert auc_pr(preds, positives, scores) == pytest.approx(area, abs=1e-12)
    assert recall_at_100_precision(preds, positives, scores) == pytest.approx(
        max(dr[i] for i in range(len(dr)) if dp[i] == 1.0)
    )
    # 1-D inputs give the same as the first column
    assert auc_pr(preds[:, 0], positives, scores[:, 0]) == auc_pr(preds, positives, scores)


def test_no_warnings_from_metrics():
    preds = np.array([[0], [1]])
    positives = [np.array([0]), np.array([1])]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert auc_pr(preds, positives, np.array([1.0, 2.0])) == 1.0
        assert recall_at_100_precision(preds, positives, np.array([1.0, 2.0])) == 1.0
