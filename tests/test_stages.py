"""The stage table: declared parameters are exactly what each key holds; names, docs and code agree."""
import ast
import dataclasses
import gc
import weakref
from pathlib import Path

import pytest

from tests.conftest import read_manifest
from vlcp.pipeline.config import ConfigError, DistillConfig
from vlcp.pipeline.table import STAGE_NAMES, STAGES, markdown_table

ROOT = Path(__file__).parent.parent
FIELDS = {f.name: f for f in dataclasses.fields(DistillConfig)}
CHANGED = {bool: lambda v: not v, int: lambda v: (v or 1) + 1, float: lambda v: (v or 0.5) / 2,
           str: lambda v: (v or "x") + "-changed"}


def _step(stage, **cfg):
    from vlcp.pipeline.run import Run, Step

    run = Run(DistillConfig(data="digits", out=Path("o"), **cfg), None, None, None, 0, False, {})
    return Step(run, stage)


def _changed(cfg_value, name):
    if name in ("detector", "detector_arch", "text_llm"):
        return "resnet18-modified"
    if name == "crop":
        return "center"
    if name == "finetune_method":
        return "lora"
    if name == "text_strategy":
        return "label"
    return CHANGED[type(cfg_value) if cfg_value is not None else int](cfg_value)


BASE = dict(ipc=2, contamination=0.1, beta=0.2, top_k=35, image_size=8, caption_batch_size=8, caption_max_tokens=32,
            finetune_epochs=1, finetune_lr=1e-5, refine_beta=0.9)


@pytest.mark.parametrize("stage", STAGES, ids=STAGE_NAMES)
def test_each_declared_parameter_changes_the_key_and_nothing_else_does(stage):
    declared = stage.params + stage.selects + stage.unkeyed
    assert set(declared) <= set(FIELDS), "declares fields the config does not have"
    base = _step(stage, **BASE).key(upstream="k")
    for name in stage.params:
        other = _step(stage, **{**BASE, name: _changed(BASE.get(name, FIELDS[name].default), name)})
        assert other.key(upstream="k") != base, name
    for name in sorted(set(FIELDS) - set(stage.params) - {"data", "out", "data_dir", "classes", "warnings"}):
        value = BASE.get(name, FIELDS[name].default)
        if isinstance(FIELDS[name].default, (bool, int, float, str)) or value is not None:
            other = _step(stage, **{**BASE, name: _changed(value, name)})
            assert other.key(upstream="k") == base, f"{name} is not declared but changes the key"
    assert _step(stage, **BASE).key(upstream="other") != base  # inputs are keyed too


@pytest.mark.parametrize("stage", STAGES, ids=STAGE_NAMES)
def test_a_stage_can_read_only_what_it_declares(stage):
    p = _step(stage, **BASE).p
    for name in stage.params + stage.selects + stage.unkeyed:
        getattr(p, name)
    undeclared = sorted(set(FIELDS) - set(stage.params + stage.selects + stage.unkeyed))
    with pytest.raises(AttributeError, match=f"stage {stage.name!r} reads {undeclared[0]!r} but does not declare"):
        getattr(p, undeclared[0])


def test_stage_names_come_from_the_table(vlcp):
    from vlcp.cli.main import cli

    until = next(p for p in cli.commands["distill"].params if p.name == "until")
    assert list(until.type.choices) == STAGE_NAMES
    clear = next(p for p in cli.commands["cache"].commands["clear"].params if p.name == "stage")
    assert list(clear.type.choices)[:len(STAGE_NAMES)] == STAGE_NAMES
    assert STAGE_NAMES[0] == "images" and STAGE_NAMES[-1] == "output" and len(set(STAGE_NAMES)) == len(STAGES)


def test_the_docs_print_the_stage_table():
    assert markdown_table() in (ROOT / "docs" / "stages.md").read_text()


def test_a_model_is_released_after_its_last_stage(vlcp, tmp_path, monkeypatch):
    """The captioner and the VAE are gone (weakly referenced) before fine-tuning starts."""
    from vlcp.method import finetune
    from vlcp.models import loading as models

    refs = {}
    for name in ("load_captioner", "load_vae"):
        real = getattr(models, name)

        def load(*a, _real=real, _name=name):
            obj = _real(*a)
            refs[_name] = weakref.ref(obj[0] if isinstance(obj, tuple) else obj)
            return obj
        monkeypatch.setattr(models, name, load)
    alive = {}
    real_train = finetune.train

    def train(*a, **k):
        gc.collect()
        alive.update({n: r() is not None for n, r in refs.items()})
        return real_train(*a, **k)
    monkeypatch.setattr(finetune, "train", train)
    r = vlcp("distill", "--data", "digits", "--tiny", "--classes", "0,1", "--max-per-class", "6", "--ipc", "1",
             "--steps", "2", "--finetune-max-steps", "1", "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert alive == {"load_captioner": False, "load_vae": False}


def test_out_inside_the_dataset_is_refused(vlcp, tmp_path):
    from tests.test_datasets import make_awkward_folder

    folder = make_awkward_folder(tmp_path / "folder")
    for out in (folder / "n01440764" / "synthetic", folder, tmp_path):
        r = vlcp("distill", "--data", folder, "--tiny", "--ipc", "1", "--out", out)
        assert r.exit_code == 2 and "--out" in r.output and "dataset folder" in r.output, out
        assert "Traceback" not in r.output
    with pytest.raises(ConfigError, match="--ipc"):
        DistillConfig(data="digits", ipc=0, out=tmp_path / "o").validate()


def test_refine_on_a_malformed_manifest_is_a_clear_error(vlcp, tmp_path):
    folder = tmp_path / "synth"
    (folder / "0").mkdir(parents=True)
    (folder / "manifest.json").write_text('{"parameters": {"data": "digits", "ipc": ')
    r = vlcp("refine", folder, "--data", "digits", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "manifest.json is unreadable" in r.output and "Traceback" not in r.output
    (folder / "manifest.json").write_text('{"parameters": {"data": "digits", "ipc": 2, "beta": 7}}')
    r = vlcp("refine", folder, "--data", "digits", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "--beta" in r.output and "(0, 1]" in r.output  # validated like distill


def _functions(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_functions_are_short_and_take_few_parameters():
    """The code-shape rule of the stage-table issue (Click commands take their options)."""
    too_long, too_many = [], []
    for path in sorted((ROOT / "vlcp").glob("*.py")):
        for fn in _functions(ast.parse(path.read_text())):
            click_cmd = any("command" in ast.unparse(d) for d in fn.decorator_list)
            if fn.end_lineno - fn.lineno + 1 > 80:
                too_long.append(f"{path.name}:{fn.name}")
            args = fn.args
            names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
            n = len([a for a in names if a not in ("self", "cls")])
            if n > 8 and not click_cmd:
                too_many.append(f"{path.name}:{fn.name}({n})")
    assert too_long == [] and too_many == []


def test_a_latent_found_corrupt_when_read_is_recomputed(vlcp, tmp_path):
    """The latents stage only looks at the index (a cached rerun reads no latent); a new --contamination
    makes outliers read the blobs, it finds the flipped bit and the run restarts with that one latent
    recomputed (exit 0, one corrupt entry counted)."""
    args = ["distill", "--data", "digits", "--tiny", "--classes", "0,1", "--max-per-class", "6", "--ipc", "1",
            "--until", "clusters"]
    assert vlcp(*args, "--out", tmp_path / "a").exit_code == 0
    blobs = sorted((tmp_path / "cache" / "blobs" / "latents").rglob("*"))
    blob = [b for b in blobs if b.is_file()][0]
    data = bytearray(blob.read_bytes())
    data[-5] ^= 0x01  # inside the tensor payload: same length, only the checksum can tell
    blob.write_bytes(bytes(data))
    r = vlcp(*args, "--out", tmp_path / "b")
    m = read_manifest(tmp_path / "b")
    assert m["stages"]["latents"]["items_computed"] == 0 and m["cache_corrupt_entries_recomputed"] == 0
    r = vlcp(*args, "--contamination", "0.2", "--out", tmp_path / "c")
    assert r.exit_code == 0, r.output
    m = read_manifest(tmp_path / "c")
    assert m["stages"]["latents"]["items_computed"] == 1 and m["cache_corrupt_entries_recomputed"] == 1
    assert m["stages"]["outliers"]["items_computed"] == 1


def test_a_synthetic_image_found_corrupt_when_written_is_recomputed(vlcp, tmp_path):
    """A cached rerun reads no synthetic image until the output writes it (keys come from the recorded
    hashes): a flipped bit found there restarts the run, which recomputes that one image (exit 0, one
    corrupt entry counted, every PNG written)."""
    args = ["distill", "--data", "digits", "--tiny", "--classes", "0,1", "--max-per-class", "6", "--ipc", "2",
            "--steps", "2", "--no-finetune"]
    assert vlcp(*args, "--out", tmp_path / "a").exit_code == 0
    blob = sorted(b for b in (tmp_path / "cache" / "blobs" / "synthesis").rglob("*") if b.is_file())[0]
    data = bytearray(blob.read_bytes())
    data[-5] ^= 0x01  # inside the pixels: same length, only the checksum can tell
    blob.write_bytes(bytes(data))
    r = vlcp(*args, "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    m = read_manifest(tmp_path / "b")
    assert m["stages"]["synthesis"]["items_computed"] == 1 and m["cache_corrupt_entries_recomputed"] == 1
    assert sorted(p.name for p in (tmp_path / "b").rglob("*.png")) == ["0000.png", "0000.png", "0001.png",
                                                                        "0001.png", "preview.png"]


def test_lof_restores_images_and_kmeans_follows_the_seed_through_distill(vlcp, tmp_path):
    """5-image classes at contamination 0.5 with IPC 4: LOF removes more than one, the least outlying come
    back until 4 remain, with a warning; two seeds give two different sets of prototypes (issue 17 item 5,
    at the distill level)."""
    import numpy as np

    from vlcp.store.cache import StageCache

    args = ["distill", "--data", "digits", "--tiny", "--classes", "0,1", "--max-per-class", "5", "--ipc", "4",
            "--contamination", "0.5", "--until", "clusters"]
    r = vlcp(*args, "--out", tmp_path / "a")
    assert r.exit_code == 0, r.output
    m = read_manifest(tmp_path / "a")
    for f, o in m["outliers"].items():
        assert o["images"] == 5 and o["removed"] == 1 and o["restored"] >= 1, (f, o)
        assert f"class {f}: LOF would leave fewer than IPC=4 inliers; kept {o['restored']}" in " ".join(m["warnings"])
    assert vlcp(*args, "--seed", "1", "--out", tmp_path / "b").exit_code == 0
    keys = {o: read_manifest(tmp_path / o)["stages"]["clusters"]["key"] for o in "ab"}
    cache = StageCache(tmp_path / "cache")
    entries = [cache.get("clusters", k.split("/", 1)[1]) for k in cache.index.iterkeys() if k.startswith("clusters/")]
    centres = [e.tensors["centres"] for e in entries]  # 2 classes x 2 seeds, one entry each
    assert keys["a"] != keys["b"] and len(centres) == 4 and all(c.shape[0] == 4 for c in centres)
    assert not any(np.allclose(x, y) for i, x in enumerate(centres) for y in centres[i + 1:])


def test_caption_batch_comes_from_the_device_when_not_given(vlcp, tmp_path, tiny_models_dir, monkeypatch):
    """Without --caption-batch-size (and without --tiny) the batch is asked of the device, once, and only
    when captions must be computed: a cached rerun asks nothing (and so imports no torch for it)."""
    from vlcp.models import captioner as captions
    from vlcp.models import loading as models
    from vlcp.models.tiny import TINY_LLAVA, TINY_SD

    asked, sizes = [], []
    monkeypatch.setattr(models, "auto_caption_batch", lambda device: asked.append(device) or 5)
    real = captions.caption_images
    monkeypatch.setattr(captions, "caption_images", lambda m, p, imgs, *a: sizes.append(len(imgs)) or real(m, p, imgs, *a))
    args = ["distill", "--data", "digits", "--classes", "0,1", "--max-per-class", "6", "--ipc", "1", "--until",
            "captions", "--captioner", tmp_path / "cache" / "models" / TINY_LLAVA,
            "--diffusion", tmp_path / "cache" / "models" / TINY_SD]
    r = vlcp(*args, "--out", tmp_path / "a")
    assert r.exit_code == 0, r.output
    assert asked == ["auto"] and sizes == [5, 5, 2]
    assert vlcp(*args, "--out", tmp_path / "b").exit_code == 0
    assert asked == ["auto"]  # the rerun found every caption cached
