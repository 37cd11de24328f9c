"""Data-parallel fine-tuning (vlcp/store/ddp.py): N processes train the model one process trains."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from vlcp.method import finetune
from vlcp.store import ddp

WORKER = r"""
import json, sys
import numpy as np
from safetensors.numpy import save_file
from vlcp.store import ddp
from vlcp.method import finetune
from vlcp.store.cache import StageCache
from vlcp.models.loading import load_img2img, resolve
from vlcp.models.tiny import TINY_SD

models, out, rank, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
import torch
torch.set_num_threads(1)
pipe = load_img2img(resolve(f"{models}/{TINY_SD}", StageCache(f"{out}/r{rank}")), "cpu")
rng = np.random.default_rng(0)
lat = rng.normal(size=(11, 4, 16, 16)).astype(np.float32)
caps = [f"digit {i % 10} with a loop" for i in range(11)]
shard = ddp.join(rank, size, "cpu") if size > 1 else ddp.ALONE
p = finetune.FinetuneParams(epochs=2, batch_size=5, lr=1e-3, accumulation=2, ema=False, shard=shard,
                            method="lora" if sys.argv[5] == "lora" else "full", lora_rank=2)
if rank == 1:
    torch.rand(7)  # a different RNG history in one process: the adapter's init must not depend on it
if sys.argv[5] == "grad":  # the summed gradient of micro-batch 0, before any step
    s = finetune._setup(pipe, p, None)
    finetune._micro_step(s, lat, caps, p, 0, 1.0)
    ddp.sum_gradients(s.params, shard)
    save_file({str(i): q.grad.numpy() for i, q in enumerate(s.params)}, f"{out}/g{size}-{rank}.safetensors")
    ddp.leave(shard)
    sys.exit(0)
weights, meta = finetune.train(pipe, lat, caps, p, StageCache(f"{out}/c{rank}"), "k", progress=False)
ddp.leave(shard)
save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, f"{out}/w{size}-{rank}.safetensors")
json.dump(meta, open(f"{out}/m{size}-{rank}.json", "w"))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(tiny_models_dir, out, size: int, mode: str = "train") -> None:
    port = _free_port()
    procs = []
    for rank in range(size):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, str(tiny_models_dir), str(out), str(rank),
                                       str(size), mode], env=env, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]


def test_rows_of_a_micro_batch_are_dealt_round_robin():
    assert ddp.Shard(1, 3).rows(7).tolist() == [1, 4]
    assert ddp.Shard(2, 3).rows(2).tolist() == []  # more processes than rows: an empty share
    assert ddp.ALONE.rows(3).tolist() == [0, 1, 2] and not ddp.ALONE.parallel


def test_the_process_count_is_not_part_of_the_key():
    one = finetune.FinetuneParams()
    two = finetune.FinetuneParams(shard=ddp.Shard(1, 2))
    assert one.key_parts() == two.key_parts() and "shard" not in one.key_parts()


def test_two_processes_train_the_weights_one_process_trains(tiny_models_dir, tmp_path):
    from safetensors.numpy import load_file

    _train(tiny_models_dir, tmp_path, 1)
    _train(tiny_models_dir, tmp_path, 2)
    one, a, b = (load_file(tmp_path / f"w{s}-{r}.safetensors") for s, r in ((1, 0), (2, 0), (2, 1)))
    m1, m2 = (json.loads((tmp_path / f"m{s}-0.json").read_text()) for s in (1, 2))
    assert m1["processes"] == 1 and m2["processes"] == 2
    assert m1["steps"] == m2["steps"] == 3  # 2 epochs x 3 micro-batches (5, 5, 1 rows), 2 per step
    for k in one:
        assert np.array_equal(a[k], b[k]), k  # both processes hold the same weights
        # equal up to float summation order, which Adam's normalisation amplifies where a gradient is ~0 (m/sqrt(v)
        # of a near-zero gradient can move a weight by most of a step): every weight within one step (lr 1e-3),
        # and all but a few in 10^4 within 5% of a step. (Which weight lands near a zero gradient depends on the
        # CPU's summation kernels: one of 36,864 conv weights differed by 8.8e-5 on a 2-core x86 VM.)
        diff = np.abs(a[k].astype(np.float64) - one[k])
        assert diff.max() <= 1e-3, (k, diff.max())
        assert (diff > 5e-5).mean() <= 1e-4, (k, int((diff > 5e-5).sum()), diff.size)
    assert m2["losses"] == pytest.approx(m1["losses"], rel=1e-5)


def test_summed_gradient_is_the_whole_micro_batch_gradient(tiny_models_dir, tmp_path):
    """Adam hides a wrong gradient scale (e.g. averaging instead of summing shares): check it directly."""
    from safetensors.numpy import load_file

    _train(tiny_models_dir, tmp_path, 1, "grad")
    _train(tiny_models_dir, tmp_path, 2, "grad")
    one, a = load_file(tmp_path / "g1-0.safetensors"), load_file(tmp_path / "g2-0.safetensors")
    scale = max(float(np.abs(g).max()) for g in one.values())
    for k in one:
        np.testing.assert_allclose(a[k], one[k], rtol=0, atol=1e-5 * scale, err_msg=k)


@pytest.mark.e2e
def test_torchrun_distill_fine_tunes_on_both_processes(tmp_path, cache_dir, vlcp):
    """`torchrun --nproc_per_node 2 -m vlcp distill` with fine-tuning: both processes train (the manifest
    says 2 processes), rank 0 stores the weights once, and a one-process rerun finds them cached."""
    from tests.conftest import read_manifest

    run = ["--data", "digits", "--tiny", "--classes", "0,1", "--max-per-class", "6", "--ipc", "1", "--steps", "2",
           "--finetune-epochs", "1", "--finetune-batch-size", "3", "--until", "finetune"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "VLCP_LAUNCH_ID"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "vlcp", "--device", "cpu", "--cache-dir", str(cache_dir), "--data-dir", str(tmp_path / "data"), "-q",
           "distill", *run, "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = read_manifest(tmp_path / "two")
    assert two["finetune"]["processes"] == 2
    ranks = [json.loads((tmp_path / "two" / "ranks" / f"{r}.json").read_text()) for r in (0, 1)]
    assert [r["stages"]["finetune"]["items_computed"] for r in ranks] == [1, 0]  # one store, by rank 0
    res = vlcp("distill", *run, "--out", tmp_path / "again")
    assert res.exit_code == 0, res.output
    assert read_manifest(tmp_path / "again")["stages"]["finetune"]["items_computed"] == 0


def test_two_processes_train_one_lora_adapter(tiny_models_dir, tmp_path):
    """LoRA: the adapter's random init is seeded and broadcast from rank 0, so the processes (whose RNG
    histories differ) train one adapter, the one a single process trains."""
    from safetensors.numpy import load_file

    _train(tiny_models_dir, tmp_path, 1, "lora")
    _train(tiny_models_dir, tmp_path, 2, "lora")
    one, a, b = (load_file(tmp_path / f"w{s}-{r}.safetensors") for s, r in ((1, 0), (2, 0), (2, 1)))
    assert one.keys() == a.keys() and any("lora" in k for k in one)
    for k in one:
        assert np.array_equal(a[k], b[k]), k
        np.testing.assert_allclose(a[k], one[k], rtol=0, atol=5e-5, err_msg=k)
