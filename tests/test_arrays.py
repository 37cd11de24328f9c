"""vlcp.store.arrays: arrays referenced in the cache, read when used (issue 12: bounded memory for synthesis)."""
import numpy as np
import pytest

from vlcp.store import arrays
from vlcp.store.arrays import Arrays, Ref, array_hash, digests
from vlcp.store.cache import StageCache


@pytest.fixture
def stored(tmp_path):
    """Three images and one stacked tensor of 3 centres in a fresh cache, read back as lazy entries."""
    cache = StageCache(tmp_path / "c")
    rng = np.random.default_rng(0)
    ims = [rng.integers(0, 256, (4, 4, 3), dtype=np.uint8) for _ in range(3)]
    centres = rng.normal(size=(3, 2, 2, 2)).astype(np.float32)
    for i, im in enumerate(ims):
        meta = {"hashes": {"image": array_hash(im)}} if i < 2 else {}  # image 2: an entry without the hash
        cache.put("synthesis", f"k{i}", meta, {"image": im})
    cache.put("clusters", "c", {"hashes": {"centres": [array_hash(z) for z in centres]}}, {"centres": centres})
    cache = StageCache(tmp_path / "c")  # a new process: nothing in memory
    arrays.forget()
    return cache, ims, centres


def test_array_hash_names_dtype_shape_and_content():
    a = np.arange(6, dtype=np.uint8).reshape(2, 3)
    assert array_hash(a) == array_hash(a.copy()) and len(array_hash(a)) == 32
    assert array_hash(a) != array_hash(a.reshape(3, 2))  # same bytes, other shape
    assert array_hash(a) != array_hash(a.astype(np.int8))  # same values, other dtype
    assert array_hash(a[:, ::2]) == array_hash(np.ascontiguousarray(a[:, ::2]))


def test_items_are_read_when_used_and_each_read_again(stored):
    cache, ims, _ = stored
    a = Arrays.stored([cache.get("synthesis", f"k{i}") for i in range(3)], "image")
    assert cache.blob_reads == 0 and len(a) == 3
    assert np.array_equal(a[1], ims[1]) and cache.blob_reads == 1
    assert [np.array_equal(x, y) for x, y in zip(a, ims)] == [True] * 3 and cache.blob_reads == 4
    assert not any(r.entry.loaded for r in a.refs)  # nothing kept on the entries


def test_recorded_hashes_read_nothing_and_a_missing_one_is_computed(stored):
    cache, ims, centres = stored
    a = Arrays.stored([cache.get("synthesis", f"k{i}") for i in range(3)], "image")
    assert [a.digest(0), a.digest(1)] == [array_hash(ims[0]), array_hash(ims[1])] and cache.blob_reads == 0
    assert a.digest(2) == array_hash(ims[2]) and cache.blob_reads == 1  # no recorded hash: read and hashed
    rows = Arrays.rows([(cache.get("clusters", "c"), j) for j in (2, 0)], "centres")
    assert rows.digests() == [array_hash(centres[2]), array_hash(centres[0])] and cache.blob_reads == 1
    assert digests(list(ims)) == [array_hash(im) for im in ims]  # a plain list: hashed
    assert digests(Arrays.held(ims)) == [array_hash(im) for im in ims]


def test_consecutive_rows_of_one_entry_read_its_blob_once(stored):
    cache, _, centres = stored
    e = cache.get("clusters", "c")
    rows = Arrays.rows([(e, j) for j in (0, 1, 2, 2)], "centres")
    got = np.stack(list(rows))
    assert np.array_equal(got, centres[[0, 1, 2, 2]]) and cache.blob_reads == 1
    other = Arrays.stored([cache.get("synthesis", "k0")], "image")
    other[0], rows[0]  # another entry in between: the centres are read again (one blob held at a time)
    assert cache.blob_reads == 3 and not e.loaded


def test_pick_add_slice_and_swap_move_references_not_arrays(stored):
    cache, ims, _ = stored
    a = Arrays.stored([cache.get("synthesis", f"k{i}") for i in range(3)], "image")
    b = Arrays.held([np.zeros((4, 4, 3), np.uint8)])
    both = a + b
    picked = both.pick([3, 0])
    copy = a[:]
    copy.refs[0] = b.refs[0]
    assert cache.blob_reads == 0 and len(both) == 4 and isinstance(copy, Arrays)
    assert picked.refs == [b.refs[0], a.refs[0]] and a.refs[0] is not copy.refs[0]
    assert np.array_equal(picked[1], ims[0]) and np.array_equal(copy[0], b[0]) and np.array_equal(a[0], ims[0])


def test_a_hash_of_the_wrong_kind_is_not_trusted_and_a_computed_one_is_kept(stored):
    """A row reference on an entry that recorded one hash (or a whole reference on per-row hashes) reads and
    hashes instead of returning a character of it; an entry without hashes (cached before they were
    recorded) is read once, not once per stage that asks."""
    cache, ims, centres = stored
    img, rows = cache.get("synthesis", "k0"), cache.get("clusters", "c")
    assert Ref(img, "image", 1).digest() == array_hash(ims[0][1]) and cache.blob_reads == 1
    assert Ref(rows, "centres").digest() == array_hash(centres) and cache.blob_reads == 2
    old = Arrays.stored([cache.get("synthesis", "k2")], "image")
    assert old.digest(0) == array_hash(ims[2]) and cache.blob_reads == 3
    Ref(img, "image").get()  # another blob read in between (the one-blob memo now holds k0)
    assert (old + old).digests() == [array_hash(ims[2])] * 2 and cache.blob_reads == 4  # k2 not read again


def test_forget_drops_the_blob_kept_for_consecutive_rows(stored):
    cache, _, centres = stored
    e = cache.get("clusters", "c")
    rows = Arrays.rows([(e, 0), (e, 1)], "centres")
    rows[0], rows[1]
    assert cache.blob_reads == 1
    arrays.forget()
    assert arrays._last[0] == (None, None)
    assert np.array_equal(rows[1], centres[1]) and cache.blob_reads == 2


def test_a_corrupt_blob_raises_and_the_next_read_still_works(stored):
    """The one-blob memo is emptied before a read: a read that fails (CorruptEntry) leaves it usable."""
    from vlcp.store.cache import CorruptEntry

    cache, ims, _ = stored
    blob = next((cache.root / "blobs").rglob("k1-*.safetensors"))
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0x01
    blob.write_bytes(bytes(data))
    a = Arrays.stored([cache.get("synthesis", f"k{i}") for i in range(3)], "image")
    with pytest.raises(CorruptEntry):
        a[1]
    assert np.array_equal(a[0], ims[0]) and np.array_equal(a[2], ims[2])


def test_recorded_hashes_of_a_whole_list_read_nothing_and_a_short_list_is_not_indexed(stored, tmp_path):
    cache, ims, centres = stored
    assert digests(Arrays.stored([cache.get("synthesis", f"k{i}") for i in range(2)], "image")) == [
        array_hash(ims[0]), array_hash(ims[1])] and cache.blob_reads == 0
    cache.put("clusters", "short", {"hashes": {"centres": ["h0", "h1"]}}, {"centres": centres})  # 2 for 3 rows
    e = StageCache(cache.root).get("clusters", "short")
    assert [Ref(e, "centres", j).digest() for j in range(3)] == ["h0", "h1", array_hash(centres[2])]


def test_a_held_reference_is_its_value():
    v = np.ones((2, 2), np.float32)
    r = Ref(value=v)
    assert r.get() is v and r.digest() == array_hash(v)


@pytest.mark.e2e
def test_synthesis_keeps_no_image_and_a_cached_rerun_reads_no_image_or_centre(tmp_path, cache_dir, monkeypatch):
    """Cold: the clusters and synthesis entries keep no tensor (read back when used). A cached rerun builds
    every synthesis key from the recorded hashes: no centre and no image blob is read, same keys, same images."""
    from vlcp.pipeline.config import DistillConfig
    from vlcp.pipeline.loop import _run_stages, start

    reads = []
    real_read = StageCache._read_blob
    monkeypatch.setattr(StageCache, "_read_blob", lambda self, stage, *a: reads.append(stage) or real_read(
        self, stage, *a))
    cfg = DistillConfig(data="digits", ipc=2, out=tmp_path / "out", data_dir=tmp_path / "data", tiny=True,
                        classes=["0", "1", "2"], max_per_class=6, until="synthesis", finetune=False, steps=2,
                        progress=False)
    run = start(cfg, StageCache(cache_dir))
    _run_stages(run)
    st = run.st
    done = {r.name: r.items_computed for r in run.reports}
    assert (done["clusters"], done["synthesis"]) == (3, 6)  # one entry per class, one per image
    assert not any(e.loaded for e in st.clusters.values()) and not any(r.entry.loaded for r in st.images.refs)
    images = [np.array(im) for im in st.images]
    assert reads.count("synthesis") == 6 and all(im.shape == images[0].shape for im in images)

    reads.clear()
    again = start(cfg, StageCache(cache_dir))  # a new process: nothing in memory
    _run_stages(again)
    assert {r.name: r.items_computed for r in again.reports}["synthesis"] == 0
    assert again.st.syn_keys == st.syn_keys and "clusters" not in reads and "synthesis" not in reads
    assert all(np.array_equal(a, b) for a, b in zip(again.st.images, images)) and reads.count("synthesis") == 6
