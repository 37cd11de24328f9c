"""`vlcp distill` end to end on digits with the tiny models, and what reruns recompute."""
import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import read_manifest
from vlcp.models import captioner as captions_mod
from vlcp.store import output as output_mod

FAST = ["--data", "digits", "--tiny", "--max-per-class", "30", "--steps", "4", "--no-finetune"]


@pytest.fixture(scope="module")
def cold(tmp_path_factory, tiny_models_dir):
    """One cold run (IPC 3) whose cache the rerun tests copy."""
    from click.testing import CliRunner

    from vlcp.cli.main import cli

    root = tmp_path_factory.mktemp("cold")
    shutil.copytree(tiny_models_dir, root / "cache" / "models")
    res = CliRunner().invoke(cli, ["--cache-dir", str(root / "cache"), "distill", *FAST, "--ipc", "3",
                                   "--out", str(root / "out")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return root


@pytest.fixture
def warm(cold, tmp_path):
    """A private copy of the cold run's cache."""
    shutil.copytree(cold / "cache", tmp_path / "warm")
    return tmp_path / "warm"


def stages(out):
    return read_manifest(out)["stages"]


def test_cold_run_writes_a_complete_image_folder(cold):
    out = cold / "out"
    pngs = sorted(out.rglob("*.png"))
    assert len([p for p in pngs if p.name != "preview.png"]) == 30 and (out / "preview.png").exists()
    m = read_manifest(out)
    assert m["tiny"] is True and m["parameters"]["ipc"] == 3
    assert list(m["stages"]) == ["images", "captions", "latents", "outliers", "clusters", "text_prototypes",
                                 "prompts", "synthesis", "output"]  # --no-finetune: no finetune stage
    for name, s in m["stages"].items():
        assert set(s) >= {"key", "cached", "items_computed", "items_cached", "model_loaded", "seconds"}
        assert s["cached"] is False
    assert m["stages"]["captions"]["items_computed"] == 300 and m["stages"]["captions"]["model_loaded"]
    assert m["stages"]["synthesis"]["items_computed"] == 30
    assert m["dataset"]["name"] == "digits" and len(m["classes"]) == 10
    assert m["models"]["diffusion"]["identity"].startswith("local:")
    protos = json.loads((out / "prototypes.json").read_text())
    assert len(protos["classes"]["7"]["clusters"]) == 3 and protos["classes"]["7"]["name"] == "handwritten digit 7"
    for cl in protos["classes"]["7"]["clusters"]:
        assert cl["caption"] and "representative_words" in cl and "non_representative" in cl
    from PIL import Image
    from torchvision.datasets import ImageFolder

    folder = ImageFolder(str(out / "train"))
    assert folder.classes == [str(i) for i in range(10)] and len(folder) == 30
    assert Image.open(out / "train" / "4" / "0002.png").size == (8, 8)  # digits keep their natural size


def test_identical_rerun_computes_nothing_loads_nothing_imports_no_torch(warm, tmp_path):
    code = ("import sys; from vlcp.cli.main import main\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    args = ["--cache-dir", str(warm), "-q", "distill", *FAST, "--ipc", "3", "--out", str(tmp_path / "o")]
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("NO-TORCH")
    for name, s in stages(tmp_path / "o").items():
        if name != "output":
            assert s["cached"] and s["items_computed"] == 0 and not s["model_loaded"], name
    assert len(list((tmp_path / "o").rglob("0*.png"))) == 30


def test_ipc_change_reuses_captions_and_latents(vlcp, warm, tmp_path):
    r = vlcp("distill", *FAST, "--ipc", "2", "--out", tmp_path / "o", cache=warm)
    assert r.exit_code == 0, r.output
    s = stages(tmp_path / "o")
    for name in ("images", "captions", "latents"):
        assert s[name]["cached"] and not s[name]["model_loaded"], name
    for name in ("outliers", "clusters", "text_prototypes"):
        assert not s[name]["cached"], name
    assert s["synthesis"]["items_computed"] == 20


def test_seed_and_contamination_changes_start_at_their_stage(vlcp, warm, tmp_path):
    vlcp("distill", *FAST, "--ipc", "3", "--seed", "5", "--out", tmp_path / "a", cache=warm)
    s = stages(tmp_path / "a")
    assert s["outliers"]["cached"] and not s["clusters"]["cached"] and s["latents"]["cached"]
    vlcp("distill", *FAST, "--ipc", "3", "--contamination", "0.2", "--out", tmp_path / "b", cache=warm)
    s = stages(tmp_path / "b")
    assert s["latents"]["cached"] and not s["outliers"]["cached"] and not s["clusters"]["cached"]


def test_beta_change_recomputes_only_text_prototypes_and_changed_images(vlcp, warm, cold, tmp_path):
    r = vlcp("distill", *FAST, "--ipc", "3", "--beta", "0.05", "--top-k", "3", "--out", tmp_path / "o", cache=warm)
    assert r.exit_code == 0, r.output
    s = stages(tmp_path / "o")
    for name in ("images", "captions", "latents", "outliers", "clusters"):
        assert s[name]["cached"], name
    assert not s["text_prototypes"]["cached"]
    before = json.loads((cold / "out" / "prototypes.json").read_text())["classes"]
    after = json.loads((tmp_path / "o" / "prototypes.json").read_text())["classes"]
    changed = sum(a["caption"] != b["caption"] for f in before
                  for a, b in zip(before[f]["clusters"], after[f]["clusters"]))
    assert changed > 0  # the prompts really changed, so those images must be regenerated
    assert s["synthesis"]["items_computed"] == changed and s["synthesis"]["items_cached"] == 30 - changed


def test_strength_change_recomputes_only_synthesis(vlcp, warm, tmp_path):
    vlcp("distill", *FAST, "--ipc", "3", "--strength", "0.5", "--out", tmp_path / "o", cache=warm)
    s = stages(tmp_path / "o")
    for name in ("images", "captions", "latents", "outliers", "clusters", "text_prototypes", "prompts"):
        assert s[name]["cached"] and not s[name]["model_loaded"], name
    assert s["synthesis"]["items_computed"] == 30 and s["synthesis"]["model_loaded"]


def test_dry_run_plans_without_loading_or_writing(vlcp, warm, tmp_path):
    r = vlcp("distill", *FAST, "--ipc", "3", "--guidance-scale", "3", "--dry-run", "--out", tmp_path / "o", cache=warm)
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "o").exists()
    line = next(ln for ln in r.output.splitlines() if ln.startswith("synthesis"))
    assert "would compute" in line and " 30 " in line
    assert "captions         hit" in r.output
    r = vlcp("distill", "--data", "digits", "--tiny", "--ipc", "3", "--dry-run", "--out", tmp_path / "o")
    lines = r.output.splitlines()
    for name in ("images", "captions", "latents"):  # independent per-image stages are all planned
        assert any(ln.split()[:4] == [name, "would", "compute", "1438"] for ln in lines), name
    assert "later stages: not planned, they depend on what latents computes" in r.output


def test_until_stops_and_a_later_run_resumes(vlcp, tmp_path):
    r = vlcp("distill", "--data", "digits", "--tiny", "--max-per-class", "20", "--ipc", "2", "--until", "latents",
             "--out", tmp_path / "a")
    assert r.exit_code == 0, r.output
    assert list(stages(tmp_path / "a")) == ["images", "captions", "latents"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["manifest.json", "report.html"]
    r = vlcp("distill", "--data", "digits", "--tiny", "--max-per-class", "20", "--ipc", "2", "--steps", "2",
             "--no-finetune", "--out", tmp_path / "b")
    s = stages(tmp_path / "b")
    assert s["captions"]["cached"] and s["latents"]["cached"] and s["synthesis"]["items_computed"] == 20


@pytest.mark.parametrize("args, hint", [
    (["--ipc", "0"], "--ipc"), (["--ipc", "-2"], "--ipc"), (["--beta", "0"], "--beta"), (["--beta", "1.5"], "--beta"),
    (["--top-k", "0"], "--top-k"), (["--strength", "0"], "--strength"), (["--strength", "1.2"], "--strength"),
    (["--contamination", "0.7"], "--contamination")])
def test_bad_parameters_are_usage_errors(vlcp, tmp_path, args, hint):
    base = {"--ipc": "2"}
    base.update(dict(zip(args[::2], args[1::2])))
    r = vlcp("distill", "--data", "digits", "--tiny", *[x for kv in base.items() for x in kv], "--out", tmp_path / "o")
    assert r.exit_code == 2 and hint in r.output and "Traceback" not in r.output


def test_out_checks(vlcp, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = vlcp("distill", "--data", "digits", "--tiny", "--ipc", "1", "--out", f)
    assert r.exit_code == 2 and "is a file" in r.output
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    r = vlcp("distill", "--data", "digits", "--tiny", "--ipc", "1", "--out", tmp_path / "full")
    assert r.exit_code == 2 and "--force" in r.output and (tmp_path / "full" / "keep.txt").exists()


def test_unknown_dataset_is_one_line_error(vlcp, tmp_path):
    r = vlcp("distill", "--data", "imagenett", "--ipc", "1", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "unknown dataset 'imagenett'" in r.output  # a bad value: the usage exit code
    assert "Traceback" not in r.output


def test_class_with_fewer_images_than_ipc(vlcp, tmp_path):
    args = ["distill", "--data", "digits", "--tiny", "--max-per-class", "2", "--contamination", "0", "--ipc", "3",
            "--no-finetune"]
    r = vlcp(*args, "--out", tmp_path / "o")
    assert r.exit_code == 1 and ("class '0' (handwritten digit 0) has 2 usable images (--max-per-class), fewer than "
                                 "--ipc 3; raise --max-per-class 2, lower --ipc or pass --allow-duplicates") in r.output
    assert "captions:" not in r.output  # said after the images are read, before the captions (hours on real data)
    r = vlcp(*args, "--dry-run", "--out", tmp_path / "o")  # the plan says it too
    assert r.exit_code == 1 and "has 2 usable images (--max-per-class), fewer than --ipc 3" in r.output
    r = vlcp(*args, "--until", "latents", "--out", tmp_path / "o")  # no clusters: no IPC to fill
    assert r.exit_code == 0, r.output
    r = vlcp(*args, "--allow-duplicates", "--steps", "2", "--out", tmp_path / "o", "--force")
    assert r.exit_code == 0, r.output
    m = read_manifest(tmp_path / "o")
    assert len(list((tmp_path / "o" / "train" / "0").glob("*.png"))) == 3 and any("repeat" in w for w in m["warnings"])


def test_empty_caption_is_a_clear_error_and_keeps_the_cache_consistent(vlcp, tmp_path, monkeypatch):
    real = captions_mod.caption_images
    monkeypatch.setattr(captions_mod, "caption_images", lambda m, p, imgs, *a: [""] * len(imgs))
    args = ["distill", "--data", "digits", "--tiny", "--max-per-class", "3", "--ipc", "1", "--until", "captions"]
    r = vlcp(*args, "--out", tmp_path / "o")
    assert r.exit_code == 1 and "returned empty text for digits/train/" in r.output
    monkeypatch.setattr(captions_mod, "caption_images", real)
    r = vlcp(*args, "--out", tmp_path / "o")
    assert r.exit_code == 0 and stages(tmp_path / "o")["captions"]["items_computed"] == 30


def test_interrupted_output_keeps_the_previous_dataset(vlcp, warm, cold, tmp_path, monkeypatch):
    out = tmp_path / "o"
    shutil.copytree(cold / "out", out)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(output_mod, "save_images", boom)
    r = vlcp("distill", *FAST, "--ipc", "3", "--force", "--out", out, cache=warm)
    assert r.exit_code == 130 and "Aborted" in r.output  # Ctrl-C: a clean abort, the shell's code for SIGINT
    assert len(list(out.rglob("0*.png"))) == 30 and read_manifest(out)["parameters"]["ipc"] == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    monkeypatch.undo()
    r = vlcp("distill", *FAST, "--ipc", "2", "--force", "--out", out, cache=warm)
    assert r.exit_code == 0 and len(list(out.rglob("0*.png"))) == 20


def test_image_folder_with_corrupt_files(vlcp, tmp_path):
    from tests.test_datasets import make_awkward_folder

    folder = make_awkward_folder(tmp_path / "folder")
    r = vlcp("distill", "--data", folder, "--tiny", "--ipc", "2", "--steps", "2", "--finetune-max-steps", "2",
             "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    m = read_manifest(tmp_path / "o")
    assert sorted(s["source"].rsplit("/", 1)[-1] for s in m["skipped_images"]) == [
        "corrupt.jpg", "empty.png", "truncated.jpg"]
    assert m["images_per_class"] == {"n01440764": 8, "n02102040": 3}
    assert "skipped 3 unreadable image(s)" in r.output
    assert sorted(p.name for p in (tmp_path / "o" / "train").iterdir() if p.is_dir()) == ["n01440764", "n02102040"]
    # the stored warning and errors name the file under the dataset folder, never the user's folders (PIL's own
    # message quotes the absolute path; publish hides only whole-path values)
    assert m["warnings"] == ["skipped 3 unreadable image(s) in the dataset folder, e.g. n01440764/corrupt.jpg: "
                             "cannot identify image file 'corrupt.jpg'"]
    assert sorted(s["error"] for s in m["skipped_images"]) == [
        "corrupt.jpg: cannot identify image file 'corrupt.jpg'", "empty.png: cannot identify image file 'empty.png'",
        "truncated.jpg: Truncated File Read"]
    assert str(tmp_path) not in (tmp_path / "o" / "report.html").read_text()
