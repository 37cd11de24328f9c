"""`vlcp export OUT --format diffusers DIR`: the fine-tuned UNet / LoRA adapter from the cache, reloaded with diffusers
itself and compared tensor by tensor with what the cache holds; the clear errors; the ddranking wiring.

One cache for the module, two tiny runs that stop after fine-tuning (full and LoRA): the export needs only them."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import cli_in
from vlcp.store.cache import StageCache

pytestmark = pytest.mark.e2e
RUN = ["distill", "--data", "digits", "--tiny", "--classes", "0,1", "--max-per-class", "6", "--ipc", "1",
       "--until", "finetune"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_models_dir):
    """(cli runner, cache dir, {"full": OUT, "lora": OUT})."""
    base = tmp_path_factory.mktemp("export")
    vlcp = cli_in(base, tiny_models_dir)
    outs = {}
    for method in ("full", "lora"):
        outs[method] = base / method
        r = vlcp(*RUN, "--finetune-method", method, "--out", outs[method])
        assert r.exit_code == 0, r.output
    return vlcp, base / "cache", outs


def cached(cache: Path, out: Path) -> tuple[dict, dict]:
    m = json.loads((out / "manifest.json").read_text())
    return m, StageCache(cache).get("finetune", m["stages"]["finetune"]["key"]).tensors


def test_full_unet_reloads_in_diffusers_equal_to_the_cache(runs, tmp_path):
    from diffusers import UNet2DConditionModel

    vlcp, cache, outs = runs
    r = vlcp("export", outs["full"], tmp_path / "unet", "--format", "diffusers")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "unet").iterdir()) == ["README.md", "config.json",
                                                                     "diffusion_pytorch_model.safetensors"]
    m, weights = cached(cache, outs["full"])
    state = UNet2DConditionModel.from_pretrained(tmp_path / "unet").state_dict()
    assert state.keys() == weights.keys() and len(weights) > 100
    assert all(torch.equal(state[k], torch.from_numpy(np.asarray(v))) for k, v in weights.items())
    readme = (tmp_path / "unet" / "README.md").read_text()
    assert m["models"]["diffusion"]["identity"] in readme and "library_name: diffusers" in readme
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "unet").iterdir()}
    assert len(set(modes.values())) == 1, modes  # safetensors' 0600 file follows the umask as README.md does
    assert modes["README.md"] == 0o666 & ~_umask()


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_lora_adapter_loads_into_the_base_pipeline_equal_to_the_cache(runs, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import get_peft_model_state_dict

    vlcp, cache, outs = runs
    r = vlcp("export", outs["lora"], tmp_path / "lora", "--format", "diffusers")
    assert r.exit_code == 0, r.output
    assert "LoRA adapter (rank 4)" in r.output
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == ["README.md", "pytorch_lora_weights.safetensors"]
    m, weights = cached(cache, outs["lora"])
    pipe = StableDiffusionPipeline.from_pretrained(m["models"]["diffusion"]["name"], safety_checker=None)
    pipe.load_lora_weights(tmp_path / "lora")
    (name, config), = pipe.unet.peft_config.items()
    assert config.r == 4 and config.lora_alpha == 4  # the scale the adapter was trained with
    state = get_peft_model_state_dict(pipe.unet, adapter_name=name)
    assert state.keys() == weights.keys() and all("lora" in k for k in weights)
    assert all(torch.equal(state[k], torch.from_numpy(np.asarray(v))) for k, v in weights.items())


def test_a_non_empty_dir_needs_force_and_dir_must_not_overlap_out(runs, tmp_path):
    vlcp, _, outs = runs
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "keep.txt").write_text("x")
    for force in ([], ["--force"]):  # a folder vlcp did not write is never replaced (tests/test_out_safety.py)
        r = vlcp("export", outs["lora"], dest, "--format", "diffusers", *force)
        assert r.exit_code == 2 and f"DIR {dest} is not empty and holds no output of vlcp" in r.output
    assert (dest / "keep.txt").exists()
    (dest / "keep.txt").unlink()
    assert vlcp("export", outs["lora"], dest, "--format", "diffusers").exit_code == 0
    r = vlcp("export", outs["lora"], dest, "--format", "diffusers")
    assert r.exit_code == 2 and f"DIR {dest} is not empty; pass --force to replace it" in r.output
    r = vlcp("export", outs["lora"], dest, "--format", "diffusers", "--force")
    assert r.exit_code == 0 and (dest / "pytorch_lora_weights.safetensors").is_file()
    r = vlcp("export", outs["lora"], outs["lora"] / "w", "--format", "diffusers")
    assert r.exit_code == 2 and "overlap" in r.output
    r = vlcp("export", outs["lora"], dest, "--format", "diffusers", "--dataset", "cifar10")
    assert r.exit_code == 2 and "--dataset and --teacher apply only with --format ddranking" in r.output


def test_clear_errors_without_manifest_fine_tuning_or_cache_entry(runs, tmp_path):
    vlcp, _, outs = runs
    (tmp_path / "empty").mkdir()
    r = vlcp("export", tmp_path / "empty", tmp_path / "x", "--format", "diffusers")
    assert r.exit_code == 2 and "has no readable manifest.json" in r.output
    no_ft = tmp_path / "no-ft"
    no_ft.mkdir()
    m = json.loads((outs["full"] / "manifest.json").read_text())
    m["parameters"]["finetune"] = False
    del m["stages"]["finetune"]  # what a --no-finetune run records
    (no_ft / "manifest.json").write_text(json.dumps(m))
    r = vlcp("export", no_ft, tmp_path / "x", "--format", "diffusers")
    assert r.exit_code == 2 and "its run did not fine-tune the diffusion model" in r.output
    r = vlcp("export", outs["full"], tmp_path / "x", "--format", "diffusers", cache=tmp_path / "empty-cache")
    assert r.exit_code == 1 and "are not in the cache" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x").exists()


def test_ddranking_format_reaches_its_exporter(runs, tmp_path):
    from PIL import Image

    from vlcp.data.datasets import IMAGENETTE

    vlcp, _, outs = runs
    r = vlcp("export", outs["full"], tmp_path / "dd", "--format", "ddranking")
    assert r.exit_code == 2 and "has no dataset for vlcp's 'digits'" in r.output
    out = tmp_path / "nette"
    for wnid, _ in IMAGENETTE:
        (out / "train" / wnid).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(out / "train" / wnid / "0000.png")
    (out / "manifest.json").write_text(json.dumps({"vlcp_version": "0.1.0", "parameters": {"data": "imagenette"}}))
    r = vlcp("export", out, tmp_path / "dd", "--format", "ddranking", "--dataset", "imagenette")
    assert r.exit_code == 0, r.output
    assert "ImageNette, IPC 1, 10 classes" in r.output
    assert (tmp_path / "dd" / "train" / "00000_n01440764" / "0000.png").is_file()
