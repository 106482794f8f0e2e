"""The RANSAC baseline re-ranker finds planted geometry and ranks by it."""

import numpy as np
import pytest
import torch

pytest.importorskip("cv2", reason='the RANSAC baseline needs OpenCV: pip install "vprkit[ransac]"')

from vprkit.rerank.base import rerank_by_scores  # noqa: E402
from vprkit.rerank.ransac import (  # noqa: E402
    Keypoints,
    dense_keypoints,
    mutual_nn_pairs,
    r2former_keypoints,
    ransac_inliers,
    ransac_scores,
)


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_mutual_nn_pairs_equal_a_brute_force_loop():
    rng = np.random.default_rng(0)
    q, c = rng.normal(size=(50, 16)), rng.normal(size=(70, 16))
    qi, ci = mutual_nn_pairs(q, c)
    sim = _unit(q) @ _unit(c).T
    expected = [
        (i, j)
        for i in range(50)
        for j in range(70)
        if sim[i].argmax() == j and sim[:, j].argmax() == i
    ]
    assert list(zip(qi.tolist(), ci.tolist(), strict=True)) == expected


def _planted_pair(rng, inliers, outliers, homography):
    """Query and candidate keypoints: `inliers` matches follow `homography`, `outliers`
    matches land at random places. Features are shared per match, so every match is a
    mutual nearest neighbour."""
    n = inliers + outliers
    features = _unit(rng.normal(size=(n, 32))).astype(np.float32)
    q_xy = rng.uniform(0, 640, size=(n, 2))
    mapped = np.c_[q_xy, np.ones(n)] @ homography.T
    c_xy = mapped[:, :2] / mapped[:, 2:]
    c_xy[inliers:] = rng.uniform(0, 640, size=(outliers, 2))
    return Keypoints(features, q_xy.astype(np.float32)), Keypoints(
        features, c_xy.astype(np.float32)
    )


H = np.array([[1.1, 0.05, 20.0], [-0.03, 0.95, -15.0], [1e-4, 5e-5, 1.0]])


def test_planted_homography_inliers_are_found():
    q, c = _planted_pair(np.random.default_rng(1), inliers=60, outliers=40, homography=H)
    qi, ci = mutual_nn_pairs(q.features, c.features)
    assert len(qi) == 100
    found = ransac_inliers(q.xy[qi], c.xy[ci], model="homography", threshold=3.0)
    assert 60 <= found <= 62  # the planted ones, and at most a chance outlier or two
    assert ransac_inliers(q.xy[qi], c.xy[ci], threshold=3.0) == found  # seeded: repeatable


def test_fundamental_matrix_on_two_views_of_3d_points():
    rng = np.random.default_rng(2)
    points = np.c_[rng.uniform(-5, 5, (80, 2)), rng.uniform(8, 20, 80)]
    K = np.array([[500.0, 0, 320], [0, 500, 240], [0, 0, 1]])
    angle = 0.1
    R = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    first = points @ K.T
    second = (points @ R.T + np.array([1.0, 0.2, 0.0])) @ K.T
    q_xy, c_xy = first[:, :2] / first[:, 2:], second[:, :2] / second[:, 2:]
    c_xy[60:] = rng.uniform(0, 640, (20, 2))  # 20 outliers
    found = ransac_inliers(q_xy, c_xy, model="fundamental", threshold=1.0)
    assert 60 <= found <= 64


def test_rerank_puts_the_geometrically_consistent_candidate_first():
    rng = np.random.default_rng(3)
    query, good = _planted_pair(rng, inliers=50, outliers=10, homography=H)
    _, bad = _planted_pair(rng, inliers=0, outliers=60, homography=H)
    bad = Keypoints(query.features, bad.xy)  # same features, no consistent geometry
    scores = ransac_scores(query, [bad, good], threshold=3.0)
    assert scores[1] >= 50 and scores[0] < 10
    np.testing.assert_array_equal(rerank_by_scores(np.array([7, 9]), scores), [9, 7])
    np.testing.assert_array_equal(rerank_by_scores(np.array([1, 2, 3]), [5, 5, 6]), [3, 1, 2])


def test_too_few_matches_give_zero_and_bad_arguments_are_clear():
    assert ransac_inliers(np.zeros((3, 2)), np.zeros((3, 2))) == 0
    assert ransac_inliers(np.zeros((7, 2)), np.zeros((7, 2)), model="fundamental") == 0
    with pytest.raises(ValueError, match="model must be one of"):
        ransac_inliers(np.zeros((9, 2)), np.zeros((9, 2)), model="affine")
    with pytest.raises(ValueError, match="5 query points for 4"):
        ransac_inliers(np.zeros((5, 2)), np.zeros((4, 2)))


def test_keypoint_layouts_of_both_models():
    dense = dense_keypoints(
        torch.arange(2 * 2 * 3, dtype=torch.float32).reshape(2, 2, 3), (224, 336)
    )
    assert dense.features.shape == (6, 2) and dense.xy.shape == (6, 2)
    np.testing.assert_allclose(dense.xy[0], [56.0, 56.0])  # centre of the top-left cell
    np.testing.assert_allclose(dense.xy[-1], [280.0, 168.0])
    assert dense.features[4].tolist() == [4.0, 10.0]  # row 1, col 1 of both channels
    tokens = torch.zeros(5, 131)
    tokens[:, 0], tokens[:, 1] = 0.5, 0.25
    kp = r2former_keypoints(tokens, (480, 640))
    np.testing.assert_allclose(kp.xy[0], [320.0, 160.0])
    assert kp.features.shape == (5, 128)
