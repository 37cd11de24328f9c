"""Issue 23, end to end: a set distilled from a local ImageWoof-like folder, evaluated, relabelled and exported,
then read back with the field's own loaders: torchvision's ImageFolder (before and after evaluate), Hugging
Face ``datasets``' imagefolder (labels and prompts), huggingface_hub's DatasetCard, and DD-Ranking's class
order for ImageWoof (Minimax's, not sorted wnids) with the teacher's rows permuted to match."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from vlcp.cli.main import cli
from vlcp.evaluation import ddranking

WOOF = ddranking.class_order("imagewoof")  # DD-Ranking's ImageWoof order (Minimax's), from its code
PER_CLASS = {"train": 6, "val": 2}


def invoke(root: Path, *args):
    base = ["--cache-dir", str(root / "cache"), "--data-dir", str(root / "data"), "-q"]
    return CliRunner().invoke(cli, base + [str(a) for a in args], catch_exceptions=False)


def woof_like(folder: Path) -> Path:
    """ImageWoof's ten wnids as class folders (train/ and val/), filled with scikit-learn's digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for split, n in PER_CLASS.items():
        for c, wnid in enumerate(sorted(WOOF)):
            d = folder / split / wnid
            d.mkdir(parents=True)
            picks = np.flatnonzero(digits.target == c)[:n] if split == "train" else np.flatnonzero(digits.target == c)[-n:]
            for j, i in enumerate(picks):
                a = (digits.images[i] * 255 / 16).astype(np.uint8)
                Image.fromarray(a).convert("RGB").resize((32, 32), Image.NEAREST).save(d / f"{j}.png")
    return folder


def classes_of(folder: Path) -> list[str]:
    from torchvision.datasets import ImageFolder

    return ImageFolder(str(folder)).classes


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_models_dir) -> dict:
    root = tmp_path_factory.mktemp("field")
    shutil.copytree(tiny_models_dir, root / "cache" / "models")
    src, out = woof_like(root / "woof"), root / "out"
    r = invoke(root, "distill", "--data", src, "--tiny", "--ipc", "2", "--max-per-class", "6", "--steps", "2",
               "--no-finetune", "--text-strategy", "label+keywords", "--out", out)
    assert r.exit_code == 0, r.output
    before = classes_of(out / "train")
    r = invoke(root, "evaluate", out, "--data", src, "--protocol", "rded", "--model", "convnet3", "--epochs", "1",
               "--seeds", "1", "--teacher-epochs", "1", "--json", root / "rded.json")
    assert r.exit_code == 0, r.output
    teacher = Path(json.loads((root / "rded.json").read_text())["teacher"]["file"])
    r = invoke(root, "relabel", out, "--teacher", teacher, "--crops", "2", "--name", "woof")
    assert r.exit_code == 0, r.output
    r = invoke(root, "export", out, root / "dd", "--format", "ddranking", "--dataset", "imagewoof",
               "--teacher", teacher)
    assert r.exit_code == 0, r.output
    return {"root": root, "out": out, "src": src, "before": before, "teacher": teacher}


def test_imagefolder_sees_exactly_the_class_folders_before_and_after_evaluate(world):
    out = world["out"]
    assert world["before"] == sorted(WOOF)
    assert classes_of(out / "train") == sorted(WOOF)  # evaluations/ and soft_labels/ are not in train/
    assert {p.name for p in out.iterdir()} >= {"train", "evaluations", "soft_labels", "manifest.json", "README.md"}
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted([*WOOF, "metadata.jsonl"])


def test_datasets_imagefolder_gives_every_image_its_label_and_prompt(world, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    ds = datasets.load_dataset("imagefolder", data_dir=str(world["out"]), cache_dir=str(tmp_path / "hf"),
                               split="train")
    files = sorted(p.relative_to(world["out"] / "train").as_posix() for p in (world["out"] / "train").rglob("*.png"))
    assert len(ds) == len(files) == 2 * len(WOOF)
    wnids = sorted(WOOF)
    rows = [json.loads(line) for line in (world["out"] / "train" / "metadata.jsonl").read_text().splitlines()]
    assert sorted(r["file_name"] for r in rows) == files
    for row in ds:
        assert wnids[row["label"]] == row["class_id"]  # label = the folder's index in sorted order
        assert isinstance(row["prompt"], str) and row["prompt"].strip()
    by_name = {r["file_name"]: r for r in rows}
    assert all(wnids[r["label"]] == f.split("/")[0] for f, r in by_name.items())


def test_the_card_loads_with_huggingface_hub_and_reports_the_evaluation(world):
    from huggingface_hub import DatasetCard

    card = DatasetCard.load(world["out"] / "README.md")
    assert "dataset-distillation" in card.data.tags
    assert card.data.configs[0]["data_files"][0]["path"] == "train/**"
    assert "## Evaluation" in card.text and "rded" in card.text


def test_ddranking_reads_the_export_in_its_own_imagewoof_order(world):
    from torchvision.datasets import ImageFolder

    dd = world["root"] / "dd"
    folder = ImageFolder(str(dd / "train"))
    assert len(folder) == 2 * len(WOOF)
    for path, label in folder.samples:  # DD-Ranking's label of an image = its wnid's index in Minimax's order
        assert WOOF[label] == Path(path).parent.name.split("_", 1)[1]
    assert [c.split("_", 1)[1] for c in folder.classes] == WOOF != sorted(WOOF)


def test_the_exported_teacher_has_its_rows_in_ddrankings_order(world):
    import torch
    from safetensors.torch import load_file

    ours = load_file(str(world["teacher"]))
    meta = json.loads(world["teacher"].with_suffix(".json").read_text())
    [ckpt] = list((world["root"] / "dd" / "teacher").rglob("ckpt_best.pt"))
    theirs = torch.load(ckpt, map_location="cpu", weights_only=True)
    heads = [k for k in ours if ours[k].ndim >= 1 and ours[k].shape[0] == len(WOOF)]  # the classifier's rows
    assert len(heads) == 2  # its weight and bias (ConvNet-3's other layers have 128 channels)
    rows = [meta["classes"].index(w) for w in WOOF]
    assert rows != sorted(rows)  # the permutation is not the identity
    for k in heads:
        assert torch.equal(theirs[k], ours[k][rows])
    assert all(torch.equal(theirs[k], ours[k]) for k in ours if k not in heads)


def test_soft_labels_sit_beside_the_set_and_name_its_images(world):
    meta = json.loads((world["out"] / "soft_labels" / "woof.json").read_text())
    on_disk = sorted(p.relative_to(world["out"]).as_posix() for p in (world["out"] / "train").rglob("*.png"))
    assert sorted(meta["images"] if isinstance(meta["images"][0], str) else [i["path"] for i in meta["images"]]) \
        == on_disk
