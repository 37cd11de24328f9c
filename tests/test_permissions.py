"""Everything vlcp publishes gets the modes the umask gives (issue 26): OUT and its files, OUT/evaluations,
a captions export, the cache's blobs. tempfile's 0600 files and 0700 folders kept their modes after the
rename, so a shared OUT could not be read by anyone else, whatever the umask."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from vlcp.store.files import new_dir, new_file
from vlcp.store.output import publish

ARGS = ["--data", "digits", "--tiny", "--classes", "0,1", "--max-per-class", "6", "--ipc", "1", "--steps", "2",
        "--no-finetune"]


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def modes(root: Path) -> dict[str, str]:
    """Every folder and file under ``root`` (``root`` too) -> its permission bits, in octal."""
    found = {".": oct(stat.S_IMODE(root.stat().st_mode))}
    for p in root.rglob("*"):
        found[str(p.relative_to(root))] = oct(stat.S_IMODE(p.stat().st_mode))
    return found


def expected(root: Path, mask: int) -> dict[str, str]:
    return {k: oct((0o777 if (root / k).is_dir() else 0o666) & ~mask) for k in modes(root)}


def test_the_helpers_follow_the_umask(tmp_path, umask):
    fd, path = new_file(tmp_path, ".tmp-", ".bin")
    os.close(fd)
    assert Path(path).name.startswith(".tmp-") and path.endswith(".bin")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask
    d = new_dir(tmp_path, ".x-")
    assert d.name.startswith(".x-") and stat.S_IMODE(d.stat().st_mode) == 0o777 & ~umask
    publish(tmp_path / "out", lambda tmp: (tmp / "a.txt").write_text("a"))
    assert modes(tmp_path / "out") == {".": oct(0o777 & ~umask), "a.txt": oct(0o666 & ~umask)}


def test_distill_evaluate_and_export_follow_the_umask(vlcp, cache_dir, tmp_path, umask):
    out = tmp_path / "shared" / "out"
    r = vlcp("distill", *ARGS, "--out", out)
    assert r.exit_code == 0, r.output
    assert {"manifest.json", "prototypes.json", "report.html", "preview.png"} <= {p.name for p in out.iterdir()}
    r = vlcp("evaluate", out, "--data", "digits", "--seeds", "1", "--epochs", "1")
    assert r.exit_code == 0, r.output
    assert list((out / "evaluations").glob("*.json"))
    assert modes(out) == expected(out, umask)
    export = tmp_path / "captions.jsonl"
    r = vlcp("captions", "export", "--data", "digits", "--tiny", "--classes", "0,1", "--max-per-class", "6",
             "--out", export)
    assert r.exit_code == 0, r.output
    assert oct(stat.S_IMODE(export.stat().st_mode)) == oct(0o666 & ~umask)
    blobs = cache_dir / "blobs"
    assert any(p.is_file() for p in blobs.rglob("*"))
    assert modes(blobs) == expected(blobs, umask)
