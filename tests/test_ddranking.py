"""DD-Ranking (issue 23): the export reads with DD-Ranking's labels, the teacher's rows follow them and its weights
load into DD-Ranking's own models, the scores are DD-Ranking's own lines, and `vlcp ddranking` runs.

DD-Ranking's code comes from the released wheel (`pip download ddranking==0.2.0 --no-deps`, never installed: it pins
numpy<2); its pure-torch ``utils/networks.py`` and the score lines of ``compute_metrics`` are executed in isolation."""
from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest

from vlcp.evaluation import ddranking as ddr

WOOF_MINIMAX = ["n02096294", "n02093754", "n02111889", "n02088364", "n02086240", "n02089973", "n02087394",
                "n02115641", "n02099601", "n02105641"]


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    d = tmp_path_factory.mktemp("ddranking-wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "download", "ddranking==0.2.0", "--no-deps", "-q", "-d", str(d)],
                       capture_output=True, text=True, timeout=600)
    found = sorted(d.glob("ddranking-0.2.0-*.whl"))
    if r.returncode or not found:
        pytest.skip("pip download ddranking==0.2.0 failed (no package index reachable): "
                    + (r.stderr.strip().splitlines() or ["no wheel"])[-1])
    return zipfile.ZipFile(found[0])


def source(wheel: zipfile.ZipFile, path: str) -> str:
    return wheel.read(f"ddranking/{path}").decode()


def ddranking_networks(wheel) -> types.ModuleType:
    """DD-Ranking's utils/networks.py (it imports torch only), as a module of its own."""
    mod = types.ModuleType("ddranking_networks")
    exec(compile(source(wheel, "utils/networks.py"), "ddranking/utils/networks.py", "exec"), mod.__dict__)
    return mod


def subsets(wheel) -> dict[str, list[int]]:
    tree = ast.parse(source(wheel, "utils/data.py"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ImageNetSubsets")
    return {t.id: ast.literal_eval(n.value) for n in cls.body if isinstance(n, ast.Assign)
            and isinstance(n.value, ast.List) for t in n.targets}


def human_names() -> dict[str, str]:
    from vlcp.data.datasets import IMAGENETTE, IMAGEWOOF

    return {w: n.split(",")[0] for w, n in IMAGEWOOF + IMAGENETTE}


# -- the class order ------------------------------------------------------------------------------------------
def test_imagewoof_is_numbered_in_ddrankings_own_order(wheel):
    from torchvision.models import ResNet18_Weights

    lists, imagenet = subsets(wheel), ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    assert list(ddr.SUBSETS["ImageWoof"]) == lists["imagewoof"]
    assert list(ddr.SUBSETS["ImageNette"]) == lists["imagenette"]
    names = human_names()
    for dataset in ("imagewoof", "imagenette"):  # the wnid vlcp puts at DD-Ranking's index c is ImageNet's class there
        assert [names[w] for w in ddr.class_order(dataset)] == [imagenet[i] for i in lists[dataset]]
    assert ddr.class_order("imagewoof") == WOOF_MINIMAX != sorted(WOOF_MINIMAX)  # Minimax's order, not sorted
    assert ddr.class_order("imagenette") == sorted(ddr.class_order("imagenette"))
    assert ddr.class_order("cifar10", list("abcdefghij")) == list("abcdefghij")  # torchvision's labels are vlcp's
    known = {n.value for n in ast.walk(ast.parse(source(wheel, "utils/data.py"))) if isinstance(n, ast.Constant)}
    assert set(ddr.DATASETS.values()) <= known  # every name vlcp maps to is a dataset get_dataset has a branch for
    with pytest.raises(ddr.EvalError, match="no dataset for vlcp's 'digits'"):
        ddr.class_order("digits")


# -- export -----------------------------------------------------------------------------------------------
def woof_set(root: Path) -> Path:
    """ImageWoof class folders (wnids; one by its name), two 4-px PNGs each whose grey level is vlcp's class index."""
    from PIL import Image

    for v, wnid in enumerate(sorted(WOOF_MINIMAX)):
        d = root / "train" / ("Samoyed" if wnid == "n02111889" else wnid)
        d.mkdir(parents=True)
        for j in range(2):
            Image.new("L", (4, 4), 20 * v + j).save(d / f"{j:04d}.png")
    return root


def teacher_file(path: Path, model: str, size: int) -> tuple[Path, object]:
    """A vlcp network whose classifier row i (weight and bias) is all i: a user's weights without a .json."""
    import torch
    from safetensors.torch import save_file

    from vlcp.evaluation.networks import build

    net = build(model, 3, 10, size).eval()
    head = net.classifier if hasattr(net, "classifier") else net.fc
    with torch.no_grad():
        head.weight.copy_(torch.arange(10.0)[:, None].expand_as(head.weight) * 1e-3)
        head.bias.copy_(torch.arange(10.0))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
    return path, net


def test_export_reads_back_with_ddrankings_labels_and_permutes_the_teacher(wheel, tmp_path):
    import torch
    from PIL import Image
    from torchvision.datasets import ImageFolder

    teacher, net = teacher_file(tmp_path / "t.safetensors", "convnet3", 8)
    rec = ddr.export(woof_set(tmp_path / "out"), tmp_path / "dd", dataset="imagewoof", teacher=teacher)
    imagenet = __import__("torchvision.models", fromlist=["x"]).ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    ddr_names = [imagenet[i] for i in subsets(wheel)["imagewoof"]]  # DD-Ranking's label c: ImageNet's class there
    vlcp_order, names = sorted(WOOF_MINIMAX), human_names()
    folder = ImageFolder(tmp_path / "dd" / "train")
    assert len(folder) == 20
    for path, label in folder.samples:
        v = Image.open(path).getpixel((0, 0)) // 20  # which class the image was
        assert label == ddr_names.index(names[vlcp_order[v]])
    assert [c["from"] for c in rec["classes"]][2] == "Samoyed" and rec["ipc"] == 2
    assert json.loads((tmp_path / "dd" / "classes.json").read_text())["classes"][0]["folder"] == "00000_n02096294"
    assert Path(tmp_path / "dd" / "train" / "00000_n02096294" / "0000.png").stat().st_nlink == 2  # a hard link
    rows = [vlcp_order.index(w) for w in WOOF_MINIMAX]
    state = torch.load(tmp_path / "dd" / "teacher" / "ImageWoof" / "ConvNet-3" / "ckpt_best.pt", weights_only=True)
    assert state["classifier.bias"].tolist() == [float(r) for r in rows]
    assert rows == [5, 4, 8, 2, 0, 3, 1, 9, 6, 7]
    assert torch.equal(state["classifier.weight"][:, 0], torch.tensor(rows) * 1e-3)
    assert rec["teacher"]["files"] == ["teacher/ImageWoof/ConvNet-3/ckpt_best.pt"]
    # DD-Ranking's ConvNet-3 (utils/model.py get_convnet's arguments) loads it strictly: its output c is vlcp's rows[c]
    theirs = ddranking_networks(wheel).ConvNet(channel=3, num_classes=10, net_width=128, net_depth=3, net_act="relu",
                                               net_norm="instancenorm", net_pooling="avgpooling", im_size=(8, 8))
    theirs.load_state_dict(state)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(theirs.eval()(x), net(x)[:, rows], atol=1e-5)
    readme = (tmp_path / "dd" / "README.md").read_text()
    assert "teacher_model_names: [ConvNet-3]" in readme and "| 4 | `00004_n02086240` | `n02086240`" in readme
    assert rec["soft_labels"] is None and not (tmp_path / "dd" / "soft_labels.pt").exists()  # OUT has none


def test_resnet_teacher_loads_into_both_of_ddrankings_resnets(wheel, tmp_path):
    import torch
    import torchvision

    teacher, net = teacher_file(tmp_path / "t.safetensors", "resnet18-modified", 32)
    woof_set(tmp_path / "out")
    rec = ddr.export(tmp_path / "out", tmp_path / "dd", dataset="imagewoof", teacher=teacher)
    assert rec["teacher"]["model"] == "ResNet-18-BN" and rec["teacher"]["files"] == [
        "teacher/ImageWoof/ResNet-18-BN/ckpt_best.pt", "teacher-ddranking-resnet/ImageWoof/ResNet-18-BN/ckpt_best.pt"]
    assert "Teacher: `teacher/ImageWoof/ResNet-18-BN/ckpt_best.pt`" in (tmp_path / "dd" / "README.md").read_text()
    rows = [sorted(WOOF_MINIMAX).index(w) for w in WOOF_MINIMAX]
    tv = torchvision.models.resnet18(num_classes=10)  # utils/model.py get_resnet, use_torchvision at 32 px
    tv.conv1 = torch.nn.Conv2d(3, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)
    tv.maxpool = torch.nn.Identity()
    nets = ddranking_networks(wheel)
    own = nets.ResNet(nets.BasicBlock, [2, 2, 2, 2], channel=3, num_classes=10, norm="batchnorm", res=32)
    x = torch.randn(2, 3, 32, 32)
    for model, folder in ((tv, "teacher"), (own, "teacher-ddranking-resnet")):
        model.load_state_dict(torch.load(tmp_path / "dd" / folder / "ImageWoof" / "ResNet-18-BN" / "ckpt_best.pt",
                                         weights_only=True))
        with torch.no_grad():
            assert torch.allclose(model.eval()(x), net.eval()(x)[:, rows], atol=1e-4)
    with pytest.raises(Exception, match="not empty; pass --force"):
        ddr.export(tmp_path / "out", tmp_path / "dd", dataset="imagewoof")
    again = ddr.export(tmp_path / "out", tmp_path / "dd", dataset="imagewoof", force=True, cache_dir=tmp_path / "none")
    assert again["teacher"] is None and not (tmp_path / "dd" / "teacher").exists()  # replaced whole


def test_export_finds_the_teacher_vlcp_trained(tmp_path):
    """No teacher given: the named file of the set's rded evaluation, else the cache's file for the same data; the
    rows follow the class order recorded in the file's .json (here not sorted), not an assumed one."""
    from dataclasses import replace

    import torch

    from vlcp.data.datasets import IMAGEWOOF, ClassInfo, Dataset
    from vlcp.evaluation.protocols import make_protocol
    from vlcp.evaluation.teacher import save_teacher_file
    from vlcp.store.tensors import state_to_numpy

    ds = Dataset("imagewoof", "train", None, [ClassInfo(w, n) for w, n in reversed(IMAGEWOOF)], [])
    woof_set(tmp_path / "out")
    (tmp_path / "out" / "manifest.json").write_text(json.dumps({"vlcp_version": "0", "dataset": ds.identity()}))
    _, net = teacher_file(tmp_path / "t.safetensors", "convnet3", 8)
    tp = replace(make_protocol("rded", "imagewoof", 2, "convnet3"), image_size=8, sources={})
    saved = save_teacher_file(tmp_path / "cache", ds, tp, "k" * 32, state_to_numpy(net.state_dict()), {})
    rec = ddr.export(tmp_path / "out", tmp_path / "dd", cache_dir=tmp_path / "cache")
    rows = [[c.folder for c in ds.classes].index(w) for w in WOOF_MINIMAX]
    assert rec["teacher"]["source"] == str(saved) and rec["teacher"]["rows"] == rows
    assert rec["teacher"]["image_size"] == 8
    state = torch.load(tmp_path / "dd" / "teacher" / "ImageWoof" / "ConvNet-3" / "ckpt_best.pt", weights_only=True)
    assert state["classifier.bias"].tolist() == [float(r) for r in rows]
    moved = tmp_path / "elsewhere.safetensors"
    saved.rename(moved)
    saved.with_suffix(".json").rename(moved.with_suffix(".json"))
    (tmp_path / "out" / "evaluations").mkdir()
    (tmp_path / "out" / "evaluations" / "rded-convnet3-x.json").write_text(json.dumps(
        {"protocol": {"name": "rded"}, "dataset": {"name": "imagewoof"}, "teacher": {"file": str(moved)}}))
    rec = ddr.export(tmp_path / "out", tmp_path / "dd", force=True, cache_dir=tmp_path / "cache")
    assert rec["teacher"]["source"] == str(moved) and rec["teacher"]["rows"] == rows


def test_export_refuses_what_ddranking_cannot_read(tmp_path):
    woof_set(tmp_path / "out")
    with pytest.raises(ddr.EvalError, match="no dataset for vlcp's 'imageidc'"):
        ddr.export(tmp_path / "out", tmp_path / "a", dataset="imageidc")
    with pytest.raises(ddr.EvalError, match="pass --dataset NAME"):
        ddr.export(tmp_path / "out", tmp_path / "a")
    with pytest.raises(Exception, match="overlap"):
        ddr.export(tmp_path / "out", tmp_path / "out" / "dd", dataset="imagewoof")
    (tmp_path / "out" / "train" / "n02086240" / "0000.png").rename(tmp_path / "x.png")
    (tmp_path / "out" / "train" / "n02086240" / "0001.png").unlink()
    with pytest.raises(ddr.EvalError, match="n02086240 .* hold no images"):
        ddr.export(tmp_path / "out", tmp_path / "a", dataset="imagewoof")
    (tmp_path / "out" / "train" / "n02086240").rmdir()
    with pytest.raises(ddr.EvalError, match="has 10 classes; the set lacks n02086240"):
        ddr.export(tmp_path / "out", tmp_path / "a", dataset="imagewoof")
    teacher, _ = teacher_file(tmp_path / "t.safetensors", "resnet18", 32)
    with pytest.raises(ddr.EvalError, match="resnet18 .* has no DD-Ranking model"):
        ddr.architecture(ddr.load_state(teacher))
    assert not (tmp_path / "a").exists()


# -- soft labels (mode S) --------------------------------------------------------------------------------
def soft_label_file(out: Path, name: str) -> tuple[list[str], np.ndarray]:
    """Soft labels of woof_set's images as `vlcp relabel` writes them (the JSON's checks hold): image_logits[r, k] =
    100 r + k, row r = the r-th image of the JSON's list (relabel's order: Samoyed/ first), column k = vlcp's class k."""
    from safetensors.numpy import save_file

    from vlcp.data.datasets import IMAGEWOOF, ClassInfo, Dataset
    from vlcp.evaluation import relabel as rl
    from vlcp.store.cache import file_digest

    ds = Dataset("imagewoof", "train", None, [ClassInfo(w, n) for w, n in sorted(IMAGEWOOF)], [])
    samples, rel = rl.set_samples(out, ds)
    n = len(rel)
    logits = (100 * np.arange(n)[:, None] + np.arange(10)[None]).astype(np.float32)
    weights, side = rl.soft_paths(out, name)
    weights.parent.mkdir(exist_ok=True)
    save_file({"crops": np.zeros((n, 1, 5), np.float32), "soft_labels": np.full((n, 1, 10), 0.1, np.float16),
               "image_logits": logits}, str(weights))
    side.write_text(json.dumps({
        "format": rl.FORMAT, "name": name, "file": weights.name, "sha256": file_digest(weights), "teacher": {},
        "classes": [c.folder for c in ds.classes], "images": rel, "image_sha256": [file_digest(s.source) for s in samples],
        "crops": 1, "seed": 0, "temperature": 1.0,
        "labels": {"kind": "full", "dtype": "float16", "tensors": ["crops", "image_logits", "soft_labels"]}}))
    return rel, logits


def test_export_writes_the_soft_labels_in_the_exported_order(tmp_path):
    """soft_labels.pt row i = the soft labels of ImageFolder's i-th image of the export, its columns permuted as the
    exported teacher's classifier rows are (the teacher's bias k is vlcp's class k, so column j - 100 r = bias j)."""
    import torch
    from PIL import Image
    from torchvision.datasets import ImageFolder

    out = woof_set(tmp_path / "out")
    rel, _ = soft_label_file(out, "m1-seed0-T1")
    assert rel[0] == "train/Samoyed/0000.png"  # relabel's order is not the export's
    teacher, _ = teacher_file(tmp_path / "t.safetensors", "convnet3", 8)
    rec = ddr.export(out, tmp_path / "dd", dataset="imagewoof", teacher=teacher)
    soft = torch.load(tmp_path / "dd" / "soft_labels.pt", weights_only=True)
    bias = torch.load(tmp_path / "dd" / "teacher" / "ImageWoof" / "ConvNet-3" / "ckpt_best.pt",
                      weights_only=True)["classifier.bias"]
    assert soft.dtype == torch.float32 and soft.shape == (20, 10)
    assert rec["soft_labels"]["columns"] == rec["teacher"]["rows"] == [5, 4, 8, 2, 0, 3, 1, 9, 6, 7]
    vlcp_order, folder = sorted(WOOF_MINIMAX), ImageFolder(tmp_path / "dd" / "train")
    for i, (path, label) in enumerate(folder.samples):
        v, j = divmod(Image.open(path).getpixel((0, 0)), 20)  # vlcp's class and file of the image
        wnid = vlcp_order[v]
        r = rel.index(f"train/{'Samoyed' if wnid == 'n02111889' else wnid}/{j:04d}.png")
        assert label == WOOF_MINIMAX.index(wnid)
        assert soft[i].tolist() == [100.0 * r + k for k in rec["teacher"]["rows"]]
        assert torch.equal(soft[i] - 100 * r, bias)
    assert sorted({int(s[0]) // 100 for s in soft}) == list(range(20))  # every image's row once
    readme = (tmp_path / "dd" / "README.md").read_text()
    assert "Soft labels (`soft_label_mode: S`): `soft_labels.pt`, float32 [20, 10]" in readme
    assert 'soft_labels=torch.load("soft_labels.pt", weights_only=True)' in readme and "`image_tensor=" in readme
    assert json.loads((tmp_path / "dd" / "classes.json").read_text())["soft_labels"]["name"] == "m1-seed0-T1"


def test_export_refuses_soft_labels_of_other_images(vlcp, tmp_path):
    import torch
    from PIL import Image

    out = woof_set(tmp_path / "out")
    rel, _ = soft_label_file(out, "a")
    soft_label_file(out, "b")
    args = ["export", out, tmp_path / "dd", "--format", "ddranking", "--dataset", "imagewoof"]
    r = vlcp(*args)  # several and none named: the set and teacher alone, and the choice said
    assert r.exit_code == 0 and "(no soft labels: OUT has several, a, b; name one with --soft-labels NAME)" in r.output
    assert not (tmp_path / "dd" / "soft_labels.pt").exists()
    assert "OUT has several (a, b); export again with `--soft-labels NAME`" in (tmp_path / "dd" / "README.md").read_text()
    args[2] = tmp_path / "dd1"
    r = vlcp(*args, "--soft-labels", "c")
    assert r.exit_code == 2 and "no soft labels 'c'" in r.output and "found: a, b" in r.output
    r = vlcp(*args, "--soft-labels", "b")
    assert r.exit_code == 0 and "soft labels b" in r.output, r.output
    assert torch.load(tmp_path / "dd1" / "soft_labels.pt", weights_only=True).shape == (20, 10)
    Image.new("L", (4, 4), 255).save(out / rel[3])  # an image changed after relabel
    r = vlcp(*args[:2], tmp_path / "dd2", *args[3:], "--soft-labels", "b")
    assert r.exit_code == 2 and f"{rel[3]} changed after its soft labels 'b' were computed" in r.output
    assert not (tmp_path / "dd2").exists()
    r = vlcp("export", out, tmp_path / "dd3", "--format", "diffusers", "--soft-labels", "b")
    assert r.exit_code == 2 and "--soft-labels applies only with --format ddranking" in r.output


# -- the scores -----------------------------------------------------------------------------------------------
def score_lines(wheel, path: str, cls: str, names: tuple[str, ...]):
    """The assignments of ``names`` in ``cls.compute_metrics`` of the wheel's ``path``, compiled on their own."""
    tree = ast.parse(source(wheel, path))
    c = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls)
    f = next(n for n in c.body if isinstance(n, ast.FunctionDef) and n.name == "compute_metrics")
    found = sorted((n for n in ast.walk(f) if isinstance(n, ast.Assign) and len(n.targets) == 1
                    and isinstance(n.targets[0], ast.Name) and n.targets[0].id in names), key=lambda n: n.lineno)
    assert [n.targets[0].id for n in found] == list(names)  # each once, in this order
    return compile(ast.Module(body=found, type_ignores=[]), f"ddranking/{path}", "exec")


def run_lines(code, **inputs) -> dict:
    ns = {"np": np, **inputs}
    exec(code, ns)
    return ns


LRS_NAMES = ("hlr", "ior", "alpha", "lrs")
CASES = [(0.62, 0.41, 0.55, 0.30, 0.5), (0.9, 0.2, 0.7, 0.65, 0.3), (0.5, 0.5, 0.1, 0.9, 0.8),
         (62.0, 41.0, 55.0, 30.0, 0.5)]  # the last in percent, as ddranking 0.2.0 feeds them


@pytest.mark.parametrize("full, syn_hard, syn_soft, rdm, w", CASES)
def test_vlcp_scores_are_ddrankings_lines(wheel, full, syn_hard, syn_soft, rdm, w):
    hard = score_lines(wheel, "metrics/hard_label.py", "LabelRobustScoreHard", LRS_NAMES)
    ns = run_lines(hard, full_data_hard_label_acc=full, syn_data_hard_label_acc=syn_hard,
                   random_data_hard_label_acc=rdm, lrs_lambda=w)
    ours = ddr.lrs(full, syn_hard, syn_hard, rdm, w)
    assert ours == pytest.approx({k: ns[k] for k in LRS_NAMES}, rel=1e-12, abs=1e-12)
    soft = score_lines(wheel, "metrics/soft_label.py", "LabelRobustScoreSoft", LRS_NAMES)
    ns = run_lines(soft, full_data_hard_label_acc=full, syn_data_hard_label_acc=syn_hard,
                   syn_data_soft_label_acc=syn_soft, random_data_soft_label_acc=rdm, lrs_lambda=w)
    ours = ddr.lrs(full, syn_hard, syn_soft, rdm, w)
    assert ours == pytest.approx({k: ns[k] for k in LRS_NAMES}, rel=1e-12, abs=1e-12)
    names = ("with_aug_score", "without_aug_score", "beta", "ars")
    aug = score_lines(wheel, "metrics/aug_robust.py", "AugmentationRobustScore", names)
    ns = run_lines(aug, syn_data_with_aug_acc=syn_soft, random_data_with_aug_acc=rdm, syn_data_without_aug_acc=syn_hard,
                   random_data_without_aug_acc=full, ars_lambda=w)
    ours = ddr.ars(syn_soft, rdm, syn_hard, full, w)
    assert [ours[k] for k in ("with_aug", "without_aug", "beta", "ars")] == pytest.approx([ns[k] for k in names],
                                                                                         rel=1e-12, abs=1e-12)


def test_the_normalisation_by_hand_and_ddrankings_units(wheel):
    assert ddr.lrs(0.7, 0.7, 0.4, 0.4)["lrs"] == pytest.approx(1 / (1 + math.e))  # alpha 0: (1 - 1/e) / (e - 1/e)
    assert ddr.lrs(1.0, 0.0, 0.0, 1.0)["lrs"] == pytest.approx(0.0, abs=1e-15)  # alpha -1, the floor
    assert ddr.ars(1.0, 0.0, 1.0, 0.0)["ars"] == pytest.approx(1.0)  # beta 1, the ceiling
    assert ddr.lrs(0.62, 0.41, 0.55, 0.30)["lrs"] == pytest.approx(
        (math.exp(0.5 * 0.25 - 0.5 * 0.21) - math.exp(-1)) / (math.exp(1) - math.exp(-1)))
    # ddranking 0.2.0 feeds percentages (its Acc@1 is x100, its cached full-data accuracy 56.5): outside [0, 1]
    assert "correct_k * (100.0 / batch_size)" in source(wheel, "utils/meter.py")
    assert '"ImageNet1K-ResNet-18-BN": 56.5' in source(wheel, "utils/train_and_eval.py")
    assert ddr.lrs(62.0, 41.0, 41.0, 30.0)["lrs"] < 0 and ddr.lrs(62.0, 41.0, 55.0, 30.0)["lrs"] > 1


# -- the command ------------------------------------------------------------------------------------------
def test_ddranking_command_on_digits(vlcp, tmp_path):
    assert vlcp("baseline", "--method", "random", "--data", "digits", "--ipc", "2", "--seed", "5",
                "--out", tmp_path / "b").exit_code == 0
    args = ["ddranking", tmp_path / "b", "--model", "convnet3", "--runs", "1", "--epochs", "1", "--teacher-epochs", "1"]
    r = vlcp(*args)
    assert r.exit_code == 0, r.output
    assert "8 trained, 0 cached" in r.output and "LRS (%)" in r.output and "ARS (%)" in r.output
    [saved] = (tmp_path / "b" / "evaluations").glob("ddranking-*.json")
    res = json.loads(saved.read_text())
    assert res["kind"] == "ddranking" and res["dataset"]["name"] == "digits" and res["ipc"] == 2
    [a] = [{k: v / 100 for k, v in acc.items()} for acc in res["accuracies"]]
    assert sorted(a) == sorted({k for ks in ("lrs-hard", "lrs-soft", "ars") for k in
                                __import__("vlcp.evaluation.ddranking_scores", fromlist=["x"]).NEEDS[ks]})
    hard, soft = ddr.lrs(a["full-hard"], a["syn-hard-aug"], a["syn-hard-aug"], a["rdm-hard-aug"]), \
        ddr.lrs(a["full-hard"], a["syn-hard"], a["syn-soft-aug"], a["rdm-soft-aug"])
    aug = ddr.ars(a["syn-soft-aug"], a["rdm-soft-aug"], a["syn-soft-naug"], a["rdm-soft-naug"])
    assert res["scores"]["lrs-hard"]["lrs"]["mean"] == pytest.approx(100 * hard["lrs"], abs=1e-3)
    assert res["scores"]["lrs-soft"]["hlr"]["mean"] == pytest.approx(100 * soft["hlr"], abs=1e-3)
    assert res["scores"]["ars"]["ars"]["mean"] == pytest.approx(100 * aug["ars"], abs=1e-3)
    assert res["teacher"]["source"].startswith("trained by vlcp")
    again = vlcp(*args)
    assert "0 trained, 8 cached" in again.output  # every accuracy memoised
    assert json.loads(saved.read_text())["scores"] == res["scores"]
    r = vlcp("ddranking", tmp_path / "b", "--protocol", "dc")
    assert r.exit_code == 2 and "lrs-soft and ars need --protocol rded" in r.output
    (tmp_path / "plain" / "0").mkdir(parents=True)
    r = vlcp("ddranking", tmp_path / "plain")
    assert r.exit_code == 2 and "pass --dataset" in r.output


def test_each_full_accuracy_value_is_its_own_result(vlcp, tmp_path):
    """--full-accuracy is a setting by its value: 80 and 90 land in two files, each with its own value and HLR;
    80 again is the same file, every training memoised (nothing retrained)."""
    assert vlcp("baseline", "--method", "random", "--data", "digits", "--ipc", "1", "--out", tmp_path / "b").exit_code == 0
    args = ["ddranking", tmp_path / "b", "--score", "lrs-hard", "--model", "convnet3", "--runs", "1", "--epochs", "1"]
    evals = tmp_path / "b" / "evaluations"

    def run(value):
        r = vlcp(*args, "--full-accuracy", value)
        assert r.exit_code == 0, r.output
        (path,) = [line.removeprefix("wrote ") for line in r.output.splitlines() if line.startswith("wrote ")]
        return Path(path), json.loads(Path(path).read_text()), r.output

    p80, r80, out80 = run(80)
    p90, r90, out90 = run(90)
    assert p80 != p90 and sorted(evals.glob("ddranking-*.json")) == sorted([p80, p90])
    assert "2 trained, 0 cached" in out80 and "0 trained, 2 cached" in out90  # syn and rdm: not the full set
    for res, value in ((r80, 80.0), (r90, 90.0)):
        assert res["full_accuracy"] == {"value": value, "source": "user (--full-accuracy)"}
        acc = res["accuracies"][0]
        assert acc["full-hard"] == value
        assert res["scores"]["lrs-hard"]["hlr"]["mean"] == pytest.approx(value - acc["syn-hard-aug"], abs=1e-3)
    assert json.loads(p80.read_text()) == r80  # the 90 run left the 80 file as it was
    again, r80b, out = run(80)
    assert again == p80 and "0 trained, 2 cached" in out and len(list(evals.glob("ddranking-*.json"))) == 2
    assert r80b["scores"] == r80["scores"] and r80b["accuracies"] == r80["accuracies"]


def test_result_names_of_the_trained_full_accuracy_are_unchanged(tmp_path):
    """A folder's existing result of the full-data accuracy vlcp trains keeps its name (the name never held the
    value, only its source), so a rerun with those settings replaces it rather than adding a second file."""
    from vlcp.evaluation.ddranking_scores import result_path
    from vlcp.store.cache import stable_hash

    source = "vlcp: trained once (seed 0), 3 epochs, hard labels, no augmentation"
    res = {"protocol": {"name": "rded", "epochs": 3, "sources": {"x": "y"}}, "runs": 2, "images_per_class": {"0": 1},
           "scores": {"ars": {}, "lrs-hard": {}}, "weights": {"lrs": 0.5, "ars": 0.5}, "teacher": {"source": "t"},
           "full_accuracy": {"value": 71.25, "source": source}}
    old = {"protocol": {"name": "rded", "epochs": 3}, "runs": 2, "images_per_class": {"0": 1},
           "scores": ["ars", "lrs-hard"], "weights": {"lrs": 0.5, "ars": 0.5}, "teacher": "t", "full": source}
    assert result_path(tmp_path, res) == tmp_path / "evaluations" / f"ddranking-{stable_hash(old, 10)}.json"
    res["full_accuracy"]["value"] = 12.5  # the accuracy it reached is a result, not a setting
    assert result_path(tmp_path, res).name == f"ddranking-{stable_hash(old, 10)}.json"
    user = {**res, "full_accuracy": {"value": 71.25, "source": "user (--full-accuracy)"}}
    other = {**res, "full_accuracy": {"value": 71.5, "source": "user (--full-accuracy)"}}
    assert len({result_path(tmp_path, r) for r in (res, user, other)}) == 3
