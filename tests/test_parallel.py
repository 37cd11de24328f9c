"""Many processes, one cache (vlcp/store/parallel.py): the split, the waits, a dead peer, torchrun end to end."""
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import read_manifest
from vlcp.store import parallel
from vlcp.store.cache import StageCache
from vlcp.store.parallel import ParallelError, World
from vlcp.store.runner import run_items, run_stage

RUN = ["--data", "digits", "--tiny", "--classes", "0,1,2", "--max-per-class", "10", "--ipc", "1", "--steps", "2",
       "--no-finetune", "--caption-batch-size", "1", "--latent-batch-size", "1",
       "--synthesis-batch-size", "1"]  # batches of 1: results independent of how items are shared
# default batch sizes (images 64, captions 32 with --tiny, latents 16, synthesis 8): (items, batch) per stage
BATCHED = ["--data", "digits", "--tiny", "--classes", "0,1,2,3,4", "--max-per-class", "10", "--ipc", "2",
           "--steps", "2", "--no-finetune"]
BATCHES = {"images": (50, 64), "captions": (50, 32), "latents": (50, 16), "clusters": (5, 1), "synthesis": (10, 8)}
PER_ITEM = ("images", "captions", "latents", "clusters", "synthesis")  # clusters: one item per class
WHOLE = ("outliers", "text_prototypes", "prompts")


@pytest.fixture
def ranked(monkeypatch):
    """Pretend to be one process of a launch: ranked(rank, world)."""
    def set_rank(rank: int, size: int, timeout: float = 30):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(size))
        monkeypatch.setenv("VLCP_LAUNCH_ID", f"test-{os.getpid()}-{time.monotonic_ns()}")
        monkeypatch.setenv("VLCP_PEER_TIMEOUT", str(timeout))

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "VLCP_LAUNCH_ID"):
        monkeypatch.delenv(name, raising=False)
    return set_rank


def compute_meta(keys, calls):
    def compute(idx):
        calls.extend(idx)
        return (({"v": keys[i]}, None) for i in idx)
    return compute


# -- the launch environment ---------------------------------------------------------------------------
def test_world_from_environment():
    assert parallel.world({}) == parallel.SINGLE and not parallel.SINGLE.parallel
    w = parallel.world({"RANK": "1", "WORLD_SIZE": "3", "LOCAL_RANK": "1", "VLCP_LAUNCH_ID": "L"})
    assert (w.rank, w.size, w.local_rank, w.launch, w.main, w.parallel) == (1, 3, 1, "L", False, True)
    assert parallel.world({"RANK": "0", "WORLD_SIZE": "1"}) == parallel.SINGLE


@pytest.mark.parametrize("env, msg", [
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 and WORLD_SIZE=2 in the environment do not fit"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "RANK=0 and WORLD_SIZE=0"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' in the environment is not an integer"),
])
def test_bad_launch_environment_is_one_line(env, msg):
    with pytest.raises(ParallelError, match=msg):
        parallel.world(env)


def test_launch_id_is_shared_by_one_launch_only():
    env = {"MASTER_ADDR": "n1", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "none", "WORLD_SIZE": "4",
           "LOCAL_WORLD_SIZE": "2"}  # two nodes: the launchers differ, the rendezvous names the launch
    assert parallel.launch_id(env) == parallel.launch_id(dict(env))
    assert parallel.launch_id(env) != parallel.launch_id({**env, "MASTER_PORT": "29501"})
    assert parallel.launch_id({**env, "VLCP_LAUNCH_ID": "job7"}) == "job7"


def test_owners_deal_whole_batches_by_position():
    w = World(1, 3, 0, "L")
    assert parallel.owners(["a", "b", "c", "d", "e"], w) == {"a": 0, "b": 1, "c": 2, "d": 0, "e": 1}
    assert parallel.owners(list("abcdefg"), w, batch=2) == {"a": 0, "b": 0, "c": 1, "d": 1, "e": 2, "f": 2, "g": 0}


def test_dealt_batches_are_the_batches_of_one_process():
    """Cold (everything missing): the ranks' batches together are exactly one process's batches, each
    key computed by one rank; the others' keys are owed by the rank that has them."""
    unique = [f"k{i}" for i in range(11)]
    one, owed = parallel.deal(unique, list(range(11)), 4, parallel.SINGLE)
    assert one == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]] and owed == {}
    for size in (2, 3, 5):
        got = []
        for r in range(size):
            mine, peers = parallel.deal(unique, list(range(11)), 4, World(r, size, 0, "L"))
            got += mine
            assert sorted(peers) == sorted(unique[n] for b in one for n in b if one.index(b) % size != r)
            assert all(peers[unique[n]] == one.index(b) % size for b in one for n in b if unique[n] in peers)
        assert sorted(got) == one
    # partly cached: each rank computes what is missing of its own batches, in those batches
    assert parallel.deal(unique, [1, 2, 5, 9], 4, World(0, 2, 0, "L")) == ([[1, 2], [9]], {"k5": 1})
    assert parallel.deal(unique, [1, 2, 5, 9], 4, World(1, 2, 0, "L")) == ([[5]], {"k1": 0, "k2": 0, "k9": 0})
    assert parallel.deal(unique, [1, 2, 5, 9], 4, parallel.SINGLE) == ([[1, 2, 5, 9]], {})  # one process: dense


def test_a_measured_batch_size_is_agreed_once_per_launch(tmp_path, ranked):
    """Ranks that measure different sizes (free GPU memory) still cut the same batches: the first one wins."""
    ranked(1, 2)
    c = StageCache(tmp_path)
    w1 = parallel.world()
    asked = []

    def size(n):
        return lambda: asked.append(n) or n

    assert parallel.batch_size(c, "captions", ["a", "b"], size(3), w1) == 3
    w0 = World(0, 2, 0, w1.launch)
    assert parallel.batch_size(c, "captions", ["a", "b"], size(5), w0) == 3 and asked == [3]  # not even asked
    assert parallel.batch_size(c, "captions", ["a", "c"], size(5), w0) == 5  # another key list: its own
    assert parallel.batch_size(c, "captions", ["a", "b"], size(7), parallel.SINGLE) == 7
    assert parallel.batch_size(c, "captions", ["a", "b"], 4, w0) == 4 and asked == [3, 5, 7]


def test_agreements_are_removed_once_every_process_reported(tmp_path, ranked):
    """A later launch with the same id (fixed VLCP_LAUNCH_ID, static multi-node rendezvous) must measure
    afresh: rank 0 drops the launch's agreements after gathering the reports."""
    ranked(0, 2)
    c = StageCache(tmp_path)
    w0 = parallel.world()
    assert parallel.agree(c, "finetune/K", lambda: 1, w0) == 1
    assert parallel.agree(c, "finetune/K", lambda: 0, World(1, 2, 0, w0.launch)) == 1  # the first value wins
    assert c.index.get(f"_agree/{w0.launch}/finetune/K") == 1
    c.index.set(f"_report/{w0.launch}/1", {"rank": 1, "world_size": 2, "stages": {}})
    reports = parallel.gather_reports(c, w0, {})
    assert sorted(reports) == [0, 1] and c.index.get(f"_agree/{w0.launch}/finetune/K") is None
    assert parallel.agree(c, "finetune/K", lambda: 0, w0) == 0


# -- run_items / run_stage under a launch -------------------------------------------------------------
def test_one_process_is_unchanged(tmp_path, ranked):
    c = StageCache(tmp_path)
    keys, calls = ["a", "b", "a", "c"], []
    entries, rep = run_items(c, "s", keys, compute_meta(keys, calls), 2, progress=False)
    assert calls == [0, 1, 3] and [e.meta["v"] for e in entries] == keys
    assert (rep.items_computed, rep.items_cached, rep.details) == (3, 1, {})


def test_each_process_computes_its_batches_and_returns_all(tmp_path, ranked):
    """Batches of 2 of the unique keys (a b | c d | e) dealt round-robin: rank 1 of 2 computes c and d in one
    batch, as one process would; a, b and e appear from 'rank 0' (a thread) while it waits."""
    ranked(1, 2)
    c = StageCache(tmp_path)
    keys, batches = ["a", "b", "c", "a", "d", "e"], []

    def compute(idx):
        batches.append(list(idx))
        return (({"v": keys[i]}, None) for i in idx)

    def peer():
        for k in ("a", "b", "e"):
            time.sleep(0.1)
            c.put("s", k, {"v": k})

    t = threading.Thread(target=peer)
    t.start()
    entries, rep = run_items(c, "s", keys, compute, 2, progress=False)
    t.join()
    assert batches == [[2, 4]]  # c, d
    assert [e.meta["v"] for e in entries] == keys
    assert (rep.items_computed, rep.items_cached, rep.details) == (2, 0, {"computed_by_peers": 3})


def test_more_processes_than_items(tmp_path, ranked):
    """Rank 5 of 6 owns nothing of 3 items: it computes nothing and returns the others' entries."""
    ranked(5, 6)
    c = StageCache(tmp_path)
    for k in "xyz":
        c.put("s", k, {"v": k})
    calls = []
    entries, rep = run_items(c, "s", list("xyz"), compute_meta(list("xyz"), calls), 2, progress=False)
    assert calls == [] and [e.meta["v"] for e in entries] == list("xyz") and rep.items_cached == 3


def test_whole_stage_runs_on_rank_zero_only(tmp_path, ranked):
    ranked(1, 2)
    c = StageCache(tmp_path)
    threading.Timer(0.2, lambda: c.put("clusters", "K", {"by": "rank 0"})).start()
    entry, rep = run_stage(c, "clusters", "K", lambda: pytest.fail("rank 1 must not compute"))
    assert entry.meta == {"by": "rank 0"}
    assert (rep.cached, rep.items_computed, rep.details) == (False, 0, {"computed_by_peers": 1})
    ranked(0, 2)
    entry, rep = run_stage(c, "clusters", "K2", lambda: ({"by": "me"}, {}))
    assert entry.meta == {"by": "me"} and rep.items_computed == 1
    assert c.index.get(f"_alive/{os.environ['VLCP_LAUNCH_ID']}/0") is not None  # beating while it computes


def test_a_slow_peer_that_beats_is_waited_for(tmp_path, ranked):
    """Rank 0 takes 1.2 s for its whole stage, longer than the 0.4 s timeout, but it beats: no error."""
    ranked(1, 2, timeout=0.4)
    c = StageCache(tmp_path)
    alive = f"_alive/{os.environ['VLCP_LAUNCH_ID']}/0"

    def slow_rank0():
        for n in range(12):
            c.index.set(alive, n)
            time.sleep(0.1)
        c.put("finetune", "F", {"steps": 3})

    t = threading.Thread(target=slow_rank0)
    t.start()
    entry, _ = run_stage(c, "finetune", "F", lambda: pytest.fail("rank 1 must not train"))
    t.join()
    assert entry.meta == {"steps": 3}


def test_dead_peer_times_out_then_a_rerun_completes_only_the_missing(tmp_path, ranked):
    ranked(0, 2, timeout=0.5)  # rank 1 never starts: it never beats
    c = StageCache(tmp_path)
    keys, calls = list("abcde"), []
    with pytest.raises(ParallelError, match=r"^stage latents: 2 of 2 item\(s\) computed by other processes still "
                                            r"missing; rank 1 gave no sign of life for 0s"):
        run_items(c, "latents", keys, compute_meta(keys, calls), 2, progress=False)
    assert calls == [0, 1, 4] and [c.has("latents", k) for k in keys] == [True, True, False, False, True]
    for name in ("RANK", "WORLD_SIZE"):
        os.environ.pop(name)
    calls.clear()
    _, rep = run_items(c, "latents", keys, compute_meta(keys, calls), 2, progress=False)
    assert calls == [2, 3] and (rep.items_computed, rep.items_cached) == (2, 3)


def test_unwritable_cache_is_refused_before_any_work(tmp_path, vlcp, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ParallelError, match=r"file is not a folder"):
        parallel.check_writable(tmp_path / "file" / "cache")

    from vlcp.store import files

    real = files.new_file

    def denied(folder, *a, **k):  # root ignores mode bits: deny the cache's probe instead (in tmp_path)
        if str(folder) == str(tmp_path):
            raise PermissionError(13, "Permission denied")
        return real(folder, *a, **k)

    monkeypatch.setattr(files, "new_file", denied)
    (tmp_path / "outs").mkdir()  # (--out's own probe goes there)
    res = vlcp("distill", *RUN, "--out", tmp_path / "outs" / "out", cache=tmp_path / "ro")
    assert res.exit_code == 1
    assert res.output.strip().splitlines()[-1] == (f"Error: cache directory {tmp_path / 'ro'} is not writable by "
                                                   f"this process ({tmp_path}: Permission denied)")
    assert not (tmp_path / "ro").exists() and not (tmp_path / "out").exists()


@pytest.mark.e2e
def test_dead_rank_in_a_distill_then_rerun(tmp_path, vlcp, cache_dir, monkeypatch, ranked):
    """Rank 0 of 2 alone (rank 1 died at start): one-line error, no OUT; a plain rerun computes the rest.

    The 30 images are one batch of the images stage (64): rank 0's, all checked; captions come in batches
    of 1, every other one rank 1's: 15 missing."""
    ranked(0, 2, timeout=1)
    res = vlcp("distill", *RUN, "--out", tmp_path / "out")
    assert res.exit_code == 1 and "Error: stage captions: 15 of 15 item(s) computed by other processes" in res.output
    assert not (tmp_path / "out").exists()
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name)
    res = vlcp("distill", *RUN, "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    stages = read_manifest(tmp_path / "out")["stages"]
    assert (stages["images"]["items_computed"], stages["images"]["items_cached"]) == (0, 30)
    assert (stages["captions"]["items_computed"], stages["captions"]["items_cached"]) == (15, 15)


@pytest.mark.e2e
def test_cached_rerun_until_latents_reads_no_blob(tmp_path, cache_dir, ranked):
    from vlcp.pipeline.config import DistillConfig
    from vlcp.pipeline.loop import distill

    def run():
        cfg = DistillConfig(data="digits", ipc=1, out=tmp_path / "out", data_dir=tmp_path / "data", tiny=True,
                            classes=["0", "1"], max_per_class=5, until="latents", finetune=False, progress=False)
        cache = StageCache(cache_dir)
        return distill(cfg, cache), cache

    first, _ = run()
    assert first["stages"]["latents"]["items_computed"] == 10
    again, cache = run()
    assert again["stages"]["latents"]["items_cached"] == 10 and again["stages"]["latents"]["items_computed"] == 0
    assert cache.blob_reads == 0


# -- torchrun end to end ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dealt(n: int, batch: int, rank: int, size: int = 2) -> int:
    """Items of rank ``rank`` when n items in batches of ``batch`` are dealt round-robin (written out: no
    vlcp code), e.g. 50 in 16s: batches 16, 16, 16, 2 -> rank 0 has 32, rank 1 has 18."""
    sizes = [min(batch, n - start) for start in range(0, n, batch)]
    return sum(sizes[rank::size])


@pytest.mark.e2e
def test_torchrun_two_processes(tmp_path, cache_dir, tiny_models_dir, vlcp):
    """Default batch sizes: whole batches dealt round-robin, every item computed exactly once across 2
    processes; byte-identical images to one process (same batches, one thread each); a rerun hits."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "VLCP_LAUNCH_ID"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "vlcp", "--cache-dir", str(cache_dir), "--data-dir", str(tmp_path / "data"), "-q", "distill",
           *BATCHED, "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "two"
    ranks = [json.loads((two / "ranks" / f"{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and read_manifest(two)["parallel"] == {"world_size": 2}
    assert [dealt(*BATCHES[s], 1) for s in PER_ITEM] == [0, 18, 18, 2, 2]  # rank 1 works in 4 stages of 5
    for stage in PER_ITEM:
        total, batch = BATCHES[stage]
        done = [r["stages"][stage]["items_computed"] for r in ranks]
        assert done == [dealt(total, batch, 0), dealt(total, batch, 1)], (stage, done)  # whole batches, once
        for r in ranks:  # what a process did not compute it found cached or waited for
            rep = r["stages"][stage]
            assert rep["items_computed"] + rep["items_cached"] + rep.get("details", {}).get("computed_by_peers", 0) == total
    for stage in WHOLE:
        assert [r["stages"][stage]["items_computed"] for r in ranks] == [1, 0], stage

    one_cache = tmp_path / "one-cache"
    shutil.copytree(tiny_models_dir, one_cache / "models")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun processes (OMP_NUM_THREADS=1): same float reductions
    try:
        assert vlcp("distill", *BATCHED, "--out", tmp_path / "one", cache=one_cache).exit_code == 0
    finally:
        torch.set_num_threads(threads)
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.png"))
    assert len(files) == 11  # 10 images + preview
    for f in files:
        assert (two / f).read_bytes() == (tmp_path / "one" / f).read_bytes(), f
    assert (two / "prototypes.json").read_text() == (tmp_path / "one" / "prototypes.json").read_text()

    res = vlcp("distill", *BATCHED, "--out", tmp_path / "again")  # one process on the shared cache
    assert res.exit_code == 0, res.output
    again = read_manifest(tmp_path / "again")["stages"]
    assert all(again[s]["items_computed"] == 0 for s in PER_ITEM + WHOLE), again
    assert "parallel" not in read_manifest(tmp_path / "again")


def test_each_local_process_gets_its_own_gpu(ranked, monkeypatch):
    assert parallel.local_device("cuda", 4) == "cuda"  # one process: unchanged
    ranked(5, 8)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert [parallel.local_device(d, 4) for d in ("cuda", "cuda:3", "cpu")] == ["cuda:1", "cuda:3", "cpu"]
    assert parallel.local_device("cuda", 0) == "cuda"
    monkeypatch.setenv("LOCAL_RANK", "5")
    assert parallel.local_device("cuda", 4) == "cuda:1"


def test_each_process_gets_its_own_gpu(monkeypatch):
    """auto / plain cuda map to cuda:LOCAL_RANK in a launch (modulo the GPUs present); cuda:N is kept."""
    import torch

    from vlcp.models import loading as models

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for k, v in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3"}.items():
        monkeypatch.setenv(k, v)
    assert models.torch_device("auto") == "cuda:1" and models.torch_device("cuda") == "cuda:1"
    assert models.torch_device("cuda:0") == "cuda:0"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k)
    assert models.torch_device("auto") == "cuda"
