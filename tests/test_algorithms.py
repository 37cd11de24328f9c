"""Exact results of the method's algorithms on hand-made inputs (LOF, K-Means, Algorithm 2)."""
import numpy as np
import pytest

from vlcp.method import clusters, outliers
from vlcp.method.text_prototypes import class_prototypes, words

# Ten captions of the class "red fox"; class frequencies worked out by hand (n = 10):
# fox 9, snow 5, grass 5, sitting 4, tree 3, running 3, bushy 2, tail 2, standing/tall/jumping/animal/red 1.
CAPTIONS = [
    "red fox sitting in snow, bushy tail",      # 0
    "fox sitting in snow",                      # 1
    "fox standing in snow, tree",               # 2
    "fox running in grass",                     # 3
    "fox running in tall grass, bushy tail",    # 4
    "fox jumping in grass",                     # 5
    "animal sitting in snow",                   # 6
    "fox in grass, tree",                       # 7
    "fox sitting in snow, tree",                # 8
    "fox running in grass",                     # 9
]
SNOWY = [1, 0, 2, 6, 8]  # cluster A, closest to the centre first
GRASSY = [9, 3, 4, 5, 7]  # cluster B


def test_words_are_lowercase_alphabetic_runs():
    assert words("The Saluki's 2 long-legs, X") == ["the", "saluki", "long", "legs"]


def test_algorithm2_top2_ties_go_to_closest_member():
    a, b = class_prototypes(CAPTIONS, [SNOWY, GRASSY], "red fox", beta=0.5, top_k=2)
    # fox: 9/10 > 0.5 and a class-name word; red: class-name word. snow and grass: 5/10 is not > 0.5.
    assert a["non_representative"] == ["fox", "red"]
    assert a["representative_words"] == {"snow": 5, "sitting": 4}
    # captions 1, 0, 6 and 8 all score 5 + 4 = 9: caption 1 is closest to the centre
    assert (a["caption"], a["score"], a["fallback"]) == ("fox sitting in snow", 9.0, False)
    assert b["representative_words"] == {"grass": 5, "running": 3}
    assert (b["caption"], b["score"]) == ("fox running in grass", 8.0)
    assert b["member"] == 9  # captions 9, 3 and 4 tie at 8: 9 is closest


def test_algorithm2_larger_k_changes_the_prototype():
    a, b = class_prototypes(CAPTIONS, [SNOWY, GRASSY], "red fox", beta=0.5, top_k=3)
    assert a["representative_words"] == {"snow": 5, "sitting": 4, "tree": 2}
    assert (a["caption"], a["score"]) == ("fox sitting in snow, tree", 11.0)
    # five words tie at frequency 1 for the third place: alphabetical order picks "bushy"
    assert b["representative_words"] == {"grass": 5, "running": 3, "bushy": 1}
    assert (b["caption"], b["score"]) == ("fox running in tall grass, bushy tail", 9.0)


def test_algorithm2_lower_beta_excludes_more_words():
    a, _ = class_prototypes(CAPTIONS, [SNOWY, GRASSY], "red fox", beta=0.4, top_k=2)
    # snow and grass (5/10) now exceed beta; sitting (4/10) does not
    assert a["non_representative"] == ["fox", "grass", "red", "snow"]
    assert a["representative_words"] == {"sitting": 4, "tree": 2}
    assert a["caption"] == "fox sitting in snow, tree"


def test_algorithm2_words_match_whole_words_and_count_once_per_caption():
    caps = ["snow snow snow", "snowy hill", "snow field"]
    (r,) = class_prototypes(caps, [[1, 0, 2]], "dog", beta=1.0, top_k=1)
    assert r["representative_words"] == {"snow": 2}  # captions containing it, not occurrences
    assert r["caption"] == "snow snow snow" and r["score"] == 2.0  # "snowy" does not match "snow"


def test_algorithm2_falls_back_to_closest_member_never_empty():
    (r,) = class_prototypes(["fox", "red fox", "the"], [[1, 0, 2]], "red fox", beta=0.9, top_k=5)
    assert r["representative_words"] == {}
    assert (r["caption"], r["fallback"], r["member"]) == ("red fox", True, 1)
    (r,) = class_prototypes(["", "..."], [[1, 0]], "cat", beta=0.5, top_k=5)  # no words at all
    assert (r["caption"], r["fallback"]) == ("...", True)


def test_lof_finds_two_planted_outliers():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 0.1, size=(20, 4))
    x = np.insert(x, 5, [8, 8, 8, 8], axis=0)
    x = np.insert(x, 12, [-6, 5, -6, 5], axis=0)
    mask, restored = outliers.inlier_mask(x, contamination=0.09)  # 2 of 22
    assert np.flatnonzero(~mask).tolist() == [5, 12] and restored == 0


def test_lof_keeps_enough_inliers_for_ipc_restoring_least_outlying():
    rng = np.random.default_rng(0)
    x = np.vstack([rng.normal(0, 0.1, size=(20, 4)), [[3, 3, 3, 3]], [[9, 9, 9, 9]]])
    mask, restored = outliers.inlier_mask(x, contamination=0.09, min_keep=21)
    assert restored == 1 and mask.sum() == 21
    assert mask[20] and not mask[21]  # the nearer outlier comes back first


# four outliers at distances 1.5, 3, 6 and 12 from a tight blob of 20 (rows 20-23, nearest first)
RING = np.vstack([np.random.default_rng(0).normal(0, 0.1, size=(20, 2)), [[1.5, 0], [0, 3], [-6, 0], [0, -12]]])


@pytest.mark.parametrize("min_keep, removed", [
    (0, [20, 21, 22, 23]), (20, [20, 21, 22, 23]), (21, [21, 22, 23]), (22, [22, 23]), (23, [23]), (24, []), (99, [])])
def test_lof_keeps_at_least_min_keep_restoring_the_nearest_outliers_first(min_keep, removed):
    mask, restored = outliers.inlier_mask(RING, contamination=4 / 24, min_keep=min_keep)
    assert np.flatnonzero(~mask).tolist() == removed
    assert restored == 4 - len(removed) and mask.sum() == 24 - len(removed) >= min(min_keep, 24)


def test_lof_uses_ten_neighbours_or_all_other_points():
    from sklearn.neighbors import LocalOutlierFactor

    x = np.vstack([RING, RING[:20] + [30, 0]])  # two blobs of 20: the outliers relative to 10 neighbours
    for rows in (x, x[:8]):
        expected = LocalOutlierFactor(n_neighbors=min(10, len(rows) - 1), contamination=0.1).fit_predict(rows) == 1
        mask, _ = outliers.inlier_mask(rows.reshape(len(rows), 1, 2), contamination=0.1)
        assert np.array_equal(mask, expected)


def test_lof_zero_contamination_skips():
    mask, restored = outliers.inlier_mask(np.arange(30.0).reshape(10, 3), 0.0)
    assert mask.all() and restored == 0


def test_kmeans_separates_blobs_and_orders_members_by_distance():
    rng = np.random.default_rng(1)
    centres = np.array([[0, 0], [10, 0], [0, 10]], float)
    x = np.vstack([c + rng.normal(0, 0.3, size=(6, 2)) for c in centres]).reshape(18, 1, 2)
    got, labels, dup = clusters.kmeans(x, 3, seed=0)
    assert not dup and got.shape == (3, 1, 2)
    for blob in range(3):
        assert len(set(labels[blob * 6:(blob + 1) * 6])) == 1
    assert len(set(labels)) == 3
    members = clusters.members_by_distance(x, got, labels)
    for c, m in enumerate(members):
        d = [np.linalg.norm(x[i].ravel() - got[c].ravel()) for i in m]
        assert d == sorted(d) and len(m) == 6
    again, labels2, _ = clusters.kmeans(x, 3, seed=0)
    assert np.array_equal(labels, labels2) and np.array_equal(got, again)


CIRCLE = np.stack([np.cos(np.arange(12) * np.pi / 6), np.sin(np.arange(12) * np.pi / 6)], 1).reshape(12, 1, 2)


def _centre_set(c):
    return sorted(map(tuple, np.round(c.reshape(len(c), -1), 5).tolist()))


def test_kmeans_follows_the_seed():
    """Twelve points on a circle: splitting them into 3 arcs of 4 has 4 equally good rotations."""
    from sklearn.cluster import KMeans

    seen = set()
    for seed in range(8):  # 4 seeds found one rotation with another scikit-learn build (a GPU machine's image)
        got, labels, dup = clusters.kmeans(CIRCLE, 3, seed=seed)
        ref = KMeans(n_clusters=3, random_state=seed, n_init=10).fit(CIRCLE.reshape(12, 2))
        assert np.allclose(got.reshape(3, 2), ref.cluster_centers_, atol=1e-6) and labels.tolist() == ref.labels_.tolist()
        assert sorted(np.bincount(labels).tolist()) == [4, 4, 4] and not dup
        seen.add(tuple(_centre_set(got)))
    assert len(seen) >= 2  # two seeds give different centres


def test_kmeans_too_few_images():
    x = np.zeros((2, 3))
    with pytest.raises(clusters.TooFewImages):
        clusters.kmeans(x, 3, seed=0)
    c, labels, dup = clusters.kmeans(np.array([[1.0], [2.0]]), 3, seed=0, allow_duplicates=True)
    assert dup and c.ravel().tolist() == [1.0, 2.0, 1.0]
