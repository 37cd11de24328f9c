"""`vlcp relabel` (stored FKD / SRe²L soft labels), `vlcp evaluate --soft-labels`, and the RDED teacher as a
named file: on a 3-per-class random digits set and a one-epoch ConvNet-3 teacher, shared by the module."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file

from vlcp.cli.main import cli
from vlcp.evaluation.relabel import SoftLabels, sample_crops
from vlcp.store.cache import file_digest

TEACHER = ["--model", "convnet3", "--teacher-epochs", "1"]


class World:
    def __init__(self, root: Path):
        self.root, self.set = root, root / "b"

    def __call__(self, *args):
        base = ["--cache-dir", str(self.root / "cache"), "--data-dir", str(self.root / "data")]
        return CliRunner().invoke(cli, base + [str(a) for a in args], catch_exceptions=False)

    def labels(self, name: str, folder: Path | None = None) -> tuple[dict, dict]:
        d = (folder or self.set) / "soft_labels"
        return json.loads((d / f"{name}.json").read_text()), load_file(str(d / f"{name}.safetensors"))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    """A digits set (random real images, 3 per class, OUT/train/<class>/), an rded evaluation that trains the
    teacher (and writes its named file), and that teacher's soft labels of 3 crops per image."""
    w = World(tmp_path_factory.mktemp("relabel"))
    r = w("baseline", "--method", "random", "--data", "digits", "--ipc", "3", "--out", w.set)
    assert r.exit_code == 0, r.output
    if not (w.set / "train").is_dir():  # the layout with the images under train/
        (w.set / "train").mkdir()
        for d in [d for d in w.set.iterdir() if d.is_dir() and d.name != "train"]:
            d.rename(w.set / "train" / d.name)
    r = w("evaluate", w.set, "--data", "digits", "--protocol", "rded", "--epochs", "1", "--seeds", "1", *TEACHER,
          "--json", w.root / "rded.json")
    assert r.exit_code == 0, r.output
    r = w("relabel", w.set, "--teacher", "auto", "--crops", "3", "--name", "auto", *TEACHER)
    assert r.exit_code == 0, r.output
    w.summary = r.output
    return w


def test_crop_sampling_is_seeded_and_inside_the_image():
    a, b, c = sample_crops(6, 4, 32, 0.08, 0), sample_crops(6, 4, 32, 0.08, 0), sample_crops(6, 4, 32, 0.08, 1)
    assert a.shape == (6, 4, 5) and a.dtype == np.float32
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    top, left, h, w, flip = np.moveaxis(a, -1, 0)
    assert (h > 0).all() and (w > 0).all() and (top + h <= 1).all() and (left + w <= 1).all()
    assert set(np.unique(flip)) <= {0.0, 1.0} and np.allclose(a[..., :4] * 32, np.rint(a[..., :4] * 32))
    assert (h * w >= 0.08 * 0.9).all()  # RandomResizedCrop's smallest area (up to rounding to whole pixels)
    whole = sample_crops(3, 2, 10, 1.0, 0)  # scale 1: only ratio 1 fits, or the fallback: the whole image
    assert np.array_equal(whole[..., :4], np.tile([0, 0, 1, 1], (3, 2, 1)).astype(np.float32))


def test_top_k_labels_are_filled_in_evenly():
    soft = SoftLabels(np.zeros((1, 1, 5), np.float32), np.array([[[0.5, 0.3]]], np.float16),
                      np.array([[[2, 0]]], np.int16), 4, 1.0)
    assert torch.allclose(soft.targets(np.array([0]), 0), torch.tensor([[0.3, 0.1, 0.5, 0.1]]), atol=1e-3)


def test_the_summary_and_the_json_describe_what_was_stored(world):
    meta, t = world.labels("auto")
    files = sorted(p.relative_to(world.set).as_posix() for p in (world.set / "train").rglob("*.png"))
    assert meta["images"] == files and len(files) == 30
    assert meta["image_sha256"][4] == file_digest(world.set / files[4])
    assert meta["classes"] == [str(i) for i in range(10)] and meta["crops"] == 3 and meta["seed"] == 0
    assert meta["sha256"] == file_digest(world.set / "soft_labels" / "auto.safetensors")
    assert meta["teacher"]["sha256"] == file_digest(meta["teacher"]["file"]) and meta["teacher"]["model"] == "convnet3"
    assert meta["labels"]["kind"] == "full" and meta["temperature"] == 1.0
    assert {k: (v.shape, v.dtype) for k, v in t.items()} == {
        "crops": ((30, 3, 5), np.float32), "soft_labels": ((30, 3, 10), np.float16),
        "image_logits": ((30, 10), np.float32)}
    assert "wrote" in world.summary and "30 images x 3 crops, 10 classes" in world.summary


def _teacher_probs(meta: dict, folder: Path, row: int, crops: np.ndarray, temperature: float):
    """The teacher file's softmax / T on the stored crops of one image, recomputed from the PNG."""
    import torchvision.transforms.v2.functional as TF
    from PIL import Image
    from safetensors.torch import load_file as load_torch

    from vlcp.evaluation import networks
    from vlcp.evaluation.samples import to_array

    ti = meta["teacher_input"]
    net = networks.build(meta["teacher"]["model"], ti["channels"], 10, ti["image_size"])
    net.load_state_dict(load_torch(meta["teacher"]["file"]))
    net.eval()
    img = torch.tensor(to_array(Image.open(folder / meta["images"][row]), ti["load_size"], ti["channels"], None,
                                ti["resample"])).float() / 255
    side = img.shape[-1]
    batch = []
    for top, left, h, w, flip in crops.tolist():
        c = TF.resized_crop(img, round(top * side), round(left * side), round(h * side), round(w * side),
                            [ti["image_size"]] * 2, antialias=True)
        batch.append(c.flip(-1) if flip else c)
    mean, std = torch.tensor(ti["mean"]).view(1, -1, 1, 1), torch.tensor(ti["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        whole = net((img[None] - mean) / std)[0].numpy()
        return torch.softmax(net((torch.stack(batch) - mean) / std) / temperature, 1).numpy(), whole


def test_the_soft_labels_are_the_teachers_softmax_on_exactly_those_crops(world):
    meta, t = world.labels("auto")
    for row in (0, 17):
        probs, whole = _teacher_probs(meta, world.set, row, t["crops"][row], 1.0)
        np.testing.assert_allclose(t["soft_labels"][row].astype(np.float32), probs, atol=2e-3)
        np.testing.assert_allclose(t["image_logits"][row], whole, rtol=1e-4, atol=1e-4)
    assert len({tuple(c) for c in t["crops"][0].tolist()}) == 3  # three different crops
    r = world("relabel", world.set, "--teacher", "auto", "--crops", "3", "--temperature", "4", "--name", "t4", *TEACHER)
    assert r.exit_code == 0, r.output
    m4, t4 = world.labels("t4")
    assert np.array_equal(t4["crops"], t["crops"]) and m4["temperature"] == 4.0  # same seed, same crops
    probs, _ = _teacher_probs(m4, world.set, 5, t4["crops"][5], 4.0)
    np.testing.assert_allclose(t4["soft_labels"][5].astype(np.float32), probs, atol=2e-3)
    assert t4["soft_labels"][5].max() < t["soft_labels"][5].max()  # T = 4: flatter


def test_the_named_teacher_file_reproduces_the_labels_and_seeds_change_the_crops(world):
    (weights,) = (world.root / "cache" / "teachers").glob("digits-convnet3-*.safetensors")
    tmeta = json.loads(weights.with_suffix(".json").read_text())
    assert tmeta["model"] == "convnet3" and tmeta["epochs"] == 1 and tmeta["classes"] == [str(i) for i in range(10)]
    assert tmeta["sha256"] == file_digest(weights) and tmeta["protocol"]["image_size"] == 8
    rded = json.loads((world.root / "rded.json").read_text())["teacher"]
    assert rded["file"] == str(weights.resolve()) and tmeta["accuracy"] == rded["accuracy"]
    meta, t = world.labels("auto")
    assert meta["teacher"]["file"] == str(weights.resolve())  # auto found the file the evaluation wrote
    r = world("relabel", world.set, "--teacher", weights, "--crops", "3", "--name", "file")
    assert r.exit_code == 0, r.output
    _, again = world.labels("file")
    assert all(np.array_equal(again[k], t[k]) for k in t)
    r = world("relabel", world.set, "--teacher", weights, "--crops", "3", "--seed", "1", "--top-k", "3")
    assert r.exit_code == 0, r.output
    m1, s1 = world.labels("m3-seed1-T1")
    assert not np.array_equal(s1["crops"], t["crops"]) and m1["labels"]["kind"] == "top-3"
    assert s1["topk_values"].shape == (30, 3, 3) and s1["topk_indices"].dtype == np.int16
    r = world("evaluate", world.set, "--data", "digits", "--protocol", "rded", "--teacher", weights, "--epochs", "1",
              "--seeds", "1", "--model", "convnet3", "--json", world.root / "file.json")
    assert r.exit_code == 0, r.output
    used = json.loads((world.root / "file.json").read_text())["teacher"]
    assert used["sha256"] == tmeta["sha256"] and used["accuracy"] == rded["accuracy"]


def test_evaluate_on_stored_soft_labels(world):
    common = ["--data", "digits", "--epochs", "2", "--seeds", "1"]
    r = world("evaluate", world.set, "--soft-labels", "auto", *common, "--json", world.root / "soft.json")
    assert r.exit_code == 0, r.output
    assert "soft labels: auto (3 crops per image, T=1" in r.output
    soft = json.loads((world.root / "soft.json").read_text())
    meta, _ = world.labels("auto")
    assert soft["soft_labels"]["sha256"] == meta["sha256"] and soft["soft_labels"]["crops"] == 3
    assert world("evaluate", world.set, *common, "--json", world.root / "hard.json").exit_code == 0
    hard = json.loads((world.root / "hard.json").read_text())
    assert "soft_labels" not in hard and soft["seeds"][0]["losses"] != hard["seeds"][0]["losses"]
    saved = {json.loads(p.read_text()).get("soft_labels", {}).get("sha256"): p.name
             for p in (world.set / "evaluations").glob("dc-convnet3-*.json")}
    assert saved.keys() >= {None, meta["sha256"]} and len(set(saved.values())) == len(saved)  # a file each
    from vlcp.report.folder import load
    from vlcp.report.sections import evaluation_section

    section = evaluation_section(load(world.set))  # the report: its own row, never the headline's "ours"
    assert sorted(r.protocol for r in section.rows if r.protocol.startswith("dc")) == ["dc", "dc, soft labels auto"]
    assert all(r.paper is None for r in section.rows if "soft labels" in r.protocol)
    for suffix in (".json", ".safetensors"):  # a second set of labels: the name is needed
        shutil.copy(world.set / "soft_labels" / f"auto{suffix}", world.set / "soft_labels" / f"copy{suffix}")
    r = world("evaluate", world.set, "--soft-labels", *common)
    assert r.exit_code == 2 and "several soft labels (" in r.output and "auto, copy" in r.output


def test_bad_input(world, tmp_path):
    r = world("relabel", tmp_path / "missing", "--teacher", "auto", "--data", "digits")
    assert r.exit_code == 2 and "does not exist" in r.output
    (tmp_path / "empty").mkdir()
    r = world("relabel", tmp_path / "empty", "--teacher", "auto", "--data", "digits")
    assert r.exit_code == 2 and "no class folders" in r.output
    r = world("relabel", world.set, "--teacher", tmp_path / "nope.safetensors")
    assert r.exit_code == 2 and "neither auto nor a file" in r.output
    (tmp_path / "teacher.pt").write_bytes(b"PK\x03\x04 a pickle, never read")
    r = world("relabel", world.set, "--teacher", tmp_path / "teacher.pt", "--name", "pt")
    assert r.exit_code == 2 and "vlcp reads safetensors only" in r.output and "Traceback" not in r.output  # a bad value
    r = world("relabel", world.set, "--teacher", "auto", "--crops", "3", "--name", "auto")
    assert r.exit_code == 2 and "exists; pass --force" in r.output
    plain = tmp_path / "plain"
    shutil.copytree(world.set / "train", plain / "train")
    r = world("relabel", plain, "--teacher", "auto")
    assert r.exit_code == 2 and "--data is needed" in r.output
    r = world("relabel", plain / "train", "--teacher", "auto", "--data", "digits")  # classes at the top
    assert r.exit_code == 2 and "where soft_labels/ would be read as one more class" in r.output
    assert not (plain / "train" / "soft_labels").exists()
    r = world("evaluate", "--full", "--data", "digits", "--soft-labels", "auto")
    assert r.exit_code == 2 and "give SYNTH_DIR" in r.output
    r = world("evaluate", world.set, "--data", "digits", "--soft-labels", "nope")
    assert r.exit_code == 2 and "no soft labels 'nope'" in r.output
    broken = tmp_path / "broken"
    shutil.copytree(world.set, broken)
    (broken / "soft_labels" / "auto.json").write_text('["not", "a", "description"]')
    r = world("evaluate", broken, "--data", "digits", "--soft-labels", "auto")
    assert r.exit_code == 2 and "is not a vlcp soft-labels description" in r.output
    meta = dict(world.labels("auto")[0])
    meta["pictures"] = meta.pop("images")
    (broken / "soft_labels" / "auto.json").write_text(json.dumps(meta))
    r = world("evaluate", broken, "--data", "digits", "--soft-labels", "auto")
    assert r.exit_code == 2 and "lacks images" in r.output
    r = world("evaluate", world.set, "--data", "digits", "--soft-labels", "auto", "--teacher-epochs", "3", "--aug", "flip")
    assert r.exit_code == 2 and "--teacher-epochs, --aug would be ignored" in r.output
    moved = tmp_path / "moved"
    shutil.copytree(world.set, moved)
    (moved / "train" / "3" / "0001.png").unlink()
    r = world("evaluate", moved, "--data", "digits", "--soft-labels", "auto")
    assert r.exit_code == 2 and "image list of soft labels 'auto' does not match" in r.output
    assert "listed but missing: train/3/0001.png" in r.output and "--force" in r.output
    shutil.copy(world.set / "train" / "3" / "0002.png", moved / "train" / "3" / "0001.png")  # same name, other image
    r = world("evaluate", moved, "--data", "digits", "--soft-labels", "auto")
    assert r.exit_code == 2 and "train/3/0001.png changed after its soft labels 'auto'" in r.output


def test_a_plain_image_folder_is_relabelled_and_evaluated(world, tmp_path):
    """Any ImageFolder in PLAIN/train (no manifest): --data names the dataset; the soft labels sit beside
    train/, where ImageFolder(PLAIN/train) never sees them."""
    plain = tmp_path / "plain"
    shutil.copytree(world.set / "train", plain / "train")
    (weights,) = (world.root / "cache" / "teachers").glob("*.safetensors")
    r = world("relabel", plain, "--data", "digits", "--teacher", weights, "--crops", "2")
    assert r.exit_code == 0, r.output
    meta, _ = world.labels("m2-seed0-T1", plain)
    assert meta["images"][0] == "train/0/0000.png" and len(meta["images"]) == 30
    r = world("evaluate", plain, "--data", "digits", "--soft-labels", "--epochs", "1", "--seeds", "1")
    assert r.exit_code == 0, r.output
    assert "soft labels: m2-seed0-T1" in r.output and not (plain / "evaluations").exists()


def test_bad_arguments_are_found_before_torch_is_imported(world):
    import subprocess
    import sys

    code = ("import sys; from click.testing import CliRunner; from vlcp.cli.main import cli\n"
            "r = CliRunner().invoke(cli, sys.argv[1:]); print(r.exit_code, 'torch' in sys.modules)")
    for args in (["relabel", world.set, "--teacher", "auto", "--crops", "3", "--name", "auto"],  # exists
                 ["relabel", world.set, "--teacher", "auto", "--name", "a/b"],
                 ["relabel", world.set, "--teacher", "auto", "--data", "no-such-data"]):
        out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                             check=True).stdout.split()
        assert out == ["2", "False"], args


def test_a_teacher_relabel_trains_logs_its_curves_and_one_from_the_cache_none(world, tmp_path):
    """--log-dir: `--teacher auto` with no teacher in the cache trains one (vlcp.evaluation.training.train) and logs
    relabel/rded-convnet3/teacher/...: the losses and lrs a rerun of the same training records, the test accuracy
    its JSON records; the rerun that finds the teacher file trains nothing and makes no run folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vlcp.data.datasets import load_dataset
    from vlcp.evaluation.protocols import Protocol
    from vlcp.evaluation.samples import test_tensors, train_tensors
    from vlcp.evaluation.training import train

    shutil.copytree(world.set, tmp_path / "set", ignore=shutil.ignore_patterns("soft_labels", "evaluations"))
    logs, data = tmp_path / "logs", world.root / "data"

    def relabel(name):  # a cache of its own: no teacher yet (the module's world has one)
        args = ["--cache-dir", tmp_path / "cache", "--data-dir", data, "relabel", tmp_path / "set", "--teacher", "auto",
                "--crops", "2", "--name", name, "--model", "convnet3", "--teacher-epochs", "2", "--log-dir", logs]
        r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        return r.output

    out = relabel("a")
    (run,) = sorted(logs.iterdir())
    assert run.name.startswith("relabel-set-") and f"training curves: {run}" in out
    ea = EventAccumulator(str(run))
    ea.Reload()
    c = {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}
    tag = "relabel/rded-convnet3/teacher/"
    assert sorted(c) == [tag + t for t in ("accuracy", "loss", "lr", "test_accuracy")]
    meta, _ = world.labels("a", tmp_path / "set")
    tfile = json.loads(Path(meta["teacher"]["file"]).with_suffix(".json").read_text())
    assert tfile["epochs"] == 2 and meta["teacher"]["file"].startswith(str((tmp_path / "cache").resolve()))
    assert c[tag + "test_accuracy"] == [(2, pytest.approx(meta["teacher"]["accuracy"] / 100, abs=6e-5))]
    # the same training again (CPU, same seed, same protocol as the teacher's JSON records): the same numbers
    tp = Protocol(**{k: tuple(v) if isinstance(v, list) else v for k, v in tfile["protocol"].items()})
    ds = load_dataset("digits", data, "train")
    _, res = train(tp, (*train_tensors(ds.samples, tp, False), 10), 0, "cpu",
                   test=test_tensors(load_dataset("digits", data, "test").samples, tp, False), progress=False)
    assert c[tag + "loss"] == [(1, pytest.approx(res["losses"][0], rel=1e-6)),
                               (2, pytest.approx(res["losses"][1], rel=1e-6))]
    assert c[tag + "lr"] == [(e, pytest.approx(v, rel=1e-6)) for e, v in zip((1, 2), res["lrs"])]
    assert res["accuracy"] * 100 == pytest.approx(meta["teacher"]["accuracy"], abs=0.006)
    again = relabel("b")  # the teacher file is found: nothing trains, no folder
    assert world.labels("b", tmp_path / "set")[0]["teacher"]["file"] == meta["teacher"]["file"]
    assert sorted(logs.iterdir()) == [run] and "training curves: none, nothing was trained" in again
