"""Spatial verification against independent numpy computations on synthetic point sets."""

import numpy as np
import pytest

from tfmet.retrieval import spatial

# A known affine map: rotation by ~15 degrees, anisotropic zoom, shear and a shift.
TRUE_MAP = np.array([[0.95, -0.25, 0.10], [0.30, 1.10, -0.05], [0.0, 0.0, 1.0]])


def _apply(params, points):
    return (np.c_[points, np.ones(len(points))] @ params.T)[:, :2]


def _unit_rows(rng, n, d):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute_force_mutual(query, candidate, min_similarity):
    pairs = []
    for i, q in enumerate(query):
        sims = [float(np.dot(q, c)) for c in candidate]
        j = int(np.argmax(sims))
        back = [float(np.dot(other, candidate[j])) for other in query]
        if int(np.argmax(back)) == i and sims[j] >= min_similarity:
            pairs.append((i, j))
    return pairs


@pytest.mark.parametrize("min_similarity", [0.0, 0.5])
def test_mutual_matches_equal_a_brute_force_search(min_similarity):
    rng = np.random.default_rng(0)
    candidate = _unit_rows(rng, 30, 8)
    # 12 query rows are noisy copies of candidate rows, 13 are unrelated.
    noisy = candidate[rng.permutation(30)[:12]] + 0.1 * rng.normal(size=(12, 8))
    query = np.concatenate([noisy, _unit_rows(rng, 13, 8)])
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    pairs = spatial.mutual_matches(query, candidate, min_similarity)
    expected = _brute_force_mutual(query, candidate, min_similarity)
    assert [tuple(p) for p in pairs] == expected
    assert len(expected) >= 12 if min_similarity == 0.0 else 12 <= len(expected) < 20


def test_mutual_matches_of_empty_sets():
    assert spatial.mutual_matches(np.zeros((0, 4)), np.ones((3, 4))).shape == (0, 2)


def test_fit_affine_recovers_the_map_and_exactly_its_inliers():
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 1, (65, 2))
    dst = _apply(TRUE_MAP, src)
    dst[:40] += rng.normal(scale=0.002, size=(40, 2))  # inliers: well inside the threshold
    dst[40:] = rng.uniform(-0.5, 1.5, (25, 2))  # outliers
    params, mask = spatial.fit_affine(src, dst, threshold=0.02)
    # Independent: which points the true map explains to within the threshold.
    residuals = np.linalg.norm(_apply(TRUE_MAP, src) - dst, axis=1)
    np.testing.assert_array_equal(mask, residuals < 0.02)
    assert mask[:40].all() and mask.sum() < 45
    np.testing.assert_allclose(params, TRUE_MAP, atol=5e-3)
    # Deterministic: OpenCV draws its samples from a fixed seed.
    again, mask_again = spatial.fit_affine(src, dst, threshold=0.02)
    np.testing.assert_array_equal(again, params)
    np.testing.assert_array_equal(mask_again, mask)


def test_fit_affine_refuses_mirrors_extreme_zooms_and_too_few_points():
    rng = np.random.default_rng(2)
    src = rng.uniform(0, 1, (30, 2))
    mirrored = src * [-1.0, 1.0]
    assert spatial.fit_affine(src, mirrored)[0] is None
    assert spatial.fit_affine(src, src * 20.0)[0] is None  # beyond MAX_SCALE
    params, mask = spatial.fit_affine(src[:3], _apply(TRUE_MAP, src[:3]))
    assert params is None and not mask.any() and len(mask) == 3


def test_plausible_maps_by_hand():
    assert spatial.plausible(np.eye(3))
    assert spatial.plausible(TRUE_MAP)
    assert not spatial.plausible(np.diag([-1.0, 1.0, 1.0]))  # a mirror
    assert not spatial.plausible(np.diag([9.0, 1.0, 1.0]))  # zoom beyond MAX_SCALE
    assert not spatial.plausible(np.diag([1.0, 0.1, 1.0]))  # squashed below 1 / MAX_SCALE
    assert spatial.plausible(np.diag([7.9, 0.2, 1.0]))


def test_inliers_count_the_correspondences_one_map_explains():
    rng = np.random.default_rng(3)
    descriptors = _unit_rows(rng, 50, 16).astype(np.float16)
    points = rng.uniform(0, 1, (50, 2)).astype(np.float32)
    candidate = spatial.LocalFeatures(points, descriptors, np.ones(50, np.float32))
    # The query sees 30 of the candidate's features under TRUE_MAP's inverse, plus 20 others.
    seen = rng.permutation(50)[:30]
    inverse = np.linalg.inv(TRUE_MAP)
    query_points = np.concatenate([_apply(inverse, points[seen]), rng.uniform(0, 1, (20, 2))])
    query_descriptors = np.concatenate([descriptors[seen], _unit_rows(rng, 20, 16)])
    query = spatial.LocalFeatures(
        query_points.astype(np.float32), query_descriptors, np.ones(50, np.float32)
    )
    assert spatial.inliers(query, candidate) == 30
    # Scrambled positions: the same matches, but no map explains them.
    scrambled = spatial.LocalFeatures(
        rng.permutation(query.points), query.descriptors, query.scores
    )
    assert spatial.inliers(scrambled, candidate) < spatial.MIN_MATCHES + 3


def test_verified_confidence_by_hand():
    confidence = np.array([0.8, 0.5, 0.9])
    inliers = np.array([0, 12, 4])
    # weight 0.5, saturation 8: factors 0.5, 1.0, 0.75.
    np.testing.assert_allclose(
        spatial.verified_confidence(confidence, inliers, 0.5, 8), [0.4, 0.5, 0.675]
    )
    np.testing.assert_array_equal(
        spatial.verified_confidence(confidence, inliers, 0.0, 8), confidence
    )
    with pytest.raises(ValueError, match="weight must be in"):
        spatial.verified_confidence(confidence, inliers, 1.5, 8)
    with pytest.raises(ValueError, match="saturation must be > 0"):
        spatial.verified_confidence(confidence, inliers, 0.5, 0)


def test_local_features_name_a_wrong_shape():
    with pytest.raises(ValueError, match=r"descriptors must be \[3, d\]"):
        spatial.LocalFeatures(np.zeros((3, 2)), np.zeros((4, 8)), np.zeros(3))
    with pytest.raises(ValueError, match=r"points must be \[n, 2\]"):
        spatial.LocalFeatures(np.zeros((3, 3)), np.zeros((3, 8)), np.zeros(3))
