"""Every row of the invalidation table against a real run on a warm tiny cache (issue: tests that fail)."""
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import read_manifest
from tests.invalidation import BASE, TABLE, markdown
from vlcp.cli.main import cli


def _run(cache: Path, out: Path, args: list[str]) -> dict:
    res = CliRunner().invoke(cli, ["--cache-dir", str(cache), "-q", "distill", *BASE, *args, "--out", str(out)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return read_manifest(out)


def _recomputed(manifest: dict) -> list[str]:
    return [s for s, r in manifest["stages"].items() if s != "output" and r["items_computed"] > 0]


@pytest.fixture(scope="module")
def base_cache(tmp_path_factory, tiny_models_dir):
    root = tmp_path_factory.mktemp("inv")
    shutil.copytree(tiny_models_dir, root / "cache" / "models")
    m = _run(root / "cache", root / "out", [])
    assert _recomputed(m) == [s for s in m["stages"] if s != "output"]  # cold: everything computes
    assert len(m["refinement"]["replacements"]) > 0  # so the refinement rows below exercise candidates
    return root / "cache"


def test_identical_rerun_recomputes_nothing(base_cache, tmp_path):
    shutil.copytree(base_cache, tmp_path / "c")
    assert _recomputed(_run(tmp_path / "c", tmp_path / "o", [])) == []


@pytest.mark.parametrize("args, expected, why", TABLE, ids=[" ".join(a) for a, _, _ in TABLE])
def test_one_parameter_recomputes_exactly_its_stages(base_cache, tmp_path, args, expected, why):
    shutil.copytree(base_cache, tmp_path / "c")
    assert _recomputed(_run(tmp_path / "c", tmp_path / "o", args)) == expected


def test_the_docs_print_the_table():
    page = (Path(__file__).parent.parent / "docs" / "stages.md").read_text()
    assert markdown() in page
