"""`vlcp evaluate --caption-fusion` (caption concatenation, vlcp's reading of the multi-modal paper's abstract):
the fused head, that the text path is used, the separate labelled row, caption reuse, bad input."""
import json
import shutil

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vlcp.data.datasets import load_dataset
from vlcp.evaluation import caption_fusion as cf
from vlcp.evaluation.evaluate import EvalConfig
from vlcp.evaluation.protocols import make_protocol
from vlcp.evaluation.samples import tensors_from_samples
from vlcp.store import scalars
from vlcp.store.cache import StageCache


def curves(folder) -> dict[str, list[tuple[int, float]]]:
    """Tag -> [(step, value)] of a TensorBoard run folder, read back with TensorBoard's own reader."""
    ea = EventAccumulator(str(folder))
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def test_the_fused_head_sees_features_plus_text():
    # ConvNet-3 on 8 px digits: conv (pad 3) 8 -> 12, pool 6, conv 6, pool 3, conv 3, pool 1: 128 x 1 x 1 = 128
    net = cf.build_fused(make_protocol("dc", "digits", 10), 10, 16)
    assert net.head.in_features == 128 + 16 and net.head.out_features == 10
    # Fashion-MNIST 28 px: 28 -> 32, pool 16, pool 8, pool 4: 128 x 4 x 4 = 2048, + CLIP ViT-B/32's 512
    assert cf.build_fused(make_protocol("dc", "fashion-mnist", 10), 10, 512).head.in_features == 2048 + 512
    # ResNetAP-10 (minimax; width 64 x 8 after four stages) and ResNet-18: 512 pooled features
    assert cf.build_fused(make_protocol("minimax", "digits", 2), 10, 16).head.in_features == 512 + 16
    assert cf.build_fused(make_protocol("dc", "cifar10", 10, model="resnet18"), 10, 16).head.in_features == 512 + 16
    x, t = torch.zeros(2, 1, 8, 8), torch.zeros(2, 16)
    with torch.no_grad():
        a = net(x, t)
        t[:, 3] = 1.0
        b = net(x, t)
    assert a.shape == (2, 10) and not torch.allclose(a, b)  # the text reaches the logits
    # the text part is scaled by sqrt(16) = 4: the logit change is 4 x the head's weight column of that entry
    assert torch.allclose(b - a, 4 * net.head.weight[:, 128 + 3].detach().expand(2, 10), atol=1e-6)


def test_one_hot_text_makes_noise_images_classifiable(tmp_path):
    """Training images of pure noise: only the text carries the class. With a stub embedding that is exactly
    the one-hot class, the fused classifier reaches 100% on the digits test set in 5 epochs (measured: 1.0);
    with an all-zero embedding of the same size it stays near chance (measured: 18.7%)."""
    tr, te = load_dataset("digits", tmp_path), load_dataset("digits", tmp_path, "test")
    x, y = tensors_from_samples(tr.samples, 8, 1)
    xt, yt = tensors_from_samples(te.samples, 8, 1)
    idx = np.concatenate([np.flatnonzero(y == c)[:10] for c in range(10)])
    noise = np.random.default_rng(0).integers(0, 256, x[idx].shape, dtype=np.uint8)
    eye = np.eye(10, dtype=np.float32)
    p = make_protocol("dc", "digits", 10, aug="none", epochs=5, batch_size=10)
    _, text = cf.train_fused(p, (noise, y[idx], eye[y[idx]], 10), (xt, yt, eye[yt]), 0, "cpu")
    _, blind = cf.train_fused(p, (noise, y[idx], 0 * eye[y[idx]], 10), (xt, yt, 0 * eye[yt]), 0, "cpu")
    assert text["accuracy"] > 0.98 and blind["accuracy"] < 0.3
    assert text["head_input"] == 128 + 10 and len(text["losses"]) == 5
    # dc: SGD 0.01, x 0.1 from step 25 of 50 (10 per epoch): each epoch's first lr
    assert text["lrs"] == pytest.approx([0.01, 0.01, 0.01, 0.001, 0.001])


def test_prompts_of_a_distill_folder(tmp_path):
    (tmp_path / "prototypes.json").write_text(json.dumps({"classes": {
        "0": {"name": "0", "clusters": [{"prompt": "a round zero"}, {"prompt": "a thin zero"}]},
        "1": {"name": "1", "clusters": [{"prompt": "a stick"}, {"prompt": "a slanted one"}]}}}))
    (tmp_path / "manifest.json").write_text(json.dumps({"vlcp_version": "x", "parameters": {"ipc": 2}}))
    assert cf.folder_prompts(tmp_path) == {"0/0000.png": "a round zero", "0/0001.png": "a thin zero",
                                           "1/0000.png": "a stick", "1/0001.png": "a slanted one"}
    # SAS: the kept image 1/0000.png came from prototype 3 = class 1's cluster 1 (class-major, IPC 2)
    (tmp_path / "manifest.json").write_text(json.dumps({"vlcp_version": "x", "parameters": {"ipc": 2},
                                                        "post_sampling": {"images": {"1/0000.png": {"prototype": 3}}}}))
    assert cf.folder_prompts(tmp_path)["1/0000.png"] == "a slanted one"
    (tmp_path / "prototypes.json").unlink()
    assert cf.folder_prompts(tmp_path) is None  # a vlcp baseline folder: no prompts, captions instead
    assert cf.folder_prompts(None) is None


def test_captions_made_by_distill_are_reused(vlcp, tmp_path):
    """Same stage, same key as the distill captions stage: distill's captions (made with the same class-agnostic
    prompt) are found, none is recomputed, and they are the same texts."""
    r = vlcp("distill", "--data", "digits", "--tiny", "--classes", "0,1", "--max-per-class", "3", "--ipc", "1",
             "--until", "captions", "--caption-prompt", cf.DEFAULT_PROMPT, "--out", tmp_path / "d")
    assert r.exit_code == 0, r.output
    cache = StageCache(tmp_path / "cache")
    ds = load_dataset("digits", tmp_path / "data", "train", ["0", "1"], 3)
    fu = cf.prepare(EvalConfig(data="digits", caption_fusion=True, tiny=True), make_protocol("dc", "digits", 1),
                    cache, "cpu")
    names = [ds.classes[s.class_idx].name for s in ds.samples]
    texts, counts = cf.captions_for(fu, cache, ds.samples, names)
    assert counts == {"computed": 0, "cached": 6}
    assert texts == [cache.get("captions", cf.caption_key(s.digest, n, fu)).meta["caption"]
                     for s, n in zip(ds.samples, names)]
    assert all(t.strip() for t in texts)


def test_fusion_row_is_separate_labelled_and_leaves_the_headline_unchanged(vlcp, tmp_path):
    assert vlcp("baseline", "--method", "random", "--data", "digits", "--ipc", "2", "--out", tmp_path / "b").exit_code == 0
    args = ["evaluate", tmp_path / "b", "--data", "digits", "--seeds", "1", "--epochs", "2"]
    plain = vlcp(*args, "--json", tmp_path / "plain.json")
    fused = vlcp(*args, "--caption-fusion", "--tiny", "--json", tmp_path / "fused.json")
    assert plain.exit_code == 0 and fused.exit_code == 0, fused.output
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("plain.json", "fused.json"))
    assert "caption_fusion" not in a and a["accuracy"] == b["accuracy"]  # the headline: same seed, same number
    assert a["seeds"][0]["losses"] == b["seeds"][0]["losses"]
    row = b["caption_fusion"]
    assert row["note"] == "changes the test-time input (each test image's caption): not comparable to the headline"
    assert "vlcp's reading of the multi-modal paper's abstract" in row["label"]
    assert row["head_input"] == {"features": 128, "text": 16} and len(row["accuracy"]["per_seed"]) == 1
    assert row["texts"] == {"train": {"prompts": 0, "captions": 20, "computed": 20, "cached": 0},
                            "test": {"prompts": 0, "captions": 359, "computed": 359, "cached": 0}}
    assert "{CLASSNAME}" not in row["caption_prompt"] and row["captioner"].startswith("local:")
    assert "caption fusion (changes the test-time input" in fused.output and "caption fusion" not in plain.output
    assert len(list((tmp_path / "b" / "evaluations").glob("*.json"))) == 2  # its own file, not overwritten
    # a vlcp distill folder: its images' prompts are the training texts; the test captions are cached now
    shutil.copytree(tmp_path / "b", tmp_path / "d", ignore=shutil.ignore_patterns("evaluations"))
    (tmp_path / "d" / "prototypes.json").write_text(json.dumps({"classes": {
        str(c): {"name": str(c), "clusters": [{"prompt": f"digit {c}"}, {"prompt": f"the number {c}"}]}
        for c in range(10)}}))
    again = vlcp("evaluate", tmp_path / "d", "--data", "digits", "--seeds", "1", "--epochs", "2", "--caption-fusion",
                 "--tiny", "--json", tmp_path / "d.json", "--log-dir", tmp_path / "logs")
    assert again.exit_code == 0, again.output
    res = json.loads((tmp_path / "d.json").read_text())
    texts = res["caption_fusion"]["texts"]
    assert texts == {"train": {"prompts": 20, "captions": 0, "computed": 0, "cached": 0},
                     "test": {"prompts": 0, "captions": 359, "computed": 0, "cached": 359}}
    # --log-dir: the fused classifier's curves beside the headline's, equal to what the JSON records
    (run,) = (tmp_path / "logs").iterdir()
    c = curves(run)
    (seed,) = res["caption_fusion"]["seeds"]
    assert sorted(t for t in c if "caption_fusion" in t) == [f"evaluate/caption_fusion/run0/{t}"
                                                            for t in ("loss", "lr", "test_accuracy")]
    assert "evaluate/dc-convnet3/run0/loss" in c
    assert c["evaluate/caption_fusion/run0/loss"] == [(e + 1, pytest.approx(v, rel=1e-6))
                                                      for e, v in enumerate(seed["losses"])]
    assert c["evaluate/caption_fusion/run0/lr"] == [(1, pytest.approx(seed["lrs"][0])), (2, pytest.approx(seed["lrs"][1]))]
    assert c["evaluate/caption_fusion/run0/test_accuracy"] == [(2, pytest.approx(seed["accuracy"], rel=1e-6))]
    assert seed["accuracy"] * 100 == pytest.approx(res["caption_fusion"]["accuracy"]["per_seed"][0], abs=0.006)


def test_fusion_bad_input_is_one_line(vlcp, tmp_path, monkeypatch):
    vlcp("baseline", "--method", "random", "--data", "digits", "--ipc", "1", "--out", tmp_path / "b")
    args = ["evaluate", tmp_path / "b", "--data", "digits", "--seeds", "1", "--epochs", "1"]
    r = vlcp(*args, "--tiny")
    assert r.exit_code == 2 and "apply only with --caption-fusion" in r.output
    r = vlcp(*args, "--caption-fusion", "--tiny", "--fusion-caption-prompt", "Describe the {CLASSNAME}.")
    assert r.exit_code == 2 and "must not contain {CLASSNAME}" in r.output
    r = vlcp(*args, "--caption-fusion", "--tiny", "--protocol", "rded")
    assert r.exit_code == 2 and "--caption-fusion: the rded protocol" in r.output
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    r = vlcp(*args, "--caption-fusion", "--captioner", "no-such-org/no-such-llava")
    lines = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert r.exit_code == 1 and "Traceback" not in r.output and "top-1" not in r.output  # before any training
    assert len(lines) == 1 and "hf download no-such-org/no-such-llava" in lines[0]


def test_the_report_lists_the_fusion_row_apart_from_the_headline(tmp_path):
    from tests.test_report import evaluation, make_folder
    from vlcp.report import html as report

    folder = make_folder(tmp_path / "out", ipc=10)
    (folder / "evaluations").mkdir()
    res = evaluation(ipc=10)
    res["caption_fusion"] = {"label": cf.LABEL, "note": cf.NOTE, "accuracy": {"mean": 99.5, "std": 0.25,
                                                                            "per_seed": [99.25, 99.75]}}
    (folder / "evaluations" / "minimax-resnetap10-fused.json").write_text(json.dumps(res))
    text = report.build(folder).read_text(encoding="utf-8")
    section = text[text.index('<section id="evaluation">'):text.index("</section>", text.index('id="evaluation"'))]
    assert "<td><b>61.00 ± 1.00</b></td>" in section and "99.50" not in section.split("Caption fusion")[0]
    assert ("<li>resnetap10, minimax: <b>99.50 ± 0.25</b> — changes the test-time input (each test image&#x27;s "
            "caption): not comparable to the headline") in section
    plain = make_folder(tmp_path / "plain", ipc=10)
    (plain / "evaluations").mkdir()
    (plain / "evaluations" / "e.json").write_text(json.dumps(evaluation(ipc=10)))
    assert "Caption fusion" not in report.build(plain).read_text(encoding="utf-8")


def test_a_protocol_that_mixes_trains_the_fusion_row_without_cutmix(cache_dir):
    p = make_protocol("minimax", "digits", 2)
    fu = cf.prepare(EvalConfig(data="digits", caption_fusion=True, tiny=True), p, StageCache(cache_dir), "cpu")
    assert p.cutmix == 1.0 and fu.protocol.cutmix == 0.0 and fu.protocol.mixup == 0.0
    assert list(fu.changes) == ["cutmix/mixup"] and fu.protocol.epochs == p.epochs and fu.protocol.aug == p.aug
    dc = cf.prepare(EvalConfig(data="digits", caption_fusion=True, tiny=True), make_protocol("dc", "digits", 2),
                    StageCache(cache_dir), "cpu")
    assert dc.changes == {} and dc.max_tokens == 32 and dc.prompt == cf.DEFAULT_PROMPT


def test_fused_training_logs_loss_lr_and_test_accuracy_as_it_records_them(tmp_path, monkeypatch):
    """train_fused in a --log-dir block: caption_fusion/run<seed>/ loss and lr per epoch (the lr x 0.1 from half the
    steps, dc's schedule), the final test accuracy; no block: nothing written, not even TensorBoard's ./runs."""
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (20, 1, 8, 8), dtype=np.uint8), np.arange(20) % 10
    eye = np.eye(10, dtype=np.float32)
    p = make_protocol("dc", "digits", 2, aug="none", epochs=4, batch_size=10)
    data, test = (x, y, eye[y], 10), (x[:10], y[:10], eye[y[:10]])
    with scalars.logging_to(tmp_path / "logs", "evaluate-x") as log:
        _, res = cf.train_fused(p, data, test, 3, "cpu")
    c = curves(log.folder)
    assert sorted(c) == [f"caption_fusion/run3/{t}" for t in ("loss", "lr", "test_accuracy")]
    assert c["caption_fusion/run3/loss"] == [(e + 1, pytest.approx(v, rel=1e-6)) for e, v in enumerate(res["losses"])]
    assert res["lrs"] == pytest.approx([0.01, 0.01, 0.001, 0.001])
    assert c["caption_fusion/run3/lr"] == [(e + 1, pytest.approx(v, rel=1e-6)) for e, v in enumerate(res["lrs"])]
    assert c["caption_fusion/run3/test_accuracy"] == [(4, pytest.approx(res["accuracy"], rel=1e-6))]
    monkeypatch.chdir(tmp_path / "logs")
    _, plain = cf.train_fused(p, data, test, 3, "cpu")
    assert plain["losses"] == res["losses"]  # logging changes nothing
    assert [f.name for f in (tmp_path / "logs").iterdir()] == ["evaluate-x"]
