"""Issue 25 on CPU: the faster captioning and synthesis paths make what the plain paths make.

Greedy captions with a static KV cache (and with the decode step compiled) are token for token the dynamic
cache's; reference captions made in one batched call (one generator per row) are token for token the
one-image calls'; a batch whose captions all end early takes fewer decoding steps; the batch sizes from
memory are the arithmetic they claim; img2img with channels_last and smaller calls stays within one
intensity level of the plain path. All on the real tiny LLaVA and SD that ``--tiny`` builds.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.conftest import read_manifest
from vlcp.method import synthesis as syn
from vlcp.models import captioner as cap
from vlcp.models.captioner import PROMPT, Engine, caption_images

NAMES = ["handwritten digit 1", "zero", "a handwritten digit with a long name", "seven", "handwritten digit 1",
         "the number nine"]  # prompt lengths differ (left padding, several reference groups) and repeat


@pytest.fixture(scope="module")
def llava(tiny_models_dir, tmp_path_factory):
    from vlcp.models.loading import load_captioner, resolve
    from vlcp.models.tiny import TINY_LLAVA
    from vlcp.store.cache import StageCache

    cache = StageCache(tmp_path_factory.mktemp("llava-cache"))
    return load_captioner(resolve(str(tiny_models_dir / TINY_LLAVA), cache), "cpu")


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (20 + 3 * i, 30 - 2 * i, 3), dtype=np.uint8)) for i in range(6)]


def _count_forwards(model):
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("eng", [Engine("static"), Engine("static", compile="eager"),
                                 Engine("static", compile="aot_eager")], ids=["static", "compiled", "aot_eager"])
def test_greedy_static_cache_is_token_identical_to_the_dynamic_one(llava, images, eng):
    """The compiled variants run transformers' CompileConfig path with dynamo's eager backend and with
    aot_eager, which also traces through AOTAutograd (where inference mode and the cache's in-place updates
    meet); inductor takes ~2 min for this model on 2 cores; on CUDA --caption-engine hf-static uses inductor
    with CUDA graphs."""
    model, proc = llava
    plain = caption_images(model, proc, images, NAMES, PROMPT, 24)
    assert len(set(plain)) >= 3  # the tiny model's captions differ by image: the comparison can fail
    model.__dict__.pop("_compiled_call", None)  # (a compiled call of an earlier variant)
    assert caption_images(model, proc, images, NAMES, PROMPT, 24, "greedy", None, eng) == plain
    assert hasattr(model, "_compiled_call") == bool(eng.compile)  # transformers did compile the decode step


def _group_sizes(proc, names):
    """Rows per batched reference call: one call per prompt length, shortest first."""
    lengths = [len(proc.tokenizer(cap.llava_v1_prompt(cap.format_prompt(PROMPT, n))).input_ids) for n in names]
    return [lengths.count(n) for n in sorted(set(lengths))]


def test_batched_reference_captions_are_the_one_image_calls(llava, images, monkeypatch):
    model, proc = llava
    seeds = [cap.item_seed(0, f"image {i}") for i in range(len(images))]
    alone = caption_images(model, proc, images, NAMES, PROMPT, 40, "reference", seeds)  # one image per call
    assert len(set(alone)) == len(alone)  # sampled at T 0.2: every caption differs
    calls, real = [], model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: calls.append(len(kw["input_ids"])) or real(**kw))
    for name in cap.ENGINES:
        calls.clear()
        assert caption_images(model, proc, images, NAMES, PROMPT, 40, "reference", seeds, name) == alone, name
        assert calls == _group_sizes(proc, NAMES) and len(calls) < len(NAMES)  # rows of one length together
    other = caption_images(model, proc, images, NAMES, PROMPT, 40, "reference", [s + 1 for s in seeds], "hf")
    assert all(a != b for a, b in zip(other, alone))  # the row's own seed decides, not its place in the batch


@pytest.mark.parametrize("mode, eng", [("greedy", None), ("greedy", "hf-static"), ("reference", "hf")])
def test_a_batch_whose_captions_all_end_early_stops_early(llava, images, mode, eng):
    """transformers' generate stops once every row has produced an end token and pads the rows that ended
    first: with end tokens that every caption meets by its 3rd token, at most 3 forward calls per generate
    call instead of 16, and each caption is the long one cut after its first end token."""
    model, proc = llava
    seeds = list(range(len(images)))
    calls, handle = _count_forwards(model)
    try:
        full = caption_images(model, proc, images, NAMES, PROMPT, 16, mode, seeds, eng)
        groups = 1 if mode == "greedy" else len(_group_sizes(proc, NAMES))
        assert len(calls) == 16 * groups  # the tiny model has no end token: every row runs to 16
        end_words = {full[0].split()[2]}  # caption 0 ends at its 3rd token; one without an end by then at its 2nd
        for c in full:
            end_words |= set() if end_words & set(c.split()[:3]) else {c.split()[1]}
        ends = sorted(proc.tokenizer.convert_tokens_to_ids(w) for w in end_words)
        model.generation_config.eos_token_id = ends
        calls.clear()
        short = caption_images(model, proc, images, NAMES, PROMPT, 16, mode, seeds, eng)
    finally:
        model.generation_config.eos_token_id = None
        handle.remove()
    assert len(calls) <= 3 * groups
    for s, f in zip(short, full):
        words = f.split()
        cut = next(i for i, w in enumerate(words) if proc.tokenizer.convert_tokens_to_ids(w) in ends)
        assert s.split() == words[:cut + 1]
    assert len({len(s.split()) for s in short}) > 1  # rows ended at different steps: the early ones were padded


def _oom_above(model, monkeypatch, rows: int) -> list[int]:
    """``model.generate`` runs out of memory (torch's own error) on a batch of more than ``rows``."""
    import torch

    calls, real = [], model.generate

    def generate(**kw):
        calls.append(len(kw["input_ids"]))
        if len(kw["input_ids"]) > rows:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(**kw)

    monkeypatch.setattr(model, "generate", generate)
    return calls


@pytest.mark.parametrize("mode, eng", [("greedy", "hf"), ("reference", "hf")])
def test_a_caption_batch_out_of_memory_is_captioned_as_halves(llava, images, monkeypatch, mode, eng):
    model, proc = llava
    seeds = [cap.item_seed(0, f"image {i}") for i in range(len(images))]
    whole = caption_images(model, proc, images, NAMES, PROMPT, 24, mode, seeds, eng)
    calls, halved = _oom_above(model, monkeypatch, 2), []
    assert cap.caption_fitting(model, proc, images, NAMES, PROMPT, 24, mode, seeds, eng, halved.append) == whole
    if mode == "greedy":  # 6 -> 3 + 3 -> (1 + 2) + (1 + 2): the failed calls first, in order
        assert calls == [6, 3, 1, 2, 3, 1, 2] and halved == [6, 3, 3]
    assert halved[0] == 6 and max(_group_sizes(proc, NAMES)) > 2  # reference: a call per prompt length; one failed
    monkeypatch.setattr(model, "generate", lambda **kw: (_ for _ in ()).throw(
        __import__("torch").OutOfMemoryError("CUDA out of memory")))
    with pytest.raises(__import__("torch").OutOfMemoryError):  # one image that does not fit: the error stands
        cap.caption_fitting(model, proc, images[:1], NAMES[:1], PROMPT, 24, mode, seeds[:1], eng)


def test_kv_cache_bytes_per_token_come_from_the_config():
    from transformers import LlamaConfig, LlavaConfig

    assert cap.kv_bytes_per_token(LlavaConfig().get_text_config(), 2) == 2 * 32 * 32 * 128 * 2  # 7B: 0.5 MiB
    gqa = LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2)
    assert cap.kv_bytes_per_token(gqa, 4) == 2 * 2 * 2 * 8 * 4


def test_caption_batch_size_is_the_memory_arithmetic():
    kv, w = 524288, 14.12e9  # LLaVA-1.5-7B in fp16: KV bytes per token, weights
    # the roofline: 80 % of the bandwidth limit at B = 4 W / (K c); c = 576 image + 128 text + 128 (half of 256 new)
    assert cap.roofline_batch(w, kv, 832) == 130  # 4 x 14.12e9 / 436,207,616 = 129.5
    assert cap.roofline_batch(w, kv, 832, share=0.5) == 33
    assert cap.roofline_batch(1.0, kv, 832) == 1
    # 141 GB free: (141 - 14.12) e9 x 0.8 / (524288 x 960) = 201.7 sequences fit; the roofline caps at 130
    assert cap.caption_batch_size(141e9, w, kv, 960, cap=130) == 130
    assert cap.caption_batch_size(141e9, w, kv, 960, cap=500) == 201
    assert cap.caption_batch_size(23.5e9, w, kv, 960, cap=130) == 14  # a 24 GB card: 9.38e9 x 0.8 / 503,316,480
    assert cap.caption_batch_size(141e9, w, kv, 1728, cap=500) == 112  # reference mode: 1024 new tokens
    assert cap.caption_batch_size(10e9, w, kv, 960, cap=130) == 1  # the weights alone do not fit: at least 1
    assert syn.synthesis_batch_size(10e9, 1.5e9, cap=32) == 5  # 8e9 / 1.5e9 = 5.3
    assert syn.synthesis_batch_size(100e9, 1.5e9, cap=32) == 32 and syn.synthesis_batch_size(1e9, 2e9, 32) == 1


def test_img2img_with_channels_last_and_smaller_calls_is_the_plain_path(tiny_models_dir, tmp_path):
    import torch

    from vlcp.models.loading import load_img2img, resolve
    from vlcp.models.tiny import TINY_SD
    from vlcp.store.cache import StageCache

    ref = resolve(str(tiny_models_dir / TINY_SD), StageCache(tmp_path / "c"), probe_file="model_index.json")
    lat = np.random.default_rng(0).normal(size=(5, 4, 16, 16)).astype(np.float32)
    prompts = ["a digit", "a handwritten digit with a long tail " * 12, "zero", "a seven", "one"]  # 2 lengths
    s = syn.Sampling(steps=6)
    pipe = load_img2img(ref, "cpu")
    plain = syn.sample(pipe, lat, prompts, [1, 2, 3, 4, 5], s)
    fast = syn.sample(pipe, lat, prompts, [1, 2, 3, 4, 5], s, syn.Speed(channels_last=True, max_batch=2))
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    diff = np.abs(plain.astype(int) - fast.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # measured here: max 1, on 1 value of 15,360
    assert plain.std() > 10  # the tiny model's images are not flat: the comparison can fail
    assert syn.speed_for("cuda", True) == syn.Speed(True, "inductor", None, True)
    assert syn.speed_for("cpu") == syn.Speed()


def test_the_engine_is_in_no_key_and_is_checked(vlcp, tmp_path):
    """--caption-engine changes how captions are decoded, not what they are: a second run with the other
    engine finds every caption cached; an unknown engine is a usage error."""
    args = ["distill", "--data", "digits", "--tiny", "--classes", "0,1", "--max-per-class", "2", "--ipc", "1",
            "--until", "captions"]
    for name, engine, computed in [("a", "hf-static", 4), ("b", "hf", 0)]:
        r = vlcp(*args, "--caption-engine", engine, "--out", tmp_path / name)
        assert r.exit_code == 0, r.output
        m = read_manifest(tmp_path / name)
        assert m["stages"]["captions"]["items_computed"] == computed
        assert m["parameters"]["caption_engine"] == engine
    r = vlcp(*args, "--caption-engine", "vllm", "--out", tmp_path / "c")
    assert r.exit_code == 2 and "'vllm' is not one of 'hf', 'hf-static'" in r.output


def test_a_run_whose_caption_batch_runs_out_of_memory_finishes_and_says_so_once(vlcp, tmp_path, monkeypatch):
    import torch

    real = cap.caption_images

    def short_of_memory(model, processor, images, *a, **kw):
        if len(images) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, processor, images, *a, **kw)

    monkeypatch.setattr(cap, "caption_images", short_of_memory)
    r = vlcp("distill", "--data", "digits", "--tiny", "--classes", "0,1", "--max-per-class", "2", "--ipc", "1",
             "--until", "captions", "--caption-batch-size", "4", "--out", tmp_path / "a")
    assert r.exit_code == 0, r.output
    m = read_manifest(tmp_path / "a")
    assert m["stages"]["captions"]["items_computed"] == 4
    said = [w for w in m["warnings"] if "ran out of GPU memory" in w]
    assert said == ["a caption batch of 4 ran out of GPU memory and was captioned as two halves (the same captions); "
                    "a smaller --caption-batch-size skips the retries"]  # once, though the halves of 2 failed too


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_vae_encoding_in_channels_last_is_the_plain_encoding(tiny_models_dir, tmp_path, images):
    """The latents and training_latents stages on CUDA put the VAE and its input in NHWC: the same latents."""
    import torch

    from vlcp.method import latents
    from vlcp.models.loading import load_img2img, resolve
    from vlcp.models.tiny import TINY_SD
    from vlcp.store.cache import StageCache

    vae = load_img2img(resolve(str(tiny_models_dir / TINY_SD), StageCache(tmp_path / "c")), "cpu").vae
    plain = latents.encode_images(vae, images, 32, channels_last=False)
    pairs = latents.encode_training_pairs(vae, images, 32, channels_last=False)
    assert not vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    fast = latents.encode_images(vae, images, 32, channels_last=True)
    assert vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    fast_pairs = latents.encode_training_pairs(vae, images, 32, channels_last=True)
    assert fast.shape == plain.shape == (6, 4, 16, 16) and pairs.shape == fast_pairs.shape == (6, 2, 4, 16, 16)
    assert np.abs(plain).max() > 0.1 and not np.allclose(pairs[:, 0], pairs[:, 1])  # not flat: it can fail
    np.testing.assert_allclose(fast, plain, atol=1e-5)
    np.testing.assert_allclose(fast_pairs, pairs, atol=1e-5)


# -- on CUDA (benchmarks/cuda_checks.sh): four questions, each its own test, so that one GPU run answers all four.
# What decides whether hf-static may become the CUDA default: in fp16 on the GPU, the compiled static cache's
# greedy tokens and the batched reference captions against the plain paths; then the memory fit of img2img and
# the fine-tuning plan.
cuda_only = pytest.mark.skipif(not _cuda(), reason="needs CUDA: runs in benchmarks/cuda_checks.sh")


@pytest.fixture(scope="module")
def cuda_llava(tiny_models_dir, tmp_path_factory):
    from vlcp.models.loading import load_captioner, resolve
    from vlcp.models.tiny import TINY_LLAVA
    from vlcp.store.cache import StageCache

    return load_captioner(resolve(str(tiny_models_dir / TINY_LLAVA), StageCache(tmp_path_factory.mktemp("c"))),
                          "cuda")


def _differ(a: list[str], b: list[str]) -> str:
    return f"{sum(x != y for x, y in zip(a, b))}/{len(a)} captions differ: " + \
        "; ".join(f"{x!r} vs {y!r}" for x, y in zip(a, b) if x != y)[:2000]


@cuda_only
def test_on_cuda_hf_static_greedy_captions_are_the_dynamic_caches(cuda_llava, images):
    import torch

    model, proc = cuda_llava
    assert model.dtype == torch.float16 and cap.batch_for_model(model, 32) >= 1
    plain = caption_images(model, proc, images, NAMES, PROMPT, 24)
    static = caption_images(model, proc, images, NAMES, PROMPT, 24, "greedy", None, "hf-static")
    assert hasattr(model, "_compiled_call")  # transformers compiled the decode step (CompileConfig, CUDA graphs)
    assert static == plain, _differ(static, plain)


@cuda_only
def test_on_cuda_batched_reference_captions_are_the_one_image_calls(cuda_llava, images):
    model, proc = cuda_llava
    seeds = list(range(len(images)))
    alone = caption_images(model, proc, images, NAMES, PROMPT, 24, "reference", seeds)
    batched = caption_images(model, proc, images, NAMES, PROMPT, 24, "reference", seeds, "hf")
    assert batched == alone, _differ(batched, alone)


@cuda_only
def test_on_cuda_img2img_fitted_to_memory_is_the_plain_path(tiny_models_dir, tmp_path):
    from vlcp.models.loading import load_img2img, resolve
    from vlcp.models.tiny import TINY_SD
    from vlcp.store.cache import StageCache

    pipe = load_img2img(resolve(str(tiny_models_dir / TINY_SD), StageCache(tmp_path / "c"),
                                probe_file="model_index.json"), "cuda")
    lat = np.random.default_rng(0).normal(size=(5, 4, 16, 16)).astype(np.float32)
    prompts, s = ["a digit", "zero", "a seven", "one", "two"], syn.Sampling(steps=6)
    ref = syn.sample(pipe, lat, prompts, [1, 2, 3, 4, 5], s)
    fast = syn.sample(pipe, lat, prompts, [1, 2, 3, 4, 5], s, syn.speed_for("cuda"))
    assert pipe._vlcp_image_bytes[(4, 16, 16)] > 0  # the first call measured one image's peak
    diff = np.abs(ref.astype(int) - fast.astype(int))
    assert diff.max() <= 2, (diff.max(), (diff > 0).mean())


@cuda_only
def test_on_cuda_the_fine_tuning_plan_fits_without_checkpointing_and_makes_the_same_update(tiny_models_dir,
                                                                                           tmp_path):
    """The pass measured on the GPU fits, fused AdamW, no checkpointing where it fits; the weights end within
    5 % of their movement of the old path's (8 x 4 passes, checkpointing, foreach AdamW), as on the CPU."""
    from dataclasses import replace

    from vlcp.method import finetune
    from vlcp.method import micro_batch as mb
    from vlcp.models.loading import load_img2img, resolve
    from vlcp.models.tiny import TINY_SD
    from vlcp.store.cache import StageCache

    ref = resolve(str(tiny_models_dir / TINY_SD), StageCache(tmp_path / "c"), probe_file="model_index.json")
    lat = np.random.default_rng(2).normal(size=(20, 4, 16, 16)).astype(np.float32)
    caps = [f"digit {i % 10}" for i in range(20)]
    old = finetune.FinetuneParams(epochs=2, batch_size=4, accumulation=2, lr=1e-4, ema=False,
                                  gradient_checkpointing=True)
    runs, start = {}, None
    for name, p in (("old", old), ("new", replace(old, gradient_checkpointing=None, speed=mb.speed_for("cuda")))):
        pipe = load_img2img(ref, "cuda")
        start = start or {k: v.detach().float().cpu().numpy().copy() for k, v in pipe.unet.state_dict().items()}
        runs[name] = finetune.train(pipe, lat, caps, p, StageCache(tmp_path / name), "k", progress=False)
    (w_old, m_old), (w_new, m_new) = runs["old"], runs["new"]
    ran = m_new["passes"]
    assert ran["fits"] >= 8 and ran["micro_batch"] == 8 and not ran["gradient_checkpointing"] and ran["halved"] == 0
    assert ran["fused_optimizer"] and not ran["channels_last"] and m_old["passes"]["gradient_checkpointing"]
    np.testing.assert_allclose(m_new["losses"], m_old["losses"], rtol=2e-2)
    moved = np.sqrt(sum(float(((w_old[k] - start[k]) ** 2).sum()) for k in w_old))
    apart = np.sqrt(sum(float(((w_new[k] - w_old[k]) ** 2).sum()) for k in w_old))
    assert moved > 0 and apart < 0.05 * moved, (apart, moved)  # rounding, not another update
