"""Model references: identities, offline errors, and the tiny models' from_pretrained round trip."""
import pytest

from vlcp.cache import StageCache
from vlcp.models import ModelError, load_captioner, load_vae, native_resolution, resolve
from vlcp.tiny import TINY_LLAVA, TINY_SD


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
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelError) as err:
        resolve("llava-hf/llava-1.5-7b-hf", StageCache(tmp_path / "c"))
    assert "huggingface-cli download llava-hf/llava-1.5-7b-hf" in str(err.value)
    with pytest.raises(ModelError, match="does not exist"):
        resolve("./no/such/model", StageCache(tmp_path / "c"))


def test_tiny_models_load_through_from_pretrained_and_caption(tiny_models_dir, tmp_path):
    from PIL import Image

    from vlcp.captions import PROMPT, caption_images

    cache = StageCache(tmp_path / "c")
    model, processor = load_captioner(resolve(str(tiny_models_dir / TINY_LLAVA), cache), "cpu")
    imgs = [Image.new("RGB", (8, 8), c) for c in ("white", "black")]
    caps = caption_images(model, processor, imgs, ["handwritten digit 1", "handwritten digit 2"], PROMPT, 8)
    assert len(caps) == 2 and all(len(c.split()) >= 4 for c in caps)
    assert caps == caption_images(model, processor, imgs, ["handwritten digit 1", "handwritten digit 2"], PROMPT, 8)
    vae = load_vae(resolve(str(tiny_models_dir / TINY_SD), cache), "cpu")
    assert vae.config.latent_channels == 4
