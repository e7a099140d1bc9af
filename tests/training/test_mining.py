"""Pair mining on hand-built descriptors: each pair type's rule, edge cases, reproducibility."""

import numpy as np
import pytest

from tfmet.training.contrastive import mining
from tfmet.training.contrastive.mining import (
    NEGATIVE,
    REAL_POSITIVE,
    SYNTHETIC,
    closest_positives,
    exact_search,
    hard_negatives,
    make_pairs,
    random_positives,
)


def circle(angles_degrees):
    """Unit 2-D descriptors at the given angles: similarity falls with the angle difference."""
    a = np.radians(np.asarray(angles_degrees, np.float64))
    return np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32)


def draws(function, trials=200, **kwargs):
    """partner of each row over `trials` seeds -> list of sets."""
    seen = None
    for seed in range(trials):
        anchors, partners = function(rng=np.random.default_rng(seed), **kwargs)
        if seen is None:
            seen = [set() for _ in anchors]
        for i, p in enumerate(partners):
            seen[i].add(int(p))
    return anchors, seen


def test_class_members():
    order, start, size = mining.class_members(np.array([5, 3, 5, 9, 3, 5]))
    assert size.tolist() == [3, 2, 3, 1, 2, 3]
    members = [sorted(order[start[i] : start[i] + size[i]].tolist()) for i in range(6)]
    assert members[0] == [0, 2, 5] and members[1] == [1, 4] and members[3] == [3]


def test_random_positives_stay_in_class_and_cover_it():
    labels = np.array([7, 7, 7, 2, 4, 4])
    anchors, seen = draws(random_positives, labels=labels)
    assert anchors.tolist() == [0, 1, 2, 3, 4, 5]
    assert seen[0] == {0, 1, 2} and seen[1] == {0, 1, 2}  # itself included, uniformly
    assert seen[3] == {3}  # singleton: augmented self
    assert seen[4] == {4, 5}


def test_closest_positives_pick_among_the_two_most_similar():
    # Class 1: rows 0, 1, 2, 4 at 0, 10, 50, 85 degrees; class 2 is a singleton (row 3).
    descriptors = circle([0, 10, 50, 120, 85])
    labels = np.array([1, 1, 1, 2, 1])
    anchors, seen = draws(closest_positives, descriptors=descriptors, labels=labels)
    assert anchors.tolist() == [0, 1, 2, 3, 4]
    assert seen[0] == {0, 1}  # itself (sim 1) or the row at 10 degrees
    assert seen[1] == {1, 0}
    assert seen[2] == {2, 4}  # 85 degrees is 35 away, 10 degrees 40 away
    assert seen[3] == {3}
    assert seen[4] == {4, 2}


def test_closest_positive_ties_go_to_the_lower_row():
    # Rows 1, 2, 3 are the same descriptor: for row 0 they tie, and the lowest (1) is taken;
    # for row 3 all three tie at similarity 1, so its top 2 are rows 1 and 2, not itself.
    descriptors = circle([0, 20, 20, 20])
    labels = np.zeros(4, np.int64)
    _, seen = draws(closest_positives, descriptors=descriptors, labels=labels)
    assert seen[0] == {0, 1}
    assert seen[3] == {1, 2}


def test_hard_negatives_are_among_the_ten_nearest_other_class_images():
    # Row 0 is the anchor at 0 degrees; rows 1..30 at 1..30 degrees. Rows 1, 3, 5 share the
    # anchor's class and are skipped: the 10 nearest negatives are rows 2, 4, 6, 7, ..., 13.
    descriptors = circle(np.arange(31))
    labels = np.arange(100, 131)
    labels[[1, 3, 5]] = 100
    anchors, seen = draws(
        hard_negatives, trials=300, descriptors=descriptors, labels=labels, search=exact_search
    )
    assert anchors[0] == 0
    assert seen[0] == {2, 4, 6, 7, 8, 9, 10, 11, 12, 13}


def test_hard_negatives_with_few_or_no_candidates_in_the_top_k():
    # 30 images of class 0 around 0 degrees, then 3 of class 1 far away (90+ degrees).
    angles = np.concatenate([np.linspace(0, 5, 30), [90, 95, 100]])
    labels = np.array([0] * 30 + [1] * 3)
    descriptors = circle(angles)
    anchors, seen = draws(
        hard_negatives, trials=100, descriptors=descriptors, labels=labels, search=exact_search
    )
    # Class-0 rows have no negative in their top 25: the nearest class-1 image (90 degrees).
    assert all(seen[i] == {30} for i in range(30))
    # Class-1 rows: the top 25 of all 33 rows hold the 3 class-1 rows and 22 class-0 ones; the
    # 10 nearest class-0 images are the 10 with the largest angles.
    assert seen[30] == set(range(20, 30))
    # With top_k=12, row 30's top 12 holds only 9 class-0 images: the pick is among those.
    _, seen_small = draws(
        hard_negatives,
        trials=100,
        descriptors=descriptors,
        labels=labels,
        top_k=12,
        search=exact_search,
    )
    assert seen_small[30] == set(range(21, 30))


def test_invalid_rows_are_never_used():
    descriptors = circle([0, 5, 10, 15, 20, 25])
    labels = np.array([0, 0, 1, 1, 2, 2])
    valid = np.array([True, False, True, True, True, True])
    for pair_type in mining.PAIR_TYPES:
        pairs = make_pairs(
            pair_type,
            labels,
            np.random.default_rng(0),
            descriptors=descriptors,
            valid=valid,
            search=exact_search,
        )
        assert 1 not in pairs.first and 1 not in pairs.second
        assert len(pairs) == (5 if pair_type == "sim_siam_pos" else 10)


@pytest.mark.parametrize("pair_type", mining.PAIR_TYPES)
def test_make_pairs_rules(pair_type):
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(8), 3)[:22]  # classes of 3, the last of 1
    descriptors = rng.normal(size=(22, 8)).astype(np.float32)
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    pairs = make_pairs(
        pair_type, labels, np.random.default_rng(5), descriptors=descriptors, search=exact_search
    )
    n = labels.size
    positives = pairs.label == 1
    assert np.array_equal(pairs.first[:n], np.arange(n))  # positives first, one per anchor
    assert positives[:n].all() and not positives[n:].any()
    assert np.all(labels[pairs.first[positives]] == labels[pairs.second[positives]])
    assert np.all(labels[pairs.first[~positives]] != labels[pairs.second[~positives]])
    same = pairs.first == pairs.second
    assert np.array_equal(pairs.kind == SYNTHETIC, same & positives)
    assert np.array_equal(pairs.kind == REAL_POSITIVE, ~same & positives)
    assert np.array_equal(pairs.kind == NEGATIVE, ~positives)
    if pair_type == "sim_siam_pos":
        assert len(pairs) == n and same.all()
    else:
        assert len(pairs) == 2 * n and np.array_equal(pairs.first[n:], np.arange(n))
    if pair_type == "sim_siam_pos+new_neg":
        assert same[:n].all()
    if pair_type == "new_pos+new_neg":
        # The positive is the anchor or its most similar class mate.
        for i in range(n):
            mates = np.flatnonzero(labels == labels[i])
            sims = descriptors[mates] @ descriptors[i]
            top2 = set(mates[np.argsort(-sims, kind="stable")[:2]].tolist())
            assert int(pairs.second[i]) in top2
    assert pairs.second[21] == 21  # the singleton (class 7) pairs with itself
    # Same generator state, same pairs; shuffling permutes them.
    again = make_pairs(
        pair_type, labels, np.random.default_rng(5), descriptors=descriptors, search=exact_search
    )
    assert np.array_equal(pairs.second, again.second)
    shuffled = pairs.shuffled(np.random.default_rng(0))
    as_set = lambda p: sorted(zip(p.first.tolist(), p.second.tolist(), strict=True))
    assert as_set(shuffled) == as_set(pairs)
    assert pairs.statistics()["pairs"] == len(pairs)


def test_mining_is_random_but_seeded():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 40, 400)
    descriptors = rng.normal(size=(400, 16)).astype(np.float32)
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    a = make_pairs(
        "new_pos+new_neg", labels, np.random.default_rng(1), descriptors, search=exact_search
    )
    b = make_pairs(
        "new_pos+new_neg", labels, np.random.default_rng(2), descriptors, search=exact_search
    )
    assert not np.array_equal(a.second, b.second)


def test_errors():
    labels = np.array([0, 0, 1])
    with pytest.raises(ValueError, match="pair_type"):
        make_pairs("pos", labels, np.random.default_rng(0))
    with pytest.raises(ValueError, match="descriptors"):
        make_pairs("pos+new_neg", labels, np.random.default_rng(0))
    with pytest.raises(ValueError, match="shape"):
        hard_negatives(np.zeros((2, 4)), labels, np.random.default_rng(0), search=exact_search)
    with pytest.raises(ValueError, match="two classes"):
        hard_negatives(circle([0, 1]), [3, 3], np.random.default_rng(0), search=exact_search)
    with pytest.raises(ValueError, match="NaN"):
        closest_positives(np.full((3, 2), np.nan), labels, np.random.default_rng(0))


@pytest.mark.parametrize("backend", ["exact", "scann"])
def test_knn_search_agrees_with_numpy(backend):
    rng = np.random.default_rng(4)
    descriptors = rng.normal(size=(300, 16)).astype(np.float32)
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    sims, idx = mining.knn_search(descriptors, descriptors[:50], 25, backend=backend)
    expected_sims, expected_idx = exact_search(descriptors, descriptors[:50], 25)
    np.testing.assert_allclose(sims, expected_sims, rtol=1e-5, atol=1e-5)
    assert np.mean(idx == expected_idx) > 0.99


def test_unknown_search_backends_are_refused_by_name():
    from tfmet.training.contrastive.config import check_config, default_config

    with pytest.raises(ValueError, match="unknown search backend 'faiss'.*'exact', 'scann'"):
        mining.knn_search(np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32), 2, "faiss")
    config = default_config().to_dict()
    for key, changed in (
        ("mining.backend", config | {"mining": config["mining"] | {"backend": "faiss"}}),
        ("knn_backend", config | {"knn_backend": "faiss"}),
    ):
        message = f"config `{key}` must be one of 'exact', 'scann'. Received: 'faiss'"
        with pytest.raises(ValueError, match=message):
            check_config(changed)
    assert check_config(config)["mining"]["backend"] == "scann"
