"""Model references: identities, offline errors, and the tiny models' from_pretrained round trip."""
import shutil
from pathlib import Path

import pytest

from vlcp.models.loading import (
    DEFAULT_DIFFUSION,
    ModelError,
    auto_caption_batch,
    caption_batch_for_memory,
    half_precision,
    load_captioner,
    load_img2img,
    load_text_llm,
    load_vae,
    native_resolution,
    parse_model_spec,
    pretrained_kwargs,
    resolve,
    torch_device,
)
from vlcp.models.tiny import TINY_LLAVA, TINY_LLM, TINY_SD
from vlcp.store.cache import StageCache


def test_local_dir_identity_is_a_content_hash(tiny_models_dir, tmp_path):
    import shutil

    cache = StageCache(tmp_path / "c")
    a = resolve(str(tiny_models_dir / TINY_SD), cache)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_models_dir / TINY_SD, copy)
    assert resolve(str(copy), cache).identity == a.identity  # same bytes, same identity
    (copy / "unet" / "config.json").write_text((copy / "unet" / "config.json").read_text().replace("}", ' }'))
    assert resolve(str(copy), cache).identity != a.identity
    assert native_resolution(a) == 32


def test_unreachable_hub_model_names_what_to_download(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)  # huggingface_hub's own reading of HF_HUB_OFFLINE
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(ModelError) as err:
        resolve("llava-hf/llava-1.5-7b-hf", StageCache(tmp_path / "c"))
    msg = str(err.value)
    assert 'hf download llava-hf/llava-1.5-7b-hf --include "*.json" "*.safetensors"' in msg and "offline" in msg
    assert "huggingface-cli" not in msg
    with pytest.raises(ModelError) as err:
        resolve(DEFAULT_DIFFUSION, StageCache(tmp_path / "c"), probe_file="model_index.json")
    assert (f"hf download {DEFAULT_DIFFUSION} --include model_index.json scheduler/scheduler_config.json "
            '"tokenizer/*" "feature_extractor/*.json" text_encoder/config.json text_encoder/model.safetensors '
            "unet/config.json unet/diffusion_pytorch_model.safetensors vae/config.json "
            "vae/diffusion_pytorch_model.safetensors") in str(err.value)
    with pytest.raises(ModelError, match="at revision 'v9'.*hf download org/name --revision v9 --include"):
        resolve("org/name@v9", StageCache(tmp_path / "c"))
    with pytest.raises(ModelError, match="does not exist"):
        resolve("./no/such/model", StageCache(tmp_path / "c"))


def test_model_spec_with_a_revision():
    assert parse_model_spec("org/name@0123abc") == ("org/name", "0123abc")
    assert parse_model_spec("org/name") == ("org/name", None)
    assert parse_model_spec("./dir@x") == ("./dir@x", None)
    with pytest.raises(ModelError, match="<org>/<name>@<revision>"):
        parse_model_spec("org/name@")


def _snapshot(hub: Path, repo: str, commit: str, src: Path | None = None) -> Path:
    """A Hugging Face cache entry as huggingface_hub lays it out: refs/main and snapshots/<commit>/."""
    root = hub / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / commit
    if src is not None:
        shutil.copytree(src, snap)
    else:
        snap.mkdir(parents=True)
        (snap / "config.json").write_text("{}")
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return snap


def test_a_local_snapshot_loads_with_local_files_only(tiny_models_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)  # no network needed: the snapshot is local
    monkeypatch.setattr("vlcp.models.loading._remote_commit", lambda *a: pytest.fail("asked the hub"))
    sha = "0123456789abcdef0123456789abcdef01234567"
    _snapshot(tmp_path / "hub", "org/tiny-llm", sha, tiny_models_dir / TINY_LLM)
    ref = resolve("org/tiny-llm", StageCache(tmp_path / "c"))
    assert (ref.identity, ref.local) == (f"org/tiny-llm@{sha}", True)
    assert pretrained_kwargs(ref) == {"revision": sha, "local_files_only": True}
    pinned = resolve(f"org/tiny-llm@{sha}", StageCache(tmp_path / "c"))
    assert (pinned.name, pinned.revision, pinned.identity) == ("org/tiny-llm", sha, ref.identity)
    model, _ = load_text_llm(ref, "cpu")  # from the snapshot, with local_files_only=True
    assert model.config.num_hidden_layers == 2


def test_half_precision_is_decided_by_the_device_type():
    import torch

    from vlcp.models.loading import _dtype

    assert half_precision("cuda:1") and half_precision("cuda") and _dtype("cuda:1") == torch.float16
    assert not half_precision("cpu") and not half_precision("mps") and _dtype("cpu") == torch.float32


def test_a_missing_cuda_device_is_a_one_line_error(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelError, match="no CUDA device"):
        torch_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert torch_device("cuda:0") == "cuda:0"
    with pytest.raises(ModelError, match=r"--device cuda:1: this machine has 1 CUDA device\(s\), cuda:0 to cuda:0"):
        torch_device("cuda:1")
    with pytest.raises(ModelError, match="not a device"):
        torch_device("gpu7")


def test_caption_batch_follows_gpu_memory():
    assert caption_batch_for_memory(free_bytes=79e9, total_bytes=80e9) == 32  # H100 80 GB
    assert caption_batch_for_memory(free_bytes=47e9, total_bytes=48e9) == 32  # >= 40 GB
    assert caption_batch_for_memory(free_bytes=23.5e9, total_bytes=24e9) == 17  # (23.5 - 14.12 - 1.5) / 0.45
    assert caption_batch_for_memory(free_bytes=15e9, total_bytes=16e9) == 1
    assert auto_caption_batch("cpu") == 8


def test_damaged_tiny_model_is_rebuilt_or_named_for_deletion(tiny_models_dir, tmp_path):
    from vlcp.models.tiny import intact, tiny_models

    models = tmp_path / "models"
    shutil.copytree(tiny_models_dir, models)
    cache = StageCache(tmp_path / "c")
    good = resolve(str(models / TINY_SD), cache).identity
    (models / TINY_SD / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    assert not intact(models / TINY_SD)
    with pytest.raises(ModelError) as err:  # loading it as it is: names the directory to delete
        load_img2img(resolve(str(models / TINY_SD), cache), "cpu")
    msg = str(err.value)
    assert f"the tiny model directory {models / TINY_SD} (built by vlcp for --tiny) is damaged" in msg
    assert "delete it" in msg and "hf download" not in msg and "\n" not in msg
    tiny_models(models)  # what --tiny runs first: rebuilds it, bit for bit
    assert intact(models / TINY_SD) and resolve(str(models / TINY_SD), cache).identity == good
    assert not [p for p in models.iterdir() if p.name.startswith(".")]  # no build or trash folders left


def test_tiny_models_load_through_from_pretrained_and_caption(tiny_models_dir, tmp_path):
    from PIL import Image

    from vlcp.models.captioner import PROMPT, caption_images

    cache = StageCache(tmp_path / "c")
    model, processor = load_captioner(resolve(str(tiny_models_dir / TINY_LLAVA), cache), "cpu")
    imgs = [Image.new("RGB", (8, 8), c) for c in ("white", "black")]
    caps = caption_images(model, processor, imgs, ["handwritten digit 1", "handwritten digit 2"], PROMPT, 8)
    assert len(caps) == 2 and all(len(c.split()) >= 4 for c in caps)
    assert caps == caption_images(model, processor, imgs, ["handwritten digit 1", "handwritten digit 2"], PROMPT, 8)
    vae = load_vae(resolve(str(tiny_models_dir / TINY_SD), cache), "cpu")
    assert vae.config.latent_channels == 4


def test_rendered_chats_get_one_bos(tiny_models_dir):
    """A Llama-style template renders BOS itself: tokenizing the text with special tokens adds a second."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    from vlcp.method.prompts import encode_requests

    tok = AutoTokenizer.from_pretrained(str(tiny_models_dir / TINY_LLM))
    tok.chat_template = "{{ bos_token }}" + tok.chat_template  # as Llama's, and a tokenizer that adds BOS as Llama's
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    texts = [tok.apply_chat_template([{"role": "user", "content": "a dog"}], tokenize=False, add_generation_prompt=True)]
    assert tok(texts).input_ids[0][:2] == [tok.bos_token_id] * 2  # the defect this guards against
    ids = encode_requests(tok, ["a dog", "a small brown dog"]).input_ids
    assert [row.tolist().count(tok.bos_token_id) for row in ids] == [1, 1]
    tok.chat_template = None  # no template: the tokenizer's own special tokens, once
    assert encode_requests(tok, ["a dog"]).input_ids[0].tolist().count(tok.bos_token_id) == 1
