"""Tests written to kill surviving mutants (benchmarks/mutation.py): exact outputs on hand-made inputs."""
import warnings

import numpy as np
import pytest

from vlcp.method import clusters, outliers
from vlcp.method.text_prototypes import class_prototypes

# -- text_prototypes ----------------------------------------------------------------------------------


def test_empty_cluster_gets_an_empty_record_and_later_clusters_still_count():
    caps = ["fox in snow", "fox on grass"]
    empty, b = class_prototypes(caps, [[], [1]], "fox", beta=1.0, top_k=1)
    assert empty == {"caption": "", "member": None, "score": 0.0, "fallback": True, "representative_words": {},
                     "non_representative": ["fox"]}
    assert (b["caption"], b["member"], b["score"], b["representative_words"]) == ("fox on grass", 1, 1.0, {"grass": 1})


def test_captions_without_words_give_fallback_records():
    (r,) = class_prototypes(["42", "!!"], [[1, 0]], "cat", beta=0.5, top_k=3)
    assert r == {"caption": "!!", "member": 1, "score": 0.0, "fallback": True, "representative_words": {},
                 "non_representative": []}


def test_a_score_of_one_still_picks_the_best_member_not_the_closest():
    (r,) = class_prototypes(["dog", "dog on grass"], [[0, 1]], "dog", beta=1.0, top_k=1)
    assert (r["caption"], r["member"], r["score"], r["fallback"]) == ("dog on grass", 1, 1.0, False)


def test_tokens_are_lowercased_letters_only():
    caps = ["Snow 42 field", "snow 42", "B52 tree"]
    (r,) = class_prototypes(caps, [[0, 1, 2]], "dog", beta=1.0, top_k=3)
    # "Snow" counts as snow (not "now"); "42" and "b52" are no words
    assert r["representative_words"] == {"snow": 2, "field": 1, "tree": 1}


def test_caption_clean_up_deletes_quotes_and_possessives_by_default():
    from vlcp.method.text_prototypes import clean_caption

    assert clean_caption('the "red" fox\'s tail\'s tip') == "the red fox tail tip"
    (r,) = class_prototypes(['a "fox\'s" tail', "tail"], [[0, 1]], "dog", beta=1.0, top_k=1)
    assert r["caption"] == "a fox tail"  # returned cleaned
    (r,) = class_prototypes(['a "fox\'s" tail', "tail"], [[0, 1]], "dog", beta=1.0, top_k=1, clean_captions=False)
    assert r["caption"] == 'a "fox\'s" tail'


# -- outliers -----------------------------------------------------------------------------------------


def test_lof_runs_from_three_images():
    mask, _ = outliers.inlier_mask(np.array([[0.0], [0.1], [10.0]]), contamination=0.34)
    assert (~mask).sum() == 1  # LOF ran (with 2 neighbours); two images are kept as they are
    assert outliers.inlier_mask(np.array([[0.0], [10.0]]), contamination=0.5)[0].tolist() == [True, True]


def test_lof_skipped_mask_is_boolean():
    for x, c in ((np.zeros((10, 2)), 0.0), (np.zeros((2, 2)), 0.3)):
        mask, restored = outliers.inlier_mask(x, c)
        assert mask.dtype == bool and mask.tolist() == [True] * len(x) and restored == 0


def test_lof_on_a_small_class_warns_nothing():
    x = np.array([[0.0, 0], [0.1, 0], [0, 0.1], [0.1, 0.1], [0.05, 0.05], [5, 5]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. sklearn's "n_neighbors is greater than the number of samples"
        mask, _ = outliers.inlier_mask(x, contamination=0.2)
    assert (~mask).sum() == 1  # 20 % of 6 rows


def test_lof_equal_scores_restore_the_earlier_row_first():
    blob = np.random.default_rng(0).normal(0, 0.1, (30, 2))
    x = np.vstack([np.insert(blob, 21, [[3, 3], [3, 3]], axis=0), [[-9, 9]]])  # rows 21, 22 identical
    mask, restored = outliers.inlier_mask(x, contamination=0.09)
    assert np.flatnonzero(~mask).tolist() == [21, 22, 32] and restored == 0
    mask, restored = outliers.inlier_mask(x, contamination=0.09, min_keep=31)
    assert np.flatnonzero(~mask).tolist() == [22, 32] and restored == 1


# -- clusters -----------------------------------------------------------------------------------------


def test_kmeans_with_exactly_k_images_clusters_them():
    x = np.array([[0.0, 0], [5, 5], [9, 0]], np.float32)
    c, labels, dup = clusters.kmeans(x, 3, seed=0)
    assert not dup and sorted(map(tuple, c.tolist())) == [(0, 0), (5, 5), (9, 0)] and c.dtype == np.float32
    assert sorted(labels.tolist()) == [0, 1, 2]


def test_kmeans_too_few_images_message_and_duplicate_dtype():
    with pytest.raises(clusters.TooFewImages, match="^2 images for 3 prototypes$"):
        clusters.kmeans(np.zeros((2, 3)), 3, seed=0)
    c, _, _ = clusters.kmeans(np.array([[1.0], [2.0]]), 3, seed=0, allow_duplicates=True)
    assert c.dtype == np.float32


def test_kmeans_runs_in_float64_with_ten_inits():
    """Exactly sklearn's result on float64 data with n_init=10 (seed 8 is one where 11 inits differ)."""
    from sklearn.cluster import KMeans

    x = np.random.default_rng(0).normal(size=(40, 2)).astype(np.float32)
    got, labels, _ = clusters.kmeans(x.reshape(40, 1, 2), 6, seed=8)
    ref = KMeans(6, random_state=8, n_init=10).fit(x.astype(np.float64))
    assert got.dtype == np.float32 and labels.dtype == np.int64
    assert np.array_equal(got.reshape(6, 2), ref.cluster_centers_.astype(np.float32))
    assert labels.tolist() == ref.labels_.tolist()


def test_members_with_equal_distances_keep_row_order():
    x = np.array([[1.0, 0.0] if i % 2 == 0 else [0.0, 2.0] for i in range(40)]).reshape(40, 1, 2)
    (members,) = clusters.members_by_distance(x, np.zeros((1, 1, 2)), np.zeros(40, int))
    assert members == list(range(0, 40, 2)) + list(range(1, 40, 2))


def test_lof_per_class_masks_and_counts():
    x = np.vstack([np.random.default_rng(0).normal(0, 0.1, (20, 2)), [[1.5, 0], [0, 3], [-6, 0], [0, -12]]])
    meta, tensors = outliers.per_class({"a": x, "b": x[:2]}, contamination=4 / 24, min_keep=22)
    assert meta == {"a": {"images": 24, "removed": 2, "restored": 2}, "b": {"images": 2, "removed": 0, "restored": 0}}
    assert tensors["mask/a"].dtype == np.uint8 and np.flatnonzero(tensors["mask/a"] == 0).tolist() == [22, 23]
    assert tensors["mask/b"].tolist() == [1, 1]


def test_lof_per_class_takes_a_generator_of_classes():
    x = np.vstack([np.random.default_rng(0).normal(0, 0.1, (20, 2)), [[1.5, 0], [0, 3], [-6, 0], [0, -12]]])
    meta, tensors = outliers.per_class(((c, v) for c, v in (("b", x[:2]), ("a", x))), 4 / 24, min_keep=1)
    assert meta == {"b": {"images": 2, "removed": 0, "restored": 0}, "a": {"images": 24, "removed": 4, "restored": 0}}
    assert list(tensors) == ["mask/b", "mask/a"]
    assert np.flatnonzero(tensors["mask/a"] == 0).tolist() == [20, 21, 22, 23]


def test_class_clusters_maps_members_to_dataset_rows():
    x = np.array([[0.0], [0.25], [10.0], [10.1], [0.1], [10.5]])  # centres 0.1167 and 10.2
    rows = [7, 3, 9, 4, 5, 8]
    centres, members, dup = clusters.class_clusters(x, rows, 2, seed=0, allow_duplicates=False)
    assert not dup and sorted(members) == [[4, 9, 8], [5, 7, 3]]  # closest to the centre first
    circle = np.stack([np.cos(np.arange(12) * np.pi / 6), np.sin(np.arange(12) * np.pi / 6)], 1)
    for seed in range(4):  # the seed reaches K-Means: these 12 points have 4 equally good 3-splits
        got, _, _ = clusters.class_clusters(circle, list(range(12)), 3, seed=seed, allow_duplicates=False)
        assert np.array_equal(got, clusters.kmeans(circle, 3, seed=seed)[0])
    centres, members, dup = clusters.class_clusters(x[:2], rows[:2], 3, seed=0, allow_duplicates=True)
    assert dup and members == [[7], [3], [7]] and centres.ravel().tolist() == [0.0, 0.25, 0.0]


# -- evaluation protocol: learning-rate schedules (values written out by hand) -------------------------


def _proto(schedule: str, epochs: int):
    from vlcp.evaluation.protocols import Protocol

    return Protocol(name="t", model="convnet3", epochs=epochs, batch_size=8, schedule=schedule)


def test_multistep_per_epoch_drops_at_two_thirds_and_five_sixths():
    from vlcp.evaluation.protocols import lr_factor

    p = _proto("multistep-epoch(2/3,5/6;gamma=0.2)", 12)  # milestones: epochs 8 and 10
    assert [lr_factor(p, e, 0, 5) for e in range(12)] == pytest.approx([1] * 8 + [0.2, 0.2, 0.04, 0.04])


def test_multistep_per_step_counts_all_steps():
    from vlcp.evaluation.protocols import lr_factor

    p = _proto("multistep", 3)  # 3 epochs x 4 steps = 12 steps: milestones 8 and 10
    assert [lr_factor(p, s // 4, s, 4) for s in range(12)] == pytest.approx([1] * 8 + [0.2, 0.2, 0.04, 0.04])


def test_step_schedule_drops_tenfold_at_half_of_the_steps():
    from vlcp.evaluation.protocols import lr_factor

    p = _proto("step(1/2;gamma=0.1)", 4)  # 4 epochs x 3 steps: drop at step 6
    assert [lr_factor(p, s // 3, s, 3) for s in range(12)] == [1.0] * 6 + [0.1] * 6


def test_cosine_schedules():
    from vlcp.evaluation.protocols import lr_factor

    half = _proto("half-cosine-epoch", 4)  # 0.5 (1 + cos(pi e / 8)), per epoch
    assert [lr_factor(half, e, 99, 7) for e in range(4)] == pytest.approx([1.0, 0.961940, 0.853553, 0.691342],
                                                                         rel=1e-6)
    cos = _proto("cosine", 2)  # 0.5 (1 + cos(pi s / 4)), per step over 2 x 2 steps
    assert [lr_factor(cos, 0, s, 2) for s in range(5)] == pytest.approx([1.0, 0.853553, 0.5, 0.146447, 0.0],
                                                                        abs=1e-6)
    assert lr_factor(_proto("cosine", 0), 0, 0, 0) == 1.0  # no division by zero
    assert lr_factor(_proto("constant", 5), 4, 40, 10) == 1.0


def test_schedules_with_epochs_that_do_not_divide_evenly():
    from vlcp.evaluation.protocols import lr_factor

    p = _proto("multistep-epoch(2/3,5/6;gamma=0.2)", 7)  # 14 // 3 = 4, 35 // 6 = 5 (integer milestones)
    assert [lr_factor(p, e, 0, 1) for e in range(7)] == pytest.approx([1, 1, 1, 1, 0.2, 0.04, 0.04])
    p = _proto("multistep", 1)  # 7 steps: milestones 4 and 5
    assert [lr_factor(p, 0, s, 7) for s in range(7)] == pytest.approx([1, 1, 1, 1, 0.2, 0.04, 0.04])
    p = _proto("step(1/2;gamma=0.1)", 1)  # 7 steps: 7 // 2 = 3
    assert [lr_factor(p, 0, s, 7) for s in range(5)] == [1.0, 1.0, 1.0, 0.1, 0.1]
    assert lr_factor(_proto("cosine", 1), 0, 1, 1) == pytest.approx(0.0)  # one step in all: cos(pi) at its end


# -- evaluation protocol: settings (values written out by hand from the reference scripts' rules) -----


def test_default_protocol_minimax_epochs_and_rded_batch_boundaries():
    from vlcp.evaluation.protocols import (
        default_protocol,
        minimax_epochs,
        rded_batch_size,
    )

    assert [default_protocol(d) for d in ("imagenette", "imagewoof", "cifar10", "digits")] == [
        "minimax", "minimax", "rded", "dc"]
    assert [minimax_epochs(i) for i in (11, 51, 201, 501)] == [1500, 1000, 500, 300]
    assert [rded_batch_size(i, 10)[0] for i in (2, 9, 11, 49, 51, 100)] == [10, 10, 50, 50, 100, 100]
    for ipc in (1, 10, 50):
        assert rded_batch_size(ipc, 10)[1].startswith("RDED script")
    for ipc in (2, 11, 51):
        assert rded_batch_size(ipc, 10)[1].startswith("vlcp's choice")


def test_minimax_sizes_test_interval_and_class_count():
    from vlcp.evaluation.protocols import make_protocol

    c = make_protocol("minimax", "cifar10", 10)
    assert (c.image_size, c.load_size, c.load_crop, c.test_resize, c.epochs, c.test_every) == (32, 32, False, 0, 2000,
                                                                                               20)
    f = make_protocol("minimax", "my-folder", 10)  # an ImageFolder is treated as ImageNet-like
    assert (f.image_size, f.load_size, f.load_crop, f.test_resize) == (224, 224, True, 224)
    assert make_protocol("minimax", "cifar100", 10, num_classes=100).epochs == 1300
    assert make_protocol("minimax", "imagenette", 10, epochs=50).test_every == 1  # never 0
    assert make_protocol("minimax", "imagenette", 10, epochs=250).test_every == 2  # 250 // 100
    assert make_protocol("minimax", "imagenette", 10, epochs=500).test_every == 5  # from the user's epochs


def test_dc_and_rded_on_an_image_folder():
    from vlcp.evaluation.protocols import IMAGENET_NORM, make_protocol

    d = make_protocol("dc", "my-folder", 10)
    assert (d.image_size, d.load_size, d.mean, d.std) == (32, 32, IMAGENET_NORM[0], IMAGENET_NORM[1])
    assert d.sources["mean"] == d.sources["std"] == "vlcp's choice"
    r = make_protocol("rded", "my-folder", 10)
    assert (r.model, r.image_size, r.factor, r.test_resize, r.teacher) == ("resnet18-bn", 224, 2, 256, "trained by vlcp")
    assert make_protocol("rded", "imagenette", 10).teacher == "trained by vlcp"  # torchvision only for ImageNet-1K


def test_protocol_sources_name_the_user_the_dataset_or_vlcp():
    from vlcp.evaluation.protocols import NORM, make_protocol

    p = make_protocol("dc", "cifar10", 10, model="convnet3", aug="none", batch_size=8, lr=None)
    assert (p.model, p.aug, p.batch_size, p.lr) == ("convnet3", "none", 8, 0.01)  # None overrides nothing
    assert [p.sources[k] for k in ("model", "aug", "batch_size")] == ["user (--model)", "user (--aug)",
                                                                     "user (--batch-size)"]
    assert p.sources["lr"].startswith("DC/DSA") and "sources" not in p.sources
    assert (p.mean, p.std) == NORM["cifar10"]  # dc uses each dataset's own statistics
    assert p.sources["mean"].startswith("vlcp's choice: the dataset's own statistics")
    assert p.sources["std"] == p.sources["mean"]
    assert p.sources["name"] == p.sources["channels"] == "dataset / protocol name"
    m = make_protocol("minimax", "imagenette", 10)
    assert "MEANS['imagenet']" in m.sources["mean"] and m.sources["std"] == m.sources["mean"]
    assert make_protocol("rded", "cifar10", 10).sources["teacher"].startswith("vlcp's choice: RDED's observers")
    assert make_protocol("rded", "imagenet", 10).sources["teacher"].startswith("RDED script")


def test_protocol_input_checks():
    from vlcp.evaluation.protocols import EvalError, make_protocol

    with pytest.raises(EvalError, match=r"^unknown protocol 'x'; known: minimax, dc, rded$"):
        make_protocol("x", "digits", 10)
    for aug in ("dsa", "none", "minimax", "flip", "rded"):
        assert make_protocol("dc", "digits", 10, aug=aug).aug == aug
    with pytest.raises(EvalError, match=r"^unknown augmentation 'bogus'$"):
        make_protocol("dc", "digits", 10, aug="bogus")


def test_tested_epochs_edges():
    from vlcp.evaluation.protocols import Protocol, tested_epochs

    assert tested_epochs(Protocol(name="m", model="x", epochs=3, batch_size=1, test_every=1)) == [1, 2, 3]
    # RDED rule, 0-based i: (i % 4 == 3 or i == 19) and i > 0.75 * 20 = 15: only i = 19 (15 is not > 15)
    r = Protocol(name="r", model="x", epochs=20, batch_size=1, test_every=4, best_after=0.75)
    assert tested_epochs(r) == [20]


# -- cache: the batched lookup and blob paths -------------------------------------------------------


def _counted_gets(c, monkeypatch) -> list:
    """The keys ``c.index.get`` is asked for from now on."""
    calls, real = [], c.index.get
    monkeypatch.setattr(c.index, "get", lambda key, *a, **kw: calls.append(key) or real(key, *a, **kw))
    return calls


def test_get_many_reads_diskcache_5s_table_at_once_and_other_versions_key_by_key(tmp_path, monkeypatch):
    from vlcp.store.cache import StageCache

    c = StageCache(tmp_path)
    for k in "ab":
        c.put("latents", k, {"k": k}, {"latent": np.full(2, ord(k), np.float32)})
    calls = _counted_gets(c, monkeypatch)
    assert [e and e.meta for e in c.get_many("latents", ["b", "zz", "a"])] == [{"k": "b"}, None, {"k": "a"}]
    assert calls == []  # diskcache 5 (constraints.txt): one SQL query, no get per key
    monkeypatch.setattr("vlcp.store.cache.diskcache_major", lambda: 6)
    assert [e and e.meta for e in c.get_many("latents", ["b", "zz", "a"])] == [{"k": "b"}, None, {"k": "a"}]
    assert calls == ["latents/b", "latents/zz", "latents/a"]


@pytest.mark.parametrize("kept", ["_sql", "_disk"])
def test_get_many_without_diskcache_internals_gets_key_by_key(tmp_path, kept):
    from vlcp.store.cache import StageCache

    c = StageCache(tmp_path)
    c.put("latents", "a", {"k": "a"}, {"latent": np.zeros(2, np.float32)})

    class Index:  # an index with get and only one of diskcache's two internals
        pass

    index = Index()
    index.get, index.__dict__[kept] = c.index.get, getattr(c.index, kept)
    c.index = index
    assert [e and e.meta for e in c.get_many("latents", ["zz", "a"])] == [None, {"k": "a"}]


def test_get_many_drops_an_unreadable_record_with_a_warning(tmp_path, caplog):
    import logging

    from vlcp.store.cache import StageCache

    c = StageCache(tmp_path)
    c.put("latents", "a", {"k": "a"})
    c.index["latents/b"] = {"meta": "{}"}  # no meta_sha
    with caplog.at_level(logging.WARNING, logger="vlcp"):
        got = c.get_many("latents", ["b", "a"])
    assert got[0] is None and got[1].meta == {"k": "a"} and c.corrupt == 1
    assert "latents/b" not in c.index and "latents/a" in c.index
    want = "cache entry latents/b is corrupt (unreadable index record: KeyError('meta_sha')); recomputing it"
    assert want in caplog.text


def test_an_entry_put_without_retaining_its_tensors_keeps_its_meta(tmp_path):
    from vlcp.store.cache import StageCache

    c = StageCache(tmp_path)
    e = c.put("latents", "k", {"m": 1}, {"latent": np.arange(3, dtype=np.float32)}, retain=False)
    assert e.meta == {"m": 1} and not e.loaded and e.read()["latent"].tolist() == [0.0, 1.0, 2.0]


def test_blob_path_is_where_put_wrote_the_blob(tmp_path):
    from vlcp.store.cache import StageCache

    c = StageCache(tmp_path)
    c.put("latents", "k", {}, {"latent": np.zeros(2, np.float32)})
    name = c.index["latents/k"]["blob"]
    (blob,) = (tmp_path / "blobs").rglob("*.safetensors")
    assert c._blob_path("latents", name) == blob and blob.relative_to(tmp_path).parts == ("blobs", "latents",
                                                                                          name[:2], name)
