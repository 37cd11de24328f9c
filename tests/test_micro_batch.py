"""The fine-tuning micro-batch from memory (vlcp/method/micro_batch.py): same effective batch, same update."""
import numpy as np
import pytest

from vlcp.method import finetune
from vlcp.method.micro_batch import fuse_for, fused_micro_step, micro_batch
from vlcp.models.loading import load_img2img, resolve
from vlcp.models.tiny import TINY_SD
from vlcp.store.cache import StageCache


def test_micro_batch_is_the_largest_whole_split_that_fits():
    assert micro_batch(32, 8, None) == (8, 4)  # off CUDA: the configured split, unchanged
    assert micro_batch(32, 8, 1000) == (32, 1)
    assert micro_batch(32, 8, 32) == (32, 1)
    assert micro_batch(32, 8, 31) == (16, 2)
    assert micro_batch(32, 8, 16) == (16, 2)
    assert micro_batch(32, 8, 15) == (8, 4)
    assert micro_batch(32, 8, 3) == (8, 4)  # nothing fits: the recipe's split (as today)
    assert micro_batch(24, 4, 20) == (12, 2)  # 4 x {1, 2, 3, 6}: 20 -> 12, not 8
    assert micro_batch(24, 4, 24) == (24, 1)
    assert micro_batch(5, 5, 100) == (5, 1)
    with pytest.raises(ValueError, match="not a multiple"):
        micro_batch(30, 8, 32)
    p = finetune.FinetuneParams(batch_size=8, accumulation=4)
    assert [fuse_for(p, f) for f in (None, 8, 20, 32, 64)] == [1, 1, 2, 4, 4]


def _pipe(tiny_models_dir, tmp_path, name):
    return load_img2img(resolve(str(tiny_models_dir / TINY_SD), StageCache(tmp_path / name)), "cpu")


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    return rng.normal(size=(22, 4, 16, 16)).astype(np.float32), [f"digit {i % 10} with a loop" for i in range(22)]


def test_one_pass_gradient_is_the_accumulated_gradient(tiny_models_dir, tmp_path, data):
    """Before any step: one pass over micro-batches 4..7 (an epoch boundary and a short micro-batch of 2
    among them) gives the gradient and loss of 4 accumulated micro-steps, so no scale is wrong."""
    lat, caps = data
    p = finetune.FinetuneParams(batch_size=4, accumulation=4, ema=False)  # 22 / 4: micro-batch 5 has 2 rows
    grads, losses = [], []
    for fused in (False, True):
        s = finetune._setup(_pipe(tiny_models_dir, tmp_path, str(fused)), p, None)
        if fused:
            losses.append(fused_micro_step(s, lat, caps, p, range(4, 8), 0.25))
        else:
            losses.append(sum(finetune._micro_step(s, lat, caps, p, m, 0.25) for m in range(4, 8)))
        grads.append([q.grad.detach().clone().numpy() for q in s.params])
    scale = max(float(np.abs(g).max()) for g in grads[0])
    worst = max(float(np.abs(a - b).max()) for a, b in zip(*grads))
    assert worst <= 1e-5 * scale, (worst, scale)
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_32_by_1_trains_the_weights_of_8_by_4(tiny_models_dir, tmp_path, data):
    """Micro 8 x 4 (today) and one pass of 32 (fuse 4), and 16 x 2, over 3 optimizer steps with AdamW and
    clipping: the same samples, flips, noise and timesteps per update, so the same weights to float
    tolerance."""
    lat, caps = data
    out = {}
    for fuse in (1, 2, 4):
        p = finetune.FinetuneParams(epochs=4, batch_size=8, lr=1e-4, accumulation=4, ema=False, fuse=fuse)
        out[fuse] = finetune.train(_pipe(tiny_models_dir, tmp_path, f"r{fuse}"), lat, caps, p,
                                   StageCache(tmp_path / f"c{fuse}"), "k", progress=False)
    ref_w, ref_meta = out[1]
    assert ref_meta["steps"] == 3 and ref_meta["params"] == out[4][1]["params"]  # fuse is not in the recipe
    fresh = finetune.trained_weights(_pipe(tiny_models_dir, tmp_path, "fresh").unet, "full")
    moved = max(float(np.abs(ref_w[k] - fresh[k]).max()) for k in ref_w)  # ~3 steps x lr
    assert moved > 1e-4
    for fuse in (2, 4):
        w, meta = out[fuse]
        worst = max(float(np.abs(w[k] - ref_w[k]).max()) for k in ref_w)
        # seen: ~5e-6 (Adam turns rounding in near-zero gradients into up to lr-sized steps), vs ~3e-4 moved
        assert worst <= 0.05 * moved, (fuse, worst, moved)
        np.testing.assert_allclose(meta["losses"], ref_meta["losses"], rtol=1e-4)
