"""Issue 23: a synthetic set is ``OUT/train`` (class folders and metadata.jsonl) and nothing else is in it; the
manifest, report, previews and evaluations stay at ``OUT``'s root. torchvision's ImageFolder and ``datasets``'
imagefolder read the set as it is; vlcp's readers accept the layout before it too."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from vlcp.cli.main import cli
from vlcp.data.datasets import ClassInfo
from vlcp.store import output

DIGITS = [str(c) for c in range(10)]
ROW_KEYS = ["file_name", "label", "class_id", "class_name", "prompt", "cluster", "cluster_size"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_models_dir) -> Path:
    """One tiny distillation (IPC 2, 10 classes); its prompts name the class and its keywords, so none is empty."""
    root = tmp_path_factory.mktemp("layout")
    shutil.copytree(tiny_models_dir, root / "cache" / "models")
    r = invoke(root, "distill", "--data", "digits", "--tiny", "--ipc", "2", "--max-per-class", "6", "--steps", "2",
               "--no-finetune", "--text-strategy", "label+keywords", "--out", root / "out")
    assert r.exit_code == 0, r.output
    return root


def invoke(root: Path, *args):
    base = ["--cache-dir", str(root / "cache"), "--data-dir", str(root / "data"), "-q"]
    return CliRunner().invoke(cli, base + [str(a) for a in args], catch_exceptions=False)


def pngs(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))


def rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "train" / "metadata.jsonl").read_text().splitlines()]


def old_layout(new: Path, old: Path) -> Path:
    """A set as vlcp wrote it before issue 23: class folders at the root, no metadata.jsonl."""
    shutil.copytree(new, old)
    for d in (old / "train").iterdir():
        if d.is_dir():
            d.rename(old / d.name)
    shutil.rmtree(old / "train")
    return old


# -- the layout, on hand-made folders ------------------------------------------------------------------
def png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4)).save(path)


def test_images_dir_finds_the_class_folders_of_either_layout(tmp_path):
    png(tmp_path / "new" / "train" / "a" / "0000.png")
    (tmp_path / "new" / "train" / "metadata.jsonl").write_text("")
    png(tmp_path / "bare" / "train" / "a" / "0000.png")  # no metadata.jsonl: still the new layout
    png(tmp_path / "old" / "a" / "0000.png")
    png(tmp_path / "old_train" / "train" / "0000.png")  # an old set whose class is called "train"
    png(tmp_path / "old_train" / "a" / "0000.png")
    (tmp_path / "old_empty" / "train").mkdir(parents=True)  # ... and an empty one
    png(tmp_path / "old_empty" / "a" / "0000.png")
    assert output.images_dir(tmp_path / "new") == tmp_path / "new" / "train"
    assert output.images_dir(tmp_path / "new" / "train") == tmp_path / "new" / "train"
    assert output.images_dir(tmp_path / "bare") == tmp_path / "bare" / "train"
    for name in ("old", "old_train", "old_empty", "missing"):
        assert output.images_dir(tmp_path / name) == tmp_path / name


def test_a_set_given_as_data_is_counted_as_distill_reads_it(tmp_path):
    """``--data OUT`` reads ``OUT/train`` (load_dataset's split rule): the --dry-run needs count those images."""
    from types import SimpleNamespace

    from vlcp.cli.needs import count_images
    from vlcp.data.datasets import load_dataset

    for name in ("a/0000.png", "a/0001.png", "b/0000.png"):
        png(tmp_path / "set" / "train" / name)
    (tmp_path / "set" / "evaluations").mkdir()
    ds = load_dataset(str(tmp_path / "set"), tmp_path / "data", "train")
    assert (len(ds.samples), len(ds.classes)) == (3, 2)
    assert count_images(SimpleNamespace(data=str(tmp_path / "set"), classes=None, max_per_class=None)) == (3, 2)


def test_metadata_labels_follow_imagefolder_order_not_the_datasets(tmp_path):
    classes = [ClassInfo("n02", "dog"), ClassInfo("n01", "fish"), ClassInfo("n03", "none written")]
    images = {0: [np.zeros((4, 4, 3), np.uint8)], 1: [np.full((4, 4, 3), 9, np.uint8)] * 2}
    assert output.save_images(tmp_path, classes, images, None, extra={"n01/0001.png": {"prompt": "p"}}) == 3
    assert pngs(tmp_path) == ["train/n01/0000.png", "train/n01/0001.png", "train/n02/0000.png"]
    assert not (tmp_path / "train" / "n03").exists()  # no empty class folder: ImageFolder would refuse it
    assert rows(tmp_path) == [
        {"file_name": "n02/0000.png", "label": 1, "class_id": "n02", "class_name": "dog"},
        {"file_name": "n01/0000.png", "label": 0, "class_id": "n01", "class_name": "fish"},
        {"file_name": "n01/0001.png", "label": 0, "class_id": "n01", "class_name": "fish", "prompt": "p"}]
    from torchvision.datasets import ImageFolder

    assert ImageFolder(str(tmp_path / "train")).class_to_idx == {"n01": 0, "n02": 1}
    assert output.read_metadata(tmp_path)["n01/0001.png"]["prompt"] == "p"
    (tmp_path / "train" / "metadata.jsonl").write_text("{not json\n")
    assert output.read_metadata(tmp_path) is None  # unreadable: the readers fall back, nothing fails


def test_prototype_records_follow_post_sampling_and_skip_odd_shapes():
    protos = {"classes": {"0": {"clusters": [{"prompt": "round", "cluster_size": 4}, {"prompt": "thin"}]},
                          "1": {"clusters": [{"prompt": "stick", "cluster_size": 3}, "odd"]}}}
    manifest = {"parameters": {"ipc": 2}, "classes": [{"folder": "0"}, {"folder": "1"}],
                "post_sampling": {"images": {  # prototype: index into the class-major (class, cluster) items
                    "0/0000.png": {"prototype": 3}, "0/0001.png": {"prototype": 0},
                    "1/0000.png": {"prototype": 2}, "1/0001.png": {"prototype": 3}}}}
    assert output.prototype_records(protos, manifest) == {
        "0/0000.png": {"prompt": "round", "cluster": 0, "cluster_size": 4},  # prototype 3 is class 1's: ignored
        "0/0001.png": {"prompt": "round", "cluster": 0, "cluster_size": 4},  # SAS kept cluster 0's image twice
        "1/0000.png": {"prompt": "stick", "cluster": 0, "cluster_size": 3},
        "1/0001.png": {"cluster": 1}}  # a cluster record without prompt or size
    without = {**manifest, "post_sampling": {}}
    assert output.prototype_records(protos, without)["0/0001.png"] == {"prompt": "thin", "cluster": 1}
    assert output.prototype_records(None, manifest) == {} == output.prototype_records(protos, [])


def test_baseline_metadata_names_each_real_image(tmp_path, vlcp):
    r = vlcp("baseline", "--method", "random", "--data", "digits", "--ipc", "2", "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["manifest.json", "train"]
    from vlcp.data.datasets import load_dataset

    ds = load_dataset("digits", tmp_path / "data", "train")
    found = rows(tmp_path / "b")
    assert [r["file_name"] for r in found] == pngs(tmp_path / "b" / "train") and len(found) == 20
    for row in found:
        assert set(row) == {"file_name", "label", "class_id", "class_name", "source_index"}
        sample = ds.samples[row["source_index"]]
        assert ds.classes[sample.class_idx].folder == row["class_id"] == str(row["label"])
        png = np.asarray(Image.open(tmp_path / "b" / "train" / row["file_name"]).convert("RGB"))
        assert np.array_equal(png, np.asarray(sample.load()))


# -- one tiny distillation -----------------------------------------------------------------------------
def test_out_holds_the_set_in_train_and_nothing_else_there(run, tmp_path):
    from torchvision.datasets import ImageFolder

    out = shutil.copytree(run / "out", tmp_path / "out")
    assert [p.name for p in out.iterdir() if p.is_dir()] == ["train"]
    assert {"manifest.json", "preview.png", "prototypes.json", "report.html"} <= {p.name for p in out.iterdir()}
    assert sorted(p.name for p in (out / "train").iterdir()) == DIGITS + ["metadata.jsonl"]
    folder = ImageFolder(str(out / "train"))
    assert folder.classes == DIGITS and len(folder) == 20
    r = invoke(run, "evaluate", out, "--data", "digits", "--seeds", "1", "--epochs", "1", "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "r.json").read_text())["train_images"] == 20
    assert len(list((out / "evaluations").glob("*.json"))) == 1  # at the root, beside the set
    assert ImageFolder(str(out / "train")).classes == DIGITS  # the evaluation is no class
    assert sorted(p.name for p in (out / "train").iterdir()) == DIGITS + ["metadata.jsonl"]


def test_metadata_lines_are_the_files_on_disk_with_their_prompts(run):
    out = run / "out"
    found = rows(out)
    assert [r["file_name"] for r in found] == pngs(out / "train")  # class by class, index order: the same list
    protos = json.loads((out / "prototypes.json").read_text())["classes"]
    names = {c["folder"]: c["name"] for c in json.loads((out / "manifest.json").read_text())["classes"]}
    for r in found:
        folder, file = r["file_name"].split("/")
        assert list(r) == ROW_KEYS
        assert r["class_id"] == folder and r["label"] == DIGITS.index(folder) and r["class_name"] == names[folder]
        assert r["cluster"] == int(file[:4])  # no post-sampling: image j is cluster j's
        cluster = protos[folder]["clusters"][r["cluster"]]
        assert r["prompt"] == cluster["prompt"] and r["prompt"].startswith(names[folder])
        assert r["cluster_size"] == cluster["cluster_size"] >= 1
    assert sum(r["cluster_size"] for r in found if r["class_id"] == "3") <= 6  # --max-per-class 6, less outliers


def test_datasets_imagefolder_reads_every_image_with_its_label_and_prompt(run, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    out = run / "out"
    meta = {r["file_name"]: r for r in rows(out)}
    for k, data_dir in enumerate((out, out / "train")):
        loaded = datasets.load_dataset("imagefolder", data_dir=str(data_dir), cache_dir=str(tmp_path / f"hf{k}"))
        assert list(loaded) == ["train"]  # train/ is the split; preview.png and the JSON files are no rows
        ds = loaded["train"]
        assert ds.num_rows == 20 and ds.column_names == ["image"] + ROW_KEYS[1:]
        paths = ds.cast_column("image", datasets.Image(decode=False))["image"]
        seen = []
        for row, path in zip(ds, paths):
            name = Path(path["path"]).resolve().relative_to((out / "train").resolve()).as_posix()
            seen.append(name)
            assert {k: row[k] for k in ROW_KEYS[1:]} == {k: meta[name][k] for k in ROW_KEYS[1:]}
            assert np.array_equal(np.asarray(row["image"]), np.asarray(Image.open(out / "train" / name)))
        assert sorted(seen) == sorted(meta)
        # the label is ImageFolder's number; the class ids make it a ClassLabel of the folders in sorted order
        encoded = ds.class_encode_column("class_id")
        assert encoded.features["class_id"].names == DIGITS
        assert encoded["class_id"] == ds["label"]


def test_readers_accept_the_layout_before_issue_23(run, tmp_path):
    old = old_layout(run / "out", tmp_path / "old")
    assert not (old / "train").exists() and (old / "3" / "0001.png").is_file()
    r = invoke(run, "evaluate", old, "--data", "digits", "--seeds", "1", "--epochs", "1", "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "r.json").read_text())["train_images"] == 20 and (old / "evaluations").is_dir()
    r = invoke(run, "evaluate", old, "--data", "digits", "--seeds", "1", "--epochs", "1")
    assert r.exit_code == 0, r.output  # evaluations/ beside the class folders is no class

    from vlcp.evaluation.caption_fusion import folder_prompts

    assert folder_prompts(old) == folder_prompts(run / "out") == {k: r["prompt"] for k, r in
                                                                  ((r["file_name"], r) for r in rows(run / "out"))}
    new = shutil.copytree(run / "out", tmp_path / "new")
    for folder, prefix in ((old, ""), (new, "train/")):
        assert invoke(run, "report", folder).exit_code == 0
        page = (folder / "report.html").read_text()
        srcs = re.findall(r'<img class="syn[^"]*" src="([^"]+)"', page)
        assert srcs == [f"{prefix}{f}" for f in pngs(new / "train")] and all((folder / s).is_file() for s in srcs)


def test_select_reads_either_layout_and_carries_the_prompts(run, tmp_path):
    old = old_layout(run / "out", tmp_path / "old")
    for pool, out in ((old, tmp_path / "s_old"), (run / "out", tmp_path / "s_new")):
        r = invoke(run, "select", pool, "--data", "digits", "--ipc", "1", "--tiny", "--out", out)
        assert r.exit_code == 0, r.output
        assert pngs(out) == ["preview.png", "preview_pool.png"] + [f"train/{c}/0000.png" for c in DIGITS]
        m = json.loads((out / "manifest.json").read_text())
        for row in rows(out):
            kept = m["classes"][row["class_id"]]["kept"][0]["source"]
            assert Path(kept).relative_to(output.images_dir(pool)).as_posix() == row["source"]
            assert m["candidates"][row["source_index"]]["output"] == [row["file_name"]]
            png = np.asarray(Image.open(out / "train" / row["file_name"]))
            assert np.array_equal(png, np.asarray(Image.open(output.images_dir(pool) / row["source"])))
    source = {r["file_name"]: r for r in rows(run / "out")}
    assert [set(r) - {"source", "source_index"} for r in rows(tmp_path / "s_old")] == [set(ROW_KEYS[:4])] * 10
    for row in rows(tmp_path / "s_new"):  # from a vlcp pool: the kept image's prompt and cluster come along
        assert {k: row[k] for k in ROW_KEYS[1:]} == {k: source[row["source"]][k] for k in ROW_KEYS[1:]}


def test_refine_detects_on_a_foreign_folder_in_the_old_layout(run, tmp_path):
    old = old_layout(run / "out", tmp_path / "old")
    (old / "manifest.json").unlink()  # not a vlcp distillation: detection only
    r = invoke(run, "refine", old, "--data", "digits", "--detector-epochs", "1", "--out", tmp_path / "rep")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert sorted(Path(i["file"]).relative_to(old).as_posix() for i in rep["images"]) == \
        [p for p in pngs(old) if "/" in p]  # every image of the class folders (not preview.png)


def test_the_report_shows_each_image_with_the_prototype_it_came_from(tmp_path):
    """After SAS, image j of a class need not come from cluster j: the card shows the cluster metadata.jsonl
    names, or in a folder without it the one the manifest's post_sampling names."""
    from tests.test_report import build_page, make_folder

    sas = {"post_sampling": {"images": {f"n01440764/000{j}.png": {"prototype": 1} for j in range(2)}}}
    folder = make_folder(tmp_path / "old", classes=(("n01440764", "tench"),), ipc=2, extra=sas)  # sizes 10, 11
    assert build_page(folder)[1].text("p.head") == "0000.png · cluster of 11 images0001.png · cluster of 11 images"
    folder = make_folder(tmp_path / "new", classes=(("n01440764", "tench"),), ipc=2)
    (folder / "train" / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"n01440764/000{j}.png", "cluster": 1 - j}) + "\n" for j in range(2)))
    assert build_page(folder)[1].text("p.head") == "0000.png · cluster of 11 images0001.png · cluster of 10 images"
