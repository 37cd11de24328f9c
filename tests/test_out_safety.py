"""An output folder never takes with it what it should not: the current folder, the cache, the data folder, or a
folder vlcp did not write, even with --force; a read-only place is one line before any work; a mount point (a
container's VOLUME) is filled in place; a disk error while writing is one line with exit code 1."""
from __future__ import annotations

import errno
import os
from pathlib import Path

from tests.conftest import read_manifest

RUN = ["distill", "--data", "digits", "--tiny", "--classes", "0,1", "--max-per-class", "2", "--ipc", "1",
       "--until", "images"]


def _one_line_error(r, code: int) -> str:
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output
    return r.output.strip().splitlines()[-1]


def test_out_that_is_the_current_folder_is_refused(vlcp, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "train.py").write_text("my code\n")
    monkeypatch.chdir(work)
    for args in (["--out", "."], ["--out", ".", "--force"], ["--out", str(tmp_path), "--force"]):
        line = _one_line_error(vlcp(*RUN, *args), 2)
        assert "is or contains the current folder" in line and "write the output to a folder of its own" in line
    assert (work / "train.py").read_text() == "my code\n"


def test_out_that_contains_the_cache_is_refused_even_with_force(vlcp, tmp_path):
    out = tmp_path / "out"
    assert vlcp(*RUN, "--out", out).exit_code == 0  # a folder vlcp wrote: --force may replace it ...
    cache = out / "cache"
    line = _one_line_error(vlcp(*RUN, "--out", out, "--force", cache=cache), 2)
    assert line == (f"Error: --out {out} is or contains the cache folder (--cache-dir) ({cache}): write the output "
                    f"to a folder of its own")  # ... but not with the cache inside it
    assert (out / "manifest.json").is_file()


def test_force_replaces_only_a_folder_vlcp_wrote(vlcp, tmp_path):
    mine = tmp_path / "results"
    mine.mkdir()
    (mine / "thesis.tex").write_text("months of work\n")
    for force in ([], ["--force"]):
        line = _one_line_error(vlcp(*RUN, "--out", mine, *force), 2)
        assert line == (f"Error: --out {mine} is not empty and holds no output of vlcp (no manifest.json): not "
                        f"replaced, even with --force; empty it or choose another folder")
    assert (mine / "thesis.tex").read_text() == "months of work\n"
    out = tmp_path / "out"
    assert vlcp(*RUN, "--out", out).exit_code == 0
    line = _one_line_error(vlcp(*RUN, "--out", out), 2)
    assert line == f"Error: --out {out} is not empty; pass --force to replace it"
    assert vlcp(*RUN, "--out", out, "--force").exit_code == 0


def test_a_folder_that_cannot_be_written_is_one_line_before_any_work(vlcp, tmp_path, monkeypatch):
    from vlcp.store import files

    ro = tmp_path / "ro"
    ro.mkdir()
    real = files.new_file

    def read_only(folder, prefix, suffix=""):
        if Path(folder).resolve() == ro.resolve():
            raise OSError(errno.EROFS, "Read-only file system", str(Path(folder) / prefix))
        return real(folder, prefix, suffix)

    monkeypatch.setattr(files, "new_file", read_only)
    line = _one_line_error(vlcp(*RUN, "--out", ro / "sub" / "set"), 2)
    assert line == f"Error: --out {ro / 'sub' / 'set'} cannot be written: {ro} is not writable (Read-only file system)"
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.npy"))  # no stage ran


def test_a_mount_point_is_filled_in_place(vlcp, tmp_path, monkeypatch):
    """A container's ``VOLUME /out`` cannot be renamed (EBUSY): the new content is swapped inside it."""
    vol = tmp_path / "vol"
    vol.mkdir()
    inode = vol.stat().st_ino
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p).resolve() == vol.resolve() or real(p))
    assert vlcp(*RUN, "--out", vol).exit_code == 0
    first = read_manifest(vol)
    assert vlcp(*RUN, "--out", vol, "--force", "--seed", "3").exit_code == 0
    assert vol.stat().st_ino == inode  # the same folder, never renamed
    assert read_manifest(vol)["parameters"]["seed"] == 3 != first["parameters"]["seed"]
    assert sorted(p.name for p in vol.iterdir() if p.name.startswith(".")) == []  # no hidden leftovers


def test_a_disk_error_while_writing_is_one_line_with_exit_code_1(vlcp, tmp_path, monkeypatch):
    from vlcp.store import output

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out/manifest.json")

    monkeypatch.setattr(output, "write_json", full)
    monkeypatch.setattr(output, "json_text", full)
    r = vlcp(*RUN, "--out", tmp_path / "out")
    assert _one_line_error(r, 1) == "Error: /data/out/manifest.json: No space left on device (errno 28)"
    assert not (tmp_path / "out").exists()


def test_force_is_not_taken_from_a_config_file(vlcp, tmp_path):
    cfg = tmp_path / "shared.yaml"
    cfg.write_text("ipc: 1\nforce: true\n")
    r = vlcp("distill", "--config", cfg, "--data", "digits", "--tiny", "--out", tmp_path / "out")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert f"{cfg}: 'force' is not taken from a file; pass --force on the command line" in r.output


def test_a_dry_run_says_the_real_run_would_stop_at_its_out(vlcp, tmp_path):
    out = tmp_path / "out"
    assert vlcp(*RUN, "--out", out).exit_code == 0
    r = vlcp(*RUN, "--dry-run", "--out", out)
    assert r.exit_code == 0 and "stage" in r.output  # the plan is printed ...
    assert r.output.strip().splitlines()[-1] == (f"the real run would stop before any work: --out {out} is not "
                                                 f"empty; pass --force to replace it")  # ... and what would stop it
    r = vlcp(*RUN, "--dry-run", "--force", "--out", out)
    assert "would stop" not in r.output


def test_a_manifest_json_of_another_tool_is_not_vlcps(vlcp, tmp_path):
    app = tmp_path / "webapp"
    (app / "src").mkdir(parents=True)
    (app / "manifest.json").write_text('{"name": "my-pwa"}')
    (app / "src" / "app.js").write_text("code\n")
    line = _one_line_error(vlcp(*RUN, "--out", app, "--force"), 2)
    assert "holds no output of vlcp (no manifest.json)" in line and (app / "src" / "app.js").is_file()


def test_refine_detection_only_can_be_rerun_into_its_own_folder(vlcp, tmp_path):
    from PIL import Image

    foreign = tmp_path / "foreign"
    for c in ("0", "1"):
        (foreign / c).mkdir(parents=True)
        Image.new("RGB", (8, 8), (int(c) * 200, 0, 0)).save(foreign / c / "a.png")
    args = ["refine", foreign, "--data", "digits", "--detector-epochs", "1", "--out", tmp_path / "r"]
    assert vlcp(*args).exit_code == 0
    assert (tmp_path / "r" / "report.json").is_file()
    r = vlcp(*args, "--force")
    assert r.exit_code == 0, r.output


def _mount(monkeypatch, vol: Path) -> None:
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p).resolve() == vol.resolve() or real(p))


def test_a_mount_point_swap_cut_short_puts_everything_back(tmp_path, monkeypatch):
    from vlcp.store import output

    vol = tmp_path / "vol"
    (vol / "train" / "a").mkdir(parents=True)
    (vol / "train" / "a" / "0.png").write_bytes(b"old image")
    (vol / "manifest.json").write_text('{"vlcp_version": "old"}')
    (vol / "lost+found").mkdir()
    _mount(monkeypatch, vol)
    real, calls = Path.rename, []

    def rename(self, target):
        calls.append(self.name)
        if len(calls) == 3:  # both old entries moved aside, the first new one about to go in: Ctrl-C
            raise KeyboardInterrupt
        return real(self, target)

    def build(tmp):
        (tmp / "train").mkdir()
        (tmp / "train" / "new.png").write_bytes(b"new image")
        (tmp / "manifest.json").write_text('{"vlcp_version": "new"}')

    monkeypatch.setattr(Path, "rename", rename)
    try:
        output.publish(vol, build)
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("the swap was not interrupted")
    monkeypatch.setattr(Path, "rename", real)
    assert calls[:2] == ["manifest.json", "train"]  # the old manifest goes first
    assert sorted(p.name for p in vol.iterdir()) == ["lost+found", "manifest.json", "train"]  # nothing hidden left
    assert (vol / "manifest.json").read_text() == '{"vlcp_version": "old"}'
    assert (vol / "train" / "a" / "0.png").read_bytes() == b"old image"
    output.publish(vol, build)  # uninterrupted: the new set, the manifest moved in last, lost+found left alone
    assert sorted(p.name for p in vol.iterdir()) == ["lost+found", "manifest.json", "train"]
    assert (vol / "manifest.json").read_text() == '{"vlcp_version": "new"}' and (vol / "train" / "new.png").is_file()


def test_a_fresh_volume_with_only_lost_and_found_is_empty(vlcp, tmp_path, monkeypatch):
    vol = tmp_path / "vol"
    (vol / "lost+found").mkdir(parents=True)
    _mount(monkeypatch, vol)
    assert vlcp(*RUN, "--out", vol).exit_code == 0
    assert (vol / "manifest.json").is_file() and (vol / "lost+found").is_dir()


def test_a_bind_mount_that_ismount_misses_is_filled_in_place_when_its_rename_is_refused(vlcp, tmp_path, monkeypatch):
    """A bind mount inside one filesystem looks like a plain folder, but renaming it fails with EBUSY."""
    vol = tmp_path / "vol"
    assert vlcp(*RUN, "--out", vol).exit_code == 0
    inode, real = vol.stat().st_ino, Path.rename

    def busy(self, target):
        if Path(self).resolve() == vol.resolve():
            raise OSError(errno.EBUSY, "Device or resource busy", str(self))
        return real(self, target)

    monkeypatch.setattr(Path, "rename", busy)
    r = vlcp(*RUN, "--out", vol, "--force", "--seed", "5")
    assert r.exit_code == 0, r.output
    assert vol.stat().st_ino == inode and read_manifest(vol)["parameters"]["seed"] == 5
    assert not [p.name for p in vol.iterdir() if p.name.startswith(".")]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".vol")]  # the sibling build folder is gone
