"""The evaluation protocols against the reference scripts, value by value, and evaluation honesty.

Expected values are written out by hand from the reference code (04_evaluation/Minimax, 04_evaluation/RDED
of the VLCP repository), not computed by the functions under test.
"""
import json
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch

from vlcp.evaluation import augment, evaluate, samples, teacher, training
from vlcp.evaluation.evaluate import EvalConfig
from vlcp.evaluation.protocols import make_protocol, minimax_epochs, rded_batch_size
from vlcp.evaluation.protocols import tested_epochs as epochs_tested
from vlcp.evaluation.training import kd_loss, train

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def settings(p):
    d = asdict(p)
    sources = d.pop("sources")
    assert set(sources) == set(d) - {"sources"} and all(isinstance(v, str) and v for v in sources.values())
    return d


def test_minimax_settings_are_the_scripts():
    assert settings(make_protocol("minimax", "imagenette", 10)) == {
        "name": "minimax", "model": "resnetap10", "epochs": 2000, "batch_size": 64, "optimizer": "sgd", "lr": 0.01,
        "momentum": 0.9, "weight_decay": 5e-4, "wd_scope": "all", "schedule": "multistep-epoch(2/3,5/6;gamma=0.2)",
        "aug": "minimax", "mix": "reference", "cutmix": 1.0, "mixup": 0.0, "factor": 1, "image_size": 224,
        "load_size": 224, "load_crop": True, "test_resize": 224, "channels": 3, "mean": IMAGENET[0],
        "std": IMAGENET[1], "test_every": 20, "best_after": 0.0, "kd_temperature": 0.0, "no_grad_forward": False,
        "resample": "bilinear", "teacher": "", "teacher_epochs": 0}


def test_rded_settings_are_the_scripts():
    common = {"name": "rded", "optimizer": "adamw", "lr": 1e-3, "momentum": 0.0, "weight_decay": 0.01,
              "wd_scope": "weights", "schedule": "half-cosine-epoch", "aug": "rded", "mix": "reference",
              "cutmix": 1.0, "mixup": 0.0, "load_crop": False, "channels": 3, "mean": IMAGENET[0], "std": IMAGENET[1],
              "test_every": 10, "best_after": 0.8, "kd_temperature": 20.0, "no_grad_forward": True, "epochs": 500,
              "resample": "bilinear", "teacher_epochs": 50}
    assert settings(make_protocol("rded", "cifar10", 10)) == {
        **common, "model": "resnet18-modified", "batch_size": 50, "factor": 1, "image_size": 32, "load_size": 32,
        "test_resize": 32, "teacher": "trained by vlcp"}  # 32 // 7 * 8 = 32
    assert settings(make_protocol("rded", "imagenet", 50, num_classes=1000)) == {
        **common, "model": "resnet18-bn", "batch_size": 200, "factor": 2, "image_size": 224, "load_size": 224,
        "test_resize": 256, "teacher": "torchvision:resnet18"}
    p = make_protocol("rded", "cifar10", 10, epochs=7)
    assert p.epochs == 7 and p.sources["epochs"] == "user (--epochs)" and "RDED" in p.sources["batch_size"]


def test_dc_settings_are_unchanged():
    """The Fashion-MNIST table in docs/evaluation.md was measured with exactly these settings."""
    assert settings(make_protocol("dc", "fashion-mnist", 10)) == {
        "name": "dc", "model": "convnet3", "epochs": 1000, "batch_size": 256, "optimizer": "sgd", "lr": 0.01,
        "momentum": 0.9, "weight_decay": 5e-4, "wd_scope": "all", "schedule": "step(1/2;gamma=0.1)", "aug": "dsa",
        "mix": "torchvision", "cutmix": 0.0, "mixup": 0.0, "factor": 1, "image_size": 28, "load_size": 28,
        "load_crop": False, "test_resize": 0, "channels": 1, "mean": (0.2860,), "std": (0.3530,), "test_every": 0,
        "best_after": 0.0, "kd_temperature": 0.0, "no_grad_forward": False, "resample": "bicubic", "teacher": "",
        "teacher_epochs": 0}
    assert make_protocol("dc", "cifar10", 10, aug="none").epochs == 300


def test_epoch_and_batch_rules():
    assert [minimax_epochs(i) for i in (1, 2, 10, 20, 50, 100, 200, 500, 1000)] == [
        3000, 2000, 2000, 1500, 1500, 1000, 1000, 500, 300]
    assert minimax_epochs(10, 100) == 1300 and minimax_epochs(50, 100) == 1000  # int(2/3 e), floor to 100
    assert [rded_batch_size(i, 10)[0] for i in (1, 10, 50)] == [10, 50, 100]
    assert [rded_batch_size(i, 100)[0] for i in (1, 10, 50)] == [20, 100, 200]
    assert rded_batch_size(1, 5)[0] == 5  # never above ipc x classes
    assert rded_batch_size(20, 10)[0] == 50 and "vlcp" in rded_batch_size(20, 10)[1]


def test_which_epochs_are_tested():
    assert epochs_tested(make_protocol("rded", "cifar10", 10)) == list(range(410, 501, 10))  # epoch > 400, 0-based
    assert epochs_tested(make_protocol("minimax", "imagenette", 10)) == list(range(20, 2001, 20))
    assert epochs_tested(make_protocol("rded", "cifar10", 10, epochs=35)) == [30, 35]  # 0-based 29, 34 > 28
    assert epochs_tested(make_protocol("dc", "cifar10", 10)) == []


def test_kd_loss_is_rdeds_kl_at_temperature_20_without_t_squared():
    s, t = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 4.0]])
    ps = np.exp([0.1, 0.0]) / np.exp([0.1, 0.0]).sum()  # softmax(s / 20)
    pt = np.exp([0.0, 0.2]) / np.exp([0.0, 0.2]).sum()  # softmax(t / 20)
    expected = float((pt * np.log(pt / ps)).sum())  # ~0.0449
    assert kd_loss(s, t, 20.0).item() == pytest.approx(expected, rel=1e-5)
    assert make_protocol("rded", "cifar10", 10).kd_temperature == 20.0


def test_shuffle_patches_and_crops():
    img = torch.arange(16.0).view(1, 4, 4)
    quads = {tuple(img[0, :2, :2].flatten().tolist()), tuple(img[0, :2, 2:].flatten().tolist()),
             tuple(img[0, 2:, :2].flatten().tolist()), tuple(img[0, 2:, 2:].flatten().tolist())}
    seen = set()
    for seed in range(20):
        out = augment.shuffle_patches(img, 2, torch.Generator().manual_seed(seed))
        got = {tuple(out[0, r:r + 2, c:c + 2].flatten().tolist()) for r in (0, 2) for c in (0, 2)}
        assert got == quads  # the four 2x2 blocks survive whole
        seen.add(tuple(out.flatten().tolist()))
    assert len(seen) == 4  # columns then rows permuted: 2 x 2 arrangements, as RDED's ShufflePatches
    assert torch.equal(augment.shuffle_patches(img, 1, torch.Generator()), img)
    g = torch.Generator().manual_seed(0)
    assert augment.rrc_params(32, 32, (1.0, 1.0), g) in {(0, 0, 32, 32)} | {(t, l, h, w) for t in (0, 1) for l in (0, 1)
                                                                         for h in (31, 32) for w in (31, 32)}


def test_cutmix_box_and_kept_share():
    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 10, 10).clone()  # image i is filled with i
    for seed in range(5):
        mixed, perm, keep = augment.cutmix(x, 1.0, torch.Generator().manual_seed(seed))
        assert sorted(perm.tolist()) == [0, 1, 2, 3]
        for j in range(4):
            pasted = (mixed[j] == perm[j]) & (mixed[j] != j)
            if perm[j] != j:  # one box, the same for every image, holds the partner's pixels
                assert pasted.sum().item() == round((1 - keep) * 100)


@pytest.fixture(scope="module")
def small():
    from vlcp.data.datasets import load_dataset

    tr, te = load_dataset("digits", "data"), load_dataset("digits", "data", "test")
    x, y = samples.tensors_from_samples(tr.samples, 8, 1)
    xt, yt = samples.tensors_from_samples(te.samples, 8, 1)
    idx = np.concatenate([np.flatnonzero(y == c)[:3] for c in range(10)])
    return x[idx], y[idx], (xt[:100], yt[:100])


def test_learning_rate_sequences_over_epochs(small):
    x, y, test = small
    r = make_protocol("rded", "digits", 3, model="convnet3", epochs=4)
    _, res = train(r, (x, y, 10), 0, "cpu", test=test, teacher=lambda xb: torch.zeros(len(xb), 10),
                   progress=False)
    assert res["lrs"] == pytest.approx([1e-3, 0.961940e-3, 0.853553e-3, 0.691342e-3], rel=1e-5)  # 0.5(1+cos(pi e/8))
    m = make_protocol("minimax", "digits", 3, model="convnet3", epochs=6, batch_size=8)  # 4 steps per epoch
    _, res = train(m, (x, y, 10), 0, "cpu", test=test, progress=False)
    assert res["lrs"] == pytest.approx([0.01, 0.01, 0.01, 0.01, 0.002, 0.0004])  # after epochs 4 and 5
    d = make_protocol("dc", "digits", 3, epochs=4, aug="none", batch_size=8)
    _, res = train(d, (x, y, 10), 0, "cpu", test=test, progress=False)
    assert res["lrs"] == pytest.approx([0.01, 0.01, 0.001, 0.001])


def test_headline_is_the_last_epoch_even_when_an_earlier_test_was_better(vlcp, tmp_path, monkeypatch):
    vlcp("baseline", "--method", "random", "--data", "digits", "--ipc", "2", "--out", tmp_path / "b")
    scripted = iter([0.9, 0.5, 0.3])  # tests after epochs 1 and 2, then the final accuracy after epoch 3
    monkeypatch.setattr(training, "accuracy", lambda *a, **k: next(scripted))
    r = vlcp("evaluate", tmp_path / "b", "--data", "digits", "--protocol", "minimax", "--model", "convnet3",
             "--epochs", "3", "--test-every", "1", "--seeds", "1", "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["accuracy"]["mean"] == 30.0 and res["accuracy"]["best_during_training"]["mean"] == 90.0
    assert res["seeds"][0]["tests"] == [[1, 0.9], [2, 0.5], [3, 0.3]]
    row = next(line.split() for line in r.output.splitlines() if line.startswith("convnet3"))
    assert row[2] == "30.00" and row[5] == "90.00"  # final in the headline column, best in its own


def test_rded_teacher_is_trained_once_and_cached(vlcp, tmp_path, monkeypatch):
    vlcp("baseline", "--method", "random", "--data", "digits", "--ipc", "2", "--out", tmp_path / "b")
    calls = []
    real_train = teacher.train

    def counting(*a, **k):
        calls.append(k.get("progress"))  # the progress bar is named after what it trains
        return real_train(*a, **k)

    monkeypatch.setattr(teacher, "train", counting)  # the teacher's training
    monkeypatch.setattr(evaluate, "train", counting)  # the students'
    args = ["evaluate", tmp_path / "b", "--data", "digits", "--protocol", "rded", "--model", "convnet3", "--epochs",
            "1", "--teacher-epochs", "1", "--seeds", "1", "--json", tmp_path / "r.json"]
    r = vlcp(*args)
    assert r.exit_code == 0 and "n/a (no test in its window)" in r.output  # 1 epoch: no test after 0.8 E
    first = json.loads((tmp_path / "r.json").read_text())
    assert vlcp(*args, "--force").exit_code == 0  # --force: r.json exists
    assert calls == ["teacher", "seed 0", "seed 0"]  # the second run loads the cached teacher
    second = json.loads((tmp_path / "r.json").read_text())
    assert second["teacher"] == first["teacher"] and first["teacher"]["source"].startswith("trained by vlcp")
    assert first["protocol"]["kd_temperature"] == 20.0 and first["best_label"] == "best in last 20% (RDED's figure)"


def test_ipc_takes_the_first_files_by_name(tmp_path):
    from PIL import Image

    from vlcp.data.datasets import load_dataset

    ds = load_dataset("digits", "data")
    for name in ("c.png", "a.png", "b.png"):
        (tmp_path / "s" / "4").mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8)).save(tmp_path / "s" / "4" / name)
    (tmp_path / "s" / "evaluations").mkdir()  # vlcp's own results folder is not a class
    found, counts = samples.synthetic_samples(tmp_path / "s", ds, 2)
    assert [s.source.rsplit("/", 1)[1] for s in found] == ["a.png", "b.png"] and counts == {"4": 2}
    assert {s.class_idx for s in found} == {4}


def test_results_are_saved_next_to_a_vlcp_folder_and_the_report_is_pointed_at(vlcp, tmp_path):
    vlcp("baseline", "--method", "random", "--data", "digits", "--ipc", "1", "--out", tmp_path / "b")
    args = ["evaluate", tmp_path / "b", "--data", "digits", "--epochs", "1", "--seeds", "1", "--aug", "none",
            "--json", tmp_path / "r.json"]
    r = vlcp(*args)
    assert r.exit_code == 0, r.output
    (saved,) = (tmp_path / "b" / "evaluations").iterdir()
    assert saved.name.startswith("dc-convnet3-") and saved.suffix == ".json"
    assert json.loads(saved.read_text()) == json.loads((tmp_path / "r.json").read_text())
    assert "report:" not in r.output
    (tmp_path / "b" / "report.html").write_text("<html></html>")
    r = vlcp(*args[:-2])
    assert r.output.strip().splitlines()[-1] == f"report: {tmp_path / 'b' / 'report.html'}"
    assert len(list((tmp_path / "b" / "evaluations").iterdir())) == 1  # same settings, same file
    vlcp(*args[:5], "2", *args[6:-2])  # other epochs: another file
    assert len(list((tmp_path / "b" / "evaluations").iterdir())) == 2
    import shutil

    shutil.copytree(tmp_path / "b", tmp_path / "o", ignore=shutil.ignore_patterns("manifest.json", "evaluations"))
    assert vlcp(args[0], tmp_path / "o", *args[2:-2]).exit_code == 0  # not vlcp's folder: nothing written into it
    assert not (tmp_path / "o" / "evaluations").exists()


def test_eval_config_defaults_match_the_cli():
    cfg = EvalConfig(data="digits", synth_dir="x")
    assert (cfg.seeds, cfg.protocol, cfg.full, cfg.device) == (3, None, False, "auto")
    assert math.isclose(make_protocol("rded", "cifar10", 10).lr, 0.001)


def test_per_dataset_defaults_follow_the_reference_scripts():
    from vlcp.data.defaults import DEFAULTS

    rows = {k: (v["contamination"], v["beta"], v["top_k"], v["image_size"]) for k, v in DEFAULTS.items()}
    assert rows["imagenette"] == (0.1, 0.7, 30, 256) and rows["cifar10"] == (0.0, 0.3, 30, 32)
    assert rows["cifar100"] == (0.0, 0.2, 30, 32)  # the RDED cifar100 script's folder names, not CIFAR-10's
    assert rows["imagenet"] == (0.1, 0.7, 30, 224)  # the ImageNet-1K script's folder names
    assert all(v["source"] for v in DEFAULTS.values())


def test_caption_clean_up_is_the_references_and_can_be_turned_off():
    from vlcp.method.text_prototypes import class_prototypes, clean_caption

    assert clean_caption('the "red" fox\'s tail') == "the red fox tail"
    assert clean_caption("a 'smooth' coat") == "a mooth' coat"  # str.replace("'s", ""), quirk included
    caps = ["a 'smooth' coat", "a 'smooth' coat", 'a "dark" coat']
    (on,) = class_prototypes(caps, [[0, 1, 2]], "fox", beta=1.0, top_k=5)
    (off,) = class_prototypes(caps, [[0, 1, 2]], "fox", beta=1.0, top_k=5, clean_captions=False)
    assert on["representative_words"] == {"coat": 3, "mooth": 2, "dark": 1}
    assert off["representative_words"] == {"coat": 3, "smooth": 2, "dark": 1}
    assert on["caption"] == "a mooth' coat" and off["caption"] == "a 'smooth' coat"


def test_one_resize_crop_and_one_class_lookup():
    from PIL import Image

    from vlcp.data.classnames import class_index, lookup
    from vlcp.data.datasets import ClassInfo
    from vlcp.data.imageops import resize_crop
    from vlcp.method.latents import preprocess

    img = Image.new("RGB", (40, 20))
    img.paste((255, 0, 0), (0, 0, 10, 20))  # a red left quarter, cut away by the centre crop
    cropped = resize_crop(img, 10, 10)
    assert cropped.size == (10, 10) and np.asarray(cropped)[:, :, 0].max() < 128
    assert resize_crop(img, 10).size == (10, 10) and np.asarray(resize_crop(img, 10))[5, 0, 0] == 255
    assert np.allclose(preprocess(img, 10, "center"), np.asarray(cropped, np.float32).transpose(2, 0, 1) / 127.5 - 1)
    index = class_index([ClassInfo("n01440764", "tench, Tinca tinca"), ClassInfo("n03888605", "parachute, chute")])
    assert [lookup(index, s) for s in ("N01440764", "Tench", "tench, tinca tinca", " parachute ", "chute")] == [
        0, 0, 0, 1, None]


def test_an_unwritable_folder_costs_a_warning_not_the_evaluation(tmp_path, monkeypatch, caplog):
    import vlcp.store.output

    (tmp_path / "manifest.json").write_text('{"vlcp_version": "0"}')
    res = {"protocol": {"name": "dc", "model": "convnet3", "sources": {}}, "seeds": [{}], "images_per_class": {},
           "teacher": None}

    def refuse(path, obj):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(vlcp.store.output, "write_json", refuse)
    assert evaluate.save_in_folder(tmp_path, res) is None
    assert "could not save the results" in caplog.text and "Permission denied" in caplog.text
    (tmp_path / "manifest.json").write_text("not json")  # not a manifest vlcp wrote: nothing is tried
    assert evaluate.save_in_folder(tmp_path, res) is None and not evaluate.written_by_vlcp(tmp_path)
