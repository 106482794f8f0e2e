"""The re-ranker registry, the built-ins' scorers against the functions they wrap, a toy
re-ranker added in one file, the ordering rule and the local-feature stores."""

import importlib.util
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vprkit
from vprkit.rerank import (
    LocalFeatureCache,
    base,
    descending_order,
    get_reranker,
    list_rerankers,
    make_scorer,
    mutual_nn_count,
    register_reranker,
    rerank_by_scores,
    rerank_order,
)

BUILTINS = ("mnn", "r2former", "ransac_homography", "ransac_fundamental")


@pytest.fixture
def registry(monkeypatch):
    """A copy of the registry for the test, so that what it registers does not leak."""
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))


def _cache(path, features: torch.Tensor) -> LocalFeatureCache:
    with LocalFeatureCache.create(path, len(features), features.shape[1:], "float32") as cache:
        cache.write(range(len(features)), features)
    return LocalFeatureCache.open(path)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """Dense maps (queries 0 and 1 planted in the database) and their caches."""
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(3, 16, 8, 8, generator=g), dim=1)
    db = F.normalize(torch.randn(9, 16, 8, 8, generator=g), dim=1)
    db[4], db[6] = q[0], F.normalize(q[1] + 0.3 * db[6], dim=0)
    folder = tmp_path_factory.mktemp("dense")
    return q, db, _cache(folder / "q.npy", q), _cache(folder / "db.npy", db)


@pytest.fixture(scope="module")
def r2former(tmp_path_factory):
    """A tiny R2Former, its global descriptors and token caches of random images."""
    torch.manual_seed(0)
    model = vprkit.create_model(
        "r2former", depth=1, embed_dim=64, num_heads=2, img_size=(64, 64), num_local=20
    ).eval()
    images = torch.randn(12, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(images)
    folder = tmp_path_factory.mktemp("tokens")
    tokens = out.local_tokens
    caches = _cache(folder / "q.npy", tokens[:3]), _cache(folder / "db.npy", tokens[3:])
    return model, out.global_desc[:3].numpy(), out.global_desc[3:].numpy(), tokens, caches


CANDIDATES = np.array([5, 4, 0, 8, 6, 2, 1])


# ----------------------------------------------------------------------------- registry


def test_builtins_are_registered_in_order():
    assert list_rerankers()[:4] == BUILTINS
    for name in BUILTINS:
        reranker = get_reranker(name)
        assert reranker.name == name and reranker.description
    assert get_reranker("mnn").local_features == ("local_desc",)
    assert get_reranker("r2former").local_features == ("local_tokens",)
    assert get_reranker("r2former").model_method == "rerank_scores"
    assert get_reranker("ransac_fundamental").local_features == ("local_desc", "local_tokens")


def test_unknown_and_duplicate_names(registry):
    with pytest.raises(ValueError, match="unknown reranker 'sift'; known: mnn, r2former, ransac"):
        get_reranker("sift")
    with pytest.raises(ValueError, match="unknown reranker"):
        make_scorer("sift", None, None, None, None, None, (64, 64))
    mnn = get_reranker("mnn")
    with pytest.raises(ValueError, match="'mnn' is already registered"):
        register_reranker(mnn)
    assert register_reranker(mnn, replace=True) is mnn


TOY_RERANKER = '''
"""A toy re-ranker: the negative L2 distance of the global descriptors."""

import numpy as np

from vprkit.rerank import Reranker, register_reranker


def toy_scorer(inputs):
    def score(q, candidates):
        return -np.linalg.norm(inputs.database_global[candidates] - inputs.query_global[q], axis=1)

    return score


register_reranker(
    Reranker("toy_l2", "negative L2 distance of global descriptors", toy_scorer, local_features=())
)
'''


def test_a_reranker_in_one_file(tmp_path, registry, monkeypatch):
    path = tmp_path / "toy_reranker.py"
    path.write_text(TOY_RERANKER)
    spec = importlib.util.spec_from_file_location("toy_reranker", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "toy_reranker", module)
    spec.loader.exec_module(module)

    assert "toy_l2" in list_rerankers()
    rng = np.random.default_rng(0)
    q_global, db_global = rng.normal(size=(4, 8)), rng.normal(size=(20, 8))
    predictions = np.array([rng.permutation(20)[:10] for _ in range(4)])
    scorer = make_scorer("toy_l2", None, None, None, q_global, db_global, (64, 64))
    orders, scores = rerank_order(predictions, 6, scorer)
    for q in range(4):
        cands = predictions[q, :6]
        dist = np.linalg.norm(db_global[cands] - q_global[q], axis=1)
        np.testing.assert_array_equal(cands[orders[q]], cands[np.argsort(dist)])
        np.testing.assert_array_equal(scores[q], -np.sort(dist))
    assert get_reranker("toy_l2").scorer(None, None, None, q_global, db_global, (64, 64))(
        0, predictions[0]
    ).shape == (10,)


def test_needs_are_checked(dense, r2former):
    q, db, q_cache, db_cache = dense
    model, q_global, db_global, _, (q_tokens, db_tokens) = r2former
    with pytest.raises(ValueError, match="reranker mnn scores local_desc, not local_tokens"):
        make_scorer("mnn", model, q_tokens, db_tokens, q_global, db_global, (64, 64))
    with pytest.raises(ValueError, match="needs a model with rerank_scores, not Linear"):
        make_scorer("r2former", torch.nn.Linear(2, 2), q_tokens, db_tokens, None, None, (64, 64))
    with pytest.raises(ValueError, match="reranker r2former scores local_tokens, not local_desc"):
        make_scorer("r2former", model, q_cache, db_cache, q_global, db_global, (64, 64))


# ------------------------------------------------------------- built-ins = what they wrap


@pytest.mark.parametrize(
    ("precision", "budget"), [("fp32", None), ("fp32", 4096), ("bf16", None), ("fp16", 4096)]
)
def test_mnn_scorer_gives_the_mutual_nn_counts(dense, precision, budget):
    q, db, q_cache, db_cache = dense
    scorer = make_scorer(
        "mnn", None, q_cache, db_cache, None, None, (64, 64), budget, precision=precision
    )
    same = get_reranker("mnn").scorer(
        None, q_cache, db_cache, None, None, (64, 64), precision=precision
    )
    for i in range(len(q)):
        expected = mutual_nn_count(q[i], db[CANDIDATES]).numpy()
        got = scorer(i, CANDIDATES)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(same(i, CANDIDATES), expected)
    orders, _ = rerank_order(CANDIDATES[None], 7, scorer)
    assert CANDIDATES[orders[0, 0]] == 4  # the planted copy of query 0


def test_r2former_scorer_gives_the_model_probabilities(r2former):
    model, q_global, db_global, tokens, (q_cache, db_cache) = r2former
    scorer = make_scorer("r2former", model, q_cache, db_cache, q_global, db_global, (64, 64))
    cands = CANDIDATES
    for i in range(3):
        expected = model.rerank_scores(
            torch.from_numpy(q_global[i : i + 1]),
            tokens[i : i + 1],
            torch.from_numpy(db_global[cands][None]),
            tokens[3:][cands][None],
        )[0].numpy()
        got = scorer(i, cands)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("geometry", ["homography", "fundamental"])
def test_ransac_scorers_give_the_inlier_counts(dense, r2former, geometry):
    pytest.importorskip("cv2")
    from vprkit.rerank.ransac import dense_keypoints, r2former_keypoints, ransac_scores

    q, db, q_cache, db_cache = dense
    model, q_global, db_global, tokens, (q_tokens, db_tokens) = r2former
    kind = f"ransac_{geometry}"
    maps = make_scorer(kind, None, q_cache, db_cache, None, None, (64, 64))
    toks = make_scorer(kind, model, q_tokens, db_tokens, q_global, db_global, (64, 64))
    for i in range(3):
        query = dense_keypoints(q[i], (64, 64))
        cands = [dense_keypoints(db[c], (64, 64)) for c in CANDIDATES]
        expected = ransac_scores(query, cands, model=geometry)
        np.testing.assert_array_equal(maps(i, CANDIDATES), expected)
        query = r2former_keypoints(tokens[i], (64, 64))
        cands = [r2former_keypoints(tokens[3 + c], (64, 64)) for c in CANDIDATES]
        expected = ransac_scores(query, cands, model=geometry)
        np.testing.assert_array_equal(toks(i, CANDIDATES), expected)


# ----------------------------------------------------------------------------- ordering


def test_descending_order_keeps_ties_in_input_order():
    np.testing.assert_array_equal(descending_order([3, 5, 3, 5, 1]), [1, 3, 0, 2, 4])
    np.testing.assert_array_equal(descending_order(np.array([0.5, 0.5, 0.7])), [2, 0, 1])
    np.testing.assert_array_equal(descending_order(np.array([True, False, True])), [0, 2, 1])
    assert rerank_by_scores([7, 3, 9], [1, 2, 2]) == [3, 9, 7]
    np.testing.assert_array_equal(rerank_by_scores(np.array([7, 3, 9]), [1, 2, 2]), [3, 9, 7])
    assert rerank_by_scores(torch.tensor([7, 3, 9]), [1, 2, 2]).tolist() == [3, 9, 7]
    with pytest.raises(ValueError, match="2 candidate ids for 3 scores"):
        rerank_by_scores([1, 2], [1, 2, 3])
    orders, scores = rerank_order(np.array([[10, 11, 12, 13]]), 3, lambda q, c: [1, 2, 1])
    np.testing.assert_array_equal(orders, [[1, 0, 2]])
    np.testing.assert_array_equal(scores, [[2.0, 1.0, 1.0]])
