"""Fine-tuning on a real GPU's terms, checked on CPU: checkpoint disk use, exact resume (GradScaler
included), the reference recipe (EMA, clipping, accumulation, flips), LoRA precision, freed gradients."""
import numpy as np
import pytest
import torch

from tests.conftest import killed_at
from vlcp.method import finetune
from vlcp.method import micro_batch as mb
from vlcp.models.loading import load_img2img, load_unet, resolve
from vlcp.models.tiny import TINY_SD
from vlcp.store import checkpoint
from vlcp.store.cache import StageCache


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    return rng.normal(size=(24, 4, 16, 16)).astype(np.float32), [f"digit {i % 10} with a loop" for i in range(24)]


def _pipe(models, tmp_path):
    return load_img2img(resolve(str(models / TINY_SD), StageCache(tmp_path / "r")), "cpu")


def _blobs(cache: StageCache) -> list:
    return sorted((cache.root / "blobs" / finetune.CHECKPOINT_STAGE).rglob("*.safetensors"))


def test_only_the_latest_checkpoint_is_kept_and_drop_removes_it(tiny_models_dir, tmp_path, data, monkeypatch):
    lat, caps = data
    cache = StageCache(tmp_path / "c")
    seen = []
    real_save = checkpoint.save

    def counting_save(*a, **k):
        real_save(*a, **k)
        seen.append((len(_blobs(cache)), cache.get(finetune.CHECKPOINT_STAGE, "k").meta["step"]))

    monkeypatch.setattr(checkpoint, "save", counting_save)
    p = finetune.FinetuneParams(epochs=2, batch_size=8, lr=1e-3, checkpoint_every=1, accumulation=1)  # 6 steps
    finetune.train(_pipe(tiny_models_dir, tmp_path), lat, caps, p, cache, "k", progress=False)
    assert seen == [(1, 1), (1, 2), (1, 3), (1, 4), (1, 5)]  # a checkpoint every step, one blob on disk at a time
    assert not list((cache.root / "blobs").rglob(".tmp-*"))
    assert finetune.drop_checkpoint(cache, "k")
    assert _blobs(cache) == [] and cache.get(finetune.CHECKPOINT_STAGE, "k") is None


def test_default_checkpoint_interval_is_in_the_thousands():
    assert finetune.FinetuneParams().checkpoint_every >= 1000


def test_grad_scaler_state_round_trips_through_a_checkpoint(tmp_path):
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2, enabled=True)
    for grad_scale in (1.0, 1.0, 1.0, float("inf")):  # two growths, then an overflow: the scale backs off
        scaler.scale((w * grad_scale).sum()).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    state = scaler.state_dict()
    assert state["scale"] == 1024.0 and state["_growth_tracker"] == 0  # 1024 -> 2048 -> backed off to 1024
    scaler.scale(w.sum()).backward()
    scaler.step(opt)
    scaler.update()
    state = scaler.state_dict()
    assert state["_growth_tracker"] == 1
    cache = StageCache(tmp_path / "c")
    checkpoint.save(cache, "s", "k", {"w": w}, opt, {"step": 5}, scaler)
    w2 = torch.nn.Parameter(torch.zeros(3))
    opt2 = torch.optim.AdamW([w2], lr=0.1)
    fresh = torch.amp.GradScaler("cpu", enabled=True)
    checkpoint.restore(cache.get("s", "k"), {"w": w2}, opt2, "cpu", fresh)
    assert fresh.state_dict() == state and torch.equal(w2, w)


def test_a_checkpoint_resumes_into_the_kernel_this_run_chose(tmp_path):
    """A run interrupted on one machine (AdamW's foreach kernel) resumes with this run's kernel (fused on CUDA)
    and the saved hyper-parameters and state; the same steps follow to float rounding."""
    def make(fused):
        w = torch.nn.Parameter(torch.arange(4.0))
        return w, torch.optim.AdamW([w], lr=0.1, weight_decay=1e-2, **({"fused": True} if fused else {}))

    w, opt = make(False)
    for _ in range(3):
        (w ** 2).sum().backward()
        opt.step(), opt.zero_grad()
    cache = StageCache(tmp_path / "c")
    checkpoint.save(cache, "s", "k", {"w": w}, opt, {"step": 3})
    for fused in (True, False):
        w2, opt2 = make(fused)
        opt2.param_groups[0]["lr"] = 0.5  # the saved hyper-parameters win
        checkpoint.restore(cache.get("s", "k"), {"w": w2}, opt2, "cpu")
        assert opt2.param_groups[0]["fused"] is (True if fused else None) and opt2.param_groups[0]["lr"] == 0.1
        assert float(opt2.state[w2]["step"]) == 3 and torch.equal(w2, w)
        (w2 ** 2).sum().backward()
        opt2.step()
        if not fused:
            (w ** 2).sum().backward()
            opt.step()
            assert torch.allclose(w2, w, atol=1e-7)
        else:
            fused_next = w2.detach().clone()
    assert torch.allclose(fused_next, w, atol=1e-6)


def test_resume_is_exact_with_the_reference_recipe(tiny_models_dir, tmp_path, data, monkeypatch):
    lat, caps = data  # defaults: EMA, clip 1, accumulation 4, flips; 5 epochs x 3 micro-batches = 4 steps
    p = finetune.FinetuneParams(epochs=5, batch_size=8, lr=1e-3, checkpoint_every=2)
    w_whole, whole = finetune.train(_pipe(tiny_models_dir, tmp_path), lat, caps, p, StageCache(tmp_path / "a"), "k",
                                    progress=False)
    real = finetune._micro_step
    killed_at(monkeypatch, finetune, "_micro_step", 9)  # in step 3
    cache = StageCache(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        finetune.train(_pipe(tiny_models_dir, tmp_path), lat, caps, p, cache, "k", progress=False)
    monkeypatch.setattr(finetune, "_micro_step", real)
    w_resumed, resumed = finetune.train(_pipe(tiny_models_dir, tmp_path), lat, caps, p, cache, "k", progress=False)
    assert whole["steps"] == 4 and resumed["resumed_from"] == 2
    assert np.allclose(resumed["losses"], whole["losses"], rtol=1e-4, atol=1e-6)
    assert all(np.allclose(w_resumed[k], w_whole[k], atol=1e-5) for k in w_whole)  # EMA weights included


def test_accumulation_groups_micro_batches_and_clipping_runs(tiny_models_dir, tmp_path, data, monkeypatch):
    lat, caps = data
    calls, clips = [], []
    real = finetune._micro_step
    monkeypatch.setattr(finetune, "_micro_step", lambda s, la, ca, p, m, w: calls.append((m, w)) or real(s, la, ca, p, m, w))
    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda ps, n: clips.append(n) or real_clip(ps, n))
    p = finetune.FinetuneParams(epochs=3, batch_size=8, lr=1e-3, ema=False)  # 9 micro-batches, accumulation 4
    _, meta = finetune.train(_pipe(tiny_models_dir, tmp_path), lat, caps, p, StageCache(tmp_path / "c"), "k",
                             progress=False)
    assert meta["steps"] == 3 and len(meta["losses"]) == 3
    assert [m for m, _ in calls] == list(range(9))
    assert [w for _, w in calls] == [0.25] * 8 + [1.0]  # the last step has one micro-batch
    assert clips == [1.0] * 3
    calls.clear(), clips.clear()
    p2 = finetune.FinetuneParams(epochs=1, batch_size=8, lr=1e-3, ema=False, max_grad_norm=None, accumulation=1)
    finetune.train(_pipe(tiny_models_dir, tmp_path), lat, caps, p2, StageCache(tmp_path / "d"), "k", progress=False)
    assert clips == [] and len(calls) == 3


def test_ema_follows_diffusers_decay():
    q = torch.nn.Parameter(torch.zeros(2))
    ema = finetune.EMA([q], decay=0.9999)
    with torch.no_grad():
        q.fill_(4.0)
    ema.step()  # the first update copies
    assert torch.equal(ema.shadow[0], torch.full((2,), 4.0))
    with torch.no_grad():
        q.fill_(15.0)
    ema.step()  # decay (1 + 1) / (10 + 1) = 2/11: 4 + 9/11 * (15 - 4) = 13
    assert torch.allclose(ema.shadow[0], torch.full((2,), 13.0))
    ema.copy_to_params()
    assert torch.allclose(q, torch.full((2,), 13.0))


def test_ema_weights_are_the_result(tiny_models_dir, tmp_path, data):
    lat, caps = data
    p = finetune.FinetuneParams(epochs=6, batch_size=8, lr=1e-3, accumulation=1)
    pipe = _pipe(tiny_models_dir, tmp_path)
    w_ema, _ = finetune.train(pipe, lat, caps, p, StageCache(tmp_path / "a"), "k", progress=False)
    p.ema = False
    w_raw, _ = finetune.train(_pipe(tiny_models_dir, tmp_path), lat, caps, p, StageCache(tmp_path / "b"), "k",
                              progress=False)
    k = "conv_in.weight"
    assert not np.allclose(w_ema[k], w_raw[k])
    assert np.array_equal(pipe.unet.state_dict()[k].numpy(), w_ema[k])  # the pipeline synthesises with them


class _Spy:
    def __init__(self, sched):
        self.sched, self.seen = sched, []

    def __getattr__(self, name):
        return getattr(self.sched, name)

    def add_noise(self, z, noise, t):
        self.seen.append(z.clone())
        return self.sched.add_noise(z, noise, t)


def test_flips_use_the_flipped_latents_or_mirror_them(tiny_models_dir, tmp_path, data):
    lat, caps = data
    p = finetune.FinetuneParams(batch_size=8, accumulation=1)
    s = finetune._setup(_pipe(tiny_models_dir, tmp_path), p, None)
    s.sched = _Spy(s.sched)
    flipped = lat[:, :, :, ::-1] + 100.0  # a stand-in "latent of the flipped image", told apart by its offset
    pairs = np.stack([lat, flipped], axis=1)
    for m in range(3):
        finetune._micro_step(s, pairs, caps, p, m, 1.0)
        finetune._micro_step(s, lat, caps, p, m, 1.0)
    n_flipped = 0
    for m in range(3):
        idx, flips = mb._batch(m, 24, 8, 0), mb._flips(m, 8, 0)
        encoded, mirrored = s.sched.seen[2 * m].numpy(), s.sched.seen[2 * m + 1].numpy()
        for j, i in enumerate(idx):
            assert np.array_equal(encoded[j], flipped[i] if flips[j] else lat[i])
            assert np.array_equal(mirrored[j], lat[i, :, :, ::-1] if flips[j] else lat[i])
        n_flipped += flips.sum()
    assert 0 < n_flipped < 24
    p.flip = False
    s.sched.seen.clear()
    finetune._micro_step(s, pairs, caps, p, 0, 1.0)
    assert np.array_equal(s.sched.seen[0].numpy(), lat[mb._batch(0, 24, 8, 0)])


def test_lora_keeps_the_base_in_half_precision_and_frees_gradients(tiny_models_dir, tmp_path, data):
    lat, caps = data
    pipe = _pipe(tiny_models_dir, tmp_path)
    pipe.unet.to(torch.float16)
    s = finetune._setup(pipe, finetune.FinetuneParams(method="lora", lora_rank=2), None)
    dtypes = {n: q.dtype for n, q in pipe.unet.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora" not in n} == {torch.float16}
    assert all(q.dtype == torch.float32 for q in s.params) and len(s.params) < len(dtypes)
    pipe = _pipe(tiny_models_dir, tmp_path)  # a short fp32 run (CPU): no gradient survives training
    finetune.train(pipe, lat, caps, finetune.FinetuneParams(method="lora", epochs=1, lora_rank=2), StageCache(
        tmp_path / "c"), "k", progress=False)
    assert all(q.grad is None for q in pipe.unet.parameters())
    assert not any(q.requires_grad for q in pipe.unet.parameters())


def test_gradient_checkpointing_defaults_on_for_cuda():
    for method in ("lora", "full"):
        assert finetune.FinetuneParams(method=method).uses_gradient_checkpointing("cuda")
        assert not finetune.FinetuneParams(method=method).uses_gradient_checkpointing("cpu")
    assert not finetune.FinetuneParams(method="lora", gradient_checkpointing=False).uses_gradient_checkpointing("cuda")


def test_full_finetuning_trains_an_fp32_master_and_hands_its_weights_to_the_pipeline(tiny_models_dir, tmp_path, data):
    lat, caps = data
    ref = resolve(str(tiny_models_dir / TINY_SD), StageCache(tmp_path / "r"))
    pipe = _pipe(tiny_models_dir, tmp_path)
    master = load_unet(ref, "cpu")
    assert master.dtype == torch.float32 and master is not pipe.unet
    before = pipe.unet.conv_in.weight.detach().clone()
    w, meta = finetune.train(pipe, lat, caps, finetune.FinetuneParams(epochs=1, lr=1e-3, accumulation=1),
                             StageCache(tmp_path / "c"), "k", progress=False, master_unet=master)
    assert meta["master_weights"] == "fp32"
    assert not torch.equal(pipe.unet.conv_in.weight, before)
    assert torch.equal(pipe.unet.conv_in.weight, master.conv_in.weight)
    assert np.array_equal(w["conv_in.weight"], master.conv_in.weight.detach().numpy())


def test_training_latent_pairs_are_centre_crops_and_their_mirrors(tiny_models_dir, tmp_path):
    from PIL import Image

    from vlcp.method.latents import encode_images, encode_training_pairs
    from vlcp.models.loading import load_vae

    vae = load_vae(resolve(str(tiny_models_dir / TINY_SD), StageCache(tmp_path / "r")), "cpu")
    rng = np.random.default_rng(0)
    wide = Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8))  # 48 wide: the crop drops 8 px a side
    pairs = encode_training_pairs(vae, [wide], 32)
    assert pairs.shape == (1, 2, 4, 16, 16)
    assert np.allclose(pairs[0, 0], encode_images(vae, [wide], 32, crop="center")[0], atol=1e-5)
    mirrored = wide.transpose(Image.FLIP_LEFT_RIGHT)
    assert np.allclose(pairs[0, 1], encode_images(vae, [mirrored], 32, crop="center")[0], atol=1e-5)
    assert not np.allclose(pairs[0, 0], encode_images(vae, [wide], 32)[0], atol=1e-3)  # not the squashed image
