"""Fine-tuning (Algorithm 1, step 3) and the semantic prompt strategies (paper, Table 5)."""
import json

import numpy as np
import pytest

from tests.conftest import killed_at, read_manifest
from vlcp.method import finetune, prompts
from vlcp.method import micro_batch as mb
from vlcp.models.loading import load_img2img, resolve
from vlcp.models.tiny import TINY_SD
from vlcp.store.cache import StageCache

BASE = ["distill", "--data", "digits", "--tiny", "--max-per-class", "20", "--ipc", "2", "--steps", "3"]


RECORD = {"caption": "a fox sitting in snow", "representative_words": {"snow": 5, "sitting": 4, "tree": 2}}


def test_each_text_strategy_builds_its_prompt():
    assert prompts.simple_prompt("dcs", "red fox", RECORD) == "a fox sitting in snow"
    assert prompts.simple_prompt("label", "red fox", RECORD) == "red fox"
    assert prompts.simple_prompt("label+keywords", "red fox", RECORD) == "red fox, snow, sitting, tree"
    assert prompts.llm_request("red fox", RECORD) == (
        "Write one sentence describing a photo of a red fox, using these features: snow, sitting, tree. "
        "Answer with the sentence only.")


@pytest.fixture(scope="module")
def tiny_latents(tiny_models_dir):
    rng = np.random.default_rng(0)
    return rng.normal(size=(24, 4, 16, 16)).astype(np.float32), [f"digit {i % 10} with a loop" for i in range(24)]


def _pipe(tiny_models_dir, tmp_path):
    return load_img2img(resolve(str(tiny_models_dir / TINY_SD), StageCache(tmp_path / "r")), "cpu")


def test_loss_decreases_and_weights_change_the_output(tiny_models_dir, tmp_path, tiny_latents):
    lat, caps = tiny_latents
    pipe = _pipe(tiny_models_dir, tmp_path)
    gen = dict(prompts=["a loop"], seeds=[3], negative_prompt="", strength=0.7, guidance_scale=5, steps=4)
    before = __import__("vlcp.method.synthesis", fromlist=["x"]).generate(pipe, lat[:1], **gen)
    p = finetune.FinetuneParams(epochs=7, batch_size=8, lr=1e-3, checkpoint_every=1000, accumulation=1)
    weights, meta = finetune.train(pipe, lat, caps, p, StageCache(tmp_path / "c"), "k", progress=False)
    assert meta["steps"] == 21 and len(meta["losses"]) == 21
    assert np.mean(meta["losses"][-5:]) < np.mean(meta["losses"][:5])  # Eq. 1 goes down
    fresh = _pipe(tiny_models_dir, tmp_path)
    finetune.apply_weights(fresh.unet, "full", weights, 4)
    from vlcp.method.synthesis import generate

    after = generate(fresh, lat[:1], **gen)
    assert not np.array_equal(before, after)
    assert np.array_equal(after, generate(pipe, lat[:1], **gen))  # reloaded weights = trained weights


def test_latents_read_per_micro_batch_train_the_same_weights(tiny_models_dir, tmp_path, tiny_latents):
    """finetune.Rows (what the stage passes: latents read from the cache a micro-batch at a time) gives
    the bytes the stacked array gives, and reads only the rows each micro-batch asks for."""
    lat, caps = tiny_latents
    p = finetune.FinetuneParams(epochs=1, batch_size=8, lr=1e-3, accumulation=1, ema=False)
    stacked, _ = finetune.train(_pipe(tiny_models_dir, tmp_path), lat, caps, p, StageCache(tmp_path / "a"), "k",
                                progress=False)
    asked = []
    rows = finetune.Rows(lambda i: asked.append(i) or lat[i], len(lat))
    lazy, _ = finetune.train(_pipe(tiny_models_dir, tmp_path), rows, caps, p, StageCache(tmp_path / "b"), "k",
                             progress=False)
    assert stacked.keys() == lazy.keys() and all(np.array_equal(stacked[k], lazy[k]) for k in stacked)
    assert sorted(asked) == list(range(24))  # one epoch: each latent read once, in its micro-batch


def test_lora_adapter_is_small_and_reloads(tiny_models_dir, tmp_path, tiny_latents):
    lat, caps = tiny_latents
    pipe = _pipe(tiny_models_dir, tmp_path)
    p = finetune.FinetuneParams(method="lora", epochs=1, batch_size=8, lr=1e-2, lora_rank=2)
    weights, meta = finetune.train(pipe, lat, caps, p, StageCache(tmp_path / "c"), "k", progress=False)
    assert all("lora" in k for k in weights) and meta["trainable_parameters"] < 20_000
    from vlcp.method.synthesis import generate

    gen = dict(prompts=["a loop"], seeds=[3], negative_prompt="", strength=0.7, guidance_scale=5, steps=4)
    fresh = _pipe(tiny_models_dir, tmp_path)
    base = generate(fresh, lat[:1], **gen)
    finetune.apply_weights(fresh.unet, "lora", weights, 2)
    adapted = generate(fresh, lat[:1], **gen)
    assert not np.array_equal(base, adapted) and np.array_equal(adapted, generate(pipe, lat[:1], **gen))


def test_killed_training_resumes_from_its_checkpoint(tiny_models_dir, tmp_path, tiny_latents, monkeypatch):
    lat, caps = tiny_latents
    p = finetune.FinetuneParams(epochs=3, batch_size=8, lr=1e-3, checkpoint_every=4, accumulation=1)  # 9 steps
    _, whole = finetune.train(_pipe(tiny_models_dir, tmp_path), lat, caps, p, StageCache(tmp_path / "a"), "k",
                              progress=False)
    real = mb._batch  # the draws of micro-batch m live in micro_batch.py
    killed_at(monkeypatch, mb, "_batch", 6)
    cache = StageCache(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        finetune.train(_pipe(tiny_models_dir, tmp_path), lat, caps, p, cache, "k", progress=False)
    assert cache.get("finetune_checkpoint", "k").meta["step"] == 4
    monkeypatch.setattr(mb, "_batch", real)
    w2, resumed = finetune.train(_pipe(tiny_models_dir, tmp_path), lat, caps, p, cache, "k", progress=False)
    assert resumed["resumed_from"] == 4 and len(resumed["losses"]) == 9
    # same data order, noise and optimizer state: the resumed run reproduces the uninterrupted one
    assert np.allclose(resumed["losses"], whole["losses"], rtol=1e-4, atol=1e-6)


def test_distill_uses_the_finetuned_model_and_never_retrains_needlessly(vlcp, tmp_path):
    ft = ["--finetune-max-steps", "6", "--finetune-lr", "1e-3", "--finetune-checkpoint-every", "4"]
    r = vlcp(*BASE, *ft, "--out", tmp_path / "a")
    assert r.exit_code == 0, r.output
    m = read_manifest(tmp_path / "a")
    assert m["stages"]["finetune"]["items_computed"] == 1 and m["finetune"]["steps"] == 6
    assert (tmp_path / "a" / "finetune_loss.png").exists() or (tmp_path / "a" / "finetune_loss.csv").exists()
    for change in (["--strength", "0.5"], ["--ipc", "3"]):  # (beta / text strategy: see the tests below)
        r = vlcp(*BASE, *ft, *change, "--force", "--out", tmp_path / "b")
        assert r.exit_code == 0, r.output
        s = read_manifest(tmp_path / "b")["stages"]
        assert s["finetune"]["cached"] and not s["finetune"]["model_loaded"], change
    # the images come from the fine-tuned UNet: without fine-tuning they differ ...
    vlcp(*BASE, "--no-finetune", "--force", "--out", tmp_path / "plain")
    a, plain = (np.asarray(__import__("PIL.Image", fromlist=["x"]).open(d / "train" / "3" / "0000.png"))
                for d in (tmp_path / "a", tmp_path / "plain"))
    assert not np.array_equal(a, plain)
    # ... and the weights reloaded from the cache give the very pixels of the run that trained them
    assert vlcp("cache", "clear", "--stage", "synthesis").exit_code == 0
    vlcp(*BASE, *ft, "--force", "--out", tmp_path / "again")
    again = read_manifest(tmp_path / "again")["stages"]
    assert again["finetune"]["cached"] and again["synthesis"]["items_computed"] == 20
    for f in ("0/0000.png", "3/0001.png", "9/0000.png"):
        assert (tmp_path / "a" / "train" / f).read_bytes() == (tmp_path / "again" / "train" / f).read_bytes()


def test_text_strategies_change_only_prompts_and_synthesis(vlcp, tmp_path):
    r = vlcp(*BASE, "--no-finetune", "--out", tmp_path / "a")
    assert r.exit_code == 0, r.output
    for strategy in ("label", "label+keywords", "llm"):
        r = vlcp(*BASE, "--no-finetune", "--text-strategy", strategy, "--force", "--out", tmp_path / "b")
        assert r.exit_code == 0, r.output
        m = read_manifest(tmp_path / "b")
        s = m["stages"]
        assert s["text_prototypes"]["cached"] and not s["prompts"]["cached"], strategy
        protos = json.loads((tmp_path / "b" / "prototypes.json").read_text())["classes"]["4"]
        prompt = protos["clusters"][0]["prompt"]
        if strategy == "label":
            assert prompt == "handwritten digit 4"
        elif strategy == "label+keywords":
            words = list(protos["clusters"][0]["representative_words"])
            assert prompt == ", ".join(["handwritten digit 4", *words])
        else:
            assert prompt and s["prompts"]["model_loaded"] and "text_llm" in m["models"]
    r = vlcp(*BASE, "--no-finetune", "--text-strategy", "llm", "--text-llm", tmp_path / "nope", "--force",
             "--out", tmp_path / "b")
    assert r.exit_code == 2 and "does not exist" in r.output  # a missing path: usage
