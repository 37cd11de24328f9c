"""Shared fixtures: tiny models built once per session, fresh caches that reuse them, a CLI runner."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from vlcp.cli.main import cli
from vlcp.cli.threads import calm_threads

calm_threads()  # commands run in-process here: the waits `vlcp` sets, before anything imports torch
if os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") != "1":
    # several workers (the README's `-n auto`) already fill the cores: one torch thread each (the subprocesses
    # they start inherit it), so no worker's threads wait on cores another holds. Set before torch loads.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory) -> Path:
    from vlcp.models.tiny import tiny_models

    d = tmp_path_factory.mktemp("tiny") / "models"
    tiny_models(d)
    return d


@pytest.fixture
def cache_dir(tmp_path, tiny_models_dir) -> Path:
    """An empty stage cache that already holds the tiny models (built once, copied: milliseconds)."""
    d = tmp_path / "cache"
    shutil.copytree(tiny_models_dir, d / "models")
    return d


@pytest.fixture(scope="session")
def clipseg_dir(tmp_path_factory) -> Path:
    """The tiny CLIPSeg (object masks), built once per session."""
    from vlcp.models import segment

    return segment.tiny_clipseg(tmp_path_factory.mktemp("clipseg") / "models")


@pytest.fixture
def seg_cache(cache_dir, clipseg_dir) -> Path:
    """The test cache with the tiny CLIPSeg already built (copied, not rebuilt)."""
    from vlcp.models import segment

    shutil.copytree(clipseg_dir, cache_dir / "models" / segment.TINY_CLIPSEG)
    return cache_dir


@pytest.fixture
def vlcp(cache_dir, tmp_path):
    """Run the CLI in-process: vlcp("distill", ...) -> click Result (exit code, output)."""
    runner = CliRunner()

    def run(*args, cache=None):
        base = ["--cache-dir", str(cache or cache_dir), "--data-dir", str(tmp_path / "data")]
        return runner.invoke(cli, base + [str(a) for a in args], catch_exceptions=False)

    return run


def read_manifest(out: Path) -> dict:
    return json.loads((Path(out) / "manifest.json").read_text())


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: runs the CLI end to end (left out of the mutation run, see setup.cfg)")


# The longest files first (measured: docs/measurements.md#test-suite), so that with `-n auto --dist loadfile`
# (the README's test command) no long file starts last and leaves one worker running alone at the end.
SLOW_FIRST = ("test_readme_claims.py", "test_invalidation.py", "test_ddp.py", "test_parallel.py", "test_finetune.py",
              "test_caption_fusion.py", "test_distill.py", "test_matching.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: file order otherwise kept


def cli_in(base: Path, tiny_models: Path):
    """For a module-scoped run: ``base/cache`` holding the tiny models, and ``vlcp(*args, cache=None)``, the CLI
    in-process on that cache (or ``cache``) with ``base/data`` as its data folder."""
    shutil.copytree(tiny_models, base / "cache" / "models")
    runner = CliRunner()

    def vlcp(*args, cache=None):
        pre = ["--cache-dir", str(cache or base / "cache"), "--data-dir", str(base / "data")]
        return runner.invoke(cli, pre + [str(a) for a in args], catch_exceptions=False)

    return vlcp


def killed_at(monkeypatch, module, name: str, index: int) -> None:
    """``module.name`` (a per-micro-batch function whose first argument after the state, or first argument, is the
    micro-batch index m, as ``finetune._micro_step`` and ``micro_batch._batch``) raising KeyboardInterrupt at
    m == ``index``: a training killed there, as Ctrl-C would. ``monkeypatch.undo()`` or a fresh setattr restores it."""
    real = getattr(module, name)
    at = 4 if name == "_micro_step" else 0  # _micro_step(s, latents, captions, p, m, weight); _batch(step, ...)

    def dies(*a):
        if a[at] == index:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(module, name, dies)
