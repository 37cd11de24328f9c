"""Which real images an evaluation tests on: a folder without a test split is refused (its images are the training
images a set was distilled from), and a set of a class subset is trained and tested on its own classes."""
import json
from collections import Counter

import numpy as np
from PIL import Image

from vlcp.data.datasets import load_dataset

NO_TEST_SPLIT = ("Error: --data {d} has no test split (no test/ or val/ or validation/ folder): its class folders "
                 "are the training images vlcp distill reads, and testing on them would test on the images a set "
                 "was distilled from; give a folder with train/ and test/ (or val/) split folders, one sub-folder "
                 "per class in each")


def image_folder(root, classes=("a", "b"), per_class=2):
    for c in classes:
        (root / c).mkdir(parents=True)
        for j in range(per_class):
            Image.new("RGB", (8, 8), (60 * j, 100 if c == "a" else 0, 0)).save(root / c / f"{j}.png")
    return root


def digits_set(root, classes, per_class=1):
    """A hand-made set: the first ``per_class`` digits training images of each class, as ``root/<digit>/*.png``."""
    seen = Counter()
    for s in load_dataset("digits", "data").samples:
        if s.class_idx in classes and seen[s.class_idx] < per_class:
            (root / str(s.class_idx)).mkdir(parents=True, exist_ok=True)
            s.load().save(root / str(s.class_idx) / f"{seen[s.class_idx]}.png")
            seen[s.class_idx] += 1
    return root


def test_a_folder_without_split_folders_is_the_train_split_and_has_no_test_split(vlcp, tmp_path):
    data = image_folder(tmp_path / "ds")
    train = load_dataset(str(data), tmp_path, "train")  # what vlcp distill reads: the folder itself
    assert [c.folder for c in train.classes] == ["a", "b"] and len(train.samples) == 4
    syn = image_folder(tmp_path / "set" / "train", per_class=1).parent  # a set in the layout vlcp writes
    expected = NO_TEST_SPLIT.format(d=data)
    for args in (("evaluate", syn), ("evaluate", "--full"), ("relabel", syn, "--teacher", "auto")):
        r = vlcp(*args, "--data", data, "--epochs" if args[0] == "evaluate" else "--crops", 1)
        assert r.exit_code == 2 and r.output.splitlines()[-1] == expected and "Traceback" not in r.output, r.output
    r = vlcp("ddranking", syn, "--dataset", data, "--protocol", "dc", "--score", "lrs-hard", "--runs", 1)
    assert r.exit_code == 2 and r.output.splitlines()[-1] == expected, r.output
    assert not (syn / "evaluations").exists()


def test_a_train_folder_without_a_test_folder_is_a_usage_error_too(vlcp, tmp_path):
    data = image_folder(tmp_path / "ds" / "train").parent
    r = vlcp("evaluate", image_folder(tmp_path / "set", per_class=1), "--data", data, "--epochs", 1, "--seeds", 1)
    assert r.exit_code == 2 and r.output.splitlines()[-1] == (
        f"Error: --data {data} has a train/ folder but no test/ or val/ or validation/ for the test split (an "
        "ImageFolder of the same classes)"), r.output


def _direct(res, samples, test_samples, num_classes):
    """What evaluate computes, by hand: the protocol it recorded, trained on ``samples`` with ``num_classes``
    outputs and tested on ``test_samples`` (seed 0)."""
    from dataclasses import asdict

    from vlcp.evaluation.protocols import make_protocol
    from vlcp.evaluation.samples import test_tensors, train_tensors
    from vlcp.evaluation.training import train

    p = make_protocol("dc", "digits", 1, None, 1, None, num_classes)
    assert {k: v for k, v in json.loads(json.dumps(asdict(p))).items() if k != "sources"} == \
        {k: v for k, v in res["protocol"].items() if k != "sources"}
    x, y = train_tensors(samples, p)
    _, out = train(p, (x, y, num_classes), 0, res["device"], test=test_tensors(test_samples, p), progress=False)
    return out


def test_a_set_of_a_class_subset_is_tested_on_its_classes(vlcp, tmp_path, monkeypatch):
    from vlcp.data.datasets import Sample
    from vlcp.evaluation import networks

    built = []
    build = networks.build
    monkeypatch.setattr(networks, "build", lambda *a, **k: built.append(a[2]) or build(*a, **k))
    syn = digits_set(tmp_path / "set", {2, 5, 7})
    r = vlcp("evaluate", syn, "--data", "digits", "--epochs", 1, "--seeds", 1, "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "r.json").read_text())
    # digits' test split (every 5th image) holds 34 twos, 28 fives and 43 sevens
    assert res["test_split"] == {"split": "test", "images": 105, "classes": ["2", "5", "7"], "dataset_classes": 10}
    assert res["dataset"]["classes"] == ["2", "5", "7"] and built == [3]  # one output per class of the set
    assert "; test: 105 real images of the set's 3 classes (of 10)\n" in r.output
    test = load_dataset("digits", "data", "test")
    new = {2: 0, 5: 1, 7: 2}  # the class index mapping: digit -> output
    kept = [Sample(new[s.class_idx], s.source, s.digest, s.array) for s in test.samples if s.class_idx in new]
    assert Counter(s.class_idx for s in kept) == {0: 34, 1: 28, 2: 43}
    mine = [Sample(new[int(p.parent.name)], str(p), "") for d in sorted(syn.iterdir()) for p in sorted(d.iterdir())]
    out = _direct(res, mine, kept, 3)
    assert res["seeds"][0]["accuracy"] == out["accuracy"] and res["seeds"][0]["losses"] == out["losses"]


def test_a_set_of_every_class_is_evaluated_as_before(vlcp, tmp_path):
    """All ten classes: ten outputs, all 359 test images, the same numbers as the code before class subsets."""
    from vlcp.data.datasets import Sample

    syn = digits_set(tmp_path / "set", set(range(10)))
    r = vlcp("evaluate", syn, "--data", "digits", "--epochs", 1, "--seeds", 1, "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["test_split"] == {"split": "test", "images": 359, "classes": [str(i) for i in range(10)],
                                 "dataset_classes": 10}
    assert "; test: 359 real images\n" in r.output  # (no "of the set's ... classes")
    mine = [Sample(int(d.name), str(p), "") for d in sorted(syn.iterdir()) for p in sorted(d.iterdir())]
    out = _direct(res, mine, load_dataset("digits", "data", "test").samples, 10)
    assert res["seeds"][0]["accuracy"] == out["accuracy"] and res["seeds"][0]["losses"] == out["losses"]
    assert np.isfinite(out["losses"]).all()


def test_ddranking_scores_refuse_a_set_of_a_class_subset(vlcp, tmp_path):
    syn = digits_set(tmp_path / "set", {0, 1, 2})
    r = vlcp("ddranking", syn, "--dataset", "digits", "--protocol", "dc", "--score", "lrs-hard", "--runs", 1,
             "--epochs", 1)
    assert r.exit_code == 2 and r.output.splitlines()[-1] == (
        "Error: digits has 10 classes; the set lacks 3, 4, 5, 6, 7 ...: DD-Ranking's scores compare it with random "
        "real images and the full real set of every class (vlcp evaluate tests a set of a class subset on its own "
        "classes)"), r.output


def test_refine_on_a_folder_without_a_test_split_runs_and_says_its_detector_is_untested(vlcp, tmp_path):
    """The detector's test accuracy is a report, not an input: a folder without a test split still refines."""
    from tests.conftest import read_manifest

    data = image_folder(tmp_path / "ds", per_class=4)
    r = vlcp("distill", "--data", data, "--tiny", "--ipc", "1", "--steps", "2", "--no-finetune", "--refine",
             "--detector-epochs", "1", "--refine-candidates", "2", "--out", tmp_path / "out")
    assert r.exit_code == 0, r.output
    det = read_manifest(tmp_path / "out")["stages"]["detector"]
    m = read_manifest(tmp_path / "out")
    found = json.dumps(m)
    assert '"accuracy": null' in found and "not measured: --data has no test split" in found, det
