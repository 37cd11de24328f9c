"""Fine-tuning sees the reference's data (issue 22, section 3): diffusers' ``train_text_to_image.py`` with
``--center_crop --random_flip`` takes Resize(r) (bilinear, short side) + CenterCrop(r) of every image and
flips the pixels; vlcp trains on the cached latents of that crop and of its mirror by default, at 32 px for
CIFAR as ``run_cifar10.sh`` / ``cifar100_dm.sh`` (``--resolution=32``); ``--finetune-data
prototype-latents`` keeps the squashed prototype latents mirrored in latent space."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import read_manifest
from vlcp.method import finetune
from vlcp.method.latents import preprocess, training_view
from vlcp.method.micro_batch import training_batch
from vlcp.pipeline.config import ConfigError, DistillConfig


def _image(w: int, h: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(w * 100 + h).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_the_training_view_is_torchvision_s_resize_and_center_crop():
    wide = _image(35, 32)  # short side already 32: no resize; CenterCrop's left = int(round(1.5)) = 2
    want = np.asarray(wide, dtype=np.float32)[:, 2:34] / 127.5 - 1
    assert np.array_equal(training_view(wide, 32), want.transpose(2, 0, 1))
    assert not np.array_equal(preprocess(wide, 32, "center"), want.transpose(2, 0, 1))  # vlcp's own crop: left 1
    tall = _image(64, 96)  # Resize(32): 32 x int(32 * 96 / 64) = 48, bilinear; top = int(round(8.0)) = 8
    want = np.asarray(tall.resize((32, 48), Image.BILINEAR), dtype=np.float32)[8:40] / 127.5 - 1
    assert np.array_equal(training_view(tall, 32), want.transpose(2, 0, 1))
    squashed = preprocess(tall, 32)  # the prototype latents' view: the whole image squashed, bicubic
    assert squashed.shape == (3, 32, 32) and not np.allclose(squashed, want.transpose(2, 0, 1), atol=0.1)


class _Rows(finetune.Rows):
    """Rows that count reads (fine-tuning must read a micro-batch, not the whole set)."""
    def __init__(self, arr):
        self.reads = []
        super().__init__(lambda i: self.reads.append(i) or arr[i], len(arr), arr.ndim)


def test_a_micro_batch_takes_the_cached_mirror_of_the_flipped_samples():
    crops = np.arange(5 * 2 * 1 * 1 * 3, dtype=np.float32).reshape(5, 2, 1, 1, 3)
    idx, flips = np.array([3, 0, 4]), np.array([True, False, True])
    rows = _Rows(crops)
    got = training_batch(rows, idx, flips)
    assert np.array_equal(got, np.stack([crops[3, 1], crops[0, 0], crops[4, 1]])) and sorted(rows.reads) == [0, 3, 4]
    single = crops[:, 0]
    got = training_batch(_Rows(single), idx, flips)  # prototype latents: mirrored along the width
    assert np.array_equal(got, np.stack([single[3, ..., ::-1], single[0], single[4, ..., ::-1]]))


@pytest.mark.parametrize("data, res, script", [("cifar10", 32, "run_cifar10.sh"), ("cifar100", 32, "cifar100_dm.sh"),
                                               ("imagenette", None, "run_nette.sh"), ("digits", None, "")])
def test_fine_tuning_resolution_follows_the_reference_scripts(data, res, script):
    cfg = DistillConfig(data=data, ipc=1, out=Path("o"))
    row = cfg.fill_defaults()
    assert (cfg.finetune_data, cfg.finetune_resolution) == ("center-crop-pairs", res)  # None: the latents'
    assert script in row["source"] and ("--resolution=32" in row["source"]) == (res == 32)
    cfg = DistillConfig(data=data, ipc=1, out=Path("o"), finetune_data="prototype-latents")
    cfg.fill_defaults()
    assert cfg.finetune_resolution is None
    with pytest.raises(ConfigError, match="--finetune-resolution: applies to --finetune-data center-crop-pairs"):
        DistillConfig(data=data, ipc=1, out=Path("o"), finetune_data="prototype-latents",
                      finetune_resolution=32).validate()


def test_the_help_shows_the_data_and_its_resolution(vlcp):
    from tests.test_help import help_of, sections

    text = " ".join(help_of("distill").split())
    assert "--finetune-data [center-crop-pairs|prototype-latents]" in text
    assert "[default: center-crop-pairs]" in text and "32 for CIFAR-10/100" in text
    assert {"--finetune-data", "--finetune-resolution"} <= set(sections(help_of("distill"))["Fine-tuning"])


def test_fine_tuning_reads_the_cached_crops_and_their_mirrors(vlcp, tmp_path, monkeypatch):
    from vlcp.data.datasets import load_dataset
    from vlcp.method.latents import encode_training_pairs
    from vlcp.models.loading import load_vae, resolve
    from vlcp.models.tiny import TINY_SD
    from vlcp.store.cache import StageCache

    seen = []
    real = finetune.train

    def train(pipe, latents, captions, *a, **k):
        seen.append((latents.ndim, latents[[0]]))
        return real(pipe, latents, captions, *a, **k)
    monkeypatch.setattr(finetune, "train", train)
    args = ["distill", "--data", "digits", "--tiny", "--classes", "0", "--max-per-class", "4", "--ipc", "1",
            "--steps", "2", "--finetune-max-steps", "1", "--finetune-resolution", "16"]
    r = vlcp(*args, "--out", tmp_path / "a")
    assert r.exit_code == 0, r.output
    m = read_manifest(tmp_path / "a")
    assert m["stages"]["training_latents"]["items_computed"] == 4
    assert {k: m["finetune"][k] for k in ("data", "resolution", "flip")} == \
        {"data": "center-crop-pairs", "resolution": 16, "flip": "encoded"}
    cache = StageCache(tmp_path / "cache")
    vae = load_vae(resolve(str(tmp_path / "cache" / "models" / TINY_SD), cache), "cpu")
    first = load_dataset("digits", tmp_path / "data", "train", ["0"], 4).samples[0].load()
    ndim, rows = seen[0]
    assert ndim == 5 and rows.shape == (1, 2, 4, 8, 8)  # 16 px crops: 8 x 8 latents of the tiny VAE
    assert np.allclose(rows, encode_training_pairs(vae, [first], 16), atol=1e-6)

    r = vlcp(*args[:-2], "--finetune-data", "prototype-latents", "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    m = read_manifest(tmp_path / "b")
    assert "training_latents" not in m["stages"] and m["stages"]["finetune"]["items_computed"] == 1
    assert {k: m["finetune"][k] for k in ("data", "resolution", "flip")} == \
        {"data": "prototype-latents", "resolution": 32, "flip": "latent-mirror"}
    assert seen[1][0] == 4 and seen[1][1].shape == (1, 4, 16, 16)  # the squashed 32 px prototype latents


def test_a_manifest_from_before_the_options_is_rerun_as_it_was_made():
    old = DistillConfig(data="digits", ipc=1, out=Path("o")).params()
    for k in ("caption_mode", "caption_seed", "finetune_data", "finetune_resolution"):
        old.pop(k)
    cfg = DistillConfig.from_params(old)
    assert (cfg.caption_mode, cfg.finetune_data, cfg.finetune_resolution) == ("greedy", "prototype-latents", None)
    new = DistillConfig.from_params(DistillConfig(data="digits", ipc=1, out=Path("o")).params())
    assert (new.caption_mode, new.finetune_data) == ("reference", "center-crop-pairs")
    assert DistillConfig.from_params(old, caption_mode="reference").caption_mode == "reference"
