"""How fine-tuning runs (vlcp/method/micro_batch.py, issue 25): the micro-batch and gradient checkpointing from
memory, fused AdamW, channels_last, a compiled UNet, an out-of-memory pass redone smaller: the same update."""
import numpy as np
import pytest
import torch

from tests.conftest import killed_at
from vlcp.method import finetune
from vlcp.method import micro_batch as mb
from vlcp.method.micro_batch import (
    Plan,
    TrainSpeed,
    fused_micro_step,
    micro_batch,
    plan,
)
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


def _fit(**kw):
    return finetune.FinetuneParams(batch_size=8, accumulation=4, speed=TrainSpeed(fit_memory=True, **{
        k: v for k, v in kw.items() if k == "micro_batch"}), **{k: v for k, v in kw.items() if k != "micro_batch"})


def test_plan_turns_checkpointing_on_only_when_the_recipe_micro_batch_does_not_fit():
    """A hand-made memory model: 3 GB per sample without checkpointing, 1 GB with it; HEADROOM 0.85 of what
    is available. The probe runs one recipe micro-batch (8), without checkpointing first."""
    calls = []

    def measure(ckpt, n):
        calls.append((ckpt, n))
        return n * (1e9 if ckpt else 3e9)

    assert mb.HEADROOM == 0.85
    assert plan(_fit(), "cuda", measure, 100e9) == Plan(16, 2, False, 28)  # 85 / 3 = 28.3: 16 x 2, no checkpointing
    assert calls == [(False, 8)]
    calls.clear()
    assert plan(_fit(), "cuda", measure, 25e9) == Plan(16, 2, True, 21)  # 21.25 / 3 = 7 < 8: on; 21 with it
    assert calls == [(False, 8), (True, 8)]
    assert plan(_fit(), "cuda", measure, 320e9) == Plan(32, 4, False, 90)  # an H200's worth: one pass of 32
    assert plan(_fit(), "cuda", measure, 5e9) == Plan(8, 1, True, 4)  # nothing fits: the recipe's 8 x 4
    oom_without = lambda ckpt, n: n * 1e9 if ckpt else None  # noqa: E731 - out of memory without checkpointing
    assert plan(_fit(), "cuda", oom_without, 50e9) == Plan(32, 4, True, 42)
    assert plan(_fit(gradient_checkpointing=False), "cuda", measure, 5e9) == Plan(8, 1, False, 1)  # as asked
    calls.clear()
    assert plan(_fit(micro_batch=16), "cuda", measure, 100e9) == Plan(16, 2, False, 28)  # probed at 16
    assert calls == [(False, 16)]


def test_plan_off_cuda_is_the_recipe_or_the_asked_micro_batch():
    p = finetune.FinetuneParams(batch_size=8, accumulation=4)
    assert plan(p, "cpu") == Plan(8, 1, False)
    assert plan(p, "cuda") == Plan(8, 1, True)  # CUDA without a measurement: the reference's checkpointing
    assert plan(finetune.FinetuneParams(speed=TrainSpeed(micro_batch=32)), "cpu") == Plan(32, 4, False)
    for bad in (12, 64, 4):
        with pytest.raises(ValueError, match=f"multiple of --finetune-batch-size \\(8\\) .* 32 samples .* got {bad}"):
            plan(finetune.FinetuneParams(speed=TrainSpeed(micro_batch=bad)), "cpu")


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
        p = finetune.FinetuneParams(epochs=4, batch_size=8, lr=1e-4, accumulation=4, ema=False,
                                    speed=TrainSpeed(micro_batch=8 * fuse))
        out[fuse] = finetune.train(_pipe(tiny_models_dir, tmp_path, f"r{fuse}"), lat, caps, p,
                                   StageCache(tmp_path / f"c{fuse}"), "k", progress=False)
    ref_w, ref_meta = out[1]
    assert ref_meta["steps"] == 3 and ref_meta["params"] == out[4][1]["params"]  # the split is not in the recipe
    assert [out[f][1]["passes"]["micro_batch"] for f in (1, 2, 4)] == [8, 16, 32]
    fresh = finetune.trained_weights(_pipe(tiny_models_dir, tmp_path, "fresh").unet, "full")
    moved = max(float(np.abs(ref_w[k] - fresh[k]).max()) for k in ref_w)  # ~3 steps x lr
    assert moved > 1e-4
    for fuse in (2, 4):
        w, meta = out[fuse]
        worst = max(float(np.abs(w[k] - ref_w[k]).max()) for k in ref_w)
        # seen: ~5e-6 (Adam turns rounding in near-zero gradients into up to lr-sized steps), vs ~3e-4 moved
        assert worst <= 0.05 * moved, (fuse, worst, moved)
        np.testing.assert_allclose(meta["losses"], ref_meta["losses"], rtol=1e-4)


@pytest.fixture(scope="module")
def reference(tiny_models_dir, tmp_path_factory, data):
    """The recipe's 8 x 4, eager, AdamW's default kernels: 2 optimizer steps (epochs 3 of 22 samples: 9 micro-batches,
    capped), and how far the weights moved from the start."""
    lat, caps = data
    tmp = tmp_path_factory.mktemp("ref")
    w, meta = finetune.train(_pipe(tiny_models_dir, tmp, "ref"), lat, caps, _short(), StageCache(tmp / "c"), "k",
                             progress=False)
    fresh = finetune.trained_weights(_pipe(tiny_models_dir, tmp, "fresh").unet, "full")
    return w, meta, max(float(np.abs(w[k] - fresh[k]).max()) for k in w), fresh


def _short(**kw) -> finetune.FinetuneParams:
    return finetune.FinetuneParams(epochs=3, batch_size=8, lr=1e-4, accumulation=4, max_steps=2, ema=False, **kw)


def _train(tiny_models_dir, tmp_path, data, p):
    lat, caps = data
    return finetune.train(_pipe(tiny_models_dir, tmp_path, "x"), lat, caps, p, StageCache(tmp_path / "c"), "k",
                          progress=False)


@pytest.mark.parametrize("speed", [TrainSpeed(fused_optimizer=True), TrainSpeed(channels_last=True),
                                   TrainSpeed(micro_batch=16, compile="aot_eager")], ids=["fused", "nhwc", "compiled"])
def test_how_it_runs_does_not_change_what_it_learns(tiny_models_dir, tmp_path, data, reference, speed):
    """Fused AdamW, channels_last and a compiled UNet (aot_eager: the same graph capture as inductor, without
    compiling kernels on this CPU) train the reference's weights to float tolerance; the meta says how it ran."""
    ref_w, ref_meta, moved, _ = reference
    w, meta = _train(tiny_models_dir, tmp_path, data, _short(speed=speed))
    worst = max(float(np.abs(w[k] - ref_w[k]).max()) for k in ref_w)
    assert moved > 1e-4 and worst <= 0.05 * moved, (worst, moved)
    np.testing.assert_allclose(meta["losses"], ref_meta["losses"], rtol=1e-4)
    assert meta["params"] == ref_meta["params"]  # in no key
    assert meta["passes"] == {"micro_batch": speed.micro_batch or 8, "fuse": (speed.micro_batch or 8) // 8,
                              "gradient_checkpointing": False, "fits": None, "halved": 0, "fit_memory": False,
                              "channels_last": speed.channels_last, "fused_optimizer": speed.fused_optimizer,
                              "compile": speed.compile}


def test_a_pass_out_of_memory_redoes_the_step_at_half_the_size(tiny_models_dir, tmp_path, data, reference,
                                                                monkeypatch):
    """The first pass of 32 runs out of memory after its backward added gradients (the worst case): the step is
    redone as 16 x 2 from zeroed gradients, so the weights are the reference's; one micro-batch out of memory
    is the error itself."""
    real, calls = mb.fused_micro_step, []

    def flaky(*a, **kw):
        out = real(*a, **kw)
        calls.append(len(a[4]))
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return out

    monkeypatch.setattr(mb, "fused_micro_step", flaky)
    ref_w, ref_meta, moved, _ = reference
    w, meta = _train(tiny_models_dir, tmp_path, data, _short(speed=TrainSpeed(micro_batch=32)))
    assert calls == [4, 2, 2, 2, 2]  # 32 (out of memory), then two steps of 16 x 2
    assert meta["passes"]["halved"] == 1 and meta["passes"]["micro_batch"] == 16
    worst = max(float(np.abs(w[k] - ref_w[k]).max()) for k in ref_w)
    assert worst <= 0.05 * moved, (worst, moved)
    np.testing.assert_allclose(meta["losses"], ref_meta["losses"], rtol=1e-4)

    def oom(*a, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(finetune, "_micro_step", oom)
    with pytest.raises(torch.OutOfMemoryError):
        _train(tiny_models_dir, tmp_path / "one", data, _short())


def test_bf16_is_a_keyed_difference_and_fp16_keeps_the_keys_made_before(tiny_models_dir, tmp_path, data, reference):
    ref_w, ref_meta, _, fresh = reference
    assert "precision" not in ref_meta["params"] and "speed" not in ref_meta["params"]  # fp16: the old key parts
    w, meta = _train(tiny_models_dir, tmp_path, data, _short(precision="bf16"))  # bf16 autocast, even on the CPU
    assert meta["params"] == {**ref_meta["params"], "precision": "bf16"}

    def norm(a, b):
        return float(np.sqrt(sum(float(((a[k] - b[k]).astype(np.float64) ** 2).sum()) for k in a)))

    # a difference of rounding, not of recipe: the weights moved the same way, not exactly as far
    assert 0 < norm(w, ref_w) < 0.5 * norm(ref_w, fresh), (norm(w, ref_w), norm(ref_w, fresh))
    np.testing.assert_allclose(meta["losses"], ref_meta["losses"], rtol=0.05)


def test_the_cli_refuses_a_micro_batch_that_splits_the_recipe(vlcp, tmp_path):
    run = ("distill", "--data", "digits", "--ipc", "1", "--tiny", "--out", tmp_path / "o")
    r = vlcp(*run, "--finetune-micro-batch", "12")
    assert r.exit_code == 2, r.output
    assert "--finetune-micro-batch: must be a multiple of --finetune-batch-size (8) that divides the update of 32 " \
           "samples (batch size x accumulation), got 12" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "o").exists()
    r = vlcp(*run, "--finetune-precision", "fp8")
    assert r.exit_code == 2 and "fp16" in r.output and "bf16" in r.output


def test_a_resumed_run_in_channels_last_with_fused_adamw_is_the_uninterrupted_one(tiny_models_dir, tmp_path, data,
                                                                                   monkeypatch):
    """The checkpoint's AdamW state comes back NCHW; the weights are turned channels_last after it: the state must
    follow (the fused kernel pairs elements by memory order: on the CPU a mismatch silently mixes them up)."""
    lat, caps = data
    p = finetune.FinetuneParams(epochs=4, batch_size=8, lr=1e-4, accumulation=4, max_steps=3, ema=False,
                                checkpoint_every=1, speed=TrainSpeed(channels_last=True, fused_optimizer=True))
    whole_w, whole = _train(tiny_models_dir, tmp_path / "whole", data, p)
    real = finetune._micro_step
    killed_at(monkeypatch, finetune, "_micro_step", 8)  # in step 3
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_models_dir, tmp_path / "cut", data, p)
    monkeypatch.setattr(finetune, "_micro_step", real)
    w, resumed = _train(tiny_models_dir, tmp_path / "cut", data, p)
    assert whole["steps"] == 3 and resumed["resumed_from"] == 2
    np.testing.assert_allclose(resumed["losses"], whole["losses"], rtol=1e-6)
    worst = max(float(np.abs(w[k] - whole_w[k]).max()) for k in w)
    assert worst <= 1e-6, worst


def test_the_probe_pass_fills_every_trainable_gradient(tiny_models_dir, tmp_path):
    """What cuda_measure runs (here on the CPU): one pass of zeros through the training UNet, in its layout, with
    checkpointing switched as asked and back."""
    s = finetune._setup(_pipe(tiny_models_dir, tmp_path, "probe"), finetune.FinetuneParams(), None)
    p = finetune.FinetuneParams(speed=TrainSpeed(channels_last=True))
    s.unet.to(memory_format=torch.channels_last)
    for ckpt in (True, False):
        mb.set_checkpointing(s.unet, ckpt)
        assert s.unet.is_gradient_checkpointing is ckpt
        mb._probe_pass(s, p, (4, 16, 16), 3)
        assert all(q.grad is not None for q in s.params)  # every gradient buffer a real pass allocates
        assert sum(float(q.grad.abs().sum()) > 0 for q in s.params) > len(s.params) // 2  # (zeros in: conv_in's is 0)
        for q in s.params:
            q.grad = None
