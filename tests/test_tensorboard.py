"""--log-dir: training curves as TensorBoard event files (vlcp/store/scalars.py), read back with TensorBoard's own
EventAccumulator and compared with what vlcp records elsewhere (loss CSV, manifest, evaluation JSON)."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import read_manifest
from vlcp.cli.main import cli
from vlcp.store import scalars

# two classes of 6 images, one epoch of 3 micro-batches of 4, one per optimizer step: a fast run that fine-tunes
DISTILL = ["distill", "--data", "digits", "--tiny", "--classes", "0,1", "--max-per-class", "6", "--ipc", "2",
           "--steps", "2", "--finetune-batch-size", "4", "--finetune-accumulation", "1", "--finetune-lr", "1e-3"]


def curves(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Tag -> [(step, value)] of every event file in one run folder."""
    ea = EventAccumulator(str(folder))
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def run_folders(log_dir: Path) -> list[Path]:
    return sorted(p for p in log_dir.iterdir() if p.is_dir()) if log_dir.exists() else []


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, tiny_models_dir):
    """One cold run without --log-dir (out plain), then fine-tuning and synthesis recomputed with --log-dir
    (out logged), then a fully cached rerun with --log-dir (out cached): one cold tiny distillation in all."""
    import shutil

    root = tmp_path_factory.mktemp("tb")
    shutil.copytree(tiny_models_dir, root / "cache" / "models")
    runner = CliRunner()

    def vlcp(*args):
        r = runner.invoke(cli, ["--cache-dir", str(root / "cache"), "--data-dir", str(root / "data"),
                                *map(str, args)], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        return r

    vlcp(*DISTILL, "--out", root / "plain")
    for stage in ("finetune", "synthesis"):  # the next run trains again, with logging on
        vlcp("cache", "clear", "--stage", stage)
    logged = vlcp(*DISTILL, "--log-dir", root / "logs", "--out", root / "logged")
    cached = vlcp(*DISTILL, "--log-dir", root / "logs", "--out", root / "cached")
    return root, logged.output, cached.output


def test_finetune_loss_per_optimizer_step_equals_the_recorded_losses(distilled):
    root, output, _ = distilled
    m = read_manifest(root / "logged")
    assert m["stages"]["finetune"]["items_computed"] == 1 and m["finetune"]["steps"] == 3
    (run,) = run_folders(root / "logs")
    assert run.name.startswith("distill-logged-") and f"training curves: {run}" in output
    c = curves(run)
    rows = (root / "logged" / "finetune_loss.csv").read_text().splitlines()[1:]
    csv = [float(r.split(",")[1]) for r in rows]
    assert len(csv) == 3
    assert [s for s, _ in c["finetune/loss"]] == [1, 2, 3]  # step n: after n optimizer steps (CSV row n - 1)
    assert [v for _, v in c["finetune/loss"]] == pytest.approx(csv, rel=1e-6)
    assert c["finetune/loss"][0][1] == pytest.approx(m["finetune"]["first_loss"], rel=1e-6)
    assert c["finetune/loss"][-1][1] == pytest.approx(m["finetune"]["last_loss"], rel=1e-6)
    assert c["finetune/lr"] == [(1, pytest.approx(1e-3)), (2, pytest.approx(1e-3)), (3, pytest.approx(1e-3))]
    # diffusers' EMAModel decay: 0 on the first update (a copy), then min(0.9999, (1 + s) / (10 + s))
    assert [v for _, v in c["finetune/ema_decay"]] == pytest.approx([0.0, 2 / 11, 3 / 12])
    assert "log_dir" not in m["parameters"]  # not a parameter of the result, never in a key


def test_logging_changes_no_output_byte(distilled):
    root, _, _ = distilled
    pngs = sorted(p.relative_to(root / "plain") for p in (root / "plain").rglob("*.png"))
    assert len([p for p in pngs if p.parent.name in ("0", "1")]) == 4
    for p in pngs:
        assert (root / "plain" / p).read_bytes() == (root / "logged" / p).read_bytes(), p
    assert (root / "plain" / "finetune_loss.csv").read_text() == (root / "logged" / "finetune_loss.csv").read_text()


def test_a_fully_cached_rerun_writes_no_scalars(distilled):
    root, _, output = distilled
    m = read_manifest(root / "cached")
    assert m["stages"]["finetune"]["cached"] and m["stages"]["synthesis"]["items_computed"] == 0
    (only,) = run_folders(root / "logs")  # the logged run's; the cached rerun made no folder of its own
    assert only.name.startswith("distill-logged-")
    assert "training curves: none, nothing was trained" in output


def test_evaluate_logs_each_seed_under_protocol_and_model(vlcp, tmp_path):
    assert vlcp("baseline", "--method", "random", "--data", "digits", "--ipc", "2", "--out", tmp_path / "b",
                "--log-dir", tmp_path / "logs").exit_code == 0
    assert run_folders(tmp_path / "logs") == []  # random selection trains nothing
    r = vlcp("evaluate", tmp_path / "b", "--data", "digits", "--seeds", "2", "--epochs", "2", "--test-every", "1",
             "--json", tmp_path / "res.json", "--log-dir", tmp_path / "logs")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "res.json").read_text())
    assert (res["protocol"]["name"], res["protocol"]["model"]) == ("dc", "convnet3")
    (run,) = run_folders(tmp_path / "logs")
    assert run.name.startswith("evaluate-b-")
    c = curves(run)
    assert sorted(c) == sorted(f"evaluate/dc-convnet3/run{i}/{t}" for i in (0, 1)
                               for t in ("loss", "lr", "accuracy", "test_accuracy"))
    for seed in res["seeds"]:
        tag = f"evaluate/dc-convnet3/run{seed['seed']}"
        assert [s for s, _ in c[f"{tag}/loss"]] == [1, 2]
        assert [v for _, v in c[f"{tag}/loss"]] == pytest.approx(seed["losses"], rel=1e-6)
        assert [v for _, v in c[f"{tag}/lr"]] == pytest.approx(seed["lrs"], rel=1e-6)
        assert c[f"{tag}/test_accuracy"] == [(e, pytest.approx(a, rel=1e-6)) for e, a in seed["tests"]]
        assert c[f"{tag}/test_accuracy"][-1][1] == pytest.approx(seed["accuracy"], rel=1e-6)
        assert all(0 <= v <= 1 for _, v in c[f"{tag}/accuracy"])


def test_rded_teacher_logs_once_and_not_when_cached(vlcp, tmp_path):
    vlcp("baseline", "--method", "random", "--data", "digits", "--ipc", "2", "--out", tmp_path / "b")
    args = ["evaluate", tmp_path / "b", "--data", "digits", "--protocol", "rded", "--epochs", "1", "--model",
            "convnet3", "--teacher-epochs", "1", "--seeds", "1", "--json", tmp_path / "r.json", "--log-dir",
            tmp_path / "logs"]
    assert vlcp(*args).exit_code == 0
    (run,) = run_folders(tmp_path / "logs")
    c = curves(run)
    teacher = json.loads((tmp_path / "r.json").read_text())["teacher"]
    assert sorted(t for t in c if "/teacher/" in t) == [f"evaluate/rded-convnet3/teacher/{t}" for t in
                                                        ("accuracy", "loss", "lr", "test_accuracy")]
    assert c["evaluate/rded-convnet3/teacher/test_accuracy"] == [(1, pytest.approx(teacher["accuracy"] / 100,
                                                                                   abs=6e-5))]
    assert "evaluate/rded-convnet3/run0/loss" in c
    time.sleep(1.1)  # another start second, so the rerun's folder name differs by its time, not by a suffix
    assert vlcp(*args, "--force").exit_code == 0  # the teacher comes from the cache: only the student's curves
    again = curves(next(p for p in run_folders(tmp_path / "logs") if p != run))
    assert not [t for t in again if "/teacher/" in t] and "evaluate/rded-convnet3/run0/loss" in again


def test_dm_logs_the_matching_loss_per_iteration_and_nothing_when_cached(vlcp, tmp_path):
    args = ["baseline", "--method", "dm", "--data", "digits", "--ipc", "1", "--iterations", "3", "--batch-real", "8",
            "--log-dir", tmp_path / "logs"]
    assert vlcp(*args, "--out", tmp_path / "dm").exit_code == 0
    (run,) = run_folders(tmp_path / "logs")
    assert run.name.startswith("baseline-dm-")
    m = read_manifest(tmp_path / "dm")["matching"]
    assert curves(run) == {"matching/loss": [(i, pytest.approx(v, rel=1e-6)) for i, v in m["loss_curve"]]}
    assert [i for i, _ in m["loss_curve"]] == [1, 2, 3]
    assert vlcp(*args, "--out", tmp_path / "again").exit_code == 0
    assert read_manifest(tmp_path / "again")["matching"]["cached"]
    assert run_folders(tmp_path / "logs") == [run]


def test_detector_training_logs_loss_lr_and_accuracy_per_epoch(tmp_path):
    """The refinement detector (vlcp/method/refine.py) on two digit classes: tags detector/..., the final test
    accuracy equal to the one its meta records."""
    from vlcp.data.datasets import load_dataset
    from vlcp.method import refine
    from vlcp.store.cache import StageCache

    ds = load_dataset("digits", tmp_path / "data", "train", ["0", "1"], 8)
    p = refine.detector_protocol("digits", None, 2)
    spec = refine.DetectorSpec("digits", tmp_path / "data", ["0", "1"], None, 0)
    with scalars.logging_to(tmp_path / "logs", "refine-x") as log:
        meta, _ = refine.train_detector(StageCache(tmp_path / "c"), ds, p, spec, "k", "cpu", False)
    c = curves(log.folder)
    assert sorted(c) == ["detector/accuracy", "detector/loss", "detector/lr", "detector/test_accuracy"]
    assert [s for s, _ in c["detector/loss"]] == [1, 2] and all(v > 0 for _, v in c["detector/loss"])
    assert c["detector/lr"] == [(1, pytest.approx(0.01)), (2, pytest.approx(0.01))]  # Adam 0.01, constant
    assert c["detector/test_accuracy"][-1][0] == 2
    assert c["detector/test_accuracy"][-1][1] * 100 == pytest.approx(meta["accuracy"], abs=0.006)


def test_log_dir_without_tensorboard_is_one_line_and_exit_1(vlcp, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    r = vlcp("evaluate", "--full", "--data", "digits", "--epochs", "1", "--seeds", "1", "--json", tmp_path / "r.json",
             "--log-dir", tmp_path / "logs")
    assert r.exit_code == 1
    assert "Error: --log-dir needs TensorBoard" in r.output and "pip install 'vlcp[tensorboard]'" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "r.json").exists()  # refused before any training


def test_log_dir_that_cannot_be_made_is_one_line_and_exit_1(vlcp, tmp_path):
    (tmp_path / "file").write_text("x")
    r = vlcp("baseline", "--method", "dm", "--data", "digits", "--ipc", "1", "--iterations", "1", "--out",
             tmp_path / "o", "--log-dir", tmp_path / "file" / "logs")
    assert r.exit_code == 1
    assert f"Error: --log-dir {tmp_path / 'file' / 'logs'}: cannot create it" in r.output
    assert not (tmp_path / "o").exists()


def test_sections_nest_and_nothing_is_written_outside_a_block(tmp_path):
    scalars.add("outside", 1.0, 0)  # no block open: nothing, no error
    with scalars.logging_to(tmp_path, "r") as log:
        assert log.folder is None  # made at the first point
        with scalars.section("a"), scalars.section(""), scalars.section("b"):
            scalars.add("c", 1.5, 3)
        scalars.add("d", 2, 4)
        assert scalars.active()
    assert not scalars.active()
    scalars.add("after", 1.0, 0)
    assert log.folder == tmp_path / "r"
    assert curves(log.folder) == {"a/b/c": [(3, 1.5)], "d": [(4, 2.0)]}


def test_two_runs_with_one_name_get_two_folders(tmp_path):
    for value in (1.0, 2.0):
        with scalars.logging_to(tmp_path, "distill-out-20250101-000000"):
            scalars.add("x", value, 1)
    assert [p.name for p in run_folders(tmp_path)] == ["distill-out-20250101-000000", "distill-out-20250101-000000-2"]
    assert curves(tmp_path / "distill-out-20250101-000000-2") == {"x": [(1, 2.0)]}


def test_run_name_is_command_out_name_and_local_start_time(tmp_path):
    t = time.mktime((2025, 3, 4, 5, 6, 7, 0, 0, -1))
    assert scalars.run_name("distill", tmp_path / "out-a", now=t) == "distill-out-a-20250304-050607"
    assert scalars.run_name("evaluate-full", None, now=t) == "evaluate-full-20250304-050607"


def test_logging_to_none_imports_nothing():
    code = ("import sys\nfrom vlcp.store import scalars\n"
            "with scalars.logging_to(None, 'x') as log:\n    scalars.add('a', 1.0, 0)\n"
            "assert log is None and not scalars.active()\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'tensorboard', 'numpy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
