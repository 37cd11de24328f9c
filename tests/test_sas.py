"""The SAS selection (vlcp's formulation of SAS from its abstract) on hand-made embeddings with known answers."""
from __future__ import annotations

import json

import numpy as np
import pytest

from vlcp.method import sas, sas_pool


def u(*v) -> np.ndarray:
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


E = np.eye(3, dtype=np.float32)  # class anchors: class 0 -> e1, class 1 -> e2, class 2 -> e3
E2 = E[:2]  # two classes: the third axis is nobody's, so it moves candidates apart without changing margins


def test_scores_relevance_and_margin_by_hand():
    emb = np.stack([u(3, 4, 0), u(0, 1, 0)])
    rel, margin = sas.scores(emb, [0, 1], E)
    np.testing.assert_allclose(rel, [0.6, 1.0], atol=1e-6)
    np.testing.assert_allclose(margin, [0.6 - 0.8, 1.0 - 0.0], atol=1e-6)  # best other class: e2 (0.8), e1 (0)
    own = np.stack([u(0, 0, 1), u(1, 1, 0)])  # per-candidate anchors (e.g. the prototype's text)
    rel, margin = sas.scores(emb, [0, 1], E, own_anchors=own)
    np.testing.assert_allclose(rel, [0.0, 1 / np.sqrt(2)], atol=1e-6)
    np.testing.assert_allclose(margin, [0.0 - 0.8, 1 / np.sqrt(2) - 0.0], atol=1e-6)


def test_negative_margin_is_filtered_in_stage_1_even_with_the_highest_relevance():
    # candidate 0 matches its class best (0.7) but class 1 even better (0.71): CLIP would call it class 1
    emb = np.stack([u(0.7, 0.71, 0), u(0.6, 0, 0.8), u(0.5, 0, 0.86), u(0.4, 0.1, 0.9)])
    sel = sas.select(emb, [0, 0, 0, 0], E2, sas.SasParams(ipc=2, keep=1.0))
    assert sel.margin[0] < 0 < min(sel.margin[1:])
    assert sel.relevance[0] == max(sel.relevance)
    assert [sas.VERDICTS[v] for v in sel.stage1] == ["filtered: negative margin", "candidate", "candidate",
                                                     "candidate"]
    assert 0 not in sel.picked[0]
    assert sel.records()[0]["why"] == "filtered: negative margin"


def test_too_few_positive_margins_are_back_filled_by_quality():
    emb = np.stack([u(0.7, 0.71, 0), u(0.6, 0, 0.8), u(0.5, 0.9, 0)])  # only candidate 1 has a positive margin
    sel = sas.select(emb, [0, 0, 0], E2, sas.SasParams(ipc=2, keep=1.0))
    assert [sas.VERDICTS[v] for v in sel.stage1] == ["back-filled", "candidate", "filtered: negative margin"]
    assert sorted(sel.picked[0]) == [0, 1]


def test_stage_1_keeps_the_top_share_by_quality():
    emb = np.stack([u(1, 0, z) for z in (0.1, 0.5, 0.3, 0.9, 0.7, 0.2)])  # relevance falls as z grows
    sel = sas.select(emb, [0] * 6, E2, sas.SasParams(ipc=2, keep=0.5, alpha=1.0))
    assert [sas.VERDICTS[v] for v in sel.stage1] == ["candidate", "filtered: below the kept share", "candidate",
                                                     "filtered: below the kept share",
                                                     "filtered: below the kept share", "candidate"]


# candidates of class 0, all with positive margins; relevance falls with the third coordinate's size
FARTHEST = np.stack([u(1, 0, 0.2), u(1, 0, 0.25), u(1, 0, -0.9), u(1, 0, -0.3), u(1, 0, -0.85)])


def test_stage_2_picks_the_farthest_after_the_first_and_rescoring_after_every_pick():
    sel = sas.select(FARTHEST, [0] * 5, E2, sas.SasParams(ipc=3, keep=1.0, lam=0.0))
    # first: the best quality (0); then the farthest from it (2); then the farthest from {0, 2}: 3, not 4,
    # which is second farthest from 0 but almost a copy of 2 (diversity recomputed after the second pick)
    assert sel.picked[0] == [0, 2, 3]
    np.testing.assert_allclose(sel.diversity[3], 1 - max(FARTHEST[3] @ FARTHEST[0], FARTHEST[3] @ FARTHEST[2]),
                               atol=1e-6)
    assert np.isnan(sel.diversity[0]) and np.isnan(sel.diversity[4])
    assert [int(r) for r in sel.rank[[0, 2, 3]]] == [1, 2, 3]


def test_lambda_one_is_pure_quality():
    sel = sas.select(FARTHEST, [0] * 5, E2, sas.SasParams(ipc=3, keep=1.0, lam=1.0))
    assert sel.picked[0] == [0, 1, 3]


def test_per_prototype_takes_the_best_of_each_prototype_even_one_filtered_in_stage_1():
    # prototype 0: three strong, near-identical candidates; prototype 1: three weaker ones
    emb = np.stack([u(1, 0, 0.1), u(1, 0, 0.11), u(1, 0, 0.12), u(1, 0, 0.6), u(1, 0, 0.5), u(1, 0, 0.7)])
    protos = [0, 0, 0, 1, 1, 1]
    params = dict(ipc=2, keep=0.5, lam=1.0)
    free = sas.select(emb, [0] * 6, E2, sas.SasParams(**params), prototypes=protos)
    assert free.picked[0] == [0, 1]
    strat = sas.select(emb, [0] * 6, E2, sas.SasParams(**params, per_prototype=True), prototypes=protos)
    assert strat.picked[0] == [0, 4]  # 4: the best of prototype 1, all of which fell below the kept share
    assert sas.VERDICTS[strat.stage1[4]] == "prototype coverage"
    assert sas.VERDICTS[strat.stage1[3]] == "filtered: below the kept share"


def test_per_prototype_fills_with_others_when_prototypes_are_fewer_than_ipc():
    emb = np.stack([u(1, 0, 0.1), u(1, 0, 0.11), u(1, 0, 0.9), u(1, 0, 0.6)])
    sel = sas.select(emb, [0] * 4, E2, sas.SasParams(ipc=3, keep=1.0, lam=1.0, per_prototype=True),
                     prototypes=[0, 0, 1, 1])
    assert sel.picked[0] == [0, 3, 1]  # the two representatives first (by quality), then the best remaining


def test_ties_go_to_the_lowest_index():
    emb = np.stack([u(1, 0.2, 0)] * 5)
    for mode in ("sas", "relevance"):
        sel = sas.select(emb, [0] * 5, E2, sas.SasParams(ipc=3, keep=1.0, mode=mode))
        assert sel.picked[0] == [0, 1, 2]
        assert sel.rank.tolist() == [1, 2, 3, 4, 5]


def test_random_mode_is_seeded_per_class():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((40, 3)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = [0] * 20 + [1] * 20
    a = sas.select(emb, labels, E2, sas.SasParams(ipc=5, mode="random", seed=3))
    b = sas.select(emb, labels, E2, sas.SasParams(ipc=5, mode="random", seed=3))
    c = sas.select(emb, labels, E2, sas.SasParams(ipc=5, mode="random", seed=4))
    assert a.picked == b.picked and a.picked != c.picked
    assert all(i < 20 for i in a.picked[0]) and all(i >= 20 for i in a.picked[1])
    alone = sas.select(emb[20:], [1] * 20, E2, sas.SasParams(ipc=5, mode="random", seed=3))
    assert [i + 20 for i in alone.picked[1]] == a.picked[1]  # a class's draw does not depend on the others
    assert len(set(a.picked[0])) == 5


def test_relevance_mode_is_top_ipc_by_relevance():
    emb = np.stack([u(1, 0, z) for z in (0.5, 0.1, 0.9, 0.3)])
    sel = sas.select(emb, [0] * 4, E2, sas.SasParams(ipc=2, mode="relevance"))
    assert sel.picked[0] == [1, 3]
    assert np.isnan(sel.quality).all()


def test_classes_selected_together_equal_each_selected_alone():
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((17, 3)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = np.array([2, 0, 1, 0, 2, 2, 0, 1, 1, 0, 2, 0, 2, 1, 0, 2, 0])  # interleaved, unequal pools
    params = sas.SasParams(ipc=3, keep=0.6)
    together = sas.select(emb, labels, E, params)
    for c in range(3):
        idx = np.nonzero(labels == c)[0]
        alone = sas.select(emb[idx], labels[idx], E, params)
        assert [int(idx[i]) for i in alone.picked[c]] == together.picked[c]
        np.testing.assert_array_equal(alone.rank, together.rank[idx])
        np.testing.assert_array_equal(alone.stage1, together.stage1[idx])


def test_a_pool_smaller_than_ipc_gives_all_it_has():
    sel = sas.select(np.stack([u(1, 0, 0), u(1, 0, 1)]), [0, 0], E2, sas.SasParams(ipc=3))
    assert sorted(sel.picked[0]) == [0, 1]


def test_records_are_json_and_say_why():
    sel = sas.select(FARTHEST, [0] * 5, E2, sas.SasParams(ipc=2, keep=1.0, lam=0.0), prototypes=[0, 0, 1, 1, 1])
    recs = json.loads(json.dumps(sel.records()))
    assert [r["kept"] for r in recs] == [True, False, True, False, False]
    assert recs[0]["why"] == "pick 1: highest quality Q"
    assert recs[2]["why"].startswith("pick 2: best lam*z(Q)+(1-lam)*D")
    assert recs[1]["why"] == "not picked: rank 3 (lower quality or diversity)"
    assert recs[3]["prototype"] == 1 and recs[3]["diversity_at_pick"] is None
    assert sel.params.manifest()["method"].startswith("vlcp's formulation of SAS")


@pytest.mark.parametrize("kw, msg", [(dict(keep=0.0), "--sas-keep"), (dict(alpha=1.5), "--sas-alpha"),
                                     (dict(lam=-0.1), "--sas-lambda"), (dict(mode="best"), "--select")])
def test_bad_parameters(kw, msg):
    with pytest.raises(sas.SasError, match=msg):
        sas.select(FARTHEST, [0] * 5, E2, sas.SasParams(ipc=2, **kw))


def test_per_prototype_needs_prototypes_and_shapes_must_fit():
    with pytest.raises(sas.SasError, match="prototype"):
        sas.select(FARTHEST, [0] * 5, E2, sas.SasParams(ipc=2, per_prototype=True))
    with pytest.raises(sas.SasError, match="shapes"):
        sas.select(FARTHEST, [0] * 4, E2, sas.SasParams(ipc=2))
    with pytest.raises(sas.SasError, match="labels must index the 2 class anchors, got 0..2"):
        sas.select(FARTHEST, [0, 0, 0, 0, 2], E2, sas.SasParams(ipc=2))


def test_a_single_class_has_no_rival_so_nothing_is_gated():
    rel, margin = sas.scores(FARTHEST, [0] * 5, E[:1])
    np.testing.assert_allclose(margin, rel + 1, atol=1e-6)
    sel = sas.select(FARTHEST, [0] * 5, E[:1], sas.SasParams(ipc=2, keep=1.0))
    assert all(sas.VERDICTS[v] == "candidate" for v in sel.stage1)


def test_centroids_are_unit_class_means():
    emb = np.stack([u(1, 0, 0), u(0, 1, 0), u(0, 0, 1), u(0, 0, 1)])
    np.testing.assert_allclose(sas_pool.centroids(emb, [0, 0, 1, 1], 2), [u(1, 1, 0), u(0, 0, 1)], atol=1e-6)
    with pytest.raises(sas.SasError, match=r"empty: \[2\]"):
        sas_pool.centroids(emb, [0, 0, 1, 1], 3)


def test_next_ranked_replacement_stays_in_the_prototype_and_follows_the_rank():
    emb = np.stack([u(1, 0, 0.1), u(1, 0, 0.2), u(1, 0, 0.3), u(1, 0, 0.15), u(1, 0, 0.9)])
    sel = sas.select(emb, [0] * 5, E2, sas.SasParams(ipc=2, keep=1.0, lam=1.0, per_prototype=True),
                     prototypes=[0, 0, 0, 1, 1])
    assert sel.picked[0] == [0, 3]
    assert sas_pool.next_ranked(sel, 0) == 1  # prototype 0's next best by quality
    assert sas_pool.next_ranked(sel, 0, taken=[1]) == 2
    assert sas_pool.next_ranked(sel, 3) == 4
    assert sas_pool.next_ranked(sel, 3, taken=[4]) is None


# -- vlcp's additions: foreground filter and caption match in stage 1 --------------------------------
def test_a_candidate_under_min_foreground_is_filtered_in_stage_1_even_with_the_best_quality():
    emb = np.stack([u(1, 0, 0.1), u(1, 0, 0.5), u(1, 0, 0.3), u(1, 0, 0.9)])  # all positive margins
    fg = [0.05, 0.5, 0.4, 0.3]
    sel = sas.select(emb, [0] * 4, E2, sas.SasParams(ipc=2, keep=1.0, lam=1.0, min_foreground=0.1), foreground=fg)
    assert sel.quality[0] == max(sel.quality)  # the most relevant, but without the object
    assert [sas.VERDICTS[v] for v in sel.stage1] == ["filtered: foreground under --min-foreground", "candidate",
                                                     "candidate", "candidate"]
    assert sel.picked[0] == [2, 1]  # lam = 1: by quality among the rest
    recs = sel.records()
    assert recs[0]["why"] == "filtered: foreground under --min-foreground" and recs[0]["foreground"] == 0.05
    plain = sas.select(emb, [0] * 4, E2, sas.SasParams(ipc=2, keep=1.0, lam=1.0), foreground=fg)
    assert plain.picked[0] == [0, 2] and plain.records()[3]["foreground"] == 0.3  # recorded, not applied


def test_back_fill_takes_candidates_with_foreground_before_those_without():
    # 0: negative margin, enough foreground; 1: the best quality but no foreground; 2: passes both
    emb = np.stack([u(0.7, 0.71, 0), u(1, 0, 0), u(0.6, 0, 0.8)])
    fg = [0.5, 0.0, 0.5]
    two = sas.select(emb, [0] * 3, E2, sas.SasParams(ipc=2, keep=1.0, min_foreground=0.1), foreground=fg)
    assert [sas.VERDICTS[v] for v in two.stage1] == ["back-filled", "filtered: foreground under --min-foreground",
                                                     "candidate"]
    assert sorted(two.picked[0]) == [0, 2]
    three = sas.select(emb, [0] * 3, E2, sas.SasParams(ipc=3, keep=1.0, min_foreground=0.1), foreground=fg)
    assert [sas.VERDICTS[v] for v in three.stage1] == ["back-filled", "back-filled", "candidate"]


def test_caption_weight_adds_w_times_z_of_the_caption_match_to_quality():
    emb = np.stack([u(1, 0, z) for z in (0.1, 0.5, 1.0)])  # no rival similarity: S = R
    m = np.array([0.0, 0.5, 1.0])
    r = 1 / np.sqrt(1 + np.array([0.1, 0.5, 1.0]) ** 2)
    zr = (r - r.mean()) / r.std()  # by hand: z(R) = z(S) = [1.0855, 0.2422, -1.3278]
    zm = (m - m.mean()) / m.std()  # [-1.2247, 0, 1.2247]
    np.testing.assert_allclose(zr, [1.0855, 0.2422, -1.3278], atol=1e-4)
    for w, order in ((0.0, [0, 1]), (0.5, [0, 1]), (1.0, [1, 2])):
        sel = sas.select(emb, [0] * 3, E2, sas.SasParams(ipc=2, keep=1.0, lam=1.0, caption_weight=w),
                         caption_match=m)
        np.testing.assert_allclose(sel.quality, zr + w * zm, atol=1e-5)  # alpha z(R) + (1 - alpha) z(S) + W z(M)
        assert sel.picked[0] == order
        np.testing.assert_allclose([rec["caption_match"] for rec in sel.records()], m)
    # W = 1: Q = [-0.139, 0.242, -0.103], so 1 then 2, where W = 0 ranks 0, 1, 2


def test_caption_weight_and_min_foreground_need_their_scores_and_ranges():
    emb = np.stack([u(1, 0, 0.1), u(1, 0, 0.5)])
    with pytest.raises(sas.SasError, match="caption match"):
        sas.select(emb, [0, 0], E2, sas.SasParams(ipc=1, caption_weight=0.5))
    with pytest.raises(sas.SasError, match="foreground"):
        sas.select(emb, [0, 0], E2, sas.SasParams(ipc=1, min_foreground=0.5))
    with pytest.raises(sas.SasError, match="--sas-caption-weight"):
        sas.select(emb, [0, 0], E2, sas.SasParams(ipc=1, caption_weight=1.5), caption_match=[0.1, 0.2])
    with pytest.raises(sas.SasError, match="shape"):
        sas.select(emb, [0, 0], E2, sas.SasParams(ipc=1, caption_weight=0.5), caption_match=[0.1])


# -- replacements from the pool (SAS then refinement) ------------------------------------------------
def _ranks() -> sas_pool.PoolRanks:
    # class 0: prototype 0 has candidates 0-3 (0 and 1 picked), prototype 1 has 4-5 (4 picked); class 1: 6-7
    return sas_pool.PoolRanks(labels=np.array([0, 0, 0, 0, 0, 0, 1, 1]), prototypes=np.array([0, 0, 0, 0, 1, 1, 0, 0]),
                         rank=np.array([1, 2, 5, 4, 3, 6, 1, 2]),
                         kept=np.array([True, True, False, False, True, False, True, False]))


def test_pool_walk_follows_the_rank_uses_no_candidate_twice_and_falls_back_when_used_up():
    walk = sas_pool.pool_walk(_ranks(), [0, 1, 4], bad={3})
    # pick 0: prototype 0's unpicked by rank: 3 (rank 4, defective), then 2 (rank 5) replaces it
    assert walk[0] == (2, [3, 2])
    # pick 1, same prototype: 2 is used, 3 was defective: nothing left, so it gets generated candidates
    assert walk[1] == (None, [])
    # pick 4: prototype 1 of class 0 only (candidate 7 of class 1's prototype 0 is never reached)
    assert walk[2] == (5, [5])
    assert sas_pool.pool_walk(_ranks(), [1, 0], bad=set()) == [(3, [3]), (2, [2])]  # order of the picks decides
    assert sas_pool.pool_walk(_ranks(), [6], bad={7}) == [(None, [7])]


def test_pool_ranks_from_manifest_records_walk_like_next_ranked():
    emb = np.stack([u(1, 0, 0.1), u(1, 0, 0.2), u(1, 0, 0.3), u(1, 0, 0.15), u(1, 0, 0.9)])
    sel = sas.select(emb, [0] * 5, E2, sas.SasParams(ipc=2, keep=1.0, lam=1.0, per_prototype=True),
                     prototypes=[0, 0, 0, 1, 1])
    pr = sas_pool.PoolRanks.of_records(json.loads(json.dumps(sel.records())))
    np.testing.assert_array_equal(pr.rank, sel.rank)
    assert pr.reachable(0) == [1, 2] and pr.reachable(3) == [4]
    assert sas_pool.pool_walk(pr, [0, 3], bad={1}) == [(sas_pool.next_ranked(sel, 0, taken=[1]), [1, 2]), (4, [4])]
